//! User and group lookups from `/etc/passwd` and `/etc/group`.
//!
//! envd is linked statically, where glibc's NSS does not work, so the files are parsed
//! here. They are re-read on each lookup so users added after boot are seen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid username: '{0}'")]
    UnknownUser(String),
}

/// A parsed snapshot of the user and group databases.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: Vec<User>,
    groups: Vec<Group>,
    uid_names: HashMap<u32, usize>,
    gid_names: HashMap<u32, usize>,
}

/// Where the databases live.
#[derive(Debug, Clone)]
pub struct UserFiles {
    pub passwd: PathBuf,
    pub group: PathBuf,
}

impl UserFiles {
    /// Reads both files. A missing group file is an empty group database.
    pub fn load(&self) -> Result<UserDb, UsersError> {
        let passwd = read(&self.passwd)?;
        let group = match std::fs::read_to_string(&self.group) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(UsersError::Read {
                    path: self.group.clone(),
                    source,
                })
            }
        };
        Ok(UserDb::parse(&passwd, &group))
    }

    /// Looks up one user by name.
    pub fn user(&self, name: &str) -> Result<User, UsersError> {
        self.load()?
            .user(name)
            .cloned()
            .ok_or_else(|| UsersError::UnknownUser(name.to_owned()))
    }
}

fn read(path: &Path) -> Result<String, UsersError> {
    std::fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.to_owned(),
        source,
    })
}

impl UserDb {
    /// Parses passwd and group text. Malformed lines are skipped, as libc does.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let users: Vec<User> = passwd.lines().filter_map(parse_passwd_line).collect();
        let groups: Vec<Group> = group.lines().filter_map(parse_group_line).collect();
        let mut uid_names = HashMap::new();
        for (i, u) in users.iter().enumerate() {
            uid_names.entry(u.uid).or_insert(i);
        }
        let mut gid_names = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            gid_names.entry(g.gid).or_insert(i);
        }
        Self {
            users,
            groups,
            uid_names,
            gid_names,
        }
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// One group by name.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The name of `uid`, or the number as text when it has none (as Go's envd does).
    pub fn user_name(&self, uid: u32) -> String {
        match self.uid_names.get(&uid) {
            Some(&i) => self.users[i].name.clone(),
            None => uid.to_string(),
        }
    }

    /// The name of `gid`, or the number as text.
    pub fn group_name(&self, gid: u32) -> String {
        match self.gid_names.get(&gid) {
            Some(&i) => self.groups[i].name.clone(),
            None => gid.to_string(),
        }
    }

    /// The groups a process of `user` gets: the primary group first, then every group
    /// listing the user as a member (deduplicated).
    pub fn groups_of(&self, user: &User) -> Vec<u32> {
        let mut gids = vec![user.gid];
        for g in &self.groups {
            if g.members.iter().any(|m| m == &user.name) && !gids.contains(&g.gid) {
                gids.push(g.gid);
            }
        }
        gids
    }
}

fn parse_passwd_line(line: &str) -> Option<User> {
    let line = line.trim_end_matches('\r');
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 || fields[0].is_empty() {
        return None;
    }
    Some(User {
        name: fields[0].to_owned(),
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        home: PathBuf::from(fields[5]),
        shell: fields[6].to_owned(),
    })
}

fn parse_group_line(line: &str) -> Option<Group> {
    let line = line.trim_end_matches('\r');
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 4 || fields[0].is_empty() {
        return None;
    }
    Some(Group {
        name: fields[0].to_owned(),
        gid: fields[2].parse().ok()?,
        members: fields[3]
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        broken line\n\
        user:x:1000:1000:User,,,:/home/user:/bin/bash\n\
        bad:x:notanumber:1:::\n\
        svc:x:998:998::/nonexistent:/usr/sbin/nologin\r\n";
    const GROUP: &str =
        "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\ndocker:x:999: user \nsvc:x:998:\n";

    #[test]
    fn parses_passwd() {
        let db = UserDb::parse(PASSWD, GROUP);
        let user = db.user("user").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 1000));
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(db.user("svc").unwrap().shell, "/usr/sbin/nologin");
        assert!(db.user("bad").is_none());
        assert!(db.user("broken line").is_none());
        assert_eq!(db.user_name(0), "root");
        assert_eq!(db.user_name(4242), "4242");
    }

    #[test]
    fn parses_groups() {
        let db = UserDb::parse(PASSWD, GROUP);
        assert_eq!(db.group_name(27), "sudo");
        assert_eq!(db.group_name(5), "5");
        assert_eq!(db.group("docker").map(|g| g.gid), Some(999));
        assert!(db.group("nope").is_none());
        let user = db.user("user").unwrap();
        assert_eq!(db.groups_of(user), vec![1000, 27, 999]);
        assert_eq!(db.groups_of(db.user("root").unwrap()), vec![0]);
    }

    #[test]
    fn loads_files_and_reports_unknown_users() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), PASSWD).unwrap();
        let files = UserFiles {
            passwd: dir.path().join("passwd"),
            group: dir.path().join("missing-group"),
        };
        assert_eq!(files.user("root").unwrap().uid, 0);
        let err = files.user("nobody-here").unwrap_err();
        assert_eq!(err.to_string(), "invalid username: 'nobody-here'");
    }
}
