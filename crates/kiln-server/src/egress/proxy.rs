//! The egress proxy: a transparent TCP proxy on the host for sandboxes whose network
//! policy names domains. The firewall DNATs such a sandbox's TCP ports 80 and 443 to
//! `<host end of its veth>:<proxy port>`; the kernel keeps the address the sandbox
//! asked for, which we read back with `SO_ORIGINAL_DST`.
//!
//! Each connection runs in its own task, in this order:
//! 1. **Admit**, before reading a byte: the peer must be a registered guest address in
//!    the sandbox pool, the connection must have been redirected (its original
//!    destination is not the proxy's own address) and the guest must be under its
//!    connection cap. Anything else is closed at once.
//! 2. **Read the preamble**, at most 16 KiB in at most 64 reads within 10 s: a TLS
//!    ClientHello gives its SNI, an HTTP request its `Host`; anything else gives no
//!    name. Lengths inside the ClientHello are checked
//!    against what was read, never trusted.
//! 3. **Decide**: ranges no sandbox may reach (unless the operator allowed them), then
//!    the sandbox's [`EgressPolicy`]. A connection allowed because of the name it
//!    announced must also go to an address of that name, checked by resolving it on
//!    the host: announcing `allowed.example` while connecting elsewhere is refused.
//! 4. **Splice or refuse**: connect to the original destination, replay the preamble
//!    byte for byte and copy both ways; or report a [`Denial`] and close (plain HTTP
//!    gets a `403` first, TLS just the close).
//!
//! Only the first request of a connection is looked at: later requests on a kept-alive
//! HTTP connection go to the same (checked) address. What name-based rules cannot
//! stop: a front end that serves many names (domain fronting on a CDN), and TLS
//! Encrypted Client Hello, whose outer SNI is the only name we see.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use kiln_runtime::jail::net::{Ipv4Cidr, POOL};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::egress::{EgressPolicy, Verdict};

/// Most bytes read from a client before deciding.
const PREAMBLE_CAP: usize = 16 * 1024;
/// Most reads before deciding. Each read rescans the whole preamble, so this bounds
/// the work a client trickling one byte at a time can cause; an honest client's
/// first flight comes in a few TCP segments.
const PREAMBLE_READS: usize = 64;
/// Longest wait for the client to announce itself.
const PREAMBLE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the host's resolver when checking an announced name.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for the original destination to accept.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Connections one sandbox may hold through the proxy, so it cannot use up the host's fds.
const MAX_PER_GUEST: usize = 256;
/// Longest domain name (RFC 1035).
const MAX_NAME: usize = 253;

/// What the proxy knows about one sandbox, keyed by its guest address.
pub struct SandboxEgress {
    pub sandbox_id: String,
    pub team_id: i64,
    pub policy: EgressPolicy,
}

/// One refused connection, for the audit log and metrics (never any payload).
#[derive(Debug, Clone)]
pub struct Denial {
    pub sandbox_id: String,
    pub team_id: i64,
    /// The name the connection announced (SNI or Host), if any.
    pub host: Option<String>,
    pub destination: SocketAddrV4,
    pub reason: String,
}

/// Called for every refused connection.
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
    /// connection.
    pub async fn start(
        blocked: Vec<Ipv4Cidr>,
        operator_allow: Vec<Ipv4Cidr>,
        on_denied: Arc<dyn Fn(Denial) + Send + Sync>,
    ) -> io::Result<Arc<EgressProxy>> {
        let shared = Shared::new(blocked, operator_allow, on_denied, Resolver::System)?;
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
                splice(client, destination, &preamble).await;
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
        match self.resolver.ipv4(&name, destination.port()).await {
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

/// What a client speaks, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tls,
    Http,
    Other,
}

/// The bytes a client sent before the decision, and what they announced.
#[derive(Debug)]
struct Preamble {
    bytes: Vec<u8>,
    protocol: Protocol,
    host: Option<String>,
}

/// How far the bytes read so far go.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// Enough to decide: the protocol and the name, if any.
    Done(Protocol, Option<String>),
    /// More bytes could tell more; the protocol as far as it is known.
    More(Protocol),
}

/// Step 2: reads until the client's announcement is complete, [`PREAMBLE_CAP`] bytes
/// are in, [`PREAMBLE_READS`] reads are used up, the client stops sending or
/// `deadline` passes; whichever comes first.
async fn read_preamble<R: AsyncRead + Unpin>(client: &mut R, deadline: Duration) -> Preamble {
    let until = tokio::time::Instant::now() + deadline;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut reads = 0;
    loop {
        let protocol = match scan(&bytes) {
            Scan::Done(protocol, host) => {
                return Preamble {
                    bytes,
                    protocol,
                    host,
                }
            }
            Scan::More(protocol) => protocol,
        };
        let room = PREAMBLE_CAP.saturating_sub(bytes.len()).min(chunk.len());
        reads += 1;
        let read = match chunk.get_mut(..room) {
            Some(buf) if room > 0 && reads <= PREAMBLE_READS => {
                tokio::time::timeout_at(until, client.read(buf)).await
            }
            _ => Ok(Ok(0)),
        };
        match read {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            // End of stream, error, deadline or a cap: decide on what there is.
            _ => {
                return Preamble {
                    bytes,
                    protocol,
                    host: None,
                }
            }
        }
    }
}

fn scan(bytes: &[u8]) -> Scan {
    match bytes.first() {
        None => Scan::More(Protocol::Other),
        Some(&client_hello::HANDSHAKE) => match client_hello::server_name(bytes) {
            client_hello::Progress::Done(name) => Scan::Done(Protocol::Tls, name),
            client_hello::Progress::NeedMore => Scan::More(Protocol::Tls),
        },
        Some(_) => http::scan(bytes),
    }
}

/// A name as it may be looked up and matched: DNS characters only, not an address.
fn dns_name(raw: &[u8]) -> Option<String> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_NAME + 1
        && raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !raw.iter().all(|b| b.is_ascii_digit() || *b == b'.');
    ok.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

/// The `Host` of a plain HTTP/1 request.
mod http {
    use super::{dns_name, Protocol, Scan};

    /// Longest method we wait for (`OPTIONS`, `PROPFIND`, ... with room to spare).
    const MAX_METHOD: usize = 16;

    pub(super) fn scan(bytes: &[u8]) -> Scan {
        let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
        let next = bytes.get(method_len);
        let request = method_len > 0 && method_len <= MAX_METHOD;
        match next {
            Some(b' ') if request => {}
            None if request || bytes.is_empty() => return Scan::More(Protocol::Http),
            _ => return Scan::Done(Protocol::Other, None),
        }
        match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => Scan::Done(Protocol::Http, host(bytes.get(..end).unwrap_or_default())),
            None => Scan::More(Protocol::Http),
        }
    }

    /// The name in the one `Host` header of `head` (request line and headers);
    /// none if there is no such header, several, or an address instead of a name.
    pub(super) fn host(head: &[u8]) -> Option<String> {
        let mut found = None;
        for line in head.split(|b| *b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (name, value) = line.split_at(colon);
            if name.eq_ignore_ascii_case(b"host") {
                if found.is_some() {
                    // Two Hosts: the upstream may believe the other one.
                    return None;
                }
                found = Some(value.get(1..).unwrap_or_default().trim_ascii());
            }
        }
        let value = found?;
        if value.starts_with(b"[") {
            return None;
        }
        let name = match value.iter().position(|b| *b == b':') {
            Some(i) => {
                let port = value.get(i + 1..).unwrap_or_default();
                if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                value.get(..i).unwrap_or_default()
            }
            None => value,
        };
        dns_name(name)
    }
}

/// The server name (SNI) of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), from
/// bytes as they arrive: the message may span several records and reads.
mod client_hello {
    use super::{dns_name, PREAMBLE_CAP};

    /// Content type of a handshake record, the first byte of a TLS connection.
    pub(super) const HANDSHAKE: u8 = 0x16;
    const CLIENT_HELLO: u8 = 1;
    const SERVER_NAME: u16 = 0;
    const HOST_NAME: u8 = 0;
    /// Largest plaintext record (RFC 8446 §5.1).
    const MAX_RECORD: usize = 1 << 14;

    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Progress {
        NeedMore,
        /// The whole message was read (or is malformed): its name, if any.
        Done(Option<String>),
    }

    pub(super) fn server_name(stream: &[u8]) -> Progress {
        let mut records = Reader(stream);
        let mut handshake = Vec::new();
        loop {
            if let Some(header) = handshake.get(..4) {
                let mut h = Reader(header);
                let (Some(kind), Some(len)) = (h.u8(), h.u24()) else {
                    return Progress::Done(None);
                };
                if kind != CLIENT_HELLO || len > PREAMBLE_CAP {
                    return Progress::Done(None);
                }
                if let Some(body) = handshake.get(4..4 + len) {
                    return Progress::Done(parse(body));
                }
            }
            let Some(header) = records.take(5) else {
                return Progress::NeedMore;
            };
            let Ok([kind, major, _minor, len_hi, len_lo]) = <[u8; 5]>::try_from(header) else {
                return Progress::Done(None);
            };
            let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
            if kind != HANDSHAKE || major != 3 || len == 0 || len > MAX_RECORD {
                return Progress::Done(None);
            }
            match records.take(len) {
                Some(fragment) => handshake.extend_from_slice(fragment),
                None => return Progress::NeedMore,
            }
        }
    }

    /// The ClientHello body, after the handshake header.
    fn parse(body: &[u8]) -> Option<String> {
        let mut r = Reader(body);
        r.take(2)?; // legacy_version
        r.take(32)?; // random
        let session_id = r.vec8()?;
        if session_id.0.len() > 32 {
            return None;
        }
        r.vec16()?; // cipher_suites
        r.vec8()?; // legacy_compression_methods
        let mut extensions = r.vec16()?;
        while !extensions.0.is_empty() {
            let kind = extensions.u16()?;
            let mut data = extensions.vec16()?;
            if kind != SERVER_NAME {
                continue;
            }
            let mut names = data.vec16()?;
            while !names.0.is_empty() {
                let name_type = names.u8()?;
                let name = names.vec16()?;
                if name_type == HOST_NAME {
                    return dns_name(name.0);
                }
            }
            return None;
        }
        None
    }

    /// Reads big-endian fields off the front of a slice; `None` past its end.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = self.0.split_at_checked(n)?;
            self.0 = rest;
            Some(head)
        }

        fn u8(&mut self) -> Option<u8> {
            self.take(1)?.first().copied()
        }

        fn u16(&mut self) -> Option<u16> {
            Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
        }

        fn u24(&mut self) -> Option<usize> {
            let b = self.take(3)?;
            Some(b.iter().fold(0, |n, b| (n << 8) | usize::from(*b)))
        }

        fn vec8(&mut self) -> Option<Reader<'a>> {
            let n = self.u8()?;
            self.take(n.into()).map(Reader)
        }

        fn vec16(&mut self) -> Option<Reader<'a>> {
            let n = self.u16()?;
            self.take(n.into()).map(Reader)
        }
    }
}

/// Unit tests: no root, no DNAT. Real sockets on 127.0.0.1 stand in for the sandbox and
/// the destination; the peer and the original destination are passed in as the
/// accept loop would get them from the kernel.
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::task::JoinHandle;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const WAIT: Duration = Duration::from_secs(5);

    fn guest_peer() -> SocketAddr {
        SocketAddr::from((GUEST, 40000))
    }

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(&v(allow), &v(deny)).unwrap()
    }

    fn sandbox(policy: EgressPolicy) -> Option<Arc<SandboxEgress>> {
        Some(Arc::new(SandboxEgress {
            sandbox_id: "sbx1".into(),
            team_id: 7,
            policy,
        }))
    }

    struct Harness {
        shared: Arc<Shared>,
        denials: Arc<Mutex<Vec<Denial>>>,
    }

    fn recorder() -> (OnDenied, Arc<Mutex<Vec<Denial>>>) {
        let denials = Arc::new(Mutex::new(Vec::new()));
        let sink = denials.clone();
        (Arc::new(move |d| sink.lock().unwrap().push(d)), denials)
    }

    /// `answers`: what the fixed resolver says, name → one address.
    fn harness(blocked: &[&str], operator_allow: &[&str], answers: &[(&str, &str)]) -> Harness {
        let nets = |l: &[&str]| l.iter().map(|c| c.parse().unwrap()).collect();
        let resolver = Resolver::Fixed(
            answers
                .iter()
                .map(|(name, ip)| (name.to_string(), vec![ip.parse().unwrap()]))
                .collect(),
        );
        let (on_denied, denials) = recorder();
        let shared = Shared::new(nets(blocked), nets(operator_allow), on_denied, resolver).unwrap();
        Harness { shared, denials }
    }

    /// A connected pair over loopback: (the sandbox's end, the proxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
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
    fn client_hello(name: &str) -> Vec<u8> {
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

    /// A handshake record holding `fragment`.
    fn record(fragment: &[u8]) -> Vec<u8> {
        let len = u16::try_from(fragment.len()).unwrap().to_be_bytes();
        [&[0x16, 3, 1, len[0], len[1]][..], fragment].concat()
    }

    fn done(host: &str) -> Scan {
        Scan::Done(Protocol::Tls, Some(host.into()))
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

    #[test]
    fn sni_from_a_real_client_hello() {
        let hello = client_hello("API.Example.com");
        assert_eq!(scan(&hello), done("api.example.com"));
        // rustls sends one record: its length covers the rest.
        assert_eq!(
            usize::from(u16::from_be_bytes([hello[3], hello[4]])) + 5,
            hello.len()
        );

        // Every prefix waits for more: never a name, never a panic.
        assert_eq!(scan(&[]), Scan::More(Protocol::Other));
        for n in 1..hello.len() {
            assert_eq!(scan(&hello[..n]), Scan::More(Protocol::Tls), "prefix {n}");
        }
        // The same message cut into two records, anywhere (even inside its header).
        let message = &hello[5..];
        for cut in [1, 3, 4, 5, 40, message.len() / 2, message.len() - 1] {
            let two = [record(&message[..cut]), record(&message[cut..])].concat();
            assert_eq!(scan(&two), done("api.example.com"), "cut at {cut}");
        }
        // An address as the server name: rustls sends no SNI.
        assert_eq!(
            scan(&client_hello("203.0.113.7")),
            Scan::Done(Protocol::Tls, None)
        );
    }

    #[test]
    fn malformed_client_hellos_give_no_name() {
        let hello = client_hello("example.com");
        let with = |at: usize, bytes: &[u8]| {
            let mut m = hello.clone();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            scan(&m)
        };
        let none = Scan::Done(Protocol::Tls, None);
        assert_eq!(with(5, &[2]), none, "not a ClientHello");
        assert_eq!(with(1, &[2]), none, "not TLS 1.x framing");
        assert_eq!(with(3, &[0, 0]), none, "empty record");
        assert_eq!(with(3, &[0x40, 1]), none, "record over 16 KiB");
        assert_eq!(with(6, &[0xff, 0xff, 0xff]), none, "message over the cap");
        // Session id of 255 bytes (at most 32 exist).
        assert_eq!(with(5 + 4 + 2 + 32, &[0xff]), none);
        // A cipher-suite length past the end of the message.
        let suites = 5 + 4 + 2 + 32 + 1 + usize::from(hello[5 + 4 + 2 + 32]);
        assert_eq!(with(suites, &[0xff, 0xff]), none);
        // Any byte at any value: a name or none, never a panic.
        for at in 0..hello.len() {
            for value in [0x00, 0x01, 0x7f, 0xff] {
                let _ = with(at, &[value]);
            }
        }
        // Another record type after a handshake start.
        let alert = [record(&hello[5..20]), vec![0x15, 3, 3, 0, 2, 2, 40]].concat();
        assert_eq!(scan(&alert), none);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any ClientHello body, framed correctly: a checked name or none, never a panic.
        #[test]
        fn any_client_hello_body_is_parsed_safely(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let len = body.len().to_be_bytes();
            let message = [&[1, len[5], len[6], len[7]][..], &body].concat();
            let bytes = record(&message);
            if let Scan::Done(_, Some(name)) = scan(&bytes) {
                proptest::prop_assert!(dns_name(name.as_bytes()).as_deref() == Some(name.as_str()));
            }
        }

        /// Any bytes at all: never a panic.
        #[test]
        fn any_bytes_scan_safely(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = scan(&bytes);
            let _ = scan(&[&[0x16u8][..], &bytes].concat());
        }
    }

    #[test]
    fn the_http_host_is_taken_with_care() {
        let host = |head: &str| http::host(head.as_bytes());
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            host("GET / HTTP/1.1\r\nAccept: */*\r\nhOsT: Example.COM:8080"),
            some("example.com")
        );
        assert_eq!(host("GET / HTTP/1.1\r\nHost:   a.test  "), some("a.test"));
        assert_eq!(host("GET / HTTP/1.1\nHost: a.test."), some("a.test."));
        for bad in [
            "Host: [::1]:80",
            "Host: [::1]",
            "Host: a.test\r\nHost: b.test",
            "Accept: */*",
            "X-Host: a.test",
            "Host: a.test:",
            "Host: a.test:x",
            "Host: 1.2.3.4:80",
            "Host: a b.test",
            "Host:",
        ] {
            assert_eq!(host(&format!("GET / HTTP/1.1\r\n{bad}")), None, "{bad:?}");
        }
        // The request line is not a header.
        assert_eq!(host("GET Host: a.test HTTP/1.1\r\nAccept: */*"), None);
    }

    #[test]
    fn http_is_told_from_anything_else() {
        let http = |s: &[u8]| scan(s);
        assert_eq!(
            http(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\nbody"),
            Scan::Done(Protocol::Http, Some("a.test".into()))
        );
        assert_eq!(http(b"GE"), Scan::More(Protocol::Http));
        assert_eq!(
            http(b"GET / HTTP/1.1\r\nHost: a.test\r\n"),
            Scan::More(Protocol::Http)
        );
        // Headers end before a Host: none, whatever follows.
        assert_eq!(
            http(b"GET / HTTP/1.1\r\n\r\nHost: a.test\r\n\r\n"),
            Scan::Done(Protocol::Http, None)
        );
        for other in [
            &b"SSH-2.0-x\r\n"[..],
            b"get / HTTP/1.1\r\n",
            b"\x00\x01",
            b" GET",
        ] {
            assert_eq!(http(other), Scan::Done(Protocol::Other, None), "{other:?}");
        }
        assert_eq!(http(&[b'A'; 17]), Scan::Done(Protocol::Other, None));
    }

    #[tokio::test]
    async fn the_preamble_may_arrive_in_pieces_and_is_kept_whole() {
        let hello = client_hello("pieces.test");
        let (mut client, mut server) = pair().await;
        let pieces = hello.clone();
        let sender = tokio::spawn(async move {
            for piece in pieces.chunks(7) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client
        });
        let p = read_preamble(&mut server, WAIT).await;
        assert_eq!(
            (p.protocol, p.host.as_deref()),
            (Protocol::Tls, Some("pieces.test"))
        );
        assert_eq!(p.bytes, hello);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn the_preamble_has_a_cap_a_deadline_and_an_end() {
        // Headers that never end stop at the cap.
        let (mut client, mut server) = pair().await;
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(3 * PREAMBLE_CAP));
        let sender = tokio::spawn(async move {
            let _ = client.write_all(endless.as_bytes()).await;
            client
        });
        let p = read_preamble(&mut server, WAIT).await;
        assert_eq!(
            (p.protocol, p.host, p.bytes.len()),
            (Protocol::Http, None, PREAMBLE_CAP)
        );
        drop(server);
        drop(sender.await.unwrap());

        // A client that stops talking gets decided at the deadline.
        let (mut client, mut server) = pair().await;
        client.write_all(b"GE").await.unwrap();
        let started = tokio::time::Instant::now();
        let p = read_preamble(&mut server, Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            (p.protocol, p.host, p.bytes),
            (Protocol::Http, None, b"GE".to_vec())
        );

        // One that closes halfway through its ClientHello: what it sent, no name.
        let (mut client, mut server) = pair().await;
        let hello = client_hello("cut.test");
        client.write_all(&hello[..30]).await.unwrap();
        client.shutdown().await.unwrap();
        let p = read_preamble(&mut server, WAIT).await;
        assert_eq!((p.protocol, p.host), (Protocol::Tls, None));
        assert_eq!(p.bytes, &hello[..30]);
    }

    #[tokio::test]
    async fn a_trickling_client_is_decided_after_a_few_reads() {
        let (mut client, mut server) = pair().await;
        let request = format!(
            "GET / HTTP/1.1\r\nX: {}\r\nHost: a.test\r\n\r\n",
            "a".repeat(600)
        );
        let sender = tokio::spawn(async move {
            for byte in request.as_bytes() {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let p = read_preamble(&mut server, WAIT).await;
        assert_eq!((p.protocol, p.host), (Protocol::Http, None));
        assert!(p.bytes.len() < 600, "{} bytes", p.bytes.len());
        drop(server);
        sender.await.unwrap();
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
            unresolved
                .starts_with("other.test does not resolve to 203.0.113.5: looking it up failed"),
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
        let proxy = EgressProxy::start(vec![], vec![], on_denied).await.unwrap();
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
            let proxy = EgressProxy::start(vec![], vec![], on_denied).await.unwrap();
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
}
