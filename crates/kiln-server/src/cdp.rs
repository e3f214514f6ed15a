//! The CDP route: a browser's DevTools endpoint inside a sandbox, reached as
//! `https://{port}-{id}.{domain}` (Playwright's `connect_over_cdp`), for the port its
//! template declares (`kiln.toml`'s `cdp_port`).
//!
//! Chromium answers DevTools requests only for a Host that is an IP or `localhost`,
//! and writes the Host it saw into the `webSocketDebuggerUrl`s of its `/json*`
//! answers. So this route sends `Host: 127.0.0.1:{port}` upstream, drops `Origin`
//! (Chromium refuses WebSocket origins it was not told about), and rewrites the
//! DevTools URLs in `/json`, `/json/list`, `/json/version` and `/json/new` answers
//! (trailing-slash forms too) to the address the client used.
//!
//! DevTools is the whole browser: cookies, every page, and a file system reach through
//! downloads. So the route wants the sandbox's traffic access token or an API key of
//! the team that owns the sandbox, whatever the sandbox's network settings say; a
//! stranger who knows only the sandbox id gets 401.

use http::header::{self, HeaderMap, HeaderValue};
use http::{StatusCode, Uri};
use kiln_api::{API_KEY_HEADER, TRAFFIC_TOKEN_HEADER};

use crate::authz::Caller;

/// The most of a DevTools JSON answer the route reads to rewrite it: a tab's entry is
/// about 500 bytes, so this is some two thousand tabs. A sandbox's answer is its own
/// to size; a larger one is refused, not buffered.
pub const BODY_CAP: usize = 1 << 20;
/// How long a `/json*` answer may take to arrive whole before the proxy gives up.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Put on requests that arrived on the sandbox-hosts TLS listener, so DevTools URLs
/// handed back say `wss://`.
#[derive(Debug, Clone, Copy)]
pub struct ViaTls;

/// Why a request for the DevTools port is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, or a key that is not a live key.
    Unauthorized(String),
    /// A live key of a team that does not own the sandbox.
    Forbidden(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthorized(m) | Refusal::Forbidden(m) => m,
        }
    }
}

/// Whether the request may drive the browser of sandbox `id` (owned by `team_id`):
/// its traffic token, or an API key `lookup` finds for a caller who sees the team.
pub fn admit(
    headers: &HeaderMap,
    id: &str,
    port: u16,
    team_id: i64,
    traffic_token: Option<&str>,
    lookup: impl FnOnce(&str) -> Option<Caller>,
) -> Result<(), Refusal> {
    if let (Some(given), Some(token)) = (headers.get(TRAFFIC_TOKEN_HEADER), traffic_token) {
        if kiln_api::constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Ok(());
        }
        return Err(Refusal::Unauthorized(format!(
            "the {TRAFFIC_TOKEN_HEADER} header is not sandbox {id}'s traffic access token"
        )));
    }
    let Some(key) = headers.get(API_KEY_HEADER) else {
        return Err(Refusal::Unauthorized(format!(
            "port {port} of sandbox {id} is its browser's DevTools (CDP), which controls the \
             whole browser: send an API key of the sandbox's team in the X-API-KEY header, or \
             the sandbox's traffic access token in {TRAFFIC_TOKEN_HEADER}"
        )));
    };
    match key.to_str().ok().and_then(lookup) {
        None => Err(Refusal::Unauthorized("invalid API key".into())),
        Some(caller) if caller.sees(team_id) => Ok(()),
        Some(_) => Err(Refusal::Forbidden(format!(
            "this API key's team does not own sandbox {id}"
        ))),
    }
}

/// The DevTools paths whose answers carry WebSocket URLs, without a trailing slash.
const JSON_PATHS: [&str; 4] = ["/json", "/json/list", "/json/version", "/json/new"];

/// How one request travels the CDP route: what to rewrite in its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    port: u16,
    /// `ws` or `wss`: how the client reaches us.
    scheme: &'static str,
    /// The Host the client sent (with its port, if any).
    public_host: String,
    /// Whether the answer is DevTools JSON with URLs to rewrite.
    rewrites: bool,
}

impl Route {
    /// Readies `req` for the browser: Host, Origin and credentials, and the path of
    /// a `/json*` request without its trailing slash.
    pub fn prepare(
        method: &http::Method,
        uri: &mut Uri,
        headers: &mut HeaderMap,
        via_tls: bool,
        port: u16,
    ) -> Route {
        let public_host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let trimmed = uri.path().trim_end_matches('/');
        let rewrites = *method != http::Method::OPTIONS && JSON_PATHS.contains(&trimmed);
        if rewrites && trimmed != uri.path() {
            let rest = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
            if let Ok(new) = format!("{trimmed}{rest}").parse::<Uri>() {
                *uri = new;
            }
        }
        if let Ok(host) = HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
            headers.insert(header::HOST, host);
        }
        headers.remove(header::ORIGIN);
        // The browser needs neither; they are the client's.
        headers.remove(API_KEY_HEADER);
        headers.remove(TRAFFIC_TOKEN_HEADER);
        // A compressed answer could not be rewritten.
        headers.remove(header::ACCEPT_ENCODING);
        Route {
            port,
            scheme: if via_tls { "wss" } else { "ws" },
            public_host,
            rewrites,
        }
    }

    /// Whether the answer's body is DevTools JSON to rewrite.
    pub fn rewrites(&self) -> bool {
        self.rewrites && !self.public_host.is_empty()
    }

    /// The answer's DevTools URLs, pointed at the address the client used:
    /// `ws://127.0.0.1:{port}/…` (and `localhost`) become `{ws,wss}://{host}/…`, and the
    /// front-end's `ws=127.0.0.1:{port}/…` parameter `{ws,wss}={host}/…`.
    pub fn rewrite(&self, body: &str) -> String {
        let (port, scheme, host) = (self.port, self.scheme, &self.public_host);
        let mut out = body.to_string();
        for local in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            out = out
                .replace(&format!("ws://{local}/"), &format!("{scheme}://{host}/"))
                .replace(&format!("ws={local}/"), &format!("{scheme}={host}/"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tests::headers;

    const TEAM: i64 = 7;

    fn keys(key: &str) -> Option<Caller> {
        match key {
            "ours" => Some(Caller {
                key_id: 1,
                team_id: TEAM,
                admin: false,
            }),
            "theirs" => Some(Caller {
                key_id: 2,
                team_id: 8,
                admin: false,
            }),
            "admin" => Some(Caller {
                key_id: 3,
                team_id: 1,
                admin: true,
            }),
            _ => None,
        }
    }

    fn admit_with(pairs: &[(&str, &str)], token: Option<&str>) -> Result<(), Refusal> {
        admit(&headers(pairs), "sbx", 9222, TEAM, token, keys)
    }

    #[test]
    fn only_the_owners_key_or_the_traffic_token_reach_devtools() {
        // A stranger who knows only the id.
        let err = admit_with(&[], None).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        assert!(err.message().contains("X-API-KEY"), "{}", err.message());
        assert_eq!(
            admit_with(&[("x-api-key", "forged")], None)
                .unwrap_err()
                .status(),
            StatusCode::UNAUTHORIZED
        );
        // Another team's key.
        assert_eq!(
            admit_with(&[("x-api-key", "theirs")], None)
                .unwrap_err()
                .status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(admit_with(&[("x-api-key", "ours")], None), Ok(()));
        assert_eq!(admit_with(&[("x-api-key", "admin")], None), Ok(()));
        // The token, when the sandbox has one; a wrong token is not passed over to
        // the key.
        let tok = Some("t0ken");
        assert_eq!(
            admit_with(&[("e2b-traffic-access-token", "t0ken")], tok),
            Ok(())
        );
        assert_eq!(
            admit_with(
                &[("e2b-traffic-access-token", "guess"), ("x-api-key", "ours")],
                tok
            )
            .unwrap_err()
            .status(),
            StatusCode::UNAUTHORIZED
        );
        // A public sandbox has no token: sending one proves nothing.
        assert!(admit_with(&[("e2b-traffic-access-token", "")], None).is_err());
    }

    fn prepared(path: &str, pairs: &[(&str, &str)], tls: bool) -> (Uri, HeaderMap, Route) {
        let mut uri: Uri = path.parse().unwrap();
        let mut h = headers(pairs);
        let route = Route::prepare(&http::Method::GET, &mut uri, &mut h, tls, 9222);
        (uri, h, route)
    }

    #[test]
    fn the_browser_sees_a_local_host_and_none_of_the_clients_credentials() {
        let (uri, h, route) = prepared(
            "/json/version/",
            &[
                ("host", "9222-sbx.kiln.test"),
                ("origin", "https://evil.example"),
                ("x-api-key", "ours"),
                ("e2b-traffic-access-token", "t"),
                ("accept-encoding", "gzip"),
                ("user-agent", "Playwright"),
            ],
            true,
        );
        assert_eq!(uri.path(), "/json/version");
        assert_eq!(h["host"], "127.0.0.1:9222");
        for gone in [
            "origin",
            "x-api-key",
            "e2b-traffic-access-token",
            "accept-encoding",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["user-agent"], "Playwright");
        assert!(route.rewrites());
    }

    #[test]
    fn json_paths_are_normalised_and_others_left_alone() {
        for (path, want, rewrites) in [
            ("/json", "/json", true),
            ("/json/", "/json", true),
            ("/json/list/", "/json/list", true),
            ("/json/new?about:blank", "/json/new?about:blank", true),
            (
                "/json/new/?https://a.test/",
                "/json/new?https://a.test/",
                true,
            ),
            ("/json/protocol", "/json/protocol", false),
            ("/devtools/browser/abc", "/devtools/browser/abc", false),
            ("/", "/", false),
        ] {
            let (uri, _, route) = prepared(path, &[("host", "h")], false);
            assert_eq!(uri.to_string(), want, "{path}");
            assert_eq!(route.rewrites(), rewrites, "{path}");
        }
    }

    #[test]
    fn devtools_urls_point_where_the_client_came_from() {
        let body = r#"{"webSocketDebuggerUrl": "ws://127.0.0.1:9222/devtools/browser/u1",
            "devtoolsFrontendUrl": "/devtools/inspector.html?ws=127.0.0.1:9222/devtools/page/p1",
            "other": "ws://127.0.0.1:92220/x", "local": "ws://localhost:9222/devtools/page/p2"}"#;
        let (_, _, tls) = prepared("/json", &[("host", "9222-sbx.kiln.test")], true);
        let out = tls.rewrite(body);
        assert!(out.contains("\"wss://9222-sbx.kiln.test/devtools/browser/u1\""));
        assert!(out.contains("?wss=9222-sbx.kiln.test/devtools/page/p1"));
        assert!(out.contains("\"wss://9222-sbx.kiln.test/devtools/page/p2\""));
        // Another port's address is not this browser's.
        assert!(out.contains("ws://127.0.0.1:92220/x"));
        let (_, _, plain) = prepared("/json", &[("host", "127.0.0.1:3000")], false);
        assert!(plain
            .rewrite(body)
            .contains("\"ws://127.0.0.1:3000/devtools/browser/u1\""));
    }
}
