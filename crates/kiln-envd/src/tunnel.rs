//! `GET /_kiln/tunnel/{port}`: upgrade the HTTP connection to a raw byte stream to
//! `127.0.0.1:{port}` (or `[::1]:{port}`) inside the sandbox. See [`kiln_proto::tunnel`].

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use kiln_proto::tunnel::{port_closed_message, PATH_PREFIX, UPGRADE};
use tokio::net::TcpStream;

use crate::error::HttpError;

pub fn routes() -> Router {
    Router::new().route(&format!("{PATH_PREFIX}{{port}}"), get(tunnel))
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, UPGRADE)
}

async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    match TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(stream) => Ok(stream),
        Err(_) => TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await,
    }
}

async fn tunnel(Path(port): Path<String>, mut request: Request) -> Result<Response, HttpError> {
    let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(|| {
        HttpError::bad_request(format!("invalid port '{port}': expected 1-65535"))
    })?;
    if !wants_upgrade(request.headers()) {
        return Err(HttpError::bad_request(format!(
            "tunnel requests need 'Connection: Upgrade' and 'Upgrade: {UPGRADE}'"
        )));
    }
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return Err(HttpError::bad_request("connection cannot be upgraded"));
    };
    let mut upstream = connect_local(port)
        .await
        .map_err(|_| HttpError::new(StatusCode::BAD_GATEWAY, port_closed_message(port)))?;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(port, error = %e, "tunnel upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(upgraded);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(port, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(port, error = %e, "tunnel ended with error"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE));
    Ok(response)
}
