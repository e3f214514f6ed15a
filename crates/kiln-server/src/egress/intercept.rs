//! Applying `network.rules`: the egress proxy hands a connection here instead of
//! splicing it when the name it announced has rules. We then speak HTTP/1.1 with the
//! sandbox ourselves, set each rule's headers (secrets filled in here, so the sandbox
//! only ever holds the placeholder) and forward every request to the original
//! destination over a connection of our own.
//!
//! - **HTTPS**: TLS toward the sandbox ends here, with a certificate for the SNI name
//!   from the sandbox's own CA ([`SandboxCa`]); only `http/1.1` is offered by ALPN.
//!   Upstream is a new TLS connection to the original destination with the same SNI,
//!   verified like any client's (webpki's roots, the host's, the operator's), so a
//!   sandbox that points a rule's name at another address gets a certificate error,
//!   not the secret. Every request must be for the SNI name (else `421`).
//! - **HTTP**: the same without TLS; the bytes the proxy already read are replayed
//!   into the parser by the caller. With no certificate to stand behind a name, a
//!   request whose Host has rules must go to an address of that name (checked with
//!   the host's resolver, as the policy does), else `421`: a sandbox cannot send
//!   `Host: api.example.com` to a server of its own to collect the secret.
//!
//! A connection is intercepted when the name it announced first has rules; one that
//! started with another name is spliced whole, so its later requests get no headers.
//! Every request of an intercepted connection gets the rules of its own Host (a Host
//! without rules: the request goes on unchanged). Bodies stream both ways; heads are
//! capped at [`MAX_HEAD`]. A secret that is unknown or cannot be read gets a `502` with
//! the one-line reason (never a value), and is reported. Connection upgrades
//! (WebSocket) are passed through once both ends agree.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::ca::SandboxCa;
use super::rules::{FillError, HeaderRule, Rules, SecretSource};

/// Largest request or response head (request line or status line and headers).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Longest wait for the upstream connection, TLS included.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the sandbox's TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for a request head, the next one on a kept-alive connection included.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What a response to the sandbox carries: the upstream's body, or our own answer.
type Body = Either<Incoming, Full<Bytes>>;

/// Checks that a name belongs to the connection's destination (plain HTTP): `Err`
/// holds the reason.
pub(crate) type CheckName = dyn Fn(String) -> BoxFuture<'static, Result<(), String>> + Send + Sync;

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("upstream root certificate #{index} (of those the operator configured) is not usable")]
    Root {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("rustls refused the egress proxy's TLS settings")]
    Config(#[source] rustls::Error),
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("could not connect to {destination}")]
    Connect {
        destination: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("no connection to {destination} within {}s", CONNECT_DEADLINE.as_secs())]
    Timeout { destination: SocketAddrV4 },
    #[error("TLS with {name} at {destination} failed")]
    Tls {
        name: String,
        destination: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("HTTP with {destination} failed")]
    Http {
        destination: SocketAddrV4,
        #[source]
        source: hyper::Error,
    },
}

/// What every intercepted connection shares: where secrets come from and how
/// upstream servers are verified.
pub(crate) struct Interceptor {
    secrets: Arc<dyn SecretSource>,
    provider: Arc<CryptoProvider>,
    upstream_tls: tokio_rustls::TlsConnector,
}

/// The sandbox one intercepted connection belongs to.
pub(crate) struct Session<'a> {
    pub(crate) team_id: i64,
    pub(crate) rules: &'a Rules,
    pub(crate) destination: SocketAddrV4,
    /// Reports a request refused because of its rules: (its host, the reason).
    pub(crate) refused: &'a (dyn Fn(&str, &str) + Send + Sync),
}

impl Interceptor {
    /// Upstream servers are verified with webpki's roots, the host's (those that
    /// parse; the others are logged) and `extra_roots`.
    pub(crate) fn new(
        secrets: Arc<dyn SecretSource>,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Interceptor, InterceptError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "egress proxy: some of the host's root certificates were not read");
        }
        let (_, unusable) = roots.add_parsable_certificates(native.certs);
        if unusable > 0 {
            tracing::warn!(
                unusable,
                "egress proxy: some of the host's root certificates do not parse"
            );
        }
        for (index, root) in extra_roots.into_iter().enumerate() {
            roots
                .add(root)
                .map_err(|source| InterceptError::Root { index, source })?;
        }
        Self::with_roots(secrets, roots)
    }

    /// Upstream servers are verified with `roots` only.
    pub(crate) fn with_roots(
        secrets: Arc<dyn SecretSource>,
        roots: RootCertStore,
    ) -> Result<Interceptor, InterceptError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(InterceptError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Interceptor {
            secrets,
            provider,
            upstream_tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// HTTPS to `name`: `client` yields the ClientHello again (the caller replays it).
    pub(crate) async fn https<S>(
        &self,
        client: S,
        name: &str,
        ca: &SandboxCa,
        session: &Session<'_>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let destination = session.destination;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let server_name = match ServerName::try_from(name.clone()) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(name, error = %e, "egress proxy: not a TLS server name");
                return;
            }
        };
        let leaf = match ca.leaf(&name) {
            Ok(leaf) => leaf,
            Err(e) => {
                tracing::warn!(%destination, name, error = %crate::report::chain(&e), "egress proxy: no certificate for the sandbox");
                return;
            }
        };
        let config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_no_client_auth()
                    .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(leaf)))
            });
        let mut config = match config {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy: TLS toward the sandbox refused");
                return;
            }
        };
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(client)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%destination, name, error = %e, "egress proxy: sandbox TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%destination, name, "egress proxy: sandbox TLS handshake timed out");
                return;
            }
        };
        let upstream = Upstream::Tls { name, server_name };
        self.serve(tls, upstream, session).await;
    }

    /// Plain HTTP: `client` yields the bytes already read again (the caller replays
    /// them). `check` vets each name with rules against the destination.
    pub(crate) async fn http<S>(&self, client: S, session: &Session<'_>, check: &CheckName)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upstream = Upstream::Plain {
            check,
            checked: Mutex::default(),
        };
        self.serve(client, upstream, session).await;
    }

    /// Serves HTTP/1.1 to the sandbox on `client` until either end closes.
    async fn serve<S>(&self, client: S, upstream: Upstream<'_>, session: &Session<'_>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let forward = Forward {
            interceptor: self,
            session,
            upstream,
            sender: tokio::sync::Mutex::new(None),
            tunnel: Mutex::new(None),
        };
        let service = hyper::service::service_fn(|req| forward.handle(req));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE)
            .max_buf_size(MAX_HEAD);
        let served = builder
            .serve_connection(TokioIo::new(client), service)
            .with_upgrades()
            .await;
        if let Err(e) = served {
            tracing::debug!(destination = %session.destination, error = %e, "egress proxy: intercepted connection ended");
        }
        // An upgraded connection goes on as a tunnel: hold the connection's slot
        // until it ends.
        let tunnel = forward
            .tunnel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tunnel) = tunnel {
            let _ = tunnel.await;
        }
    }
}

/// How requests go on from here.
enum Upstream<'a> {
    /// A new TLS connection with `server_name`; every request must be for `name`.
    Tls {
        name: String,
        server_name: ServerName<'static>,
    },
    /// Plain TCP; `checked` holds the names `check` found to be the destination's.
    Plain {
        check: &'a CheckName,
        checked: Mutex<HashSet<String>>,
    },
}

/// One intercepted connection's state: requests come one at a time (HTTP/1.1).
struct Forward<'a> {
    interceptor: &'a Interceptor,
    session: &'a Session<'a>,
    upstream: Upstream<'a>,
    /// The upstream connection, kept alive between requests.
    sender: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    /// The copy between both ends after an upgrade.
    tunnel: Mutex<Option<JoinHandle<()>>>,
}

impl Forward<'_> {
    async fn handle(&self, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(why) => return Ok(answer(StatusCode::BAD_REQUEST, why)),
        };
        let host = match (&self.upstream, host) {
            (Upstream::Tls { name, .. }, Some(host)) if host != *name => {
                let reason = format!(
                    "this request is for {host}, but its TLS connection is for {name}: open one for {host}"
                );
                (self.session.refused)(&host, &reason);
                return Ok(answer(StatusCode::MISDIRECTED_REQUEST, &reason));
            }
            (Upstream::Tls { name, .. }, _) => Some(name.clone()),
            (Upstream::Plain { .. }, host) => host,
        };
        if let Some(host) = host {
            let rules = self.session.rules.for_host(&host);
            if !rules.is_empty() {
                if let Err(reason) = self.check(&host).await {
                    (self.session.refused)(&host, &reason);
                    return Ok(answer(StatusCode::MISDIRECTED_REQUEST, &reason));
                }
                match self.fill(&rules) {
                    Ok(headers) => {
                        for (name, value) in headers {
                            req.headers_mut().insert(name, value);
                        }
                    }
                    Err(e) => {
                        let reason = format!("network.rules for {host}: {e}");
                        (self.session.refused)(&host, &reason);
                        return Ok(answer(StatusCode::BAD_GATEWAY, &reason));
                    }
                }
            }
        }
        Ok(self.forward(req).await)
    }

    /// Plain HTTP: whether `host` is a name of the destination (TLS needs no check:
    /// the upstream's certificate is verified for the name).
    async fn check(&self, host: &str) -> Result<(), String> {
        let Upstream::Plain { check, checked } = &self.upstream else {
            return Ok(());
        };
        let lock = || checked.lock().unwrap_or_else(PoisonError::into_inner);
        if lock().contains(host) {
            return Ok(());
        }
        check(host.to_string()).await?;
        lock().insert(host.to_string());
        Ok(())
    }

    /// Each rule's header with the secrets filled in. The secret source is read
    /// inline, as the API's handlers read the store.
    fn fill(&self, rules: &[&HeaderRule]) -> Result<Vec<(HeaderName, HeaderValue)>, FillError> {
        let secrets = &*self.interceptor.secrets;
        rules
            .iter()
            .map(|r| Ok((r.name.clone(), r.fill(self.session.team_id, secrets)?)))
            .collect()
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let destination = self.session.destination;
        let mut slot = self.sender.lock().await;
        let reusable = match slot.take() {
            Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
            None => None,
        };
        let mut sender = match reusable {
            Some(sender) => sender,
            None => match self.connect().await {
                Ok(sender) => sender,
                Err(e) => {
                    let reason = crate::report::chain(&e);
                    tracing::debug!(%destination, "egress proxy: upstream failed: {reason}");
                    return answer(StatusCode::BAD_GATEWAY, &reason);
                }
            },
        };
        let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let mut response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(source) => {
                let e = UpstreamError::Http {
                    destination,
                    source,
                };
                return answer(StatusCode::BAD_GATEWAY, &crate::report::chain(&e));
            }
        };
        match client_upgrade {
            Some(client) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The upstream connection is now the tunnel's: not kept.
                let upstream = hyper::upgrade::on(&mut response);
                let tunnel = tokio::spawn(async move {
                    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(upstream),
                    )
                    .await;
                });
                *self.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
            }
            _ => *slot = Some(sender),
        }
        response.map(Either::Left)
    }

    /// A new connection to the destination, within [`CONNECT_DEADLINE`].
    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let destination = self.session.destination;
        let connect = async {
            let tcp =
                TcpStream::connect(destination)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        destination,
                        source,
                    })?;
            let _ = tcp.set_nodelay(true);
            match &self.upstream {
                Upstream::Plain { .. } => handshake(tcp, destination).await,
                Upstream::Tls { name, server_name } => {
                    let tls = self
                        .interceptor
                        .upstream_tls
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(|source| UpstreamError::Tls {
                            name: name.clone(),
                            destination,
                            source,
                        })?;
                    handshake(tls, destination).await
                }
            }
        };
        tokio::time::timeout(CONNECT_DEADLINE, connect)
            .await
            .unwrap_or(Err(UpstreamError::Timeout { destination }))
    }
}

/// HTTP/1.1 on `io`; the connection runs in its own task until the sender is gone.
async fn handshake<T>(
    io: T,
    destination: SocketAddrV4,
) -> Result<SendRequest<Incoming>, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Http {
            destination,
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(%destination, error = %e, "egress proxy: upstream connection ended");
        }
    });
    Ok(sender)
}

/// The name a request is for: its one Host header (else its URI's host), lowercase,
/// without port or trailing dot; `None` when it names none.
fn request_host<B>(req: &Request<B>) -> Result<Option<String>, &'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err("a request has one Host header, not several"),
        (Some(value), None) => {
            let authority = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<Authority>().ok())
                .ok_or("the Host header is not host[:port]")?;
            authority.host().to_string()
        }
        (None, _) => match req.uri().host() {
            Some(host) => host.to_string(),
            None => return Ok(None),
        },
    };
    Ok(Some(host.trim_end_matches('.').to_ascii_lowercase()))
}

/// Whether a request asks to switch protocols (`Connection: upgrade`).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Our own answer: `status` and a one-line reason.
fn answer(status: StatusCode, reason: &str) -> Response<Body> {
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(headers: &[(&str, &str)], uri: &str) -> Result<Option<String>, &'static str> {
        let mut req = Request::builder().uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        request_host(&req.body(()).unwrap())
    }

    #[test]
    fn a_request_names_its_host_once() {
        let some = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(
            host(&[("Host", "API.Example.com:8443")], "/"),
            some("api.example.com")
        );
        assert_eq!(host(&[("Host", "a.test.")], "/"), some("a.test"));
        assert_eq!(host(&[], "http://B.test:81/x"), some("b.test"));
        assert_eq!(host(&[], "/x"), Ok(None));
        assert!(host(&[("Host", "a.test"), ("Host", "b.test")], "/").is_err());
        assert!(host(&[("Host", "a b")], "/").is_err());
        assert!(host(&[("Host", "a.test/x")], "/").is_err());
    }

    #[test]
    fn upgrades_are_asked_for_with_both_headers() {
        let req = |headers: &[(&str, &str)]| {
            let mut r = Request::builder();
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(()).unwrap()
        };
        assert!(wants_upgrade(&req(&[
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket")
        ])));
        assert!(!wants_upgrade(&req(&[("Upgrade", "websocket")])));
        assert!(!wants_upgrade(&req(&[("Connection", "upgrade")])));
    }

    #[test]
    fn our_answers_are_one_line_of_text() {
        let r = answer(StatusCode::BAD_GATEWAY, "a\r\nEvil: 1");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
        let Either::Right(body) = r.into_body() else {
            unreachable!("our own body")
        };
        let bytes = futures::executor::block_on(http_body_util::BodyExt::collect(body))
            .unwrap()
            .to_bytes();
        assert_eq!(&bytes[..], b"a  Evil: 1\n");
    }
}
