//! The gate in front of a desktop's live view (noVNC on port 6080 of a `desktop`
//! sandbox), for browsers: a browser opening `stream.get_url()` cannot send headers,
//! so the token it needs may come as a query parameter on the page (`kiln_token`),
//! which is answered with a host-only cookie that the page's `/websockify` WebSocket
//! then carries. Which token: the sandbox's traffic access token when its ports are
//! private (the owner asked for exactly that), else the operator's
//! `E2B_DESKTOP_AUTH_TOKEN` when set; an API key of the owning team always passes.
//! Neither the parameter nor the cookie reaches the sandbox.

use http::header::{self, HeaderMap, HeaderValue};
use http::Uri;
use kiln_api::{API_KEY_HEADER, TRAFFIC_TOKEN_HEADER};

use crate::authz::Caller;

/// noVNC's port in the desktop template (where the SDK runs `novnc_proxy`).
pub const PORT: u16 = 6080;
/// The query parameter a browser brings the token in.
pub const QUERY: &str = kiln_api::desktop::VIEW_TOKEN_QUERY;
/// The cookie it is kept in afterwards.
pub const COOKIE: &str = "kiln_view";

/// What the live view of one sandbox wants.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    /// The token that opens it: the traffic token of a private sandbox, else the
    /// operator's; `None`: the view is as open as any port.
    pub token: Option<&'a str>,
    pub team_id: i64,
}

/// How a request passed the gate.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    /// No token guards this view, or a header or the cookie carried it.
    AsIs,
    /// The token came in the query: set the cookie on the answer.
    SetCookie,
}

impl Gate<'_> {
    /// Whether the request may reach the view.
    pub fn admit(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        lookup: impl FnOnce(&str) -> Option<Caller>,
    ) -> Result<Admitted, String> {
        let Some(token) = self.token else {
            return Ok(Admitted::AsIs);
        };
        let matches = |given: &str| kiln_api::constant_time_eq(given.as_bytes(), token.as_bytes());
        if headers
            .get(TRAFFIC_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(matches)
        {
            return Ok(Admitted::AsIs);
        }
        // The browser attaches the cookie to requests other pages start too: a page of
        // another sandbox under the same registrable domain is same-site, and a
        // WebSocket is not held back by CORS. So the cookie counts only for requests
        // the view's own pages make (no Origin, or this host's).
        if cookie(headers, COOKIE).is_some_and(|c| matches(&c)) {
            if from_this_host(uri, headers) {
                return Ok(Admitted::AsIs);
            }
            return Err(format!(
                "the live view's cookie is accepted only from its own pages (Origin {:?} is \
                 another site's)",
                headers
                    .get(header::ORIGIN)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            ));
        }
        if query(uri, QUERY).is_some_and(|q| matches(&q)) {
            return Ok(Admitted::SetCookie);
        }
        if let Some(key) = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok()) {
            if lookup(key).is_some_and(|c| c.sees(self.team_id)) {
                return Ok(Admitted::AsIs);
            }
        }
        Err(format!(
            "this desktop's live view wants its token: add {QUERY}=<token> to the page's URL \
             (the sandbox's trafficAccessToken if its ports are private, else the operator's \
             E2B_DESKTOP_AUTH_TOKEN)"
        ))
    }
}

/// Whether the request has no `Origin` or the origin of the host it is for.
fn from_this_host(uri: &Uri, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    // HTTP/1.1's Host, else HTTP/2's :authority.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h);
    match (origin_host, host) {
        (Some(o), Some(h)) => o.eq_ignore_ascii_case(h),
        _ => false,
    }
}

/// The value of query parameter `name`, percent-decoded.
fn query(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// The value of cookie `name`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// The request as the sandbox gets it: without the token's query parameter and cookie.
pub fn strip(uri: &mut Uri, headers: &mut HeaderMap) {
    if let Some(q) = uri.query() {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| pair.split('=').next() != Some(QUERY))
            .collect();
        let path = uri.path().to_string();
        let rebuilt = if kept.is_empty() {
            path
        } else {
            format!("{path}?{}", kept.join("&"))
        };
        if let Ok(new) = rebuilt.parse() {
            *uri = new;
        }
    }
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split('=').next() != Some(COOKIE))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The cookie that keeps `token` for this host, for the request that brought it in
/// the URL. A top-level page gets `SameSite=Strict` (`Secure` where the browser came
/// over TLS). A page framed by another site (Surf's page embeds live views; the
/// browser says so in `Sec-Fetch-Dest`/`Sec-Fetch-Site`) never gets a Strict cookie
/// back, so over TLS it gets a partitioned one (CHIPS): sent only under the top-level
/// site that framed it, never where another site frames or opens the view.
pub fn set_cookie(token: &str, via_tls: bool, request: &HeaderMap) -> Option<HeaderValue> {
    let says = |name: &str, value: &str| {
        request
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(value))
    };
    let framed = says("sec-fetch-dest", "iframe") && !says("sec-fetch-site", "same-origin");
    let attributes = match (framed, via_tls) {
        (true, true) => "; SameSite=None; Secure; Partitioned",
        (_, true) => "; SameSite=Strict; Secure",
        (_, false) => "; SameSite=Strict",
    };
    HeaderValue::from_str(&format!("{COOKIE}={token}; Path=/; HttpOnly{attributes}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tests::headers;

    const TEAM: i64 = 4;

    fn keys(key: &str) -> Option<Caller> {
        (key == "owner").then_some(Caller {
            key_id: 1,
            team_id: TEAM,
            admin: false,
        })
    }

    fn admit(token: Option<&str>, uri: &str, pairs: &[(&str, &str)]) -> Result<Admitted, String> {
        let gate = Gate {
            token,
            team_id: TEAM,
        };
        gate.admit(&uri.parse().unwrap(), &headers(pairs), keys)
    }

    #[test]
    fn a_browser_brings_the_token_in_the_url_then_in_its_cookie() {
        let t = Some("s3cret");
        assert_eq!(admit(None, "/vnc.html", &[]), Ok(Admitted::AsIs));
        assert!(admit(t, "/vnc.html?autoconnect=true", &[]).is_err());
        assert!(admit(t, "/vnc.html?kiln_token=guess", &[]).is_err());
        assert_eq!(
            admit(t, "/vnc.html?autoconnect=true&kiln_token=s3cret", &[]),
            Ok(Admitted::SetCookie)
        );
        assert_eq!(
            admit(t, "/websockify", &[("cookie", "a=b; kiln_view=s3cret")]),
            Ok(Admitted::AsIs)
        );
        assert!(admit(t, "/websockify", &[("cookie", "kiln_view=nope")]).is_err());
        // The view's own page opens its WebSocket; another sandbox's page cannot.
        let view = "6080-a.sandbox.example.com";
        let ws_from = |origin: &str| {
            admit(
                t,
                "/websockify",
                &[
                    ("host", view),
                    ("origin", origin),
                    ("cookie", "kiln_view=s3cret"),
                ],
            )
        };
        assert_eq!(
            ws_from("https://6080-a.sandbox.example.com"),
            Ok(Admitted::AsIs)
        );
        let err = ws_from("https://3000-b.sandbox.example.com").unwrap_err();
        assert!(err.contains("another site"), "{err}");
        assert!(ws_from("null").is_err());
        assert_eq!(
            admit(t, "/", &[("e2b-traffic-access-token", "s3cret")]),
            Ok(Admitted::AsIs)
        );
        assert_eq!(admit(t, "/", &[("x-api-key", "owner")]), Ok(Admitted::AsIs));
        assert!(admit(t, "/", &[("x-api-key", "stranger")]).is_err());
    }

    #[test]
    fn the_sandbox_never_sees_the_token() {
        let mut uri: Uri = "/vnc.html?autoconnect=true&kiln_token=s3cret&resize=scale"
            .parse()
            .unwrap();
        let mut h = headers(&[("cookie", "a=1; kiln_view=s3cret; b=2")]);
        strip(&mut uri, &mut h);
        assert_eq!(uri.to_string(), "/vnc.html?autoconnect=true&resize=scale");
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut uri: Uri = "/vnc.html?kiln_token=s3cret".parse().unwrap();
        let mut h = headers(&[("cookie", "kiln_view=s3cret")]);
        strip(&mut uri, &mut h);
        assert_eq!(uri.to_string(), "/vnc.html");
        assert!(!h.contains_key("cookie"));
    }

    #[test]
    fn the_cookie_is_strict_unless_another_site_frames_the_view_over_tls() {
        let top = headers(&[("sec-fetch-dest", "document"), ("sec-fetch-site", "none")]);
        let framed = headers(&[
            ("sec-fetch-dest", "iframe"),
            ("sec-fetch-site", "cross-site"),
        ]);
        let own = headers(&[
            ("sec-fetch-dest", "iframe"),
            ("sec-fetch-site", "same-origin"),
        ]);
        let cookie = |tls, h: &HeaderMap| set_cookie("s3cret", tls, h).unwrap();
        assert_eq!(
            cookie(true, &top),
            "kiln_view=s3cret; Path=/; HttpOnly; SameSite=Strict; Secure"
        );
        assert_eq!(
            cookie(false, &top),
            "kiln_view=s3cret; Path=/; HttpOnly; SameSite=Strict"
        );
        assert_eq!(
            cookie(true, &framed),
            "kiln_view=s3cret; Path=/; HttpOnly; SameSite=None; Secure; Partitioned"
        );
        assert_eq!(
            cookie(false, &framed),
            "kiln_view=s3cret; Path=/; HttpOnly; SameSite=Strict"
        );
        assert_eq!(
            cookie(true, &own),
            "kiln_view=s3cret; Path=/; HttpOnly; SameSite=Strict; Secure"
        );
    }
}
