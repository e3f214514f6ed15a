//! The shape of one REST route: method, path, who may call it, a summary, and its
//! handler. `routes::endpoints` lists them all; the router, the authorization test and
//! the OpenAPI document are all built from that one list.

use std::sync::Arc;

use axum::http::Method;
use axum::routing::{on, MethodFilter, MethodRouter};

use crate::state::AppState;

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

/// One route of the REST API: what it is, who may call it, and its handler. The router
/// is built from [`endpoints`] alone, so the authorization test and the OpenAPI
/// document, which walk the same list, cover every route the server serves.
pub struct Endpoint {
    pub method: Method,
    /// axum's path syntax (`/sandboxes/{id}`), which is OpenAPI's too.
    pub path: &'static str,
    pub access: Access,
    /// One line for the OpenAPI document.
    pub summary: &'static str,
    pub handler: MethodRouter<Arc<AppState>>,
}

impl Endpoint {
    pub fn new<H, T>(
        method: Method,
        path: &'static str,
        access: Access,
        summary: &'static str,
        handler: H,
    ) -> Self
    where
        H: axum::handler::Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("{method} is not a routable method"));
        Endpoint {
            method,
            path,
            access,
            summary,
            handler: on(filter, handler),
        }
    }
}
