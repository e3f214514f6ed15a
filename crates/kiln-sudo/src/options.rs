//! sudo's command line: the subset Kiln's sudo understands.

use serde::{Deserialize, Serialize};

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a command (or a shell) as another user.
    Run(Invocation),
    /// `-v`, `-k`/`-K` without a command: succeed when the caller may use sudo.
    Validate,
    /// `-l [command]`: the caller's rules, or the command line sudo would run.
    List(Invocation),
    Version,
    Help,
}

/// One `sudo ... [VAR=value...] [command...]`, as the broker receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// `-u`: a user name or `#uid`; `None` is root.
    pub user: Option<String>,
    /// `-g`: a group name or `#gid` for the primary group.
    pub group: Option<String>,
    /// `-E`: keep the caller's environment.
    pub preserve_env: bool,
    /// `--preserve-env=A,B`: keep these variables too.
    pub preserve_vars: Vec<String>,
    /// `-H`: HOME is the target's (already so unless `-E`).
    pub set_home: bool,
    /// `-i`: the target's login shell, in its home directory.
    pub login: bool,
    /// `-s`: a shell (`$SHELL` or the target's).
    pub shell: bool,
    /// `-D`: working directory of the command.
    pub chdir: Option<String>,
    /// `VAR=value` words before the command.
    pub assignments: Vec<(String, String)>,
    pub command: Vec<String>,
}

pub const USAGE: &str =
    "usage: sudo [-EHiklnsSv] [-D directory] [-g group] [-u user] [VAR=value] [command [arg ...]]";

const SUPPORTED: &str = "Kiln's sudo supports -A -D -E -g -H -i -k -K -l -n -p -s -S -u -v -V -h, --preserve-env[=list], --, VAR=value";

/// sudo's long options and the short flag each stands for.
const LONG: &[(&str, char)] = &[
    ("user", 'u'),
    ("group", 'g'),
    ("chdir", 'D'),
    ("prompt", 'p'),
    ("preserve-env", 'E'),
    ("set-home", 'H'),
    ("login", 'i'),
    ("shell", 's'),
    ("non-interactive", 'n'),
    ("stdin", 'S'),
    ("askpass", 'A'),
    ("reset-timestamp", 'k'),
    ("remove-timestamp", 'K'),
    ("validate", 'v'),
    ("list", 'l'),
    ("version", 'V'),
    ("help", 'h'),
];

/// Short flags that take a value.
const TAKES_VALUE: &str = "ugDp";

/// What the flags ask for besides the invocation itself.
#[derive(Default)]
struct Flags {
    validate: bool,
    list: bool,
}

impl Flags {
    /// Applies one flag (`value` is set for those in [`TAKES_VALUE`]); `Some` when it
    /// decides the action on its own (`-V`, `-h`).
    fn apply(
        &mut self,
        flag: char,
        value: Option<String>,
        inv: &mut Invocation,
    ) -> Result<Option<Action>, String> {
        match flag {
            'u' => inv.user = value,
            'g' => inv.group = value,
            'D' => inv.chdir = value,
            'p' => {}
            'E' => inv.preserve_env = true,
            'H' => inv.set_home = true,
            'i' => inv.login = true,
            's' => inv.shell = true,
            'n' | 'S' | 'A' | 'k' => {}
            'v' | 'K' => self.validate = true,
            'l' => self.list = true,
            'V' => return Ok(Some(Action::Version)),
            'h' => return Ok(Some(Action::Help)),
            _ => return Err(format!("sudo: unsupported option '-{flag}' ({SUPPORTED})")),
        }
        Ok(None)
    }
}

/// Parses the arguments after `sudo`.
pub fn parse(args: &[String]) -> Result<Action, String> {
    let mut inv = Invocation::default();
    let mut flags = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        if arg == "--" {
            i += 1;
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, attached) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let Some(&(_, flag)) = LONG.iter().find(|(n, _)| *n == name) else {
                return Err(format!("sudo: unsupported option '--{name}' ({SUPPORTED})"));
            };
            if flag == 'E' {
                // `--preserve-env=A,B` keeps a list; bare, it is `-E`.
                if let Some(list) = attached {
                    let names = list.split(',').filter(|v| !v.is_empty());
                    inv.preserve_vars.extend(names.map(str::to_owned));
                    i += 1;
                    continue;
                }
            }
            let value = if TAKES_VALUE.contains(flag) {
                match attached {
                    Some(v) => Some(v),
                    None => {
                        i += 1;
                        let v = args.get(i).cloned();
                        Some(v.ok_or_else(|| {
                            format!("sudo: option '--{name}' requires an argument")
                        })?)
                    }
                }
            } else {
                None
            };
            if let Some(action) = flags.apply(flag, value, &mut inv)? {
                return Ok(action);
            }
            i += 1;
            continue;
        }
        let Some(bundle) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            break;
        };
        // Short flags, possibly bundled (`-nE`); one taking a value ends the bundle
        // (`-uroot` or `-u root`).
        for (pos, flag) in bundle.char_indices() {
            let rest = &bundle[pos + flag.len_utf8()..];
            let takes_value = TAKES_VALUE.contains(flag);
            let value = match (takes_value, rest.is_empty()) {
                (false, _) => None,
                (true, false) => Some(rest.to_owned()),
                (true, true) => {
                    i += 1;
                    let v = args.get(i).cloned();
                    Some(v.ok_or_else(|| format!("sudo: option requires an argument -- '{flag}'"))?)
                }
            };
            if let Some(action) = flags.apply(flag, value, &mut inv)? {
                return Ok(action);
            }
            if takes_value {
                break;
            }
        }
        i += 1;
    }
    let (validate, list) = (flags.validate, flags.list);
    while let Some((name, value)) = args.get(i).and_then(|a| assignment(a)) {
        inv.assignments.push((name, value));
        i += 1;
    }
    inv.command = args[i.min(args.len())..].to_vec();
    if inv.login && inv.shell {
        return Err("sudo: you may not specify both the -i and -s options".into());
    }
    let asked_to_run = !inv.command.is_empty() || inv.login || inv.shell;
    if list {
        return Ok(Action::List(inv));
    }
    if validate && !asked_to_run {
        return Ok(Action::Validate);
    }
    if !asked_to_run {
        // `sudo -k` alone only forgets a cached password, which Kiln's sudo never has.
        if args.iter().any(|a| a == "-k" || a == "--reset-timestamp") {
            return Ok(Action::Validate);
        }
        return Err(USAGE.into());
    }
    Ok(Action::Run(inv))
}

/// `NAME=value` with a shell-variable name.
fn assignment(word: &str) -> Option<(String, String)> {
    let (name, value) = word.split_once('=')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    let valid = (first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| (name.to_owned(), value.to_owned()))
}

/// The command as one `sh -c` string for `-i`/`-s`, escaped as sudo does: every
/// character other than letters, digits, `_`, `-` and `$` gets a backslash.
pub fn shell_command(command: &[String]) -> String {
    let mut out = String::new();
    for (n, word) in command.iter().enumerate() {
        if n > 0 {
            out.push(' ');
        }
        for c in word.chars() {
            if !(c.is_alphanumeric() || matches!(c, '_' | '-' | '$')) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Action, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn run(args: &[&str]) -> Invocation {
        match p(args).unwrap() {
            Action::Run(inv) => inv,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    #[test]
    fn plain_command() {
        let inv = run(&["-n", "whoami"]);
        assert_eq!(inv.command, ["whoami"]);
        assert_eq!(inv.user, None);
        assert!(!inv.preserve_env);
    }

    #[test]
    fn options_stop_at_the_command() {
        let inv = run(&["-u", "user", "ls", "-la", "-u"]);
        assert_eq!(inv.user.as_deref(), Some("user"));
        assert_eq!(inv.command, ["ls", "-la", "-u"]);
    }

    #[test]
    fn bundled_and_attached_values() {
        let inv = run(&["-nEuuser", "id"]);
        assert!(inv.preserve_env);
        assert_eq!(inv.user.as_deref(), Some("user"));
        let inv = run(&["--user=nobody", "-D", "/tmp", "--", "-x"]);
        assert_eq!(inv.user.as_deref(), Some("nobody"));
        assert_eq!(inv.chdir.as_deref(), Some("/tmp"));
        assert_eq!(inv.command, ["-x"]);
    }

    #[test]
    fn assignments_before_the_command() {
        let inv = run(&["-E", "A=1", "_B2=x=y", "env", "C=3"]);
        assert_eq!(
            inv.assignments,
            [("A".into(), "1".into()), ("_B2".into(), "x=y".into())]
        );
        assert_eq!(inv.command, ["env", "C=3"]);
        assert_eq!(run(&["1A=x"]).command, ["1A=x"]);
    }

    #[test]
    fn preserve_env_list() {
        let inv = run(&["--preserve-env=FOO,BAR", "env"]);
        assert!(!inv.preserve_env);
        assert_eq!(inv.preserve_vars, ["FOO", "BAR"]);
    }

    #[test]
    fn shells_need_no_command() {
        assert!(run(&["-i"]).login);
        assert!(run(&["-s", "echo", "hi"]).shell);
        assert!(p(&["-i", "-s"]).is_err());
    }

    #[test]
    fn validate_version_help_usage() {
        assert_eq!(p(&["-v"]).unwrap(), Action::Validate);
        assert_eq!(p(&["-k"]).unwrap(), Action::Validate);
        assert_eq!(p(&["-K"]).unwrap(), Action::Validate);
        assert_eq!(p(&["-V"]).unwrap(), Action::Version);
        assert_eq!(p(&["-h"]).unwrap(), Action::Help);
        assert_eq!(p(&[]).unwrap_err(), USAGE);
        assert_eq!(p(&["-n"]).unwrap_err(), USAGE);
        assert!(matches!(p(&["-k", "true"]).unwrap(), Action::Run(_)));
    }

    #[test]
    fn list_with_and_without_a_command() {
        let Action::List(inv) = p(&["-l"]).unwrap() else {
            panic!("-l is a listing");
        };
        assert!(inv.command.is_empty());
        let Action::List(inv) = p(&["-n", "--list", "-u", "guest", "ls", "-l"]).unwrap() else {
            panic!("--list with a command is a listing");
        };
        assert_eq!(inv.user.as_deref(), Some("guest"));
        assert_eq!(inv.command, ["ls", "-l"]);
    }

    #[test]
    fn clear_errors() {
        let e = p(&["-b", "sleep", "1"]).unwrap_err();
        assert!(e.contains("unsupported option '-b'"), "{e}");
        assert!(e.contains("-u"), "{e}");
        let e = p(&["-u"]).unwrap_err();
        assert!(e.contains("requires an argument"), "{e}");
        let e = p(&["--frobnicate", "x"]).unwrap_err();
        assert!(e.contains("'--frobnicate'"), "{e}");
    }

    #[test]
    fn shell_escaping_matches_sudo() {
        let cmd = [
            "echo".to_string(),
            "a b".into(),
            "$HOME".into(),
            "x;y".into(),
        ];
        assert_eq!(shell_command(&cmd), r"echo a\ b $HOME x\;y");
    }
}
