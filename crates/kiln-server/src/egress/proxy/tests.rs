//! Unit tests: no root, no DNAT. Real sockets on 127.0.0.1 stand in for the sandbox and
//! the destination; the peer and the original destination are passed in as the
//! accept loop would get them from the kernel. The one root test says so.

use super::*;
use tokio::task::JoinHandle;

pub(super) const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) fn guest_peer() -> SocketAddr {
    SocketAddr::from((GUEST, 40000))
}

pub(super) fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

pub(super) fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    EgressPolicy::parse(&v(allow), &v(deny)).unwrap()
}

/// Sandbox `sbx1` of team 7 with `policy` and no rules.
pub(super) fn sandbox(policy: EgressPolicy) -> Option<Arc<SandboxEgress>> {
    Some(Arc::new(SandboxEgress {
        sandbox_id: "sbx1".into(),
        team_id: 7,
        policy,
        rules: Rules::default(),
        ca: None,
    }))
}

pub(super) struct Harness {
    pub(super) shared: Arc<Shared>,
    pub(super) denials: Arc<Mutex<Vec<Denial>>>,
}

pub(super) fn recorder() -> (OnDenied, Arc<Mutex<Vec<Denial>>>) {
    let denials = Arc::new(Mutex::new(Vec::new()));
    let sink = denials.clone();
    (Arc::new(move |d| sink.lock().unwrap().push(d)), denials)
}

/// `answers`: what the fixed resolver says, name → one address. No secrets, and no
/// upstream is trusted.
pub(super) fn harness(
    blocked: &[&str],
    operator_allow: &[&str],
    answers: &[(&str, &str)],
) -> Harness {
    let interceptor =
        Interceptor::with_roots(Arc::new(NoSecrets), rustls::RootCertStore::empty()).unwrap();
    harness_with(blocked, operator_allow, answers, interceptor)
}

pub(super) fn harness_with(
    blocked: &[&str],
    operator_allow: &[&str],
    answers: &[(&str, &str)],
    interceptor: Interceptor,
) -> Harness {
    let nets = |l: &[&str]| l.iter().map(|c| c.parse().unwrap()).collect();
    let resolver = Resolver::Fixed(
        answers
            .iter()
            .map(|(name, ip)| (name.to_string(), vec![ip.parse().unwrap()]))
            .collect(),
    );
    let (on_denied, denials) = recorder();
    let shared = Shared::new(
        nets(blocked),
        nets(operator_allow),
        on_denied,
        resolver,
        interceptor,
    )
    .unwrap();
    Harness { shared, denials }
}

/// A connected pair over loopback: (the sandbox's end, the proxy's end).
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

/// A destination that takes one connection, reads `expect` bytes, answers "pong"
/// and closes; the task gives back what it read.
async fn destination(expect: usize) -> (SocketAddrV4, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!("bound to IPv4")
    };
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = vec![0; expect];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    (addr, task)
}

/// The first flight of a real TLS client (rustls) for `name`.
pub(super) fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[test]
fn admission_wants_a_registered_guest_that_was_redirected() {
    let h = harness(&[], &[], &[]);
    let local: SocketAddr = "10.77.0.1:4000".parse().unwrap();
    let dst = || Ok(v4("203.0.113.5:443"));
    let admit = |peer, original| h.shared.admit(peer, local, original);

    assert!(matches!(
        admit(guest_peer(), dst()),
        Err(Refusal::Unregistered(ip)) if ip == GUEST
    ));
    h.shared.set(GUEST, sandbox(EgressPolicy::default()));
    let a = admit(guest_peer(), dst()).unwrap();
    assert_eq!(a.destination, v4("203.0.113.5:443"));
    assert_eq!(a.sandbox.sandbox_id, "sbx1");

    // Outside the pool nothing is served, registered or not.
    let stranger = Ipv4Addr::new(192, 168, 1, 2);
    h.shared.set(stranger, sandbox(EgressPolicy::default()));
    assert!(matches!(
        admit(SocketAddr::from((stranger, 1)), dst()),
        Err(Refusal::OutsidePool { .. })
    ));
    assert!(matches!(
        admit("[fd00::2]:1".parse().unwrap(), dst()),
        Err(Refusal::NotIpv4(_))
    ));
    // Not redirected: the client dialled the proxy itself.
    assert!(matches!(
        admit(guest_peer(), Ok(v4("10.77.0.1:4000"))),
        Err(Refusal::NotRedirected(_))
    ));
    assert!(matches!(
        admit(guest_peer(), Err(io::Error::other("ENOENT"))),
        Err(Refusal::NoOriginalDestination(_))
    ));
    h.shared.set(GUEST, None);
    assert!(matches!(
        admit(guest_peer(), dst()),
        Err(Refusal::Unregistered(_))
    ));
}

#[test]
fn a_guest_holds_at_most_its_share_of_connections() {
    let mut h = harness(&[], &[], &[]);
    Arc::get_mut(&mut h.shared).unwrap().max_per_guest = 2;
    h.shared.set(GUEST, sandbox(EgressPolicy::default()));
    let local: SocketAddr = "10.77.0.1:4000".parse().unwrap();
    let admit = || {
        h.shared
            .admit(guest_peer(), local, Ok(v4("203.0.113.5:80")))
    };

    let first = admit().unwrap();
    let second = admit().unwrap();
    let refusal = admit().err().unwrap();
    assert!(matches!(refusal, Refusal::Busy { max: 2, .. }));
    assert!(refusal.to_string().contains("sbx1"), "{refusal}");
    drop(first);
    let third = admit().unwrap();
    drop((second, third));
    assert!(h.shared.lock_open().is_empty());
}

#[tokio::test]
async fn strangers_and_unredirected_connections_are_closed_without_a_word() {
    let h = harness(&[], &[], &[]);
    // Unregistered guest.
    let (mut client, server) = pair().await;
    let serve = h
        .shared
        .clone()
        .connection(server, guest_peer(), Ok(v4("127.0.0.1:9")));
    tokio::time::timeout(WAIT, serve).await.unwrap();
    let mut got = Vec::new();
    assert_eq!(client.read_to_end(&mut got).await.unwrap(), 0);

    // Registered, but its original destination is the proxy's own address.
    h.shared.set(GUEST, sandbox(EgressPolicy::default()));
    let (mut client, server) = pair().await;
    let SocketAddr::V4(local) = server.local_addr().unwrap() else {
        unreachable!("bound to IPv4")
    };
    let serve = h.shared.clone().connection(server, guest_peer(), Ok(local));
    tokio::time::timeout(WAIT, serve).await.unwrap();
    assert_eq!(client.read_to_end(&mut got).await.unwrap(), 0);
    assert!(h.denials.lock().unwrap().is_empty());
}

#[tokio::test]
async fn blocked_ranges_come_first_unless_the_operator_allowed_them() {
    let h = harness(&["10.0.0.0/8", "192.168.0.0/16"], &["10.1.2.0/24"], &[]);
    let decide = |p: EgressPolicy, dst: &str| {
        let shared = h.shared.clone();
        let dst = v4(dst);
        async move { shared.decide(&p, dst, None).await }
    };
    assert_eq!(
        decide(EgressPolicy::default(), "10.9.9.9:443").await,
        Err("10.9.9.9 is in a range sandboxes may not reach".into())
    );
    // Not even the sandbox's own allow-list opens a blocked range.
    assert!(decide(policy(&["10.9.9.9"], &[]), "10.9.9.9:443")
        .await
        .is_err());
    assert!(decide(EgressPolicy::default(), "10.1.2.3:443")
        .await
        .is_ok());
    assert!(decide(EgressPolicy::default(), "1.1.1.1:443").await.is_ok());
    assert!(decide(policy(&[], &["1.1.1.1"]), "1.1.1.1:443")
        .await
        .is_err());
}

#[tokio::test]
async fn a_name_that_allows_must_resolve_to_the_destination() {
    let h = harness(&[], &[], &[("api.test", "203.0.113.5")]);
    let p = policy(&["api.test", "other.test"], &["0.0.0.0/0"]);
    let decide = |ip: &str, host: Option<&'static str>| {
        let (shared, p) = (h.shared.clone(), p.clone());
        let dst = SocketAddrV4::new(ip.parse().unwrap(), 443);
        async move { shared.decide(&p, dst, host).await }
    };
    assert_eq!(decide("203.0.113.5", Some("api.test")).await, Ok(()));
    assert_eq!(
        decide("198.51.100.1", Some("api.test")).await,
        Err(
            "api.test does not resolve to 198.51.100.1: the name and the destination disagree"
                .into()
        )
    );
    let unresolved = decide("203.0.113.5", Some("other.test")).await.unwrap_err();
    assert!(
        unresolved.starts_with("other.test does not resolve to 203.0.113.5: looking it up failed"),
        "{unresolved}"
    );
    let nameless = decide("203.0.113.5", None).await.unwrap_err();
    assert!(
        nameless.contains("denied by the sandbox's network policy"),
        "{nameless}"
    );
}

#[tokio::test]
async fn the_host_resolver_gives_ipv4_answers() {
    let answers = Resolver::System.ipv4("localhost", 80).await.unwrap();
    assert!(answers.contains(&Ipv4Addr::LOCALHOST), "{answers:?}");
}

#[tokio::test]
async fn allowed_connections_are_replayed_byte_for_byte() {
    let http = b"GET /x HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: t\r\n\r\nbody".to_vec();
    for first_flight in [http, client_hello("localhost")] {
        let h = harness(&[], &[], &[("localhost", "127.0.0.1")]);
        h.shared
            .set(GUEST, sandbox(policy(&["localhost"], &["0.0.0.0/0"])));
        let (dst, upstream) = destination(first_flight.len()).await;
        let (mut client, server) = pair().await;
        let serve = tokio::spawn(h.shared.clone().connection(server, guest_peer(), Ok(dst)));

        client.write_all(&first_flight).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, b"pong");
        assert_eq!(upstream.await.unwrap(), first_flight);
        client.shutdown().await.unwrap();
        tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
        assert!(h.denials.lock().unwrap().is_empty());
        assert!(h.shared.lock_open().is_empty(), "the slot is given back");
    }
}

/// Runs one connection from the guest to `dst` that sends `first_flight`; gives
/// back all the client received.
async fn exchange(h: &Harness, dst: SocketAddrV4, first_flight: &[u8]) -> Vec<u8> {
    let (mut client, server) = pair().await;
    let serve = tokio::spawn(h.shared.clone().connection(server, guest_peer(), Ok(dst)));
    client.write_all(first_flight).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    drop(client);
    tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    answer
}

#[tokio::test]
async fn denied_http_gets_a_403_with_the_reason_and_is_reported() {
    let h = harness(&[], &[], &[]);
    h.shared.set(GUEST, sandbox(policy(&[], &["blocked.test"])));
    let dst = v4("198.51.100.7:80");
    let answer = exchange(&h, dst, b"GET / HTTP/1.1\r\nHost: Blocked.test\r\n\r\n").await;
    let answer = String::from_utf8(answer).unwrap();
    let reason = "blocked.test (198.51.100.7) is denied by the sandbox's network policy";
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.contains("\r\nContent-Type: text/plain\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    assert!(answer.ends_with(&format!("\r\n\r\n{reason}\n")), "{answer}");

    let denials = h.denials.lock().unwrap();
    assert_eq!(denials.len(), 1);
    let d = &denials[0];
    assert_eq!((d.sandbox_id.as_str(), d.team_id), ("sbx1", 7));
    assert_eq!(
        (d.host.as_deref(), d.destination),
        (Some("blocked.test"), dst)
    );
    assert_eq!(d.reason, reason);
}

#[tokio::test]
async fn denied_tls_is_closed_without_a_byte_and_reported() {
    let h = harness(&[], &[], &[]);
    h.shared.set(GUEST, sandbox(policy(&[], &["blocked.test"])));
    let answer = exchange(&h, v4("198.51.100.7:443"), &client_hello("blocked.test")).await;
    assert!(answer.is_empty());
    let denials = h.denials.lock().unwrap();
    assert_eq!(denials.len(), 1);
    assert_eq!(denials[0].host.as_deref(), Some("blocked.test"));
}

#[tokio::test]
async fn an_unreachable_destination_gets_a_502_over_http() {
    let h = harness(&[], &[], &[]);
    h.shared.set(GUEST, sandbox(EgressPolicy::default()));
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        addr
    };
    let answer = exchange(&h, closed, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let answer = String::from_utf8(answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!("could not connect to {closed}")),
        "{answer}"
    );
    // TLS: just closed.
    assert!(exchange(&h, closed, &client_hello("a.test"))
        .await
        .is_empty());
    assert!(h.denials.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_listener_closes_strangers_keeps_accepting_and_stops_when_dropped() {
    let (on_denied, denials) = recorder();
    let proxy = EgressProxy::start(vec![], vec![], on_denied, Arc::new(NoSecrets), Vec::new())
        .await
        .unwrap();
    assert_ne!(proxy.port(), 0);
    proxy.set(GUEST, sandbox(EgressPolicy::default()));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));
    // 127.0.0.1 is no sandbox: closed at once, and the loop goes on.
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        let n = tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .unwrap();
        assert_eq!(n.unwrap(), 0);
    }
    assert!(denials.lock().unwrap().is_empty());

    drop(proxy);
    let stopped = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, stopped).await.unwrap();
}

/// Privilege tier: root. The one test of `SO_ORIGINAL_DST` itself: it re-runs in a
/// fresh network namespace (`unshare -n`) where a DNAT rule sends a "guest"
/// address's port 80 to the proxy, as the sandbox firewall does. Without root it
/// says SKIP, except under CI (root): there it fails.
#[test]
fn a_redirected_connection_keeps_its_original_destination() {
    const NAME: &str = "a_redirected_connection_keeps_its_original_destination";
    if std::env::var_os("KILN_EGRESS_NETNS").is_some() {
        return in_netns();
    }
    let unshare = std::process::Command::new("unshare")
        .args(["-n", "true"])
        .status();
    if !unshare.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "{NAME} needs root (unshare -n), and CI runs as root"
        );
        eprintln!("SKIP {NAME}: needs root (unshare -n)");
        return;
    }
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let out = std::process::Command::new("unshare")
        .arg("-n")
        .arg(std::env::current_exe().unwrap())
        .args([&format!("{module}::{NAME}"), "--exact", "--nocapture"])
        .env("KILN_EGRESS_NETNS", "1")
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && log.contains("1 passed"), "{log}");
}

/// Inside the namespace: loopback holds the host end (10.77.0.1), the guest
/// (10.77.0.2) and a destination (203.0.113.5); the guest's port 80 is DNATed.
fn in_netns() {
    let sh = |cmd: &str| {
        let ok = std::process::Command::new("sh")
            .args(["-c", cmd])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{cmd}");
    };
    sh("ip link set lo up && ip addr add 10.77.0.1/30 dev lo \
        && ip addr add 10.77.0.2/32 dev lo && ip addr add 203.0.113.5/32 dev lo");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (on_denied, denials) = recorder();
        let proxy = EgressProxy::start(vec![], vec![], on_denied, Arc::new(NoSecrets), Vec::new()).await.unwrap();
        proxy.set(GUEST, sandbox(policy(&[], &["blocked.test"])));
        sh(&format!(
            "iptables -t nat -A OUTPUT -p tcp -s {GUEST} --dport 80 -j DNAT --to-destination 10.77.0.1:{}",
            proxy.port()
        ));
        let from_guest = |to: &str| {
            let to: SocketAddr = to.parse().unwrap();
            async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::from((GUEST, 0))).unwrap();
                socket.connect(to).await.unwrap()
            }
        };
        let talk = |mut c: TcpStream, first_flight: &'static [u8]| async move {
            c.write_all(first_flight).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(WAIT, c.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8(answer).unwrap()
        };

        // Denied by name: the proxy saw where the guest was going.
        let c = from_guest("203.0.113.5:80").await;
        let answer = talk(c, b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        let destination = denials.lock().unwrap()[0].destination;
        assert_eq!(destination, v4("203.0.113.5:80"));

        // Allowed: spliced to that same destination.
        let upstream = TcpListener::bind("203.0.113.5:80").await.unwrap();
        let serve = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await.unwrap();
            s.write_all(b"pong").await.unwrap();
            s.shutdown().await.unwrap();
            head
        });
        let c = from_guest("203.0.113.5:80").await;
        let answer = talk(c, b"GET / HTTP/1.1\r\nHost: ok.test\r\n\r\n").await;
        assert_eq!(answer, "pong");
        assert_eq!(&serve.await.unwrap(), b"GET ");

        // Straight to the proxy, not redirected: closed without a word.
        let c = from_guest(&format!("10.77.0.1:{}", proxy.port())).await;
        assert_eq!(talk(c, b"").await, "");
        assert_eq!(denials.lock().unwrap().len(), 1);
    });
}
