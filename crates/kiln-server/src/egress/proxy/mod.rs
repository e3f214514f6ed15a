//! The egress proxy: a transparent TCP proxy on the host for sandboxes whose network
//! policy names domains or that have `network.rules`. The firewall DNATs such a
//! sandbox's TCP ports 80 and 443 to `<host end of its veth>:<proxy port>`; the kernel
//! keeps the address the sandbox asked for, which we read back with `SO_ORIGINAL_DST`.
//!
//! Each connection runs in its own task, in this order:
//! 1. **Admit**, before reading a byte: the peer must be a registered guest address in
//!    the sandbox pool, the connection must have been redirected (its original
//!    destination is not the proxy's own address) and the guest must be under its
//!    connection cap. Anything else is closed at once.
//! 2. **Read the preamble** ([`preamble`]), at most 16 KiB in at most 64 reads within
//!    10 s: a TLS ClientHello gives its SNI, an HTTP request its `Host`; anything else
//!    gives no name.
//! 3. **Decide**: ranges no sandbox may reach (unless the operator allowed them), then
//!    the sandbox's [`EgressPolicy`]. A connection allowed because of the name it
//!    announced must also go to an address of that name, checked by resolving it on
//!    the host: announcing `allowed.example` while connecting elsewhere is refused.
//! 4. **Intercept, splice or refuse**: when the announced name has `network.rules`,
//!    `egress::intercept` serves the connection (TLS terminated with the sandbox's
//!    own CA, each request's headers set); otherwise connect to the
//!    original destination, replay the preamble byte for byte and copy both ways; or
//!    report a [`Denial`] and close (plain HTTP gets a `403` first, TLS just the close).
//!    A denied connection is never intercepted.
//!
//! The policy looks at the first request of a connection only: later requests on a
//! kept-alive HTTP connection go to the same (checked) address (an intercepted one
//! checks each request whose Host has rules again). What name-based
//! rules cannot stop: a front end that serves many names (domain fronting on a CDN),
//! and TLS Encrypted Client Hello, whose outer SNI is the only name we see.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_runtime::jail::net::{Ipv4Cidr, POOL};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::egress::ca::SandboxCa;
use crate::egress::intercept::{Interceptor, Session};
use crate::egress::rules::{Rules, SecretSource};
use crate::egress::{EgressPolicy, Verdict};

#[cfg(test)]
mod intercept_tests;
mod preamble;
#[cfg(test)]
mod tests;

use preamble::{read_preamble, Preamble, Protocol, Replay};

/// Longest wait for the client to announce itself.
const PREAMBLE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the host's resolver when checking an announced name.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for the original destination to accept.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Connections one sandbox may hold through the proxy, so it cannot use up the host's fds.
const MAX_PER_GUEST: usize = 256;

/// What the proxy knows about one sandbox, keyed by its guest address.
pub struct SandboxEgress {
    pub sandbox_id: String,
    pub team_id: i64,
    pub policy: EgressPolicy,
    /// Headers to set on requests, per host (`network.rules`).
    pub rules: Rules,
    /// The sandbox's own CA, for HTTPS to hosts with rules; `None` without rules.
    pub ca: Option<Arc<SandboxCa>>,
}

/// One refused connection or request, for the audit log and metrics (never any
/// payload, never a secret).
#[derive(Debug, Clone)]
pub struct Denial {
    pub sandbox_id: String,
    pub team_id: i64,
    /// The name the connection (or request) announced (SNI or Host), if any.
    pub host: Option<String>,
    pub destination: SocketAddrV4,
    pub reason: String,
}

/// A [`SecretSource`] without secrets: every secret a rule names is unknown.
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn value(&self, _team_id: i64, _name: &str) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// Called for every refused connection, and every request refused because of its
/// rules (an unknown secret, a misdirected request).
type OnDenied = Arc<dyn Fn(Denial) + Send + Sync>;

/// The running proxy; dropping it stops accepting (spliced connections stay up).
pub struct EgressProxy {
    port: u16,
    shared: Arc<Shared>,
    accept_loop: tokio::task::AbortHandle,
}

impl EgressProxy {
    /// Binds 0.0.0.0:0 (an ephemeral port) and starts the accept loop on the current
    /// tokio runtime. `blocked`: destinations no sandbox may reach whatever its policy
    /// says (private ranges, the host's networks); `operator_allow`: exceptions to
    /// `blocked` the operator configured. `on_denied` is called for every refused
    /// connection. `secrets` fills in the placeholders of `network.rules`; the servers
    /// behind rules are verified with webpki's roots, the host's and `upstream_roots`.
    pub async fn start(
        blocked: Vec<Ipv4Cidr>,
        operator_allow: Vec<Ipv4Cidr>,
        on_denied: Arc<dyn Fn(Denial) + Send + Sync>,
        secrets: Arc<dyn SecretSource>,
        upstream_roots: Vec<CertificateDer<'static>>,
    ) -> io::Result<Arc<EgressProxy>> {
        let interceptor = Interceptor::new(secrets, upstream_roots)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let shared = Shared::new(
            blocked,
            operator_allow,
            on_denied,
            Resolver::System,
            interceptor,
        )?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let port = listener.local_addr()?.port();
        let accept_loop = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        tracing::info!(port, "egress proxy listening");
        Ok(Arc::new(EgressProxy {
            port,
            shared,
            accept_loop,
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Registers (Some) or forgets (None) the sandbox at `guest`. Connections already
    /// spliced stay up (the firewall cuts them if needed); new ones use the new policy
    /// immediately.
    pub fn set(&self, guest: Ipv4Addr, sandbox: Option<Arc<SandboxEgress>>) {
        self.shared.set(guest, sandbox);
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds and the like: the listener is fine, wait for some to close.
                tracing::warn!(error = %e, "egress proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let original = original_destination(&client);
        tokio::spawn(shared.clone().connection(client, peer, original));
    }
}

/// Where the client was going before the firewall redirected it to us.
fn original_destination(client: &TcpStream) -> io::Result<SocketAddrV4> {
    socket2::SockRef::from(client)
        .original_dst_v4()?
        .as_socket_ipv4()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST is not an IPv4 address"))
}

/// Why a connection was closed before anything was read from it.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("peer {0} is not an IPv4 address")]
    NotIpv4(SocketAddr),
    #[error("peer {peer} is outside the sandbox pool {pool}")]
    OutsidePool { peer: Ipv4Addr, pool: Ipv4Cidr },
    #[error("peer {0} is not a registered sandbox")]
    Unregistered(Ipv4Addr),
    #[error("the original destination is unknown")]
    NoOriginalDestination(#[source] io::Error),
    #[error("the connection's local address is unknown")]
    NoLocalAddress(#[source] io::Error),
    #[error("the connection to {0} was not redirected by the firewall")]
    NotRedirected(SocketAddrV4),
    #[error("sandbox {sandbox_id} ({guest}) already has {max} connections through the proxy")]
    Busy {
        sandbox_id: String,
        guest: Ipv4Addr,
        max: usize,
    },
}

/// A connection that passed admission; holds one of its sandbox's connection slots.
struct Admitted {
    sandbox: Arc<SandboxEgress>,
    destination: SocketAddrV4,
    _slot: Slot,
}

/// One of a guest's [`MAX_PER_GUEST`] connections; given back on drop.
struct Slot {
    shared: Arc<Shared>,
    guest: Ipv4Addr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.lock_open();
        if let Some(n) = open.get_mut(&self.guest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.guest);
            }
        }
    }
}

/// What the accept loop and every connection task share.
struct Shared {
    pool: Ipv4Cidr,
    blocked: Vec<Ipv4Cidr>,
    operator_allow: Vec<Ipv4Cidr>,
    on_denied: OnDenied,
    resolver: Resolver,
    interceptor: Interceptor,
    max_per_guest: usize,
    preamble_deadline: Duration,
    sandboxes: RwLock<HashMap<Ipv4Addr, Arc<SandboxEgress>>>,
    /// Open connections per guest address; absent means none.
    open: Mutex<HashMap<Ipv4Addr, usize>>,
}

impl Shared {
    fn new(
        blocked: Vec<Ipv4Cidr>,
        operator_allow: Vec<Ipv4Cidr>,
        on_denied: OnDenied,
        resolver: Resolver,
        interceptor: Interceptor,
    ) -> io::Result<Arc<Shared>> {
        let pool = POOL.parse::<Ipv4Cidr>().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("sandbox pool: {e}"))
        })?;
        Ok(Arc::new(Shared {
            pool,
            blocked,
            operator_allow,
            on_denied,
            resolver,
            interceptor,
            max_per_guest: MAX_PER_GUEST,
            preamble_deadline: PREAMBLE_DEADLINE,
            sandboxes: RwLock::default(),
            open: Mutex::default(),
        }))
    }

    fn set(&self, guest: Ipv4Addr, sandbox: Option<Arc<SandboxEgress>>) {
        let mut sandboxes = self
            .sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match sandbox {
            Some(s) => sandboxes.insert(guest, s),
            None => sandboxes.remove(&guest),
        };
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<Ipv4Addr, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Step 1: who is asking and whether it was redirected; reads nothing.
    fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        local: SocketAddr,
        original: io::Result<SocketAddrV4>,
    ) -> Result<Admitted, Refusal> {
        let SocketAddr::V4(peer_v4) = peer else {
            return Err(Refusal::NotIpv4(peer));
        };
        let guest = *peer_v4.ip();
        if !self.pool.contains(guest) {
            return Err(Refusal::OutsidePool {
                peer: guest,
                pool: self.pool,
            });
        }
        let sandbox = self
            .sandboxes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&guest)
            .cloned()
            .ok_or(Refusal::Unregistered(guest))?;
        let destination = original.map_err(Refusal::NoOriginalDestination)?;
        if SocketAddr::V4(destination) == local {
            return Err(Refusal::NotRedirected(destination));
        }
        let mut open = self.lock_open();
        let n = open.entry(guest).or_insert(0);
        if *n >= self.max_per_guest {
            return Err(Refusal::Busy {
                sandbox_id: sandbox.sandbox_id.clone(),
                guest,
                max: self.max_per_guest,
            });
        }
        *n += 1;
        drop(open);
        Ok(Admitted {
            sandbox,
            destination,
            _slot: Slot {
                shared: self.clone(),
                guest,
            },
        })
    }

    /// One accepted connection, from admission to its end.
    async fn connection(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        original: io::Result<SocketAddrV4>,
    ) {
        let admitted = client
            .local_addr()
            .map_err(Refusal::NoLocalAddress)
            .and_then(|local| self.admit(peer, local, original));
        let admitted = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                tracing::debug!(%peer, "egress proxy: closed at once: {refusal}");
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let preamble = read_preamble(&mut client, self.preamble_deadline).await;
        let host = preamble.host.as_deref();
        let sandbox = &admitted.sandbox;
        let destination = admitted.destination;
        match self.decide(&sandbox.policy, destination, host).await {
            Ok(()) => {
                tracing::debug!(
                    sandbox_id = %sandbox.sandbox_id, %destination, host,
                    "egress proxy: allowed"
                );
                let ruled = host
                    .filter(|h| !sandbox.rules.for_host(h).is_empty())
                    .map(str::to_string);
                match ruled {
                    Some(name) => self.intercept(client, preamble, &name, &admitted).await,
                    None => splice(client, destination, &preamble).await,
                }
            }
            Err(reason) => {
                // Debug only: `on_denied` feeds the audit log, and a looping client
                // must not flood the server's log.
                tracing::debug!(
                    sandbox_id = %sandbox.sandbox_id, %destination, host,
                    "egress proxy: denied: {reason}"
                );
                (self.on_denied)(Denial {
                    sandbox_id: sandbox.sandbox_id.clone(),
                    team_id: sandbox.team_id,
                    host: preamble.host.clone(),
                    destination,
                    reason: reason.clone(),
                });
                if preamble.protocol == Protocol::Http {
                    respond(&mut client, "403 Forbidden", &reason).await;
                }
            }
        }
    }

    /// Step 4 for a name with rules: the connection is served by the interceptor.
    async fn intercept(
        self: &Arc<Self>,
        client: TcpStream,
        preamble: Preamble,
        name: &str,
        admitted: &Admitted,
    ) {
        let sandbox = &admitted.sandbox;
        let destination = admitted.destination;
        let refused = |host: &str, reason: &str| {
            tracing::debug!(
                sandbox_id = %sandbox.sandbox_id, %destination, host,
                "egress proxy: request refused: {reason}"
            );
            (self.on_denied)(Denial {
                sandbox_id: sandbox.sandbox_id.clone(),
                team_id: sandbox.team_id,
                host: Some(host.to_string()),
                destination,
                reason: reason.to_string(),
            });
        };
        let session = Session {
            team_id: sandbox.team_id,
            rules: &sandbox.rules,
            destination,
            refused: &refused,
        };
        match (preamble.protocol, &sandbox.ca) {
            (Protocol::Tls, Some(ca)) => {
                let client = Replay::new(preamble.bytes, client);
                self.interceptor.https(client, name, ca, &session).await;
            }
            // Splicing would send the requests without their headers: say why instead.
            (Protocol::Tls, None) => refused(
                name,
                &format!(
                    "network.rules for {name} need the sandbox's egress CA, which it does not have"
                ),
            ),
            (Protocol::Http, _) => {
                let shared = self.clone();
                let check = move |name: String| -> BoxFuture<'static, Result<(), String>> {
                    let shared = shared.clone();
                    Box::pin(async move { shared.resolves_to(&name, destination).await })
                };
                let client = Replay::new(preamble.bytes, client);
                self.interceptor.http(client, &session, &check).await;
            }
            // Never: only TLS and HTTP announce a name.
            (Protocol::Other, _) => splice(client, destination, &preamble).await,
        }
    }

    /// Step 3: `Ok` to splice, or the reason to refuse.
    async fn decide(
        &self,
        policy: &EgressPolicy,
        destination: SocketAddrV4,
        host: Option<&str>,
    ) -> Result<(), String> {
        let ip = *destination.ip();
        let covered = |nets: &[Ipv4Cidr]| nets.iter().any(|n| n.contains(ip));
        if covered(&self.blocked) && !covered(&self.operator_allow) {
            return Err(format!("{ip} is in a range sandboxes may not reach"));
        }
        let name = match policy.decide(ip, host) {
            Verdict::Deny { reason } => return Err(reason),
            Verdict::Allow { verify_host: None } => return Ok(()),
            Verdict::Allow {
                verify_host: Some(name),
            } => name,
        };
        self.resolves_to(&name, destination).await
    }

    /// Whether the host's resolver gives `destination`'s address for `name`.
    async fn resolves_to(&self, name: &str, destination: SocketAddrV4) -> Result<(), String> {
        let ip = *destination.ip();
        match self.resolver.ipv4(name, destination.port()).await {
            Ok(addrs) if addrs.contains(&ip) => Ok(()),
            Ok(_) => Err(format!(
                "{name} does not resolve to {ip}: the name and the destination disagree"
            )),
            Err(e) => Err(format!(
                "{name} does not resolve to {ip}: looking it up failed ({e})"
            )),
        }
    }
}

/// How announced names are looked up.
enum Resolver {
    /// The host's resolver (`getaddrinfo`).
    System,
    /// Fixed answers, so decisions are tested without DNS.
    #[cfg(test)]
    Fixed(HashMap<String, Vec<Ipv4Addr>>),
}

impl Resolver {
    /// The IPv4 addresses of `name`, within [`RESOLVE_DEADLINE`].
    async fn ipv4(&self, name: &str, port: u16) -> Result<Vec<Ipv4Addr>, String> {
        match self {
            Resolver::System => {
                let answers =
                    tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host((name, port)))
                        .await
                        .map_err(|_| format!("no answer within {}s", RESOLVE_DEADLINE.as_secs()))?
                        .map_err(|e| e.to_string())?;
                Ok(answers
                    .filter_map(|a| match a.ip() {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                    .collect())
            }
            #[cfg(test)]
            Resolver::Fixed(answers) => answers
                .get(name)
                .cloned()
                .ok_or_else(|| "no such name".to_string()),
        }
    }
}

/// Step 4: connect to where the client was going, replay what it sent, copy both ways.
async fn splice(mut client: TcpStream, destination: SocketAddrV4, preamble: &Preamble) {
    let connected = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(destination))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}s", CONNECT_DEADLINE.as_secs()),
            ))
        });
    let mut upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%destination, error = %e, "egress proxy: upstream connect failed");
            if preamble.protocol == Protocol::Http {
                let reason = format!("could not connect to {destination}: {e}");
                respond(&mut client, "502 Bad Gateway", &reason).await;
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = upstream.write_all(&preamble.bytes).await {
        tracing::debug!(%destination, error = %e, "egress proxy: upstream write failed");
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(%destination, up, down, "egress proxy: connection done");
        }
        Err(e) => {
            tracing::debug!(%destination, error = %e, "egress proxy: connection ended");
        }
    }
}

/// Answers a plain HTTP client with `status` and a one-line body, then closes.
async fn respond(client: &mut TcpStream, status: &str, reason: &str) {
    // The reason names at most a checked host; keeping it to one line is cheap insurance.
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = tokio::time::timeout(Duration::from_secs(5), async {
        client.write_all(answer.as_bytes()).await?;
        client.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // Read what the client still sends (a request body) for a moment: closing with
    // unread data resets the connection, and the client could lose the answer.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
