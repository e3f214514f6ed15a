//! The client: what runs as `sudo` inside a gVisor sandbox.

use std::io::{BufRead, BufReader};
use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::ExitCode;

use nix::sys::signal::{self, SigHandler, SigSet, Signal};

use crate::options::{self, Action, Invocation, USAGE};
use crate::proto::{self, Control, Mode, Reply, Request, SOCKET_NAME};

/// Signals passed on to the command (as sudo relays them).
const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

pub fn run(args: &[String]) -> ExitCode {
    let action = match options::parse(args) {
        Ok(action) => action,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(1);
        }
    };
    match action {
        Action::Help => {
            println!("{USAGE}");
            println!(
                "Kiln's sudo: this sandbox's kernel (gVisor) ignores set-user-ID bits, so the \
                 command runs through a broker started by kiln-init, under the NOPASSWD: ALL \
                 rules of /etc/sudoers and /etc/sudoers.d."
            );
            ExitCode::SUCCESS
        }
        Action::Version => {
            println!(
                "Kiln sudo {} (sudo for gVisor sandboxes)",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Action::Validate => ask(Invocation::default(), Mode::Validate),
        Action::List(invocation) => ask(invocation, Mode::List),
        Action::Run(invocation) => ask(invocation, Mode::Run),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(1)
}

fn ask(invocation: Invocation, mode: Mode) -> ExitCode {
    // Blocked before any other thread exists, so only the relay thread takes them.
    let mut mask = SigSet::empty();
    for sig in FORWARDED {
        mask.add(sig);
    }
    if let Err(e) = mask.thread_block() {
        return fail(format!("sudo: blocking signals: {e}"));
    }
    let stream = match SocketAddr::from_abstract_name(SOCKET_NAME)
        .and_then(|addr| UnixStream::connect_addr(&addr))
    {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "sudo: cannot reach Kiln's sudo broker at @kiln-sudo ({e}); kiln-init starts it in gVisor sandboxes"
            ))
        }
    };
    let request = Request {
        invocation,
        mode,
        env: std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect(),
        cwd: std::env::current_dir()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/".into()),
    };
    let stdio = match stdio_fds() {
        Ok(fds) => fds,
        Err(e) => {
            return fail(format!(
                "sudo: opening /dev/null for a closed stdio fd: {e}"
            ))
        }
    };
    if let Err(e) = proto::send_request(&stream, &request, &stdio) {
        return fail(format!("sudo: sending the request to the broker: {e}"));
    }
    if let Ok(writer) = stream.try_clone() {
        std::thread::spawn(move || {
            while let Ok(sig) = mask.wait() {
                if proto::send_line(&writer, &Control::Signal(sig as i32)).is_err() {
                    break;
                }
            }
        });
    }
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(n) if n > 0 => {}
        Ok(_) => return fail("sudo: the broker closed the connection without a reply".into()),
        Err(e) => return fail(format!("sudo: reading the broker's reply: {e}")),
    }
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Exited(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        Ok(Reply::Killed(sig)) => die_by(sig),
        Ok(Reply::Listing(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Reply::Error { message, code }) => {
            eprintln!("{message}");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Err(e) => fail(format!("sudo: unreadable reply from the broker: {e}")),
    }
}

/// fds 0, 1 and 2, with `/dev/null` in place of a closed one (sendmsg would refuse it).
fn stdio_fds() -> std::io::Result<[RawFd; 3]> {
    let mut fds = [0, 1, 2];
    for fd in &mut fds {
        if nix::fcntl::fcntl(unsafe_borrow(*fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            *fd = std::os::fd::IntoRawFd::into_raw_fd(null);
        }
    }
    Ok(fds)
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: fds 0-2 are only probed with F_GETFD, which is harmless on a closed
    // descriptor (EBADF); the borrow is not kept.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Ends this process by the signal that ended the command, as sudo does; the exit
/// status `128 + n` if the signal does not end it.
fn die_by(sig: i32) -> ExitCode {
    if let Ok(signal) = Signal::try_from(sig) {
        // SAFETY: restoring the default disposition installs no handler code.
        let _ = unsafe { signal::signal(signal, SigHandler::SigDfl) };
        let mut set = SigSet::empty();
        set.add(signal);
        let _ = set.thread_unblock();
        let _ = signal::raise(signal);
    }
    ExitCode::from(128u8.saturating_add(sig.clamp(0, 127) as u8))
}
