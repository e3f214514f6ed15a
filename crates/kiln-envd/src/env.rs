//! The environment a process starts with (spec §5.1). Later layers win:
//! 1. `PATH` from envd's own environment (a standard PATH if envd has none);
//! 2. `HOME`, `USER`, `LOGNAME` of the user;
//! 3. the sandbox defaults set by `POST /init` (`E2B_SANDBOX`, create-time `envVars`…);
//! 4. the request's own `envs`.
//!
//! Nothing else from envd's environment is inherited.

use std::collections::BTreeMap;

use crate::users::User;

/// PATH used when envd itself was started without one.
pub const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn build(
    envd_path: Option<&str>,
    user: &User,
    defaults: &BTreeMap<String, String>,
    request: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        envd_path.unwrap_or(FALLBACK_PATH).to_owned(),
    );
    env.insert("HOME".to_owned(), user.home.to_string_lossy().into_owned());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    env.extend(defaults.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: PathBuf::from("/home/user"),
            shell: "/bin/bash".into(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn base_layers() {
        let env = build(Some("/bin"), &user(), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            env,
            map(&[
                ("PATH", "/bin"),
                ("HOME", "/home/user"),
                ("USER", "user"),
                ("LOGNAME", "user")
            ])
        );
        let env = build(None, &user(), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(env["PATH"], FALLBACK_PATH);
    }

    #[test]
    fn later_layers_win() {
        let defaults = map(&[("E2B_SANDBOX", "true"), ("HOME", "/data"), ("A", "default")]);
        let request = map(&[("A", "request"), ("PATH", "/opt/bin")]);
        let env = build(Some("/bin"), &user(), &defaults, &request);
        assert_eq!(env["HOME"], "/data");
        assert_eq!(env["A"], "request");
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["E2B_SANDBOX"], "true");
        assert_eq!(env["USER"], "user");
        assert_eq!(env.len(), 6);
    }
}
