//! The sandbox-level environment (spec A.6): envd's `GET /envs`, which returns the
//! create-time env vars plus `E2B_SANDBOX*`. Kernels may have started before the sandbox
//! got its identity (warm pools, snapshots), so each kernel is given these values on its
//! first execution instead of through its process environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Where envd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvdTarget {
    /// `unix:/run/kiln/envd.sock`: Kiln's envd socket (only root can open it).
    Unix(PathBuf),
    /// `http://127.0.0.1:49983`: a TCP envd (E2B's own layout, development).
    Tcp(String),
    /// `off`: no sandbox-level variables.
    Off,
}

impl FromStr for EnvdTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" || s.is_empty() {
            Ok(EnvdTarget::Off)
        } else if let Some(path) = s.strip_prefix("unix:") {
            Ok(EnvdTarget::Unix(PathBuf::from(path)))
        } else if let Some(rest) = s.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(format!("'{s}': expected http://HOST:PORT with no path"));
            }
            Ok(EnvdTarget::Tcp(authority.to_owned()))
        } else {
            Err(format!(
                "'{s}': expected unix:/path/to/envd.sock, http://HOST:PORT or off"
            ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("cannot connect to envd at {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with envd failed")]
    Http(#[source] hyper::Error),
    #[error("envd answered GET /envs with status {0}")]
    Status(u16),
    #[error("envd's /envs body is not a JSON object of strings")]
    Body(#[source] serde_json::Error),
    #[error("envd did not answer within {0:?}")]
    Timeout(Duration),
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// Fetches envd's default environment, forwarding the caller's envd access token.
pub async fn fetch_envs(
    target: &EnvdTarget,
    access_token: Option<&str>,
) -> Result<BTreeMap<String, String>, EnvdError> {
    match tokio::time::timeout(TIMEOUT, fetch(target, access_token)).await {
        Ok(result) => result,
        Err(_) => Err(EnvdError::Timeout(TIMEOUT)),
    }
}

async fn fetch(
    target: &EnvdTarget,
    access_token: Option<&str>,
) -> Result<BTreeMap<String, String>, EnvdError> {
    let body = match target {
        EnvdTarget::Off => return Ok(BTreeMap::new()),
        EnvdTarget::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| EnvdError::Connect {
                    target: format!("unix:{}", path.display()),
                    source,
                })?;
            get(stream, "localhost", access_token).await?
        }
        EnvdTarget::Tcp(authority) => {
            let stream = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|source| EnvdError::Connect {
                    target: format!("http://{authority}"),
                    source,
                })?;
            get(stream, authority, access_token).await?
        }
    };
    serde_json::from_slice(&body).map_err(EnvdError::Body)
}

async fn get<S>(stream: S, host: &str, access_token: Option<&str>) -> Result<Bytes, EnvdError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EnvdError::Http)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = hyper::Request::get("/envs").header(hyper::header::HOST, host);
    if let Some(token) = access_token {
        request = request.header("x-access-token", token);
    }
    // The builder only fails on invalid header values; a bad token is sent as absent.
    let request = match request.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(_) => hyper::Request::get("/envs")
            .header(hyper::header::HOST, "localhost")
            .body(Empty::new())
            .unwrap_or_default(),
    };
    let response = sender
        .send_request(request)
        .await
        .map_err(EnvdError::Http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(EnvdError::Http)?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(EnvdError::Status(status.as_u16()));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            "unix:/run/kiln/envd.sock".parse::<EnvdTarget>().unwrap(),
            EnvdTarget::Unix("/run/kiln/envd.sock".into())
        );
        assert_eq!(
            "http://127.0.0.1:49983/".parse::<EnvdTarget>().unwrap(),
            EnvdTarget::Tcp("127.0.0.1:49983".into())
        );
        assert_eq!("off".parse::<EnvdTarget>().unwrap(), EnvdTarget::Off);
        assert!("https://x".parse::<EnvdTarget>().is_err());
        assert!("http://x/envs".parse::<EnvdTarget>().is_err());
    }

    #[tokio::test]
    async fn fetches_over_a_unix_socket_with_the_token() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            let body = r#"{"E2B_SANDBOX":"true","A":"b"}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(reply.as_bytes()).await.unwrap();
            req
        });
        let envs = fetch_envs(&EnvdTarget::Unix(path), Some("tok"))
            .await
            .unwrap();
        assert_eq!(envs["A"], "b");
        let req = server.await.unwrap();
        assert!(req.starts_with("get /envs http/1.1"), "{req}");
        assert!(req.contains("x-access-token: tok"), "{req}");
    }

    #[tokio::test]
    async fn unreachable_envd_is_an_error() {
        let err = fetch_envs(&EnvdTarget::Unix("/nonexistent/envd.sock".into()), None)
            .await
            .unwrap_err();
        assert!(matches!(err, EnvdError::Connect { .. }), "{err}");
    }
}
