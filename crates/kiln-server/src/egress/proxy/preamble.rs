//! Step 2 of the egress proxy: what a client announces before we decide. A TLS
//! ClientHello gives its SNI, an HTTP request its `Host`; anything else gives no name.
//! Lengths inside the ClientHello are checked against what was read, never trusted.
//! [`Replay`] hands what was read here to whoever serves the connection next.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Most bytes read from a client before deciding.
pub(super) const PREAMBLE_CAP: usize = 16 * 1024;
/// Most reads before deciding. Each read rescans the whole preamble, so this bounds
/// the work a client trickling one byte at a time can cause; an honest client's
/// first flight comes in a few TCP segments.
const PREAMBLE_READS: usize = 64;
/// Longest domain name (RFC 1035).
const MAX_NAME: usize = 253;

/// What a client speaks, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Tls,
    Http,
    Other,
}

/// The bytes a client sent before the decision, and what they announced.
#[derive(Debug)]
pub(super) struct Preamble {
    pub(super) bytes: Vec<u8>,
    pub(super) protocol: Protocol,
    pub(super) host: Option<String>,
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
pub(super) async fn read_preamble<R: AsyncRead + Unpin>(
    client: &mut R,
    deadline: Duration,
) -> Preamble {
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

/// A client stream that yields the preamble again before what follows it, so a parser
/// (rustls, hyper) sees the connection from its first byte. Writes go straight through.
pub(super) struct Replay<S> {
    preamble: Vec<u8>,
    /// How much of `preamble` was read back.
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub(super) fn new(preamble: Vec<u8>, inner: S) -> Replay<S> {
        Replay {
            preamble,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rest = this.preamble.get(this.at..).unwrap_or_default();
        if rest.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        this.at += n;
        if this.at == this.preamble.len() {
            this.preamble = Vec::new();
            this.at = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Unit tests: no root; real sockets on 127.0.0.1 where bytes have to arrive.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::proxy::tests::{client_hello, pair, WAIT};
    use tokio::io::AsyncWriteExt;

    /// A handshake record holding `fragment`.
    fn record(fragment: &[u8]) -> Vec<u8> {
        let len = u16::try_from(fragment.len()).unwrap().to_be_bytes();
        [&[0x16, 3, 1, len[0], len[1]][..], fragment].concat()
    }

    fn done(host: &str) -> Scan {
        Scan::Done(Protocol::Tls, Some(host.into()))
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
    async fn the_preamble_is_replayed_before_the_rest_and_writes_go_through() {
        let (mut client, server) = pair().await;
        client.write_all(b"rest").await.unwrap();
        let mut replay = Replay::new(b"pre".to_vec(), server);
        let mut two = [0u8; 2];
        replay.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"pr");
        let mut five = [0u8; 5];
        replay.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"erest");
        replay.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
