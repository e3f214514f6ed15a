//! Pause to disk and resume: `runsc checkpoint` of the whole sandbox (processes, kernel
//! state, memory) into `state_dir/<id>/snapshot/`, `runsc restore` from it.
//!
//! runsc cannot save envd's socket (a host socket, `--host-uds`) nor a connection
//! accepted on it, so envd lets go of them first: the host signals it (`runsc kill
//! --pid <envd> USR1`), envd closes the listener and every connection and writes
//! `run/envd.quiesced` (`ok`, or `busy <n>`), and only then is the sandbox
//! checkpointed. After `runsc restore` the host sends `USR2` and waits until envd
//! accepts again. envd announces its pid, and that it can do this, in `run/envd.pid`
//! (kiln-envd's `quiesce` module).
//!
//! When envd cannot quiesce (no pid file, a connection that will not close, no answer)
//! pause falls back to `runsc pause`, which keeps the sandbox in RAM; `state.json`
//! records which kind of pause it is. A checkpoint that fails after envd quiesced
//! leaves the sandbox running if runsc still has it (envd is woken again and the
//! fallback applies); if runsc stopped it, the error says so.
//!
//! The snapshot lives beside the overlay's upper layer, so a checkpointed sandbox
//! outlives a server restart and a host reboot: [`GvisorRuntime::ensure_host_side`]
//! mounts the overlay and re-creates the network namespace before the restore.
//! Written down in docs/gvisor.md ("Pause and resume").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{host, io_other, GvisorRuntime, GvisorState, PauseKind};
use crate::jail::{chain, spec::validate_id};
use crate::{RuntimeError, SandboxInstance};

/// Files envd keeps beside its socket in `run/` (kiln-envd's `quiesce` module).
const ENVD_PID_FILE: &str = "envd.pid";
const ENVD_QUIESCED_FILE: &str = "envd.quiesced";
/// envd drains its connections for up to 5 s before it reports.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(8);
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long envd gets to listen again after a restore: a restored sandbox pages its
/// memory back in, which on a loaded host takes longer than a fresh start (measured:
/// past 20 s while other sandboxes were being checkpointed and restored).
const WAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// The file runsc writes into the image directory.
const CHECKPOINT_IMAGE: &str = "checkpoint.img";

impl GvisorRuntime {
    /// Where a checkpointed sandbox's image lives: `state_dir/<id>/snapshot/`.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.paths(id).dir.join("snapshot")
    }

    /// Whether `id` is paused to disk with a complete image.
    pub fn is_checkpointed(&self, id: &str) -> bool {
        self.read_state(id)
            .is_some_and(|s| s.paused == Some(PauseKind::Checkpoint))
            && self.snapshot_dir(id).join(CHECKPOINT_IMAGE).is_file()
    }

    /// [`crate::Runtime::pause`]: checkpoint to disk, or `runsc pause` when envd cannot
    /// let go of its socket. Pausing a paused sandbox does nothing.
    pub(super) async fn pause_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let mut state = self
            .read_state(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })?;
        if state.paused.is_some() {
            return Ok(());
        }
        let t = Instant::now();
        let sentry = self.sentry_pid(id).await.unwrap_or(0);
        let quiesced = match self.quiesce_envd(id).await {
            Ok(()) => match self.host_sockets(id).await {
                sockets if sockets.is_empty() => Ok(()),
                sockets => {
                    self.wake_envd(id).await?;
                    Err(format!(
                        "the sandbox holds host sockets runsc cannot save: {}",
                        sockets.join(", ")
                    ))
                }
            },
            Err(reason) => Err(reason),
        };
        let kind = match quiesced {
            Ok(()) => match self.checkpoint(id, &self.snapshot_dir(id)).await {
                Ok(()) => {
                    // Return once the memory is released.
                    wait_for_exit(sentry, Duration::from_secs(5)).await;
                    PauseKind::Checkpoint
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(self.snapshot_dir(id));
                    if self.runsc_status(id).await.is_none_or(|s| s != "running") {
                        return Err(io_other(
                            format!(
                                "sandbox {id}: runsc checkpoint failed and stopped the sandbox"
                            ),
                            &e,
                        ));
                    }
                    tracing::warn!(%id, error = %chain(&e), "checkpoint failed; keeping the sandbox in RAM (runsc pause)");
                    self.wake_envd(id).await?;
                    self.freeze(id).await?;
                    PauseKind::Frozen
                }
            },
            Err(reason) => {
                tracing::warn!(%id, %reason, "cannot checkpoint; keeping the sandbox in RAM (runsc pause)");
                self.freeze(id).await?;
                PauseKind::Frozen
            }
        };
        state.paused = Some(kind);
        self.write_state(&state)?;
        tracing::debug!(%id, ?kind, took = ?t.elapsed(), "gvisor sandbox paused");
        Ok(())
    }

    /// [`crate::Runtime::resume`]. Resuming a running sandbox does nothing. On a failed
    /// restore the snapshot and the paused state stay, so it can be retried or killed.
    pub(super) async fn resume_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let mut state = self
            .read_state(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })?;
        match state.paused {
            // Paused by a Kiln that did not record it: `runsc pause` was all it had.
            None if self.runsc_status(id).await.as_deref() == Some("paused") => {
                self.runsc_short(id, "resume").await?
            }
            None => return Ok(()),
            Some(PauseKind::Frozen) => self.runsc_short(id, "resume").await?,
            Some(PauseKind::Checkpoint) => {
                let image = self.snapshot_dir(id);
                self.restore(id, &image).await?;
                if let Err(e) = std::fs::remove_dir_all(&image) {
                    tracing::warn!(%id, error = %e, "cannot remove the snapshot after the restore");
                }
            }
        }
        state.paused = None;
        self.write_state(&state)
    }

    /// Ask envd to close its socket and connections; `Err(reason)` when it cannot
    /// (then it serves on, or is told to).
    async fn quiesce_envd(&self, id: &str) -> Result<(), String> {
        let run = self.paths(id).run();
        let pid = envd_pid(&run)?;
        let marker = run.join(ENVD_QUIESCED_FILE);
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", marker.display())),
        }
        self.signal(id, pid, "USR1")
            .await
            .map_err(|e| format!("signalling envd: {}", chain(&e)))?;
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        let answer = loop {
            // Guest-writable: opened beneath `run/`, never through a link, capped.
            if let Ok(text) = crate::guest::read_capped_string(&run, ENVD_QUIESCED_FILE, 256) {
                break text;
            }
            if Instant::now() >= deadline {
                break format!("no answer within {QUIESCE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if answer.trim() == "ok" {
            return Ok(());
        }
        if let Err(e) = self.wake_envd(id).await {
            tracing::warn!(%id, error = %chain(&e), "envd did not come back after a failed quiesce");
        }
        Err(format!("envd answered {:?}", answer.trim()))
    }

    /// Paths of the named Unix sockets the sandbox's host processes hold, envd's
    /// own left out: with `--host-uds` a guest `bind()` on the root filesystem makes
    /// a host socket (the gofer binds it and keeps a copy), which runsc cannot save
    /// (`Cannot save endpoint with bound host socket`), and a failed checkpoint stops
    /// the sandbox. Read from `/proc/<pid>/net/unix` of each network namespace of
    /// the sandbox's cgroup. envd's socket is left out because envd said it closed it
    /// (the gofer of an Internet sandbox keeps its copy open; runsc saves the sandbox
    /// all the same). Conservative: a socket the guest closed may still be listed
    /// while the gofer holds it. Pathless client sockets are not seen.
    async fn host_sockets(&self, id: &str) -> Vec<String> {
        let this = self.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || {
            let mut seen = std::collections::HashSet::new();
            let mut paths = std::collections::BTreeSet::new();
            for pid in this.inner.cgroups.procs(&id2).unwrap_or_default() {
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
                if ns.is_none() || !seen.insert(ns) {
                    continue;
                }
                if let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) {
                    paths.extend(
                        named_sockets(&table)
                            .into_iter()
                            .filter(|p| p != crate::GUEST_ENVD_SOCKET),
                    );
                }
            }
            paths.into_iter().collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Tell envd to listen again (`USR2`, repeated until it does) and wait until its
    /// socket accepts; the Sentry's host pid. A guest without `envd.pid` (a test
    /// command) is only waited for.
    async fn wake_envd(&self, id: &str) -> Result<u32, RuntimeError> {
        let socket = self.paths(id).envd_socket();
        let pid = envd_pid(&self.paths(id).run()).ok();
        let wait = self.inner.opts.start_timeout.max(WAKE_TIMEOUT);
        let deadline = Instant::now() + wait;
        loop {
            let mut round = Duration::from_millis(500);
            if let Some(pid) = pid {
                // Fails while `runsc restore` is still setting the sandbox up.
                if let Err(e) = self.signal(id, pid, "USR2").await {
                    tracing::debug!(%id, error = %chain(&e), "USR2 to envd");
                    round = Duration::from_millis(20);
                }
            }
            let round = Instant::now() + round;
            while Instant::now() < round {
                if crate::guest::connect_envd(&socket).await.is_ok() {
                    return self.sentry_pid(id).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::io(
                    format!(
                        "sandbox {id}: envd did not listen on {} again within {:?}; log:\n{}",
                        socket.display(),
                        wait,
                        self.log_tail(id)
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
        }
    }

    async fn signal(&self, id: &str, pid: u32, signal: &'static str) -> Result<(), RuntimeError> {
        let this = self.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || this.inner.runsc.kill(&id2, pid, signal))
            .await
            .map_err(|e| RuntimeError::io("kill task", std::io::Error::other(e)))?
            .map_err(|e| io_other(format!("sandbox {id}: runsc kill {signal}"), &e))
    }

    /// The host pid of `id`'s Sentry (`runsc state`), 0 when it has none.
    pub(super) async fn sentry_pid(&self, id: &str) -> Result<u32, RuntimeError> {
        let state = self.runsc_state(id).await?;
        Ok(state.and_then(|s| s.sentry_pid()).unwrap_or(0))
    }

    /// `runsc state` of `id`, `None` when runsc does not know the sandbox.
    pub(super) async fn runsc_state(
        &self,
        id: &str,
    ) -> Result<Option<super::runsc::ContainerState>, RuntimeError> {
        let this = self.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || this.inner.runsc.state(&id2))
            .await
            .map_err(|e| RuntimeError::io("state task", std::io::Error::other(e)))?
            .map_err(|e| io_other(format!("sandbox {id}: runsc state"), &e))
    }

    /// `runsc state`'s status, `None` when runsc does not know the sandbox or fails.
    pub(super) async fn runsc_status(&self, id: &str) -> Option<String> {
        self.runsc_state(id).await.ok()?.map(|s| s.status)
    }

    /// `runsc pause`: the Sentry stops every task and keeps the memory in RAM.
    async fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        self.runsc_short(id, "pause").await
    }

    async fn runsc_short(&self, id: &str, verb: &'static str) -> Result<(), RuntimeError> {
        let this = self.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || {
            this.inner
                .runsc
                .output(&[verb, &id2], Duration::from_secs(30))
        })
        .await
        .map_err(|e| RuntimeError::io(format!("{verb} task"), std::io::Error::other(e)))?
        .map(|_| ())
        .map_err(|e| io_other(format!("sandbox {id}: runsc {verb}"), &e))
    }

    /// `runsc checkpoint`: save the sandbox's processes, kernel state and memory to
    /// `image_dir` (created `0700`; emptied first); the sandbox stops and its memory
    /// is released. Restore it with [`GvisorRuntime::restore`].
    ///
    /// runsc refuses while the guest holds a host socket (envd's, unless quiesced:
    /// `Cannot save endpoint with bound host socket`), and then stops the sandbox;
    /// [`crate::Runtime::pause`] quiesces envd first.
    pub async fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<(), RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        make_private_dir(image_dir)?;
        let arg = format!("--image-path={}", image_dir.display());
        let this = self.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || {
            this.inner
                .runsc
                .output(&["checkpoint", &arg, &id2], CHECKPOINT_TIMEOUT)
        })
        .await
        .map_err(|e| RuntimeError::io("checkpoint task", std::io::Error::other(e)))?
        .map(|_| ())
        .map_err(|e| io_other(format!("sandbox {id}: runsc checkpoint"), &e))
    }

    /// Restore a checkpointed sandbox `id` from `image_dir`, launched like a fresh
    /// start (Loopback: `runsc restore` supervised like `run`; Internet: `runsc create`
    /// then `runsc restore --detach`); the overlay and network namespace are set up
    /// again first if the host lost them (a reboot). Returns once envd accepts again.
    pub async fn restore(
        &self,
        id: &str,
        image_dir: &Path,
    ) -> Result<SandboxInstance, RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let state = self
            .read_state(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })?;
        let this = self.clone();
        let st = state.clone();
        tokio::task::spawn_blocking(move || this.ensure_host_side(&st))
            .await
            .map_err(|e| RuntimeError::io("host setup task", std::io::Error::other(e)))??;
        let this = self.clone();
        let id2 = id.to_string();
        // The checkpointed container is stopped; runsc wants the id free again.
        tokio::task::spawn_blocking(move || this.inner.runsc.delete(&id2))
            .await
            .map_err(|e| RuntimeError::io("delete task", std::io::Error::other(e)))?
            .map_err(|e| io_other(format!("sandbox {id}: runsc delete"), &e))?;
        let paths = self.paths(id);
        let _ = std::fs::remove_file(paths.envd_socket());
        let launched = match state.slot {
            None => self.spawn_runsc(id, Some(image_dir)),
            Some(_) => self.create_and_start(id, Some(image_dir)).await,
        };
        let woken = match launched {
            Ok(()) => self.wake_envd(id).await,
            Err(e) => Err(e),
        };
        match woken {
            Ok(pid) => Ok(SandboxInstance {
                id: id.to_string(),
                pid,
                envd_socket: paths.envd_socket(),
            }),
            Err(e) => {
                // Stop a half-restored Sentry; the image stays for another try.
                let this = self.clone();
                let id2 = id.to_string();
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = crate::jail::cgroup::kill_all(
                        &*this.inner.cgroups,
                        &id2,
                        Duration::from_secs(5),
                    );
                    this.inner.runsc.delete(&id2)
                })
                .await;
                Err(e)
            }
        }
    }

    /// What the host holds for a sandbox outside its directory, set up again when it
    /// is gone (after a reboot): the overlay mount at `rootfs/` and, for Internet
    /// sandboxes, the network namespace with its veth. Blocking.
    pub(super) fn ensure_host_side(&self, state: &GvisorState) -> Result<(), RuntimeError> {
        let id = &state.id;
        let paths = self.paths(id);
        let host_err =
            |what: &str, e: &dyn std::error::Error| io_other(format!("sandbox {id}: {what}"), e);
        if !host::rootfs_mounted(&paths).map_err(|e| host_err("checking its overlay", &e))? {
            let lower = state.rootfs.as_deref().ok_or_else(|| {
                RuntimeError::io(
                    format!("sandbox {id}: its overlay is not mounted and state.json does not name its template"),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })?;
            // The same range as before: the one the sandbox directory records.
            host::mount_overlay(
                lower,
                &paths,
                self.host_ids(id),
                &self.inner.opts.helper_exe,
            )
            .map_err(|e| host_err("mounting its overlay again", &e))?;
            tracing::info!(%id, "overlay mounted again for the restore");
        }
        if let Some(slot) = state.slot {
            if !host::netns_path(id).exists() {
                // A half-made veth from an earlier try would make `ip link add` fail.
                let _ = host::remove_netns(id, Some(slot));
                host::setup_netns(id, slot)
                    .map_err(|e| host_err("creating its network namespace again", &e))?;
                tracing::info!(%id, "network namespace created again for the restore");
            }
        }
        Ok(())
    }
}

/// The named (not abstract, not unnamed) sockets of a `/proc/net/unix` table:
/// `Num RefCount Protocol Flags Type St Inode Path`.
fn named_sockets(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter(|path| !path.starts_with('@'))
        .map(str::to_string)
        .collect()
}

/// Wait until host process `pid` has exited (gone or a zombie), at most `timeout`.
async fn wait_for_exit(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pid > 0 && Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) S …`: the state letter follows the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next());
        if matches!(state, None | Some('Z' | 'X')) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// envd's pid inside the sandbox, from `run/envd.pid`; `Err` says why there is none.
/// The file is guest-writable: read beneath `run/` without following links, at most a
/// few bytes (a link to `/dev/zero` or a FIFO is an error, not a hang).
fn envd_pid(run: &Path) -> Result<u32, String> {
    let text = crate::guest::read_capped_string(run, ENVD_PID_FILE, 32).map_err(|e| {
        format!(
            "{}: {} (an envd that cannot quiesce)",
            run.join(ENVD_PID_FILE).display(),
            chain(&e)
        )
    })?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            format!(
                "{}: not a pid: {:?}",
                run.join(ENVD_PID_FILE).display(),
                text.trim()
            )
        })
}

/// Create `dir` as an empty `0700` directory (root only: the image is the sandbox's
/// whole memory).
fn make_private_dir(dir: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::io(format!("emptying {}", dir.display()), e)),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_pid_is_read_and_checked() {
        let t = tempfile::tempdir().unwrap();
        assert!(envd_pid(t.path()).unwrap_err().contains("cannot quiesce"));
        std::fs::write(t.path().join(ENVD_PID_FILE), "2\n").unwrap();
        assert_eq!(envd_pid(t.path()), Ok(2));
        for bad in ["0", "-1", "x", ""] {
            std::fs::write(t.path().join(ENVD_PID_FILE), bad).unwrap();
            assert!(envd_pid(t.path()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_guest_link_to_dev_zero_as_envd_pid_is_refused_not_read() {
        // Attack: root in the sandbox replaces /run/kiln/envd.pid by a link to
        // /dev/zero (or a FIFO, or a huge file); the host must not follow or read it.
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", t.path().join(ENVD_PID_FILE)).unwrap();
        assert!(envd_pid(t.path()).unwrap_err().contains("cannot quiesce"));
        std::fs::remove_file(t.path().join(ENVD_PID_FILE)).unwrap();
        std::fs::write(t.path().join(ENVD_PID_FILE), "1".repeat(1 << 20)).unwrap();
        assert!(envd_pid(t.path()).unwrap_err().contains("more than"));
    }

    #[test]
    fn named_sockets_skip_abstract_and_unnamed() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 1069685 /home/user/x.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 1069690\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 1069691 @runsc-ctl\n";
        assert_eq!(named_sockets(table), vec!["/home/user/x.sock".to_string()]);
        assert!(named_sockets("Num RefCount Protocol Flags Type St Inode Path\n").is_empty());
    }

    #[test]
    fn image_dir_is_private_and_empty() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/snapshot");
        make_private_dir(&dir).unwrap();
        std::fs::write(dir.join("old"), "x").unwrap();
        make_private_dir(&dir).unwrap();
        assert!(!dir.join("old").exists());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
