//! Who may run what as whom: the `NOPASSWD` rules of `/etc/sudoers` and
//! `/etc/sudoers.d/*`.
//!
//! Kiln's sudo asks no passwords (there is no terminal it could trust inside a
//! sandbox, and E2B's templates give their user `NOPASSWD: ALL`), so only rules that
//! allow every command without a password grant anything. A rule that would need a
//! password is reported as such, so the refusal says why. As in sudo, the last rule
//! that matches the caller wins.

use std::path::Path;

/// The verdict for one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// May run any command as the listed users (`ALL` = anyone).
    NoPassword { runas: Vec<String> },
    /// A rule matches but needs a password, which Kiln's sudo cannot take.
    PasswordRequired,
    /// No rule names the caller or one of its groups.
    NotInSudoers,
}

impl Grant {
    /// Whether `target` (a user name) may be the command's user.
    pub fn allows(&self, target: &str) -> bool {
        match self {
            Grant::NoPassword { runas } => runas.iter().any(|r| r == "ALL" || r == target),
            _ => false,
        }
    }
}

/// The texts of `etc/sudoers` and of every `etc/sudoers.d` file sudo's `@includedir`
/// would read (names without `.` and not ending in `~`), under `root`.
pub fn read_sudoers(root: &Path) -> Vec<String> {
    let mut texts = Vec::new();
    if let Ok(text) = std::fs::read_to_string(root.join("etc/sudoers")) {
        texts.push(text);
    }
    let mut names: Vec<_> = std::fs::read_dir(root.join("etc/sudoers.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.contains('.') && !n.ends_with('~'))
        })
        .collect();
    names.sort();
    texts.extend(names.iter().filter_map(|p| std::fs::read_to_string(p).ok()));
    texts
}

/// The grant of `user`, a member of `groups`, under the rules in `texts`.
pub fn grant(texts: &[String], user: &str, groups: &[String]) -> Grant {
    let mut verdict = Grant::NotInSudoers;
    for text in texts {
        for line in logical_lines(text) {
            if let Some(g) = rule(&line, user, groups) {
                verdict = g;
            }
        }
    }
    verdict
}

/// Lines with comments removed and `\` continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(stripped) = line.strip_suffix('\\') {
            current.push_str(stripped);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let whole = std::mem::take(&mut current);
        let code = match whole.find('#') {
            Some(at) => &whole[..at],
            None => &whole,
        };
        if !code.trim().is_empty() {
            out.push(code.trim().to_owned());
        }
    }
    out
}

/// The grant of one `who hosts=(runas) TAGS: commands` line when `who` names the
/// caller; `None` for other lines (Defaults, aliases, rules for someone else, rules
/// limited to some commands).
fn rule(line: &str, user: &str, groups: &[String]) -> Option<Grant> {
    const NOT_RULES: [&str; 6] = [
        "Defaults",
        "User_Alias",
        "Runas_Alias",
        "Host_Alias",
        "Cmnd_Alias",
        "@include",
    ];
    if NOT_RULES.iter().any(|k| line.starts_with(k)) {
        return None;
    }
    let (who, spec) = line.split_once(char::is_whitespace)?;
    let named = who.split(',').map(str::trim).any(|w| {
        w == "ALL"
            || w == user
            || w.strip_prefix('%')
                .is_some_and(|g| groups.iter().any(|x| x == g))
    });
    if !named {
        return None;
    }
    let (_hosts, rest) = spec.split_once('=')?;
    let rest = rest.trim();
    let (runas, rest) = match rest.strip_prefix('(') {
        Some(inner) => {
            let (list, after) = inner.split_once(')')?;
            let users = list.split(':').next().unwrap_or_default();
            let users: Vec<String> = users
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            (users, after.trim())
        }
        None => (vec!["root".to_owned()], rest),
    };
    let mut nopasswd = false;
    let mut commands = rest;
    // Tags such as `NOPASSWD:` and `SETENV:` come before the command list.
    while let Some((tag, after)) = commands.split_once(':') {
        let tag = tag.trim();
        if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            break;
        }
        match tag {
            "NOPASSWD" => nopasswd = true,
            "PASSWD" => nopasswd = false,
            _ => {}
        }
        commands = after.trim();
    }
    if commands.trim() != "ALL" {
        return None;
    }
    let runas = if runas.is_empty() {
        vec!["root".to_owned()]
    } else {
        runas
    };
    Some(if nopasswd {
        Grant::NoPassword { runas }
    } else {
        Grant::PasswordRequired
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "\
Defaults\tenv_reset
Defaults\tsecure_path=\"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"
# User privilege specification
root\tALL=(ALL:ALL) ALL
%sudo\tALL=(ALL:ALL) ALL
@includedir /etc/sudoers.d
";

    fn g(texts: &[&str], user: &str, groups: &[&str]) -> Grant {
        let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        grant(&texts, user, &groups)
    }

    #[test]
    fn e2b_user_rule() {
        let verdict = g(
            &[DEBIAN, "user ALL=(ALL:ALL) NOPASSWD: ALL\n"],
            "user",
            &["user"],
        );
        assert!(verdict.allows("root"));
        assert!(verdict.allows("nobody"));
    }

    #[test]
    fn group_rule_without_password_is_refused_with_a_reason() {
        assert_eq!(
            g(&[DEBIAN], "user", &["user", "sudo"]),
            Grant::PasswordRequired
        );
        assert_eq!(g(&[DEBIAN], "user", &["user"]), Grant::NotInSudoers);
    }

    #[test]
    fn group_nopasswd_and_continuations() {
        let text = "%wheel ALL = (ALL) \\\n   NOPASSWD: SETENV: ALL # comment\n";
        assert!(g(&[text], "alice", &["wheel"]).allows("root"));
        assert_eq!(g(&[text], "bob", &["users"]), Grant::NotInSudoers);
    }

    #[test]
    fn last_match_wins() {
        let texts = [
            "user ALL=(ALL) NOPASSWD: ALL\n",
            "user ALL=(ALL) PASSWD: ALL\n",
        ];
        assert_eq!(g(&texts, "user", &[]), Grant::PasswordRequired);
    }

    #[test]
    fn runas_lists_and_default_root() {
        let only_root = g(&["user ALL= NOPASSWD: ALL\n"], "user", &[]);
        assert!(only_root.allows("root"));
        assert!(!only_root.allows("nobody"));
        let listed = g(&["user ALL=(www-data, root) NOPASSWD: ALL\n"], "user", &[]);
        assert!(listed.allows("www-data"));
        assert!(!listed.allows("nobody"));
    }

    #[test]
    fn command_limited_rules_grant_nothing() {
        let text = "user ALL=(ALL) NOPASSWD: /usr/bin/apt-get\n";
        assert_eq!(g(&[text], "user", &[]), Grant::NotInSudoers);
    }

    #[test]
    fn reads_includedir_like_sudo() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(etc.join("sudoers.d")).unwrap();
        std::fs::write(etc.join("sudoers"), DEBIAN).unwrap();
        std::fs::write(etc.join("sudoers.d/user"), "user ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        std::fs::write(etc.join("sudoers.d/x.bak"), "eve ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        std::fs::write(etc.join("sudoers.d/eve~"), "eve ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        let texts = read_sudoers(dir.path());
        assert_eq!(texts.len(), 2);
        assert!(grant(&texts, "user", &[]).allows("root"));
        assert_eq!(grant(&texts, "eve", &[]), Grant::NotInSudoers);
    }
}
