//! The broker: a root daemon (started by kiln-init) that runs sudo requests.
//!
//! One thread per request: it checks the caller (uid from `SCM_CREDENTIALS`) against the
//! sudoers rules, starts the command with the caller's own stdin, stdout and stderr
//! (received over the socket), relays the signals the client forwards, and replies
//! with the command's status. The command runs in a session of its own (no
//! controlling terminal, so reading the caller's terminal is never stopped by job
//! control). When the client goes away before the command ends (killed), the
//! command's process group is killed too: a sandbox's `commands.kill` must not leave a
//! root process behind.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use kiln_envd::users::{User, UserDb, UserFiles};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid};

use crate::options::shell_command;
use crate::policy::{self, Grant};
use crate::proto::{self, Control, Mode, Reply, Request, SOCKET_NAME};

/// sudo's `secure_path` on Debian: the command's PATH, and where commands are found.
pub const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables an `env_reset` sudo keeps from the caller.
const KEPT: [&str; 7] = [
    "TERM",
    "COLORTERM",
    "DISPLAY",
    "XAUTHORITY",
    "LANG",
    "LANGUAGE",
    "TZ",
];

/// Listens on `@kiln-sudo` until killed.
pub fn run() -> ExitCode {
    let listener = match SocketAddr::from_abstract_name(SOCKET_NAME)
        .and_then(|addr| UnixListener::bind_addr(&addr))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln-sudo broker: binding @kiln-sudo: {e}");
            return ExitCode::from(1);
        }
    };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(&stream) {
                        eprintln!("kiln-sudo broker: {e}");
                    }
                });
            }
            Err(e) => eprintln!("kiln-sudo broker: accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// What to start, decided before anything is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub program: PathBuf,
    pub arg0: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn refuse(message: impl Into<String>) -> Reply {
    Reply::Error {
        message: message.into(),
        code: 1,
    }
}

fn serve(stream: &UnixStream) -> io::Result<()> {
    proto::expect_credentials(stream)?;
    let proto::Received { request, fds, uid } = proto::recv_request(stream)?;
    let fds: [OwnedFd; 3] = match fds.try_into() {
        Ok(fds) => fds,
        Err(_) => {
            return proto::send_line(stream, &refuse("sudo: expected stdin, stdout and stderr"))
        }
    };
    let db = UserFiles {
        passwd: "/etc/passwd".into(),
        group: "/etc/group".into(),
    }
    .load();
    let db = match db {
        Ok(db) => db,
        Err(e) => return proto::send_line(stream, &refuse(format!("sudo: {e}"))),
    };
    let sudoers = policy::read_sudoers(Path::new("/"));
    match request.mode {
        Mode::Run => {}
        Mode::Validate => {
            let reply = match authorize(&request, uid, &db, &sudoers) {
                Ok(_) => Reply::Exited(0),
                Err(reply) => reply,
            };
            return proto::send_line(stream, &reply);
        }
        Mode::List => {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into());
            let reply = listing(&request, uid, &db, &sudoers, &host, &|p| p.is_file())
                .unwrap_or_else(|refusal| refusal);
            return proto::send_line(stream, &reply);
        }
    }
    let plan = match plan(&request, uid, &db, &sudoers, &|p| p.is_file()) {
        Ok(plan) => plan,
        Err(reply) => return proto::send_line(stream, &reply),
    };
    let reply = run_plan(stream, plan, fds);
    proto::send_line(stream, &reply)
}

/// Starts the plan, relays the client's signals, waits.
fn run_plan(stream: &UnixStream, plan: Plan, [stdin, stdout, stderr]: [OwnedFd; 3]) -> Reply {
    let mut cmd = Command::new(&plan.program);
    cmd.arg0(&plan.arg0)
        .args(&plan.args)
        .env_clear()
        .envs(&plan.env)
        .current_dir(&plan.cwd)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let groups: Vec<Gid> = plan.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(plan.uid), Gid::from_raw(plan.gid));
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (setsid, setgroups, setgid, setuid) on data
    // prepared before the fork; it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return refuse(format!(
                "sudo: {}: command not found",
                plan.program.display()
            ))
        }
        Err(e) => {
            return refuse(format!(
                "sudo: unable to run {}: {e}",
                plan.program.display()
            ))
        }
    };
    // The child leads its own session, so its pid is its process group.
    let group = Pid::from_raw(child.id() as i32);
    let running = Arc::new(Mutex::new(true));
    if let Ok(reader) = stream.try_clone() {
        let running = running.clone();
        std::thread::spawn(move || relay_signals(reader, group, &running));
    }
    let status = child.wait();
    if let Ok(mut r) = running.lock() {
        *r = false;
    }
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Reply::Exited(code),
            (None, Some(sig)) => Reply::Killed(sig),
            (None, None) => Reply::Exited(1),
        },
        Err(e) => refuse(format!("sudo: waiting for the command: {e}")),
    }
}

/// Passes the client's signals to the command's process group; kills the group when
/// the client disappears while the command still runs.
fn relay_signals(reader: UnixStream, group: Pid, running: &Mutex<bool>) {
    let still_running = || running.lock().map(|r| *r).unwrap_or(false);
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let Ok(Control::Signal(n)) = serde_json::from_str(&line) else {
            continue;
        };
        if let (Ok(sig), true) = (Signal::try_from(n), still_running()) {
            let _ = killpg(group, sig);
        }
    }
    if still_running() {
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// The caller and the command's user, when the sudoers rules allow the request.
pub fn authorize(
    req: &Request,
    caller_uid: u32,
    db: &UserDb,
    sudoers: &[String],
) -> Result<(User, User), Reply> {
    let inv = &req.invocation;
    let caller = db.user(&db.user_name(caller_uid)).cloned().ok_or_else(|| {
        refuse(format!(
            "sudo: you do not exist in the passwd database (uid {caller_uid})"
        ))
    })?;
    let target = match &inv.user {
        Some(spec) => {
            find_user(db, spec).ok_or_else(|| refuse(format!("sudo: unknown user {spec}")))?
        }
        None => find_user(db, "#0").unwrap_or(User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            shell: "/bin/sh".into(),
        }),
    };
    if caller.uid == 0 {
        return Ok((caller, target));
    }
    let grant = caller_grant(db, &caller, sudoers);
    match grant {
        Grant::NotInSudoers => Err(refuse(format!(
            "sudo: {} is not in the sudoers file (Kiln's sudo runs the NOPASSWD: ALL rules of /etc/sudoers and /etc/sudoers.d)",
            caller.name
        ))),
        Grant::PasswordRequired => Err(refuse(format!(
            "sudo: a password is required for {}, and Kiln's sudo asks none: it runs only NOPASSWD: ALL rules (add `{} ALL=(ALL:ALL) NOPASSWD: ALL` to /etc/sudoers.d)",
            caller.name, caller.name
        ))),
        Grant::NoPassword { .. } if !grant.allows(&target.name) => Err(refuse(format!(
            "sudo: {} may not run commands as {}",
            caller.name, target.name
        ))),
        Grant::NoPassword { .. } => Ok((caller, target)),
    }
}

/// What the sudoers rules give `caller` (through its name or one of its groups).
fn caller_grant(db: &UserDb, caller: &User, sudoers: &[String]) -> Grant {
    let groups: Vec<String> = db
        .groups_of(caller)
        .into_iter()
        .map(|g| db.group_name(g))
        .collect();
    policy::grant(sudoers, &caller.name, &groups)
}

/// `sudo -l`: the caller's rule, as sudo prints it; `sudo -l command`: the command line
/// that would run (its full path), when the caller may run it.
pub fn listing(
    req: &Request,
    caller_uid: u32,
    db: &UserDb,
    sudoers: &[String],
    host: &str,
    is_file: &dyn Fn(&Path) -> bool,
) -> Result<Reply, Reply> {
    let inv = &req.invocation;
    if !inv.command.is_empty() || inv.login || inv.shell {
        let plan = plan(req, caller_uid, db, sudoers, is_file)?;
        return Ok(Reply::Listing(format!("{}\n", plan.env["SUDO_COMMAND"])));
    }
    let (caller, _) = authorize(req, caller_uid, db, sudoers)?;
    let runas = match caller_grant(db, &caller, sudoers) {
        Grant::NoPassword { runas } if caller.uid != 0 => runas.join(", "),
        _ => "ALL".to_owned(),
    };
    Ok(Reply::Listing(format!(
        "User {} may run the following commands on {host}:\n    ({runas}) NOPASSWD: ALL\n",
        caller.name
    )))
}

/// Decides who runs what where, or the refusal to send.
pub fn plan(
    req: &Request,
    caller_uid: u32,
    db: &UserDb,
    sudoers: &[String],
    is_file: &dyn Fn(&Path) -> bool,
) -> Result<Plan, Reply> {
    let inv = &req.invocation;
    let (caller, target) = authorize(req, caller_uid, db, sudoers)?;
    let gid = match &inv.group {
        Some(spec) => {
            find_group(db, spec).ok_or_else(|| refuse(format!("sudo: unknown group {spec}")))?
        }
        None => target.gid,
    };
    let mut groups = db.groups_of(&target);
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }

    let caller_env: BTreeMap<&str, &str> = req
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let target_shell = if target.shell.is_empty() {
        "/bin/sh".to_owned()
    } else {
        target.shell.clone()
    };
    let (program, arg0, args) = if inv.login || inv.shell {
        let shell = if inv.shell {
            caller_env
                .get("SHELL")
                .map(|s| s.to_string())
                .unwrap_or_else(|| target_shell.clone())
        } else {
            target_shell.clone()
        };
        let base = Path::new(&shell)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| shell.clone());
        let arg0 = if inv.login {
            format!("-{base}")
        } else {
            shell.clone()
        };
        let args = if inv.command.is_empty() {
            Vec::new()
        } else {
            vec!["-c".to_owned(), shell_command(&inv.command)]
        };
        (PathBuf::from(&shell), arg0, args)
    } else {
        let Some(name) = inv.command.first() else {
            return Err(refuse(crate::options::USAGE));
        };
        let program = resolve(name, is_file)
            .ok_or_else(|| refuse(format!("sudo: {name}: command not found")))?;
        (program, name.clone(), inv.command[1..].to_vec())
    };

    let mut env = BTreeMap::new();
    if inv.preserve_env {
        env.extend(req.env.iter().cloned());
    } else {
        for (k, v) in &req.env {
            let keep = KEPT.contains(&k.as_str())
                || k.starts_with("LC_")
                || inv.preserve_vars.iter().any(|p| p == k);
            if keep {
                env.insert(k.clone(), v.clone());
            }
        }
    }
    if !inv.preserve_env || inv.set_home || inv.login {
        env.insert("HOME".into(), target.home.display().to_string());
    }
    if !inv.preserve_env || inv.login {
        env.insert("SHELL".into(), target_shell.clone());
        env.insert("MAIL".into(), format!("/var/mail/{}", target.name));
    }
    env.insert("USER".into(), target.name.clone());
    env.insert("LOGNAME".into(), target.name.clone());
    env.insert("PATH".into(), SECURE_PATH.into());
    let mut command_line = vec![program.display().to_string()];
    command_line.extend(args.iter().cloned());
    env.insert("SUDO_COMMAND".into(), command_line.join(" "));
    env.insert("SUDO_USER".into(), caller.name.clone());
    env.insert("SUDO_UID".into(), caller.uid.to_string());
    env.insert("SUDO_GID".into(), caller.gid.to_string());
    for (k, v) in &inv.assignments {
        env.insert(k.clone(), v.clone());
    }

    let cwd = match (&inv.chdir, inv.login) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, true) => target.home.clone(),
        (None, false) => PathBuf::from(&req.cwd),
    };
    Ok(Plan {
        program,
        arg0,
        args,
        env,
        cwd,
        uid: target.uid,
        gid,
        groups,
    })
}

/// A user by name or `#uid`. A uid without an entry is a nameless user with
/// group 0 and home `/`, as sudo allows for `-u '#1234'`.
fn find_user(db: &UserDb, spec: &str) -> Option<User> {
    match spec.strip_prefix('#') {
        Some(n) => {
            let uid: u32 = n.parse().ok()?;
            let name = db.user_name(uid);
            Some(db.user(&name).cloned().unwrap_or(User {
                name,
                uid,
                gid: 0,
                home: "/".into(),
                shell: "/bin/sh".into(),
            }))
        }
        None => db.user(spec).cloned(),
    }
}

fn find_group(db: &UserDb, spec: &str) -> Option<u32> {
    match spec.strip_prefix('#') {
        Some(n) => n.parse().ok(),
        None => db.group(spec).map(|g| g.gid),
    }
}

/// The command's path: as given when it has a `/`, else the first match in
/// [`SECURE_PATH`].
fn resolve(name: &str, is_file: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    SECURE_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_file(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        user:x:1000:1000::/home/user:/bin/bash\n\
        guest:x:1001:1001::/home/guest:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:user\nuser:x:1000:\nguest:x:1001:\n";
    const RULE: &str = "user ALL=(ALL:ALL) NOPASSWD: ALL\n";

    fn req(args: &[&str]) -> Request {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let crate::options::Action::Run(invocation) = crate::options::parse(&args).unwrap() else {
            panic!("not a run: {args:?}");
        };
        Request {
            invocation,
            mode: Mode::Run,
            env: vec![
                ("TERM".into(), "xterm".into()),
                ("HOME".into(), "/home/user".into()),
                ("PATH".into(), "/home/user/bin:/usr/bin".into()),
                ("SECRET".into(), "s".into()),
                ("LC_ALL".into(), "C.UTF-8".into()),
                ("SHELL".into(), "/bin/zsh".into()),
            ],
            cwd: "/home/user/project".into(),
        }
    }

    fn plan_for(uid: u32, args: &[&str]) -> Result<Plan, Reply> {
        let db = UserDb::parse(PASSWD, GROUP);
        let exists = |p: &Path| p == Path::new("/usr/bin/whoami") || p == Path::new("/bin/whoami");
        plan(&req(args), uid, &db, &[RULE.to_owned()], &exists)
    }

    #[test]
    fn user_becomes_root_with_a_reset_environment() {
        let p = plan_for(1000, &["whoami"]).unwrap();
        assert_eq!(p.program, PathBuf::from("/usr/bin/whoami"));
        assert_eq!(p.arg0, "whoami");
        assert_eq!((p.uid, p.gid, p.groups.clone()), (0, 0, vec![0]));
        assert_eq!(p.cwd, PathBuf::from("/home/user/project"));
        assert_eq!(p.env["HOME"], "/root");
        assert_eq!(p.env["USER"], "root");
        assert_eq!(p.env["PATH"], SECURE_PATH);
        assert_eq!(p.env["TERM"], "xterm");
        assert_eq!(p.env["LC_ALL"], "C.UTF-8");
        assert_eq!(p.env["SUDO_USER"], "user");
        assert_eq!(p.env["SUDO_UID"], "1000");
        assert_eq!(p.env["SUDO_COMMAND"], "/usr/bin/whoami");
        assert!(!p.env.contains_key("SECRET"));
    }

    #[test]
    fn preserve_env_keeps_the_callers_variables_but_not_path() {
        let p = plan_for(1000, &["-E", "X=1", "whoami"]).unwrap();
        assert_eq!(p.env["SECRET"], "s");
        assert_eq!(p.env["HOME"], "/home/user");
        assert_eq!(p.env["PATH"], SECURE_PATH);
        assert_eq!(p.env["X"], "1");
        let p = plan_for(1000, &["-E", "-H", "whoami"]).unwrap();
        assert_eq!(p.env["HOME"], "/root");
    }

    #[test]
    fn other_target_users_and_groups() {
        let p = plan_for(1000, &["-u", "guest", "-g", "sudo", "whoami"]).unwrap();
        assert_eq!((p.uid, p.gid), (1001, 27));
        assert!(p.groups.contains(&1001) && p.groups.contains(&27));
        let p = plan_for(1000, &["-u", "#4242", "whoami"]).unwrap();
        assert_eq!(p.uid, 4242);
        assert!(
            matches!(plan_for(1000, &["-u", "nobody-here", "whoami"]), Err(Reply::Error { message, .. }) if message.contains("unknown user nobody-here"))
        );
    }

    #[test]
    fn login_and_shell() {
        let p = plan_for(1000, &["-i", "echo", "a b"]).unwrap();
        assert_eq!(p.program, PathBuf::from("/bin/bash"));
        assert_eq!(p.arg0, "-bash");
        assert_eq!(p.args, ["-c", r"echo a\ b"]);
        assert_eq!(p.cwd, PathBuf::from("/root"));
        let p = plan_for(1000, &["-s"]).unwrap();
        assert_eq!(p.program, PathBuf::from("/bin/zsh"));
        assert!(p.args.is_empty());
        let p = plan_for(1000, &["-D", "/tmp", "whoami"]).unwrap();
        assert_eq!(p.cwd, PathBuf::from("/tmp"));
    }

    #[test]
    fn refusals_say_why() {
        let message = |r: Result<Plan, Reply>| match r {
            Err(Reply::Error { message, code: 1 }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let m = message(plan_for(1001, &["whoami"]));
        assert!(m.contains("guest is not in the sudoers file"), "{m}");
        let m = message(plan_for(1000, &["no-such-command"]));
        assert_eq!(m, "sudo: no-such-command: command not found");
        let m = message(plan_for(5555, &["whoami"]));
        assert!(m.contains("passwd database"), "{m}");
        // Root needs no rule.
        assert_eq!(plan_for(0, &["-u", "guest", "whoami"]).unwrap().uid, 1001);
    }

    #[test]
    fn validation_and_an_empty_command() {
        let db = UserDb::parse(PASSWD, GROUP);
        let sudoers = [RULE.to_owned()];
        let mut r = req(&["true"]);
        r.invocation.command.clear();
        assert!(authorize(&r, 1000, &db, &sudoers).is_ok());
        assert!(authorize(&r, 1001, &db, &sudoers).is_err());
        let got = plan(&r, 1000, &db, &sudoers, &|_| true);
        assert!(matches!(got, Err(Reply::Error { message, .. }) if message.starts_with("usage:")));
    }

    #[test]
    fn listing_shows_the_rule_or_the_command() {
        let db = UserDb::parse(PASSWD, GROUP);
        let sudoers = [RULE.to_owned()];
        let exists = |p: &Path| p == Path::new("/usr/bin/whoami");
        let text = |r: Result<Reply, Reply>| match r {
            Ok(Reply::Listing(text)) => text,
            other => panic!("expected a listing, got {other:?}"),
        };
        let mut r = req(&["whoami", "-a"]);
        assert_eq!(
            text(listing(&r, 1000, &db, &sudoers, "box", &exists)),
            "/usr/bin/whoami -a\n"
        );
        r.invocation.command.clear();
        assert_eq!(
            text(listing(&r, 1000, &db, &sudoers, "box", &exists)),
            "User user may run the following commands on box:\n    (ALL) NOPASSWD: ALL\n"
        );
        assert!(text(listing(&r, 0, &db, &sudoers, "box", &exists)).starts_with("User root may"));
        let refused = listing(&r, 1001, &db, &sudoers, "box", &exists);
        assert!(
            matches!(&refused, Err(Reply::Error { message, .. }) if message.contains("guest is not in the sudoers file")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_rule_needing_a_password_is_explained() {
        let db = UserDb::parse(PASSWD, GROUP);
        let sudoers = ["%sudo ALL=(ALL:ALL) ALL\n".to_owned()];
        let r = plan(&req(&["whoami"]), 1000, &db, &sudoers, &|_| true);
        assert!(matches!(r, Err(Reply::Error { message, .. }) if message.contains("NOPASSWD")));
    }
}
