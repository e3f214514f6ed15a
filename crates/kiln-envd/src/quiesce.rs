//! Letting go of the Unix socket for a checkpoint, and taking it back after a restore.
//!
//! Under gVisor envd's socket is a *host* socket (runsc `--host-uds`), and runsc cannot
//! save a sandbox that holds one: neither the bound listener nor a connection accepted
//! on it (docs/gvisor.md). So before the host runs `runsc checkpoint` it sends envd
//! `SIGUSR1`: envd stops accepting, closes the listener, force-closes every accepted
//! connection (streams and tunnels included: their clients see them cut, as at an E2B
//! pause), removes the socket file and writes the marker file `envd.quiesced` beside
//! it: `ok` once nothing is open, `busy <n>` when `n` connections did not close within
//! the drain timeout (the host must then not checkpoint). After `runsc restore` the
//! host sends `SIGUSR2`: envd binds the same path again (mode 0600), removes the
//! marker and serves as before. Everything else (processes, their output, `/init`'s
//! settings) stays where it is; the checkpoint freezes it with the rest of memory.
//!
//! At start envd writes its pid to `envd.pid` beside the socket: the host signals that
//! pid (`runsc kill --pid`), and the file's presence says this envd can quiesce.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::SocketAddr;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What the host asks of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Close the listener and every connection, then write the marker (`SIGUSR1`).
    Quiesce,
    /// Bind the socket again and serve (`SIGUSR2`).
    Resume,
}

/// The marker file written once quiesced: `<socket dir>/envd.quiesced`.
pub fn marker_path(socket: &Path) -> PathBuf {
    socket.with_file_name("envd.quiesced")
}

/// The pid file: `<socket dir>/envd.pid`.
pub fn pid_path(socket: &Path) -> PathBuf {
    socket.with_file_name("envd.pid")
}

/// Forward `SIGUSR1`/`SIGUSR2` to `tx` as [`Control::Quiesce`]/[`Control::Resume`].
pub fn forward_signals(tx: mpsc::UnboundedSender<Control>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let control = tokio::select! {
                Some(()) = usr1.recv() => Control::Quiesce,
                Some(()) = usr2.recv() => Control::Resume,
                else => return,
            };
            if tx.send(control).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The next request; never resolves once nobody can send one (then we serve on as we
/// are).
async fn next_control(control: &mut Option<mpsc::UnboundedReceiver<Control>>) -> Control {
    if let Some(rx) = control {
        if let Some(c) = rx.recv().await {
            return c;
        }
        *control = None;
    }
    std::future::pending().await
}

/// A Unix listener that can let go of its socket and every connection accepted on it
/// (see the module docs). Served with `axum::serve` like a plain `UnixListener`.
pub struct QuiescingListener {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// Cancelled at a quiesce; every connection accepted since the last resume holds it.
    token: CancellationToken,
    /// Number of accepted connections still open (upgraded ones included).
    live: Arc<watch::Sender<usize>>,
    control: Option<mpsc::UnboundedReceiver<Control>>,
    drain_timeout: Duration,
}

impl QuiescingListener {
    /// Binds `path` (see [`bind`]) and removes a marker left by an earlier run.
    pub fn bind(
        path: &Path,
        control: mpsc::UnboundedReceiver<Control>,
        drain_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let listener = bind(path)?;
        remove_if_exists(&marker_path(path));
        Ok(QuiescingListener {
            path: path.to_path_buf(),
            listener: Some(listener),
            token: CancellationToken::new(),
            live: Arc::new(watch::Sender::new(0)),
            control: Some(control),
            drain_timeout,
        })
    }

    async fn quiesce(&mut self) {
        let was_serving = self.listener.take().is_some();
        remove_if_exists(&self.path);
        self.token.cancel();
        let mut live = self.live.subscribe();
        let drained = tokio::time::timeout(self.drain_timeout, live.wait_for(|n| *n == 0)).await;
        let open = *self.live.borrow();
        let marker = match drained {
            Ok(Ok(_)) => "ok\n".to_string(),
            _ => format!("busy {open}\n"),
        };
        match write_atomically(&marker_path(&self.path), marker.as_bytes()) {
            Ok(()) if open == 0 => {
                tracing::info!(was_serving, "quiesced: socket and connections closed")
            }
            Ok(()) => tracing::warn!(open, "quiesce: connections did not close in time"),
            Err(e) => tracing::error!(error = %e, "quiesce: cannot write the marker file"),
        }
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.listener = Some(bind(&self.path)?);
        self.token = CancellationToken::new();
        remove_if_exists(&marker_path(&self.path));
        tracing::info!(socket = %self.path.display(), "resumed: listening again");
        Ok(())
    }
}

impl axum::serve::Listener for QuiescingListener {
    type Io = Tracked;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Tracked, SocketAddr) {
        loop {
            let control = match &self.listener {
                Some(listener) => {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, addr)) => {
                                let tracked = track(&self.live, &self.token, stream);
                                return (tracked, addr);
                            }
                            Err(e) => {
                                // EMFILE and friends: wait instead of spinning.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                        control = next_control(&mut self.control) => control,
                    }
                }
                None => next_control(&mut self.control).await,
            };
            match control {
                // Again while quiesced: rewrite the marker (the host may retry).
                Control::Quiesce => self.quiesce().await,
                Control::Resume if self.listener.is_none() => {
                    if let Err(e) = self.resume() {
                        tracing::error!(error = format!("{e:#}"), "resume: cannot bind the socket");
                    }
                }
                Control::Resume => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "quiesced: not listening",
            )),
        }
    }
}

/// Binds the Unix socket: parent created, a stale socket replaced, mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

fn remove_if_exists(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a reader never
/// sees a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn track(
    live: &Arc<watch::Sender<usize>>,
    token: &CancellationToken,
    stream: UnixStream,
) -> Tracked {
    live.send_modify(|n| *n += 1);
    Tracked {
        stream,
        cancelled: Box::pin(token.clone().cancelled_owned()),
        _live: LiveGuard(live.clone()),
    }
}

struct LiveGuard(Arc<watch::Sender<usize>>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// An accepted connection that fails every read and write once its listener
/// quiesces. hyper always has a read pending on a connection (for the next request,
/// a request body, or to notice EOF while it streams a response; an upgraded tunnel
/// copies both ways), so the failure ends the connection at once and the stream is
/// dropped, which closes it.
pub struct Tracked {
    stream: UnixStream,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    _live: LiveGuard,
}

impl Tracked {
    /// `Err` once quiesced; otherwise registers the task to be woken at the quiesce.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cancelled.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "envd quiesced for a checkpoint",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn marker(socket: &Path) -> String {
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(marker_path(socket)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no marker");
    }

    #[test]
    fn file_names_sit_beside_the_socket() {
        let s = Path::new("/run/kiln/envd.sock");
        assert_eq!(marker_path(s), Path::new("/run/kiln/envd.quiesced"));
        assert_eq!(pid_path(s), Path::new("/run/kiln/envd.pid"));
    }

    #[tokio::test]
    async fn quiesce_closes_connections_and_resume_rebinds() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("envd.sock");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut listener = QuiescingListener::bind(&socket, rx, Duration::from_secs(2)).unwrap();
        // An echo server over the listener, like axum::serve's connection tasks.
        tokio::spawn(async move {
            loop {
                let (mut io, _) = listener.accept().await;
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut client = UnixStream::connect(&socket).await.unwrap();
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).await.unwrap();

        tx.send(Control::Quiesce).unwrap();
        assert_eq!(marker(&socket).await, "ok\n");
        assert!(!socket.exists(), "the socket file is removed");
        let mut rest = Vec::new();
        let n = client.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "the open connection was closed");
        assert!(UnixStream::connect(&socket).await.is_err());

        tx.send(Control::Resume).unwrap();
        let mut again = None;
        for _ in 0..200 {
            if let Ok(s) = UnixStream::connect(&socket).await {
                again = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut again = again.expect("listening again");
        again.write_all(b"yo").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"yo");
        assert!(!marker_path(&socket).exists(), "the marker is removed");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_connection_that_does_not_close_is_reported_busy() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("envd.sock");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut listener =
            QuiescingListener::bind(&socket, rx, Duration::from_millis(200)).unwrap();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held2 = held.clone();
        // Keeps the connection without ever polling it.
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await;
                held2.lock().unwrap().push(io);
            }
        });
        let _client = UnixStream::connect(&socket).await.unwrap();
        for _ in 0..100 {
            if !held.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send(Control::Quiesce).unwrap();
        assert_eq!(marker(&socket).await, "busy 1\n");
    }
}
