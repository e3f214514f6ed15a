//! Sandbox traffic on the API listener: a request that names a sandbox (by the
//! `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, or a Host of `{port}-{id}.{domain}`)
//! goes to that sandbox: port 49983 to envd, any other port through envd's tunnel,
//! WebSocket and other upgrades included.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::header::{self, HeaderMap, HeaderName};
use http::StatusCode;
use hyper_util::rt::TokioIo;
use kiln_api::{
    SandboxGoneBody, ENVD_PORT, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TRAFFIC_TOKEN_HEADER,
};

use crate::error::json_error;
use crate::exec_watch::{AuditNote, Peeked, Watched};
use crate::manager::SandboxManager;
use crate::metrics::{ProxyFailure, ProxyLabels};
use crate::report::chain;

/// Where a request is headed, when it is sandbox traffic.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Sandbox {
        id: String,
        port: u16,
    },
    /// Named a sandbox, but not in a form we accept.
    Invalid(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Pick the target from the routing headers or, failing that, the Host.
pub fn target(headers: &HeaderMap, domain: Option<&str>) -> Option<Target> {
    let id = headers.get(SANDBOX_ID_HEADER);
    let port = headers.get(SANDBOX_PORT_HEADER);
    if id.is_some() || port.is_some() {
        let (Some(id), Some(port)) = (id, port) else {
            return Some(Target::Invalid(format!(
                "both {SANDBOX_ID_HEADER} and {SANDBOX_PORT_HEADER} headers are required"
            )));
        };
        let id = id.to_str().unwrap_or_default().to_string();
        let Ok(port) = port.to_str().unwrap_or_default().parse::<u16>() else {
            return Some(Target::Invalid(format!(
                "{SANDBOX_PORT_HEADER} must be a port number"
            )));
        };
        if !valid_id(&id) {
            return Some(Target::Invalid(format!("invalid sandbox id {id:?}")));
        }
        return Some(Target::Sandbox { id, port });
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let (label, rest) = host.split_once('.')?;
    if let Some(domain) = domain {
        if rest != domain {
            return None;
        }
    }
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok()?;
    valid_id(id).then(|| Target::Sandbox {
        id: id.to_string(),
        port,
    })
}

pub fn gone(id: &str) -> Response {
    let body = SandboxGoneBody {
        sandbox_id: id.to_string(),
        message: "The sandbox was not found".to_string(),
        code: 502,
    };
    (StatusCode::BAD_GATEWAY, Json(body)).into_response()
}

fn paused(id: &str) -> Response {
    let body = SandboxGoneBody {
        sandbox_id: id.to_string(),
        message: "The sandbox is paused; connect to it to resume it".to_string(),
        code: 502,
    };
    (StatusCode::BAD_GATEWAY, Json(body)).into_response()
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        headers.remove(HeaderName::from_static(name));
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// Whether `path` names one of envd's host-only control routes: `/init` (which sets
/// the access token, environment and default user) and Kiln's own `/_kiln/...` routes
/// (the port tunnel). Those are the server's to call, over the socket only the host
/// reaches; a client, who may be a stranger knowing only a sandbox id, never reaches
/// them through the proxy. Compared after percent-decoding and collapsing slashes, so
/// `//init`, `/init/` and `/%69nit` are the same path.
pub fn is_control_path(path: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut normal = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty() && *s != ".") {
        normal.push('/');
        normal.push_str(&segment.to_ascii_lowercase());
    }
    normal == kiln_proto::envd::PATH_INIT
        || normal == "/_kiln"
        || normal.starts_with("/_kiln/")
        // `..` could climb back to either; envd has no route that needs it.
        || normal.split('/').any(|s| s == "..")
}

fn control_path_refused(id: &str, path: &str) -> Response {
    tracing::warn!(%id, path, "refused a client request for an envd control route");
    json_error(
        StatusCode::FORBIDDEN,
        format!("{path} is not reachable through the proxy: it is a control route of the sandbox's host"),
    )
}

/// The path of envd's command start, whose `Connect-Timeout-Ms` is the command's
/// deadline.
const PROCESS_START: &str = "/process.Process/Start";

/// A command's deadline above the server's per-execution cap is refused (400 naming
/// the cap) rather than silently shortened: the caller learns the limit.
fn check_execution_deadline(path: &str, headers: &HeaderMap, cap_secs: u64) -> Result<(), String> {
    if path != PROCESS_START {
        return Ok(());
    }
    let Some(value) = headers.get(kiln_proto::connect::HEADER_TIMEOUT_MS) else {
        return Ok(());
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| "Connect-Timeout-Ms must be a whole number of milliseconds".to_string())?;
    if ms > cap_secs.saturating_mul(1000) {
        return Err(format!(
            "a command may run for at most {cap_secs} s on this server \
             (E2B_EXECUTION_TIMEOUT_SEC); asked for {} s",
            ms.div_ceil(1000)
        ));
    }
    Ok(())
}

/// Forward one request to sandbox `id`, port `port`.
pub async fn forward(
    manager: Arc<SandboxManager>,
    id: String,
    port: u16,
    mut req: Request,
) -> Response {
    if port == ENVD_PORT && is_control_path(req.uri().path()) {
        return control_path_refused(&id, req.uri().path());
    }
    if port == ENVD_PORT {
        let cap = manager.execution_timeout_secs();
        if let Err(message) = check_execution_deadline(req.uri().path(), req.headers(), cap) {
            return json_error(StatusCode::BAD_REQUEST, message);
        }
    }
    let Some(entry) = manager.get(&id) else {
        return gone(&id);
    };
    let mut cdp = None;
    let mut view_cookie: Option<http::HeaderValue> = None;
    if port != ENVD_PORT {
        let rec = entry.record();
        let network = crate::manager::network_of(&rec);
        if entry.ports.cdp == Some(port) {
            // DevTools: the owner's key or the token, whatever the network settings.
            let admitted = crate::cdp::admit(
                req.headers(),
                &id,
                port,
                rec.team_id,
                rec.traffic_token.as_deref(),
                |key| manager.caller_for_key(key),
            );
            if let Err(refusal) = admitted {
                tracing::info!(%id, port, reason = refusal.message(), "refused a DevTools request");
                return json_error(refusal.status(), refusal.message().to_string());
            }
            let via_tls = req.extensions().get::<crate::cdp::ViaTls>().is_some();
            let (mut parts, body) = std::mem::take(&mut req).into_parts();
            cdp = Some(crate::cdp::Route::prepare(
                &parts.method,
                &mut parts.uri,
                &mut parts.headers,
                via_tls,
                port,
            ));
            req = Request::from_parts(parts, body);
        } else if port == crate::live_view::PORT && entry.ports.desktop {
            // A browser's way in: the token may come in the page's URL (see live_view).
            let token = if network.private {
                rec.traffic_token.clone()
            } else {
                manager.desktop_token().map(|t| t.as_str().to_string())
            };
            let gate = crate::live_view::Gate {
                token: token.as_deref(),
                team_id: rec.team_id,
            };
            match gate.admit(req.uri(), req.headers(), |key| manager.caller_for_key(key)) {
                Ok(crate::live_view::Admitted::SetCookie) => {
                    let via_tls = req.extensions().get::<crate::cdp::ViaTls>().is_some();
                    view_cookie = token
                        .as_deref()
                        .and_then(|t| crate::live_view::set_cookie(t, via_tls, req.headers()));
                }
                Ok(crate::live_view::Admitted::AsIs) => {}
                Err(message) => return json_error(StatusCode::UNAUTHORIZED, message),
            }
            let (mut parts, body) = std::mem::take(&mut req).into_parts();
            crate::live_view::strip(&mut parts.uri, &mut parts.headers);
            req = Request::from_parts(parts, body);
        } else if network.private && !traffic_token_ok(req.headers(), rec.traffic_token.as_deref())
        {
            return json_error(
                StatusCode::FORBIDDEN,
                format!(
                    "port {port} of sandbox {id} is private: send the sandbox's traffic access \
                     token (trafficAccessToken from its create) in the {TRAFFIC_TOKEN_HEADER} header"
                ),
            );
        }
        if let (Some(host), None) = (network.masked_host(port), &cdp) {
            if let Ok(value) = http::HeaderValue::from_str(&host) {
                req.headers_mut().insert(header::HOST, value);
            }
        }
    }
    if manager.is_paused(&id) {
        // A sandbox created with auto-resume wakes for traffic that passed the checks
        // above, and for envd only with its access token (a stranger's request would
        // be refused by envd, but only after the wake); otherwise a frozen envd would
        // hold the request forever, and E2B's proxy also answers a paused sandbox as
        // unreachable.
        let may_wake = port != ENVD_PORT
            || match entry.record().access_token {
                Some(token) => header_is(
                    req.headers(),
                    kiln_proto::envd::HEADER_ACCESS_TOKEN,
                    Some(&token),
                ),
                None => true,
            };
        if !may_wake {
            return paused(&id);
        }
        match manager.resume_for_traffic(&id).await {
            Ok(true) => {}
            Ok(false) => return paused(&id),
            Err(e) => {
                tracing::warn!(%id, error = %chain(&e), "resuming a sandbox for its traffic failed");
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    format!("sandbox {id} is paused and could not be resumed for this request"),
                );
            }
        }
    }
    // The sandbox's servers never see the token or an API key (nor could they replay
    // them elsewhere).
    req.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
    req.headers_mut().remove(kiln_api::API_KEY_HEADER);
    let execution = crate::exec_watch::kind_of(port, req.method(), req.uri().path());
    let began = std::time::Instant::now();
    let audit = execution.map(|kind| {
        let rec = entry.record();
        let event = crate::audit::Event::new("sandbox.executed", true)
            .sandbox(&id)
            .user(rec.team_id, 0)
            .agent_or(rec.metadata.get("agent_id"));
        let request = (kind == crate::metrics::ExecKind::RunCode).then(Default::default);
        if let Some(peek) = &request {
            let peek = Arc::clone(peek);
            let (parts, body) = std::mem::take(&mut req).into_parts();
            req = Request::from_parts(parts, Body::new(Peeked::new(body, peek)));
        }
        AuditNote {
            log: manager.audit(),
            event,
            request,
        }
    });
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);

    let result = if port == ENVD_PORT {
        crate::envd::send(&entry.envd_socket, req)
            .await
            .map_err(|e| {
                // The chain names host paths: for the log only.
                tracing::warn!(%id, error = %chain(&e), "envd request failed");
                "the sandbox's envd did not answer".to_string()
            })
    } else {
        via_tunnel(&entry.envd_socket, port, req).await
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(message) => {
            // A sandbox killed between lookup and send is gone, not broken.
            if manager.get(&id).is_none() {
                return gone(&id);
            }
            let failure = if port == ENVD_PORT {
                ProxyFailure::Envd
            } else {
                ProxyFailure::Tunnel
            };
            manager
                .meters()
                .proxy_errors
                .get_or_create(&ProxyLabels { failure })
                .inc();
            tracing::warn!(%id, port, error = %message, "proxying to sandbox failed");
            return json_error(StatusCode::BAD_GATEWAY, message);
        }
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match (client_upgrade.await, upstream.await) {
                    (Ok(client), Ok(upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    (c, u) => tracing::debug!(
                        client_ok = c.is_ok(),
                        upstream_ok = u.is_ok(),
                        "upgrade through the proxy failed"
                    ),
                }
            });
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    if let Some(cookie) = view_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if let Some(route) = cdp.filter(crate::cdp::Route::rewrites) {
        return devtools_answer(&id, resp, &route).await;
    }
    match execution {
        Some(kind) => {
            let metrics = manager.meters().clone();
            resp.map(|b| Body::new(Watched::new(Body::new(b), kind, metrics, began, audit)))
        }
        None => resp.map(Body::new),
    }
}

/// A DevTools JSON answer with its URLs pointed at the client's address; read up to
/// [`crate::cdp::BODY_CAP`] and refused beyond it.
async fn devtools_answer<B>(
    id: &str,
    resp: http::Response<B>,
    route: &crate::cdp::Route,
) -> Response
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    let limited = http_body_util::Limited::new(body, crate::cdp::BODY_CAP);
    // A sandbox's browser that trickles (or never ends) its answer holds no proxy task.
    let read = tokio::time::timeout(crate::cdp::BODY_TIMEOUT, limited.collect()).await;
    let bytes = match read {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            tracing::warn!(%id, "a DevTools answer took too long");
            return json_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the browser's DevTools answer did not end within {} s",
                    crate::cdp::BODY_TIMEOUT.as_secs()
                ),
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(%id, error = %e, "reading a DevTools answer failed");
            return json_error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the browser's DevTools answer could not be read whole (at most {} bytes): {e}",
                    crate::cdp::BODY_CAP
                ),
            );
        }
    };
    let body = match std::str::from_utf8(&bytes) {
        Ok(text) => Body::from(route.rewrite(text)),
        Err(_) => Body::from(bytes),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body)
}

/// Whether the request carries the sandbox's traffic access token.
fn traffic_token_ok(headers: &HeaderMap, token: Option<&str>) -> bool {
    // A private sandbox always has a token; without one nothing matches.
    header_is(headers, TRAFFIC_TOKEN_HEADER, token)
}

/// Whether header `name` carries `expected` (compared in constant time); never when
/// there is nothing to expect.
fn header_is(headers: &HeaderMap, name: &str, expected: Option<&str>) -> bool {
    match (headers.get(name), expected) {
        (Some(given), Some(expected)) => {
            kiln_api::constant_time_eq(given.as_bytes(), expected.as_bytes())
        }
        _ => false,
    }
}

async fn via_tunnel(
    socket: &std::path::Path,
    port: u16,
    req: Request,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = match crate::envd::tunnel(socket, port).await {
        Ok(s) => s,
        Err(crate::envd::EnvdError::Tunnel { body, .. }) => {
            // envd's own message names the closed port; pass it on.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            return Err(message);
        }
        Err(e) => {
            tracing::warn!(port, error = %chain(&e), "opening a tunnel failed");
            return Err(format!("cannot reach port {port} in the sandbox"));
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(stream)
        .await
        .map_err(|e| format!("HTTP handshake through the tunnel to port {port} failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("request to port {port} in the sandbox failed: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map from name-value pairs (the CDP route's tests use it too).
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn routes_by_headers_first() {
        let h = headers(&[
            ("host", "127.0.0.1:3000"),
            ("e2b-sandbox-id", "abc123"),
            ("e2b-sandbox-port", "49983"),
        ]);
        assert_eq!(
            target(&h, None),
            Some(Target::Sandbox {
                id: "abc123".into(),
                port: 49983
            })
        );
    }

    #[test]
    fn one_routing_header_alone_is_an_error() {
        let h = headers(&[("e2b-sandbox-id", "abc")]);
        assert!(matches!(target(&h, None), Some(Target::Invalid(_))));
        let h = headers(&[("e2b-sandbox-id", "ABC"), ("e2b-sandbox-port", "1")]);
        assert!(matches!(target(&h, None), Some(Target::Invalid(_))));
    }

    #[test]
    fn routes_by_host_label() {
        let h = headers(&[("host", "8080-abc123.kiln.local:3000")]);
        assert_eq!(
            target(&h, None),
            Some(Target::Sandbox {
                id: "abc123".into(),
                port: 8080
            })
        );
        assert_eq!(
            target(&h, Some("kiln.local")),
            Some(Target::Sandbox {
                id: "abc123".into(),
                port: 8080
            })
        );
        assert_eq!(target(&h, Some("other.domain")), None);
    }

    #[test]
    fn api_hosts_are_not_sandbox_traffic() {
        for host in [
            "127.0.0.1:3000",
            "localhost:3000",
            "api.example.com",
            "[::1]:3000",
        ] {
            assert_eq!(target(&headers(&[("host", host)]), None), None, "{host}");
        }
    }

    #[test]
    fn envd_control_routes_are_recognised_in_every_spelling() {
        for path in [
            "/init",
            "//init",
            "/init/",
            "/./init",
            "/%69nit",
            "/INIT",
            "/_kiln/tunnel/22",
            "/_kiln",
            "//_kiln//tunnel/80",
            "/%5fkiln/tunnel/80",
            "/files/../init",
        ] {
            assert!(is_control_path(path), "{path}");
        }
        for path in [
            "/health",
            "/files",
            "/envs",
            "/process.Process/Start",
            "/filesystem.Filesystem/Stat",
            "/initial",
            "/kiln/tunnel",
        ] {
            assert!(!is_control_path(path), "{path}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Routing headers and Host values from a stranger: a target or nothing,
        /// never a panic; an accepted id is always `[a-z0-9]+`.
        #[test]
        fn any_routing_headers_parse_or_are_refused(
            id in "[ -~]{0,30}",
            port in "[ -~]{0,8}",
            host in "[ -~]{0,40}",
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in [("e2b-sandbox-id", &id), ("e2b-sandbox-port", &port), ("host", &host)] {
                if let Ok(v) = value.parse() {
                    h.insert(HeaderName::from_static(name), v);
                }
            }
            if let Some(Target::Sandbox { id, .. }) = target(&h, None) {
                proptest::prop_assert!(valid_id(&id), "{id:?}");
            }
        }

        /// Whatever a client writes, a path that envd would route to `/init` is
        /// refused: decoded and collapsed, it is never exactly `/init`.
        #[test]
        fn no_spelling_of_init_slips_through(path in "[/%.a-zA-Z0-9_]{0,24}") {
            let decoded = percent_encoding::percent_decode_str(&path).decode_utf8_lossy().to_string();
            if decoded.trim_end_matches('/').eq_ignore_ascii_case("/init") {
                proptest::prop_assert!(is_control_path(&path), "{path:?}");
            }
        }
    }

    #[test]
    fn command_deadlines_above_the_cap_are_refused() {
        let start = PROCESS_START;
        let ok = headers(&[("connect-timeout-ms", "60000")]);
        assert_eq!(check_execution_deadline(start, &ok, 300), Ok(()));
        let at = headers(&[("connect-timeout-ms", "300000")]);
        assert_eq!(check_execution_deadline(start, &at, 300), Ok(()));
        let over = headers(&[("connect-timeout-ms", "300001")]);
        let err = check_execution_deadline(start, &over, 300).unwrap_err();
        assert!(
            err.contains("E2B_EXECUTION_TIMEOUT_SEC") && err.contains("301 s"),
            "{err}"
        );
        // No deadline (timeout=0): bounded by the sandbox's lifetime instead.
        assert_eq!(
            check_execution_deadline(start, &HeaderMap::new(), 300),
            Ok(())
        );
        let bad = headers(&[("connect-timeout-ms", "soon")]);
        assert!(check_execution_deadline(start, &bad, 300).is_err());
        // Other routes' deadlines are theirs.
        assert_eq!(
            check_execution_deadline("/process.Process/Connect", &over, 300),
            Ok(())
        );
    }

    #[tokio::test]
    async fn devtools_answers_are_rewritten_and_capped() {
        use http_body_util::BodyExt;
        let route = || {
            let mut uri: http::Uri = "/json/version".parse().unwrap();
            let mut h = headers(&[("host", "9222-sbx.kiln.test")]);
            crate::cdp::Route::prepare(&http::Method::GET, &mut uri, &mut h, true, 9222)
        };
        let body = r#"{"webSocketDebuggerUrl":"ws://127.0.0.1:9222/devtools/browser/b"}"#;
        let resp = http::Response::builder()
            .header("content-length", body.len())
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let out = devtools_answer("sbx", resp, &route()).await;
        assert_eq!(out.status(), StatusCode::OK);
        assert!(!out.headers().contains_key("content-length"));
        let text = out.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            text,
            r#"{"webSocketDebuggerUrl":"wss://9222-sbx.kiln.test/devtools/browser/b"}"#
        );
        // A sandbox's endless answer is refused, not buffered.
        let huge = vec![b' '; crate::cdp::BODY_CAP + 1];
        let resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(huge)));
        let out = devtools_answer("sbx", resp, &route()).await;
        assert_eq!(out.status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_devtools_answer_that_never_ends_is_given_up() {
        let route = {
            let mut uri: http::Uri = "/json/list".parse().unwrap();
            let mut h = headers(&[("host", "9222-sbx.kiln.test")]);
            crate::cdp::Route::prepare(&http::Method::GET, &mut uri, &mut h, true, 9222)
        };
        let never =
            futures::stream::pending::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>();
        let resp = http::Response::new(http_body_util::StreamBody::new(never));
        let out = devtools_answer("sbx", resp, &route).await;
        assert_eq!(out.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_unless_upgrading() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "x"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("upgrade") && !h.contains_key("te"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }
}
