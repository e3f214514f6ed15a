//! Loopback registries, image config, cache keys, base hash and root account tests.
//! Privilege tier: none.

use super::*;

#[test]
fn only_loopback_registries_are_plain_http() {
    for r in [
        "127.0.0.1:5000",
        "127.0.0.1",
        "127.1.2.3:80",
        "localhost:5000",
        "LOCALHOST",
        "[::1]:5000",
    ] {
        assert!(is_loopback(r), "{r}");
    }
    for r in [
        "index.docker.io",
        "ghcr.io",
        "10.0.0.1:5000",
        "localhost.example.com:5000",
        "127.0.0.1.nip.io",
        "[::2]:5000",
    ] {
        assert!(!is_loopback(r), "{r}");
    }
}

#[test]
fn image_config_gives_user_workdir_and_env() {
    let blob = br#"{"architecture":"amd64","os":"linux","config":{
        "User":"app:app","WorkingDir":"/srv//app/","Env":["PATH=/usr/bin:/bin","A=b=c","BROKEN"],
        "Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let c = ImageConfig::parse(blob).unwrap();
    assert_eq!(c.user, "app:app");
    assert_eq!(c.workdir.as_deref(), Some("/srv/app"));
    assert_eq!(c.env.get("PATH").map(String::as_str), Some("/usr/bin:/bin"));
    assert_eq!(c.env.get("A").map(String::as_str), Some("b=c"));
    assert!(!c.env.contains_key("BROKEN"));
    let root = tempfile::tempdir().unwrap();
    assert_eq!(c.start_user(root.path()).unwrap(), "app");

    // No config at all (or nulls): root, no workdir, no env.
    for blob in [
        &br#"{}"#[..],
        br#"{"config":null}"#,
        br#"{"config":{"User":null,"Env":null,"WorkingDir":""}}"#,
    ] {
        let c = ImageConfig::parse(blob).unwrap();
        assert_eq!(c, ImageConfig::default());
        assert_eq!(c.start_user(root.path()).unwrap(), "root");
    }

    // A numeric user is looked up in the image's passwd.
    fs::create_dir(root.path().join("etc")).unwrap();
    fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n",
    )
    .unwrap();
    let numeric = |u: &str| ImageConfig {
        user: u.into(),
        ..Default::default()
    };
    assert_eq!(
        numeric("1000:1000").start_user(root.path()).unwrap(),
        "node"
    );
    assert_eq!(numeric("0").start_user(root.path()).unwrap(), "root");
    assert!(numeric("4242")
        .start_user(root.path())
        .unwrap_err()
        .contains("\"4242\""));
}

#[test]
fn cache_keys_only_from_well_formed_digests() {
    let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
    assert_eq!(
        cache_key(&d).unwrap(),
        format!("v{PREPARE_VERSION}-sha256-{}", "0123456789abcdef".repeat(4))
    );
    for bad in [
        "sha256",
        "sha256:",
        "sha256:../../etc",
        "SHA256:abcdefabcdefabcdefabcdefabcdefab",
        &format!("sha256:{}", "A".repeat(64)),
        &format!("sha/256:{}", "a".repeat(64)),
    ] {
        assert_eq!(cache_key(bad), None, "{bad}");
    }
}

#[test]
fn the_base_hash_covers_the_digest() {
    let pulled = |digest: &str| PulledImage {
        reference: "r".into(),
        digest: digest.into(),
        rootfs: PathBuf::from("/x"),
        config: ImageConfig::default(),
        rootfs_bytes: 0,
    };
    assert_eq!(
        pulled("sha256:a").base_hash(),
        pulled("sha256:a").base_hash()
    );
    assert_ne!(
        pulled("sha256:a").base_hash(),
        pulled("sha256:b").base_hash()
    );
    assert_ne!(
        pulled("sha256:a").base_hash(),
        recipe::base_hash("base", "sha256:a")
    );
}

#[test]
fn root_account_is_added_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ensure_root_account(root).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("etc/passwd")).unwrap(),
        "root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/group")).unwrap(),
        "root:x:0:\n"
    );
    assert!(root.join("root").is_dir());
    // An existing root entry is left alone; other entries are kept.
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/ash\nnobody:x:65534:65534::/:/bin/false",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "wheel:x:10:").unwrap();
    ensure_root_account(root).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("etc/passwd")).unwrap(),
        "root:x:0:0::/root:/bin/ash\nnobody:x:65534:65534::/:/bin/false"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/group")).unwrap(),
        "wheel:x:10:\nroot:x:0:\n"
    );
}
