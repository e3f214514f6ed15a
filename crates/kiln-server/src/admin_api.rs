//! The operator's routes (admin keys only): teams, their quotas, and API keys. The
//! same operations as `kiln teams` and `kiln keys`, over HTTP.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::authz::Caller;
use crate::endpoint::{Access::Admin, Endpoint};
use crate::error::AppError;
use crate::extract::Body;
use crate::keys;
use crate::state::AppState;
use crate::store::{Quotas, StoreError, TeamRecord};

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(
            Method::GET,
            "/admin/teams",
            Admin,
            "List teams and their quotas",
            list_teams,
        ),
        Endpoint::new(
            Method::POST,
            "/admin/teams",
            Admin,
            "Create a team",
            create_team,
        ),
        Endpoint::new(
            Method::PATCH,
            "/admin/teams/{name}",
            Admin,
            "Change a team's quotas",
            set_quotas,
        ),
        Endpoint::new(
            Method::GET,
            "/admin/keys",
            Admin,
            "List API keys (never the secrets)",
            list_keys,
        ),
        Endpoint::new(
            Method::POST,
            "/admin/keys",
            Admin,
            "Create an API key in a team",
            create_key,
        ),
        Endpoint::new(
            Method::DELETE,
            "/admin/keys/{id}",
            Admin,
            "Revoke an API key",
            revoke_key,
        ),
    ]
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Team {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub quotas: Quotas,
}

impl From<TeamRecord> for Team {
    fn from(t: TeamRecord) -> Self {
        Team {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            quotas: t.quotas,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewTeam {
    name: String,
    #[serde(flatten)]
    quotas: Quotas,
}

/// Team names: what `kiln keys create --team` and URLs carry without quoting.
pub fn check_team_name(name: &str) -> Result<(), AppError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "invalid team name {name:?}: use 1 to 64 of a-z, 0-9, '-' and '_'"
        )))
    }
}

fn store_error(e: StoreError) -> AppError {
    match e {
        StoreError::Conflict(message) => AppError::Conflict(message),
        other => other.into(),
    }
}

async fn list_teams(State(state): State<Arc<AppState>>) -> Result<Json<Vec<Team>>, AppError> {
    let teams = state.store.list_teams()?;
    Ok(Json(teams.into_iter().map(Team::from).collect()))
}

async fn create_team(
    State(state): State<Arc<AppState>>,
    Body(req): Body<NewTeam>,
) -> Result<Response, AppError> {
    check_team_name(&req.name)?;
    let team = state
        .store
        .create_team(&req.name, req.quotas)
        .map_err(store_error)?;
    Ok((StatusCode::CREATED, Json(Team::from(team))).into_response())
}

fn find_team(state: &AppState, name: &str) -> Result<TeamRecord, AppError> {
    state
        .store
        .find_team(name)?
        .ok_or_else(|| AppError::NotFound(format!("team {name:?} not found")))
}

/// Replaces the team's quotas with the body's (an absent field: no quota).
async fn set_quotas(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(quotas): Body<Quotas>,
) -> Result<Json<Team>, AppError> {
    let team = find_team(&state, &name)?;
    state.store.set_quotas(team.id, quotas)?;
    Ok(Json(Team::from(find_team(&state, &name)?)))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyInfo {
    id: i64,
    name: String,
    prefix: String,
    team: String,
    admin: bool,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    /// The key itself: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

async fn list_keys(State(state): State<Arc<AppState>>) -> Result<Json<Vec<KeyInfo>>, AppError> {
    let teams = state.store.list_teams()?;
    let team_name = |id: i64| {
        teams
            .iter()
            .find(|t| t.id == id)
            .map_or_else(|| id.to_string(), |t| t.name.clone())
    };
    let keys = state.store.list_keys()?;
    Ok(Json(
        keys.into_iter()
            .map(|k| KeyInfo {
                id: k.id,
                team: team_name(k.team_id),
                name: k.name,
                prefix: k.prefix,
                admin: k.admin,
                created_at: k.created_at,
                revoked_at: k.revoked_at,
                key: None,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    /// The team's name; the default team when absent.
    team: Option<String>,
    #[serde(default)]
    admin: bool,
}

async fn create_key(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<NewKey>,
) -> Result<Response, AppError> {
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(AppError::BadRequest(
            "a key's name must be 1 to 128 characters".into(),
        ));
    }
    let team = find_team(
        &state,
        req.team.as_deref().unwrap_or(crate::store::DEFAULT_TEAM),
    )?;
    let key = keys::generate();
    let id = keys::register(state.store.as_ref(), &req.name, &key, req.admin, team.id)
        .map_err(|e| AppError::internal("registering the key failed", e))?;
    state.manager.audit().record(
        crate::audit::Event::new("key.created", true)
            .user(caller.team_id, caller.key_id)
            .subject(format!("key:{id}")),
    );
    let info = KeyInfo {
        id,
        name: req.name,
        prefix: keys::display_prefix(&key),
        team: team.name,
        admin: req.admin,
        created_at: Utc::now(),
        revoked_at: None,
        key: Some(key),
    };
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let id: i64 = id
        .parse()
        .map_err(|_| AppError::BadRequest(format!("key id must be a number, got {id:?}")))?;
    match state.store.revoke_key(&id.to_string())? {
        0 => Err(AppError::NotFound(format!("no active key with id {id}"))),
        _ => {
            state.manager.audit().record(
                crate::audit::Event::new("key.revoked", true)
                    .user(caller.team_id, caller.key_id)
                    .subject(format!("key:{id}")),
            );
            Ok(StatusCode::NO_CONTENT)
        }
    }
}
