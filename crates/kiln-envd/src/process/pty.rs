//! Pseudo-terminals: allocation, async I/O on the master side, window size.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{self, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The master side of a PTY, registered with the tokio reactor.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// Columns and rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    pub cols: u16,
    pub rows: u16,
}

impl WinSize {
    /// Clamps protobuf's u32 sizes into the kernel's u16 ones; 0 stays 0 (the kernel's
    /// "unknown").
    pub fn new(cols: u32, rows: u32) -> Self {
        Self {
            cols: u16::try_from(cols).unwrap_or(u16::MAX),
            rows: u16::try_from(rows).unwrap_or(u16::MAX),
        }
    }
}

/// Opens a PTY pair. Both ends are close-on-exec (the child gets the slave through
/// dup2 onto 0/1/2, which clears the flag); the slave is opened `O_NOCTTY` so envd never
/// acquires it as its controlling terminal.
pub fn open(size: WinSize) -> io::Result<(PtyMaster, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_winsize(&master, size)?;
    let flags = OFlag::from_bits_truncate(fcntl::fcntl(&master, FcntlArg::F_GETFL)?);
    fcntl::fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: `master` is an `OwnedFd` moved into the `AsyncFd`, so its descriptor is
    // open, owned by nobody else, and refers to the same PTY until the `AsyncFd` drops.
    let fd =
        unsafe { AsyncFd::register_with_interest(master, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
    Ok((PtyMaster { fd }, slave))
}

fn set_winsize(fd: &OwnedFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is an open PTY master owned by the caller for the duration of the
    // call, and `ws` is a fully initialised `winsize` that TIOCSWINSZ only reads.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PtyMaster {
    /// Reads output. `Ok(0)` means the slave side is closed (the kernel reports that
    /// as EIO on a PTY master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` as terminal input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Changes the window size; the kernel signals SIGWINCH to the foreground group.
    pub fn resize(&self, size: WinSize) -> io::Result<()> {
        set_winsize(self.fd.get_ref(), size)
    }
}
