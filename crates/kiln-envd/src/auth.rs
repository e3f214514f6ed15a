//! Access-token checks (spec §3.1) and the Basic-auth user of RPC calls (§1.5).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use kiln_proto::envd::{
    HEADER_ACCESS_TOKEN, PATH_FILES, PATH_HEALTH, PATH_INIT, UNAUTHORIZED_MESSAGE,
};
use sha2::{Digest, Sha256};

use crate::error::HttpError;
use crate::state::Sandbox;

/// `/files` operations as they enter the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// `v1_` + unpadded base64 of SHA-256(`{path}:{op}:{username}:{token}[:{expiration}]`).
pub fn signature(
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut raw = format!("{path}:{}:{username}:{token}", operation.as_str());
    if let Some(expiration) = expiration {
        raw.push_str(&format!(":{expiration}"));
    }
    format!(
        "v1_{}",
        STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
    )
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(HEADER_ACCESS_TOKEN).map(|v| v.as_bytes())
}

/// Routes that check authorization themselves or need none.
fn exempt(method: &Method, path: &str) -> bool {
    (method == Method::GET && path == PATH_HEALTH)
        || ((method == Method::GET || method == Method::POST) && path == PATH_FILES)
        || (method == Method::POST && path == PATH_INIT)
        || method == Method::OPTIONS
        || path.starts_with(kiln_proto::tunnel::PATH_PREFIX)
}

/// Middleware: with an access token set, every non-exempt request needs a matching
/// `X-Access-Token`.
pub async fn require_token(
    State(sandbox): State<Sandbox>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = sandbox.defaults().access_token {
        if !exempt(request.method(), request.uri().path()) {
            let ok = header_token(request.headers())
                .is_some_and(|given| constant_time_eq(given, token.as_bytes()));
            if !ok {
                return HttpError::unauthorized(UNAUTHORIZED_MESSAGE).into_response();
            }
        }
    }
    next.run(request).await
}

/// The `signature` parameters of a `/files` request.
#[derive(Debug, Default, Clone)]
pub struct SignatureParams<'a> {
    pub path: &'a str,
    pub username: &'a str,
    pub signature: Option<&'a str>,
    pub expiration: Option<&'a str>,
}

/// `/files` authorization: a present token header must match; otherwise a valid,
/// unexpired signature is required. Open when no token is set.
pub fn check_files_access(
    token: Option<&str>,
    headers: &HeaderMap,
    operation: Operation,
    params: &SignatureParams<'_>,
    now_unix: i64,
) -> Result<(), HttpError> {
    let Some(token) = token else {
        return Ok(());
    };
    if let Some(given) = header_token(headers) {
        return if constant_time_eq(given, token.as_bytes()) {
            Ok(())
        } else {
            Err(HttpError::unauthorized(
                "access token present in header but does not match",
            ))
        };
    }
    let Some(given) = params.signature else {
        return Err(HttpError::unauthorized("missing signature query parameter"));
    };
    let expiration = match params.expiration {
        None | Some("") => None,
        Some(text) => Some(text.parse::<i64>().map_err(|_| {
            HttpError::bad_request(format!(
                "invalid signature_expiration '{text}': expected unix seconds"
            ))
        })?),
    };
    if let Some(expiration) = expiration {
        if expiration < now_unix {
            return Err(HttpError::unauthorized("signature is already expired"));
        }
    }
    let expected = signature(params.path, operation, params.username, token, expiration);
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(HttpError::unauthorized("invalid signature"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BasicAuthError {
    #[error("malformed Authorization header: expected 'Basic base64(user:)'")]
    Malformed,
}

/// The user named by `Authorization: Basic base64("user:")`, if any. Other schemes are
/// ignored (old SDKs sent `Bearer` tokens).
pub fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, BasicAuthError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| BasicAuthError::Malformed)?;
    let Some((scheme, credentials)) = value.trim().split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = STANDARD
        .decode(credentials.trim())
        .map_err(|_| BasicAuthError::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| BasicAuthError::Malformed)?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    Ok(Some(user.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn signature_matches_sdk_formula() {
        // python: "v1_" + base64.b64encode(sha256(b"/a.txt:read:user:tok").digest()).rstrip(b"=")
        let expected = {
            let digest = Sha256::digest(b"/a.txt:read:user:tok");
            format!("v1_{}", STANDARD.encode(digest).trim_end_matches('='))
        };
        assert_eq!(
            signature("/a.txt", Operation::Read, "user", "tok", None),
            expected
        );
        let with_exp = signature("/a.txt", Operation::Write, "", "tok", Some(1700000000));
        let digest = Sha256::digest(b"/a.txt:write::tok:1700000000");
        assert_eq!(with_exp, format!("v1_{}", STANDARD_NO_PAD.encode(digest)));
        assert!(!with_exp.ends_with('='));
    }

    #[test]
    fn files_access_rules() {
        let mut headers = HeaderMap::new();
        let params = SignatureParams {
            path: "/x",
            ..Default::default()
        };
        assert!(check_files_access(None, &headers, Operation::Read, &params, 0).is_ok());
        let err = check_files_access(Some("t"), &headers, Operation::Read, &params, 0).unwrap_err();
        assert_eq!(err.message, "missing signature query parameter");

        let sig = signature("/x", Operation::Read, "", "t", None);
        let signed = SignatureParams {
            signature: Some(&sig),
            ..params.clone()
        };
        assert!(check_files_access(Some("t"), &headers, Operation::Read, &signed, 0).is_ok());
        assert!(check_files_access(Some("t"), &headers, Operation::Write, &signed, 0).is_err());

        let sig = signature("/x", Operation::Read, "", "t", Some(100));
        let expiring = SignatureParams {
            signature: Some(&sig),
            expiration: Some("100"),
            ..params.clone()
        };
        assert!(check_files_access(Some("t"), &headers, Operation::Read, &expiring, 99).is_ok());
        let err =
            check_files_access(Some("t"), &headers, Operation::Read, &expiring, 101).unwrap_err();
        assert_eq!(err.status.as_u16(), 401);

        headers.insert(HEADER_ACCESS_TOKEN, HeaderValue::from_static("wrong"));
        let err = check_files_access(Some("t"), &headers, Operation::Read, &signed, 0).unwrap_err();
        assert_eq!(
            err.message,
            "access token present in header but does not match"
        );
        headers.insert(HEADER_ACCESS_TOKEN, HeaderValue::from_static("t"));
        assert!(check_files_access(Some("t"), &headers, Operation::Read, &params, 0).is_ok());
    }

    #[test]
    fn basic_auth() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_auth_user(&headers), Ok(None));
        headers.insert("authorization", HeaderValue::from_static("Basic cm9vdDo="));
        assert_eq!(basic_auth_user(&headers), Ok(Some("root".into())));
        headers.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(basic_auth_user(&headers), Ok(None));
        headers.insert("authorization", HeaderValue::from_static("Basic !!"));
        assert_eq!(basic_auth_user(&headers), Err(BasicAuthError::Malformed));
    }

    #[test]
    fn exemptions() {
        assert!(exempt(&Method::GET, "/health"));
        assert!(exempt(&Method::POST, "/files"));
        assert!(exempt(&Method::POST, "/init"));
        assert!(exempt(&Method::GET, "/_kiln/tunnel/80"));
        assert!(!exempt(&Method::POST, "/health"));
        assert!(!exempt(&Method::GET, "/envs"));
        assert!(!exempt(&Method::POST, "/process.Process/Start"));
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
