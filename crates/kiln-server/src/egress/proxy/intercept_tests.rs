//! Tests of `network.rules` through the proxy's per-connection function: the sandbox's
//! TLS client trusts only its sandbox CA; the real server is a local TLS (or plain)
//! HTTP server whose certificate comes from a test CA the interceptor is told to trust.
//! Unit tier: no root, no DNAT; sockets on 127.0.0.1.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::tests::{guest_peer, harness_with, policy, Harness, WAIT};
use super::*;

const SECRET: &str = "s3cr3t-value";

/// Team 7's secrets: `key` has a value, `broken` cannot be read.
struct Fixed;

impl SecretSource for Fixed {
    fn value(&self, team_id: i64, name: &str) -> Result<Option<String>, String> {
        match (team_id, name) {
            (7, "key") => Ok(Some(SECRET.to_string())),
            (7, "broken") => Err("the store is down".to_string()),
            _ => Ok(None),
        }
    }
}

/// A CA of the test's own, standing in for a public one.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

fn test_ca(name: &str) -> TestCa {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap().der().clone();
    TestCa {
        issuer: Issuer::new(params, key),
        cert,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS server config with a certificate for `name` from `ca`; also gives the DER.
fn server_config(ca: &TestCa, name: &str) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap()
        .der()
        .clone();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(config), cert)
}

/// One request as the real server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    host: String,
    authorization: Option<String>,
    body: String,
}

/// A real server on 127.0.0.1: answers `ok <n>` to its n-th request.
struct Upstream {
    addr: SocketAddrV4,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// TLS handshakes that failed.
    refused: Arc<AtomicUsize>,
}

async fn upstream(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!("bound to IPv4")
    };
    let up = Upstream {
        addr,
        seen: Arc::default(),
        connections: Arc::default(),
        refused: Arc::default(),
    };
    let (seen, connections, refused) =
        (up.seen.clone(), up.connections.clone(), up.refused.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let (seen, refused, tls) = (seen.clone(), refused.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_http(tcp, seen).await,
                    Some(config) => {
                        match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                            Ok(stream) => serve_http(stream, seen).await,
                            Err(_) => {
                                refused.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }
            });
        }
    });
    up
}

async fn serve_http<I>(io: I, seen: Arc<Mutex<Vec<Seen>>>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            let host = header("host").unwrap_or_default();
            let authorization = header("authorization");
            let body = req.into_body().collect().await?.to_bytes();
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(Seen {
                    host,
                    authorization,
                    body: String::from_utf8(body.to_vec()).unwrap(),
                });
                seen.len()
            };
            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(format!("ok {n}")))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// A sandbox with `rules` (JSON), its own CA and an open policy.
fn ruled_sandbox(
    rules: serde_json::Value,
    ca: bool,
) -> (Arc<SandboxEgress>, Option<Arc<SandboxCa>>) {
    let ca = ca.then(|| Arc::new(SandboxCa::new("sbx1").unwrap()));
    let sandbox = Arc::new(SandboxEgress {
        sandbox_id: "sbx1".into(),
        team_id: 7,
        policy: EgressPolicy::default(),
        rules: Rules::parse(&rules).unwrap(),
        ca: ca.clone(),
    });
    (sandbox, ca)
}

fn bearer_rule(host: &str, template: &str) -> serde_json::Value {
    serde_json::json!({ host: [{"transform": {"headers": {"Authorization": template}}}] })
}

/// The proxy trusting `upstream_ca` for real servers, secrets from [`Fixed`].
fn proxy_for(
    sandbox: Arc<SandboxEgress>,
    upstream_ca: &TestCa,
    answers: &[(&str, &str)],
) -> Harness {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(upstream_ca.cert.clone()).unwrap();
    let interceptor = Interceptor::with_roots(Arc::new(Fixed), roots).unwrap();
    let h = harness_with(&[], &[], answers, interceptor);
    h.shared.set(super::tests::GUEST, Some(sandbox));
    h
}

/// A connection from the sandbox through the proxy to `dst`: the sandbox's end and the
/// proxy's task.
async fn through_proxy(h: &Harness, dst: SocketAddrV4) -> (TcpStream, tokio::task::JoinHandle<()>) {
    let (client, server) = super::tests::pair().await;
    let serve = tokio::spawn(h.shared.clone().connection(server, guest_peer(), Ok(dst)));
    (client, serve)
}

/// The sandbox's TLS client for `name`, trusting `root` only.
async fn sandbox_tls(
    tcp: TcpStream,
    name: &str,
    root: &CertificateDer<'static>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn http1<I>(io: I) -> SendRequest<Full<Bytes>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends one request; gives back the status and the body.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri("/x")
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let exchange = async {
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    tokio::time::timeout(WAIT, exchange).await.unwrap()
}

fn ca_cert(ca: &SandboxCa) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()
}

#[tokio::test]
async fn https_requests_get_their_rules_headers_on_one_kept_alive_connection() {
    let upstream_ca = test_ca("Test public CA");
    let up = upstream(Some(server_config(&upstream_ca, "api.test").0)).await;
    let (sandbox, ca) = ruled_sandbox(bearer_rule("api.test", "Bearer ${e2b.secrets.key}"), true);
    let h = proxy_for(sandbox, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;

    // The sandbox trusts only its own CA: the certificate it gets is from that CA.
    let tls = sandbox_tls(client, "api.test", &ca_cert(ca.as_ref().unwrap()))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut sender = http1(tls).await;
    // A header of the rule's name that the sandbox sent is replaced.
    let first = send(
        &mut sender,
        "GET",
        "api.test",
        &[("authorization", "mine")],
        "",
    )
    .await;
    assert_eq!(first, (StatusCode::OK, "ok 1".into()));
    let second = send(&mut sender, "POST", "API.test:443", &[], "hello").await;
    assert_eq!(second, (StatusCode::OK, "ok 2".into()));

    let bearer = Some(format!("Bearer {SECRET}"));
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            Seen {
                host: "api.test".into(),
                authorization: bearer.clone(),
                body: String::new()
            },
            Seen {
                host: "API.test:443".into(),
                authorization: bearer,
                body: "hello".into()
            },
        ]
    );
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "kept alive upstream too"
    );

    // Another name on this TLS connection: 421, reported, not forwarded.
    let (status, body) = send(&mut sender, "GET", "other.test", &[], "").await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(
        body.contains("for other.test, but its TLS connection is for api.test"),
        "{body}"
    );
    assert_eq!(up.seen.lock().unwrap().len(), 2);
    // The connection goes on.
    let (status, _) = send(&mut sender, "GET", "api.test", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    {
        let denials = h.denials.lock().unwrap();
        assert_eq!(denials.len(), 1);
        assert_eq!(denials[0].host.as_deref(), Some("other.test"));
        assert_eq!(denials[0].destination, up.addr);
    }
    drop(sender);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert!(h.shared.lock_open().is_empty(), "the slot is given back");
}

#[tokio::test]
async fn a_secret_that_cannot_be_filled_gets_a_502_without_any_value() {
    let upstream_ca = test_ca("Test public CA");
    let up = upstream(Some(server_config(&upstream_ca, "api.test").0)).await;
    let rules = serde_json::json!({"api.test": [{"transform": {"headers": {
        "X-Known": "${e2b.secrets.key}",
        "X-Missing": "${e2b.secrets.missing}",
    }}}]});
    let (sandbox, ca) = ruled_sandbox(rules, true);
    let h = proxy_for(sandbox, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;
    let tls = sandbox_tls(client, "api.test", &ca_cert(ca.as_ref().unwrap()))
        .await
        .unwrap();
    let mut sender = http1(tls).await;
    let (status, body) = send(&mut sender, "GET", "api.test", &[], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        body,
        "network.rules for api.test: the rule names secret \"missing\", which this sandbox's team does not have\n"
    );
    assert!(!body.contains(SECRET));
    assert_eq!(up.connections.load(Ordering::SeqCst), 0, "nothing was sent");
    drop(sender);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();

    let denials = h.denials.lock().unwrap();
    assert_eq!(denials.len(), 1);
    assert_eq!(
        (denials[0].sandbox_id.as_str(), denials[0].host.as_deref()),
        ("sbx1", Some("api.test"))
    );
    assert!(denials[0].reason.contains("\"missing\""));
    assert!(!denials[0].reason.contains(SECRET));
}

#[tokio::test]
async fn a_store_failure_gets_a_502_with_its_reason() {
    let upstream_ca = test_ca("Test public CA");
    let up = upstream(Some(server_config(&upstream_ca, "api.test").0)).await;
    let (sandbox, ca) = ruled_sandbox(bearer_rule("api.test", "${e2b.secrets.broken}"), true);
    let h = proxy_for(sandbox, &upstream_ca, &[]);
    let (client, _serve) = through_proxy(&h, up.addr).await;
    let tls = sandbox_tls(client, "api.test", &ca_cert(ca.as_ref().unwrap()))
        .await
        .unwrap();
    let (status, body) = send(&mut http1(tls).await, "GET", "api.test", &[], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("reading secret \"broken\" failed: the store is down"),
        "{body}"
    );
}

#[tokio::test]
async fn an_upstream_the_proxy_does_not_trust_gets_a_502_and_nothing() {
    let upstream_ca = test_ca("Test public CA");
    let impostor = test_ca("Impostor CA");
    let up = upstream(Some(server_config(&impostor, "api.test").0)).await;
    let (sandbox, ca) = ruled_sandbox(bearer_rule("api.test", "Bearer ${e2b.secrets.key}"), true);
    let h = proxy_for(sandbox, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;
    let tls = sandbox_tls(client, "api.test", &ca_cert(ca.as_ref().unwrap()))
        .await
        .unwrap();
    let mut sender = http1(tls).await;
    let (status, body) = send(&mut sender, "GET", "api.test", &[], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.starts_with(&format!("TLS with api.test at {} failed: ", up.addr)),
        "{body}"
    );
    assert!(body.contains("UnknownIssuer"), "{body}");
    assert!(!body.contains(SECRET));
    drop(sender);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert!(up.seen.lock().unwrap().is_empty(), "no request reached it");
    assert_eq!(up.refused.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn plain_http_gets_the_headers_with_the_preamble_replayed() {
    let upstream_ca = test_ca("Test public CA");
    let up = upstream(None).await;
    let rules = serde_json::json!({
        "api.test": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.key}"}}}],
        "elsewhere.test": [{"transform": {"headers": {"Authorization": "${e2b.secrets.key}"}}}],
    });
    let (sandbox, _) = ruled_sandbox(rules, false);
    let answers = [("api.test", "127.0.0.1"), ("elsewhere.test", "203.0.113.9")];
    let h = proxy_for(sandbox, &upstream_ca, &answers);
    let (client, serve) = through_proxy(&h, up.addr).await;
    let mut sender = http1(client).await;
    let host = format!("api.test:{}", up.addr.port());
    // The first request is what the proxy read to decide: it reaches the server whole.
    let first = send(&mut sender, "POST", &host, &[], "first body").await;
    assert_eq!(first, (StatusCode::OK, "ok 1".into()));
    let (status, _) = send(
        &mut sender,
        "GET",
        "plain.test",
        &[("authorization", "own")],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A name with rules that is not the destination's: the secret does not go there.
    let (status, body) = send(&mut sender, "GET", "elsewhere.test", &[], "").await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(
        body.contains("elsewhere.test does not resolve to 127.0.0.1"),
        "{body}"
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0],
        Seen {
            host,
            authorization: Some(format!("Bearer {SECRET}")),
            body: "first body".into()
        }
    );
    // Each request gets the rules of its own Host: none here.
    assert_eq!(seen[1].authorization.as_deref(), Some("own"));
    drop(sender);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    let denials = h.denials.lock().unwrap();
    assert_eq!(denials.len(), 1);
    assert_eq!(denials[0].host.as_deref(), Some("elsewhere.test"));
}

#[tokio::test]
async fn a_name_without_rules_is_spliced_with_the_servers_own_certificate() {
    let upstream_ca = test_ca("Test public CA");
    let (config, upstream_cert) = server_config(&upstream_ca, "plain.test");
    let up = upstream(Some(config)).await;
    let (sandbox, _) = ruled_sandbox(bearer_rule("api.test", "Bearer ${e2b.secrets.key}"), true);
    let h = proxy_for(sandbox, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;
    // The client trusts the server's CA, not the sandbox's: the TLS is the server's.
    let tls = sandbox_tls(client, "plain.test", &upstream_ca.cert)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, upstream_cert);
    let mut sender = http1(tls).await;
    let (status, body) = send(&mut sender, "GET", "plain.test", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok 1"));
    assert_eq!(up.seen.lock().unwrap()[0].authorization, None);
    drop(sender);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
}

#[tokio::test]
async fn denied_names_are_never_intercepted_and_rules_without_a_ca_are_refused() {
    let upstream_ca = test_ca("Test public CA");
    let up = upstream(Some(server_config(&upstream_ca, "api.test").0)).await;
    let rules = bearer_rule("api.test", "Bearer ${e2b.secrets.key}");
    // Denied by the policy: closed before any TLS, as without rules.
    let (sandbox, _) = ruled_sandbox(rules.clone(), true);
    let denied = Arc::new(SandboxEgress {
        policy: policy(&[], &["api.test"]),
        rules: sandbox.rules.clone(),
        ca: sandbox.ca.clone(),
        sandbox_id: sandbox.sandbox_id.clone(),
        team_id: sandbox.team_id,
    });
    let h = proxy_for(denied, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;
    let ca = ca_cert(sandbox.ca.as_ref().unwrap());
    assert!(sandbox_tls(client, "api.test", &ca).await.is_err());
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert!(h.denials.lock().unwrap()[0]
        .reason
        .contains("denied by the sandbox's network policy"));

    // Rules but no CA (a server bug): refused and reported, never spliced bare.
    let (no_ca, _) = ruled_sandbox(rules, false);
    let h = proxy_for(no_ca, &upstream_ca, &[]);
    let (client, serve) = through_proxy(&h, up.addr).await;
    assert!(sandbox_tls(client, "api.test", &ca).await.is_err());
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert!(h.denials.lock().unwrap()[0].reason.contains("egress CA"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_upgrade_becomes_a_tunnel_after_the_headers_are_set() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(dst) = listener.local_addr().unwrap() else {
        unreachable!("bound to IPv4")
    };
    // A server that switches protocols, then echoes.
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).await.unwrap();
        s.write_all(&ping).await.unwrap();
        String::from_utf8(head).unwrap().to_ascii_lowercase()
    });
    let (sandbox, _) = ruled_sandbox(bearer_rule("api.test", "Bearer ${e2b.secrets.key}"), false);
    let h = proxy_for(
        sandbox,
        &test_ca("Test public CA"),
        &[("api.test", "127.0.0.1")],
    );
    let (mut client, serve) = through_proxy(&h, dst).await;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, client.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(WAIT, client.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"ping");
    let seen = server.await.unwrap();
    assert!(
        seen.contains(&format!("authorization: bearer {SECRET}")),
        "{seen}"
    );
    drop(client);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert!(h.shared.lock_open().is_empty());
}
