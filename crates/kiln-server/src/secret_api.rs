//! `/secrets`: E2B's secrets API (`e2b.Secret`). A team's secrets are its own; another
//! team's answer as missing ones. Values go in and never come out: every answer is
//! the secret's metadata, and a body that does not parse gets an error that quotes
//! none of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use kiln_api::NEXT_TOKEN_HEADER;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::authz::Caller;
use crate::endpoint::{Access::Member, Endpoint};
use crate::error::AppError;
use crate::extract::QueryParams;
use crate::secrets::{SecretInfo, SecretValue};
use crate::state::AppState;

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(
            Method::POST,
            "/secrets",
            Member,
            "Create a secret of the caller's team at version 1 (409 if it has one of that name)",
            create,
        ),
        Endpoint::new(
            Method::GET,
            "/secrets",
            Member,
            "List the team's secrets by name, paged (limit, nextToken; x-next-token)",
            list,
        ),
        Endpoint::new(
            Method::GET,
            "/secrets/{secretID}",
            Member,
            "Read a secret's metadata, by id (sec_…) or name",
            get,
        ),
        Endpoint::new(
            Method::POST,
            "/secrets/{secretID}",
            Member,
            "Store a new value as the secret's next version",
            update,
        ),
        Endpoint::new(
            Method::DELETE,
            "/secrets/{secretID}",
            Member,
            "Delete a secret and its value",
            delete,
        ),
    ]
}

/// `Secret` of E2B's API: everything but the value.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Secret {
    #[serde(rename = "secretID")]
    secret_id: String,
    name: String,
    current_version: i64,
    metadata: BTreeMap<String, String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<SecretInfo> for Secret {
    fn from(s: SecretInfo) -> Self {
        Secret {
            secret_id: s.id,
            name: s.name,
            current_version: s.version,
            metadata: s.metadata,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// `NewSecret`.
#[derive(Debug, Deserialize)]
struct NewSecret {
    name: String,
    value: SecretValue,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// `SecretUpdate`.
#[derive(Debug, Deserialize)]
struct SecretUpdate {
    value: SecretValue,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    limit: Option<usize>,
    next_token: Option<String>,
}

/// A JSON body whose rejection never quotes it: serde's "invalid type: integer `5`"
/// would show a value sent as a number.
struct SecretBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for SecretBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| AppError::BadRequest(format!("unreadable request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(SecretBody)
            .map_err(|e| AppError::BadRequest(body_error(&e)))
    }
}

fn body_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => "is not JSON".to_string(),
        // "missing field `value`" quotes nothing sent.
        Category::Data if e.to_string().starts_with("missing field") => {
            let message = e.to_string();
            let field = message.split(" at line").next().unwrap_or(&message);
            format!("lacks a field ({field})")
        }
        Category::Data => "has a field of the wrong type".to_string(),
    };
    format!(
        "invalid request body: it {what} at line {} column {}; send a JSON object with \
         \"value\" (a string), \"name\" (a string; to create only) and, optionally, \
         \"metadata\" (an object of strings)",
        e.line(),
        e.column()
    )
}

fn audit(state: &AppState, caller: &Caller, event: &'static str, name: &str) {
    state.manager.audit().record(
        crate::audit::Event::new(event, true)
            .user(caller.team_id, caller.key_id)
            .subject(format!("secret:{name}")),
    );
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    SecretBody(req): SecretBody<NewSecret>,
) -> Result<Response, AppError> {
    let info = state
        .secrets
        .create(caller.team_id, &req.name, &req.value, req.metadata)?;
    audit(&state, &caller, "secret.created", &info.name);
    Ok((StatusCode::CREATED, Json(Secret::from(info))).into_response())
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Response, AppError> {
    let page = state
        .secrets
        .list(caller.team_id, q.limit, q.next_token.as_deref())?;
    let items: Vec<Secret> = page.items.into_iter().map(Secret::from).collect();
    let mut resp = Json(items).into_response();
    if let Some(token) = page.next_token {
        if let Ok(v) = HeaderValue::from_str(&token) {
            resp.headers_mut().insert(NEXT_TOKEN_HEADER, v);
        }
    }
    Ok(resp)
}

async fn get(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Secret>, AppError> {
    Ok(Json(state.secrets.get(caller.team_id, &id)?.into()))
}

async fn update(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    SecretBody(req): SecretBody<SecretUpdate>,
) -> Result<Json<Secret>, AppError> {
    let info = state
        .secrets
        .update(caller.team_id, &id, &req.value, req.metadata)?;
    audit(&state, &caller, "secret.updated", &info.name);
    Ok(Json(info.into()))
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let info = state.secrets.delete(caller.team_id, &id)?;
    audit(&state, &caller, "secret.deleted", &info.name);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_quote_nothing_that_was_sent() {
        for (body, want) in [
            (r#"{"name": "n", "value": 424242}"#, "wrong type"),
            (r#"{"name": "n", "value": "424242""#, "not JSON"),
            (r#"{"name": "n"}"#, "missing field `value`"),
            (
                r#"{"name": "n", "value": "424242", "metadata": {"a": 1}}"#,
                "wrong type",
            ),
        ] {
            let err = serde_json::from_str::<NewSecret>(body).unwrap_err();
            let message = body_error(&err);
            assert!(message.contains(want), "{body}: {message}");
            assert!(!message.contains("424242"), "{body}: {message}");
        }
        let ok: NewSecret =
            serde_json::from_str(r#"{"name": "n", "value": "424242", "metadata": null}"#).unwrap();
        assert!(ok.metadata.is_none());
        assert!(!format!("{ok:?}").contains("424242"));
    }
}
