//! The conversation between the client (`sudo`) and the broker, over the abstract
//! Unix socket `@kiln-sudo`:
//!
//! 1. client → broker: one `sendmsg` carrying a 4-byte little-endian length, the
//!    client's fds 0, 1 and 2 (`SCM_RIGHTS`) and its credentials (`SCM_CREDENTIALS`,
//!    which the kernel checks: only root may claim another uid); then that many bytes
//!    of [`Request`] JSON. The broker takes the caller's uid from those credentials,
//!    never from the request. (Not from `SO_PEERCRED`: gVisor through 2024-07-29
//!    answers it with the *listening* process's credentials, root for everyone.)
//! 2. client → broker, while the command runs: [`Control`] JSON lines (signals the
//!    client received, to pass on).
//! 3. broker → client: one [`Reply`] JSON line, then the broker closes.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{
    self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixCredentials,
};
use serde::{Deserialize, Serialize};

use crate::options::Invocation;

/// The broker's abstract socket name (`@kiln-sudo`): abstract names live in the
/// sandbox's network namespace, never in a host-visible file.
pub const SOCKET_NAME: &[u8] = b"kiln-sudo";
/// Requests are small (argv, environment); bound what the broker reads.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub invocation: Invocation,
    /// Run the command, or only answer a question about it.
    pub mode: Mode,
    /// The caller's environment.
    pub env: Vec<(String, String)>,
    /// The caller's working directory.
    pub cwd: String,
}

/// What the client asks of the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Run the command.
    #[default]
    Run,
    /// Only whether the caller may use sudo (`-v`).
    Validate,
    /// The caller's rules, or the command line that would run (`-l`).
    List,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Refused or failed before the command ran: print it, exit with `code`.
    Error {
        message: String,
        code: i32,
    },
    Exited(i32),
    Killed(i32),
    /// The answer to [`Mode::List`]: print it, exit 0.
    Listing(String),
}

/// Sends the request with `fds` attached.
pub fn send_request(stream: &UnixStream, request: &Request, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(request).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::other("request too large"))?
        .to_le_bytes();
    let iov = [io::IoSlice::new(&len)];
    let creds = UnixCredentials::new();
    let cmsg = [
        ControlMessage::ScmRights(fds),
        ControlMessage::ScmCredentials(&creds),
    ];
    let sent = socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    if sent != len.len() {
        return Err(io::Error::other("short write of the request header"));
    }
    io::Write::write_all(&mut &*stream, &body)
}

/// What the broker received: the request, the fds sent with it and the sender's uid
/// as the kernel vouches for it.
pub struct Received {
    pub request: Request,
    pub fds: Vec<OwnedFd>,
    pub uid: u32,
}

/// Prepares an accepted stream for [`recv_request`]: without `SO_PASSCRED` set before
/// the client's message arrives, no credentials come with it.
pub fn expect_credentials(stream: &UnixStream) -> io::Result<()> {
    socket::setsockopt(stream, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// Receives a request, the fds and the credentials sent with it.
pub fn recv_request(stream: &UnixStream) -> io::Result<Received> {
    let mut len = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; 3], libc::ucred);
    let (got, fds, uid) = {
        let mut iov = [io::IoSliceMut::new(&mut len)];
        let msg = socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        let mut uid = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            match c {
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process
                    // just now; nothing else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                ControlMessageOwned::ScmCredentials(creds) => uid = Some(creds.uid()),
                _ => {}
            }
        }
        (msg.bytes, fds, uid)
    };
    if got == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no request"));
    }
    let uid = uid.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the request carried no credentials",
        )
    })?;
    (&*stream).read_exact(&mut len[got..])?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_REQUEST {
        return Err(io::Error::other(format!(
            "request of {len} bytes is over the {MAX_REQUEST}-byte limit"
        )));
    }
    let mut body = vec![0; len];
    (&*stream).read_exact(&mut body)?;
    let request =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Received { request, fds, uid })
}

/// Writes one JSON line.
pub fn send_line<T: Serialize>(mut stream: &UnixStream, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    io::Write::write_all(&mut stream, &line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn request_and_fds_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        expect_credentials(&b).unwrap();
        let request = Request {
            invocation: Invocation {
                command: vec!["whoami".into()],
                ..Default::default()
            },
            mode: Mode::Run,
            env: vec![("TERM".into(), "xterm".into())],
            cwd: "/home/user".into(),
        };
        let file = tempfile::tempfile().unwrap();
        send_request(&a, &request, &[file.as_raw_fd(), 1, 2]).unwrap();
        let got = recv_request(&b).unwrap();
        assert_eq!(got.request.invocation.command, ["whoami"]);
        assert_eq!(got.request.cwd, "/home/user");
        assert_eq!(got.fds.len(), 3);
        assert_eq!(got.uid, nix::unistd::getuid().as_raw());

        send_line(&b, &Reply::Exited(3)).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&a).read_line(&mut line).unwrap();
        assert_eq!(
            serde_json::from_str::<Reply>(&line).unwrap(),
            Reply::Exited(3)
        );
        assert_eq!(
            serde_json::to_string(&Control::Signal(2)).unwrap(),
            r#"{"signal":2}"#
        );
    }

    #[test]
    fn oversized_requests_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        expect_credentials(&b).unwrap();
        let len = ((MAX_REQUEST + 1) as u32).to_le_bytes();
        let iov = [io::IoSlice::new(&len)];
        socket::sendmsg::<()>(a.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        let err = recv_request(&b).err().unwrap();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn requests_without_credentials_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let body = br#"{"invocation":{},"mode":"validate","env":[],"cwd":"/"}"#;
        let len = (body.len() as u32).to_le_bytes();
        // Sent before the receiver asked for credentials: none are attached.
        socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[io::IoSlice::new(&len)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        io::Write::write_all(&mut &a, body).unwrap();
        let err = recv_request(&b).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
