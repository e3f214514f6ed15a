//! `/spells`: list, read, define, delete and run spells (Kiln's own API). A team sees
//! Kiln's library, the operator's spell files and its own; it changes only its own.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_api::spell::{Spell, SpellRun, SpellRunRequest};

use crate::authz::Caller;
use crate::endpoint::{Access::Member, Endpoint};
use crate::error::AppError;
use crate::extract::Body;
use crate::spells::SpellError;
use crate::state::AppState;

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(
            Method::GET,
            "/spells",
            Member,
            "List the spells the caller's team can run",
            list,
        ),
        Endpoint::new(
            Method::POST,
            "/spells",
            Member,
            "Define one of the team's own spells (409 if it has one of that name)",
            create,
        ),
        Endpoint::new(Method::GET, "/spells/{name}", Member, "Read a spell", get),
        Endpoint::new(
            Method::PUT,
            "/spells/{name}",
            Member,
            "Define or replace one of the team's own spells",
            put,
        ),
        Endpoint::new(
            Method::DELETE,
            "/spells/{name}",
            Member,
            "Delete one of the team's own spells",
            delete,
        ),
        Endpoint::new(
            Method::POST,
            "/spells/{name}/runs",
            Member,
            "Run a spell in a fresh sandbox and answer its result",
            run,
        ),
    ]
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Spell>>, AppError> {
    Ok(Json(state.spells.list(&caller)?))
}

async fn get(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Spell>, AppError> {
    Ok(Json(state.spells.get(&caller, &name)?))
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(spell): Body<Spell>,
) -> Result<Response, AppError> {
    let taken = state
        .spells
        .get(&caller, &spell.name)
        .is_ok_and(|s| s.source == Some(kiln_api::spell::SpellSource::Team));
    if taken {
        return Err(AppError::Conflict(format!(
            "your team already has a spell {:?}; PUT /spells/{} replaces it",
            spell.name, spell.name
        )));
    }
    let name = spell.name.clone();
    let spell = state.spells.put(&caller, &name, spell)?;
    Ok((StatusCode::CREATED, Json(spell)).into_response())
}

async fn put(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Body(spell): Body<Spell>,
) -> Result<Json<Spell>, AppError> {
    Ok(Json(state.spells.put(&caller, &name, spell)?))
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    state.spells.delete(&caller, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn run(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<SpellRunRequest>,
) -> Result<Json<SpellRun>, AppError> {
    let spell = state.spells.get(&caller, &name)?;
    let limits = state.spells.limits();
    let manager = state.manager.clone();
    // Run to the end in a task of its own: a client that goes away does not leave the
    // spell's sandbox behind.
    let ran = tokio::spawn(crate::audit::scoped(crate::audit::current(), async move {
        crate::spells::run::run(&manager, limits, caller, &spell, req.args, None).await
    }))
    .await
    .map_err(|e| AppError::internal("the spell's task failed", e))?;
    Ok(Json(ran.map_err(|e: SpellError| AppError::from(e))?))
}
