//! Who may do what, decided in one place.
//!
//! Every API key belongs to a team. A team's keys see and change only what the team
//! owns; anything else answers 404, exactly as if it did not exist, so a stranger
//! cannot even learn that a sandbox id or template name is in use. Built-in templates
//! belong to no team: every team may start sandboxes from them, only admins change
//! them. Admin keys (the operator's) manage teams and keys and see everything.
//!
//! Each endpoint declares its [`Access`] where it is routed ([`crate::api::endpoints`]);
//! the router applies the matching middleware, so no handler can forget it, and a test
//! walks the same list to attack every route.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use kiln_api::API_KEY_HEADER;

use crate::app::AppState;
use crate::error::AppError;
use crate::keys;

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No API key (health, and upload links whose token is the credential).
    Public,
    /// Any team's key; the handler scopes what it touches to the caller's team.
    Member,
    /// Admin keys only; a member key gets 403.
    Admin,
}

/// The authenticated caller, put in the request by [`authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub key_id: i64,
    pub team_id: i64,
    pub admin: bool,
}

impl Caller {
    /// The server acting on its own behalf (deadlines, shutdown, recovery).
    pub const OPERATOR: Caller = Caller {
        key_id: 0,
        team_id: 0,
        admin: true,
    };

    /// Whether a resource of `team_id` exists for this caller.
    pub fn sees(&self, team_id: i64) -> bool {
        self.admin || self.team_id == team_id
    }

    /// Whether this caller may start sandboxes from (and read) a template owned by
    /// `owner` (`None`: a built-in, everyone's).
    pub fn sees_template(&self, owner: Option<i64>) -> bool {
        owner.is_none_or(|team| self.sees(team))
    }

    /// Whether this caller may rebuild, tag or delete a template owned by `owner`.
    pub fn may_change_template(&self, owner: Option<i64>) -> bool {
        match owner {
            None => self.admin,
            Some(team) => self.sees(team),
        }
    }
}

/// Middleware of [`Access::Member`] endpoints: a live key, or 401.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let caller = caller_of(&state, &req)?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Middleware of [`Access::Admin`] endpoints: a live admin key, 401 without a key,
/// 403 with a member's.
pub async fn authenticate_admin(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let caller = caller_of(&state, &req)?;
    if !caller.admin {
        return Err(AppError::Forbidden(
            "this route is for admin keys only (`kiln keys create --admin`)".into(),
        ));
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

fn caller_of(state: &AppState, req: &Request) -> Result<Caller, AppError> {
    let key = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError::Unauthorized("missing X-API-KEY header".into()))?;
    let record = state
        .store
        .find_key(&keys::hash(key))?
        .ok_or_else(|| AppError::Unauthorized("invalid API key".into()))?;
    Ok(Caller {
        key_id: record.id,
        team_id: record.team_id,
        admin: record.admin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_see_their_team_admins_see_all() {
        let member = Caller {
            key_id: 5,
            team_id: 2,
            admin: false,
        };
        assert!(member.sees(2));
        assert!(!member.sees(3));
        assert!(Caller::OPERATOR.sees(3));
        assert!(member.sees_template(None));
        assert!(member.sees_template(Some(2)));
        assert!(!member.sees_template(Some(3)));
        assert!(!member.may_change_template(None));
        assert!(member.may_change_template(Some(2)));
        assert!(!member.may_change_template(Some(3)));
        assert!(Caller::OPERATOR.may_change_template(None));
    }
}
