//! Property tests of every parser of outside input in this crate: the Dockerfile subset,
//! `kiln.toml`, the E2B build recipe JSON, and the tar unpacker (image layers and COPY
//! contexts) fed random small archives with hostile entries. None may panic or hang,
//! and an unpack never writes outside its root. Privilege tier: none (run as root, the
//! unpacks also create what only root may, and must still stay inside the root).
//! Case counts are modest so the suite stays fast on two cores.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::dockerfile::{parse_dockerfile, parse_kiln_toml};
use crate::recipe::{expand_env, normalize, BuildSpec, BuildState, StepSpec};
use crate::unpack::{self, Devices, Limits, UnpackError, UnpackOptions};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- Dockerfile and kiln.toml ------------------------------------------------------

fn dockerfile_line() -> impl Strategy<Value = String> {
    let instr = prop::sample::select(vec![
        "FROM",
        "RUN",
        "COPY",
        "ADD",
        "ENV",
        "ARG",
        "WORKDIR",
        "USER",
        "CMD",
        "ENTRYPOINT",
        "EXPOSE",
        "LABEL",
        "HEALTHCHECK",
        "from",
        "Run",
        "BOGUS",
        "#",
        "",
    ]);
    let word = prop::sample::select(vec![
        "a",
        "..",
        "/",
        "../x",
        "*.py",
        "--chown=1:2",
        "--from=x",
        "x=y",
        "\"q\"",
        "'s'",
        "[\"sh\",\"-c\"]",
        "\\",
        "$X",
        "${X:-y}",
        "http://h/f",
        "=",
        "\t",
        "é",
        "\u{0}",
    ]);
    (instr, prop::collection::vec(word, 0..5), ".{0,12}")
        .prop_map(|(i, ws, tail)| format!("{i} {} {tail}", ws.join(" ")))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn dockerfile_parser_never_panics(lines in prop::collection::vec(dockerfile_line(), 0..12)) {
        let ctx = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("a"), "x").unwrap();
        let text = lines.join("\n");
        let _ = parse_dockerfile(&text, ctx.path());
        let _ = parse_dockerfile(&text.replace('\n', "\\\n"), ctx.path());
    }

    #[test]
    fn dockerfile_parser_never_panics_on_any_text(text in "\\PC{0,200}") {
        let ctx = tempfile::tempdir().unwrap();
        let _ = parse_dockerfile(&text, ctx.path());
    }

    #[test]
    fn kiln_toml_parser_never_panics(
        lines in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "name", "cpu_count", "memory_mb", "runtime", "ready_cmd", "start_cmd", "cdp_port",
                    "colour", "", "=",
                ]),
                prop::sample::select(vec![" = ", "=", " ", " == "]),
                "\\PC{0,16}",
            ).prop_map(|(k, eq, v)| format!("{k}{eq}{v}")),
            0..8,
        ),
        noise in "\\PC{0,64}",
    ) {
        let _ = parse_kiln_toml(&lines.join("\n"));
        let _ = parse_kiln_toml(&noise);
    }
}

// ---- The E2B build recipe ----------------------------------------------------------

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    let kind = prop::sample::select(vec![
        "RUN", "COPY", "ENV", "WORKDIR", "USER", "run", "ADD", "", "FROM",
    ]);
    let arg = prop::sample::select(vec![
        "",
        "/",
        "..",
        "../../etc",
        "a b",
        "root",
        "1000:1000",
        "0755",
        "7777",
        "99999999999",
        "$HOME",
        "${A}",
        "~",
        "*",
        "src/*",
        "/dest/",
        "x=y",
    ]);
    let hash = prop_oneof![
        Just(None),
        Just(Some("ab".repeat(32))),
        Just(Some("../x".to_string())),
        "[0-9a-fA-F]{0,70}".prop_map(Some),
    ];
    (kind, prop::collection::vec(arg, 0..6), any::<bool>(), hash).prop_map(
        |(kind, args, force, files_hash)| StepSpec {
            kind: kind.into(),
            args: args.into_iter().map(String::from).collect(),
            force,
            files_hash,
            force_upload: false,
        },
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn recipe_json_never_panics(v in json_value()) {
        if let Ok(spec) = serde_json::from_value::<BuildSpec>(v.clone()) {
            let _ = spec.base();
            let _ = spec.runtime();
            let _ = spec.parse_steps();
        }
        let _ = serde_json::from_str::<BuildSpec>(&v.to_string());
    }

    #[test]
    fn recipe_steps_never_panic(
        steps in prop::collection::vec(step_spec(), 0..8),
        from_image in prop::option::of("\\PC{0,20}"),
        from_template in prop::option::of("[a-z./:]{0,12}"),
        runtime in prop::option::of("\\PC{0,8}"),
    ) {
        let spec = BuildSpec {
            from_image,
            from_template,
            runtime,
            steps,
            ..BuildSpec::default()
        };
        let _ = spec.base();
        let _ = spec.runtime();
        let _ = spec.parse_steps();
        for s in &spec.steps {
            let _ = crate::recipe::layer_hash("p", s);
        }
    }

    #[test]
    fn path_and_env_helpers_never_panic(s in "\\PC{0,40}", user in "\\PC{0,8}") {
        let n = normalize(&s);
        prop_assert!(n.starts_with('/'), "{n:?}");
        prop_assert!(!n.split('/').any(|c| c == ".."), "{n:?}");
        let env: BTreeMap<String, String> = [("A".into(), "$A$A".into())].into();
        let _ = expand_env(&s, &env, &user);
        let state = BuildState { user: user.clone(), workdir: Some(s.clone()), env };
        let _ = state.resolve_workdir(&s);
        let _ = state.cwd();
    }
}

// ---- Tar unpacking: image layers and COPY contexts ---------------------------------

/// One hostile-or-not archive entry.
#[derive(Debug, Clone)]
enum Entry {
    File {
        name: String,
        data: Vec<u8>,
    },
    /// A header that declares far more data than follows.
    Huge {
        name: String,
    },
    Dir {
        name: String,
    },
    Symlink {
        name: String,
        target: String,
    },
    HardLink {
        name: String,
        target: String,
    },
    Device {
        name: String,
        block: bool,
    },
    Fifo {
        name: String,
    },
}

/// Names: plain, `..`, absolute, whiteouts, and through earlier symlinks. `OUT` is
/// replaced by the absolute path of the directory beside the root that must stay empty.
fn entry_name() -> impl Strategy<Value = String> {
    let comp = prop::sample::select(vec![
        "a",
        "b",
        "l",
        "up",
        "abs",
        "..",
        ".",
        "etc",
        ".wh.a",
        ".wh..wh..opq",
        "OUT",
    ]);
    (any::<bool>(), prop::collection::vec(comp, 1..4)).prop_map(|(abs, cs)| {
        let p = cs.join("/");
        if abs {
            format!("/{p}")
        } else {
            p
        }
    })
}

fn link_target() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "/",
        "..",
        "../..",
        "../../..",
        "a",
        "l",
        "up/../..",
        "/etc/passwd",
        "OUT",
        "OUT/x",
        "/proc/self/root",
        "b/../../a",
    ])
    .prop_map(String::from)
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (entry_name(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(name, data)| Entry::File { name, data }),
        entry_name().prop_map(|name| Entry::Huge { name }),
        entry_name().prop_map(|name| Entry::Dir { name }),
        (entry_name(), link_target()).prop_map(|(name, target)| Entry::Symlink { name, target }),
        (entry_name(), link_target()).prop_map(|(name, target)| Entry::HardLink { name, target }),
        (entry_name(), any::<bool>()).prop_map(|(name, block)| Entry::Device { name, block }),
        entry_name().prop_map(|name| Entry::Fifo { name }),
    ]
}

/// Builds the archive; names and targets go into the header raw (no validation), long
/// ones through GNU long-name entries.
fn archive(entries: &[Entry], out: &Path) -> Vec<u8> {
    let out = out.to_string_lossy();
    let fix = |s: &str| s.replace("OUT", &out);
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (kind, name, link, data): (tar::EntryType, String, String, Vec<u8>) = match e {
            Entry::File { name, data } => (
                tar::EntryType::Regular,
                fix(name),
                String::new(),
                data.clone(),
            ),
            Entry::Huge { name } => (
                tar::EntryType::Regular,
                fix(name),
                String::new(),
                Vec::new(),
            ),
            Entry::Dir { name } => (
                tar::EntryType::Directory,
                fix(name),
                String::new(),
                Vec::new(),
            ),
            Entry::Symlink { name, target } => {
                (tar::EntryType::Symlink, fix(name), fix(target), Vec::new())
            }
            Entry::HardLink { name, target } => {
                (tar::EntryType::Link, fix(name), fix(target), Vec::new())
            }
            Entry::Device { name, block } => (
                if *block {
                    tar::EntryType::Block
                } else {
                    tar::EntryType::Char
                },
                fix(name),
                String::new(),
                Vec::new(),
            ),
            Entry::Fifo { name } => (tar::EntryType::Fifo, fix(name), String::new(), Vec::new()),
        };
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        let mut data = &data[..];
        if name.len() >= 100 || link.len() >= 100 {
            // Too long for the header: skip the entry rather than validate it.
            continue;
        }
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        if matches!(e, Entry::Huge { .. }) {
            h.set_size(1 << 40);
            data = &[];
        }
        h.set_cksum();
        // `append` writes the header as given and only the data that exists.
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Owners are not changed (the test may not be root); modes are.
struct ModesOnly;

impl crate::shift::Chown for ModesOnly {
    fn lchown(&mut self, _: &Path, _: u32, _: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }
}

/// Everything below `dir` (symlinks not followed).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}

fn check_unpack(entries: &[Entry], opts: &UnpackOptions) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = dir.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&out).unwrap();
    fs::write(out.join("x"), "outside").unwrap();
    let bytes = archive(entries, &out);
    let result = unpack::unpack(&root, &bytes[..], &mut ModesOnly, opts);
    // Nothing beside the root, nothing new or changed outside it.
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    prop_assert_eq!(names, vec!["outside", "root"]);
    prop_assert_eq!(tree(&out), vec![out.join("x")]);
    prop_assert_eq!(fs::read_to_string(out.join("x")).unwrap(), "outside");
    // No entry below the root is a hard link to the outside file.
    use std::os::unix::fs::MetadataExt;
    let outside_ino = fs::metadata(out.join("x")).unwrap().ino();
    for p in tree(&root) {
        let m = fs::symlink_metadata(&p).unwrap();
        prop_assert!(m.ino() != outside_ino, "{} links outside", p.display());
        // Devices are skipped or refused, never created.
        use std::os::unix::fs::FileTypeExt;
        prop_assert!(
            !m.file_type().is_char_device() && !m.file_type().is_block_device(),
            "{} is a device",
            p.display()
        );
    }
    match result {
        Ok(stats) => prop_assert!(stats.entries <= opts.limits.max_entries),
        Err(UnpackError::Device { .. }) => prop_assert_eq!(opts.devices, Devices::Refuse),
        Err(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn image_layer_unpack_stays_in_its_root(entries in prop::collection::vec(entry(), 0..12)) {
        check_unpack(&entries, &UnpackOptions::IMAGE_LAYER)?;
    }

    #[test]
    fn context_unpack_stays_in_its_root(entries in prop::collection::vec(entry(), 0..12)) {
        check_unpack(&entries, &UnpackOptions::CONTEXT)?;
    }

    #[test]
    fn unpack_limits_hold(entries in prop::collection::vec(entry(), 0..12), n in 0u64..6) {
        let opts = UnpackOptions {
            limits: Limits { max_entries: n, max_bytes: 16 },
            ..UnpackOptions::CONTEXT
        };
        check_unpack(&entries, &opts)?;
    }
}

/// A gzip bomb's worth of declared data stops at the byte cap with an error naming it.
#[test]
fn unpack_byte_cap_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_size(4096);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &[0u8; 4096][..]).unwrap();
    let bytes = b.into_inner().unwrap();
    let opts = UnpackOptions {
        limits: Limits {
            max_entries: 10,
            max_bytes: 1000,
        },
        ..UnpackOptions::CONTEXT
    };
    let e = unpack::unpack(dir.path(), &bytes[..], &mut ModesOnly, &opts).unwrap_err();
    assert!(
        matches!(e, UnpackError::TooLarge { limit: 1000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("1000 bytes"), "{e}");
    assert!(
        !dir.path().join("big").exists()
            || fs::metadata(dir.path().join("big")).unwrap().len() == 0
    );
    let opts = UnpackOptions {
        limits: Limits {
            max_entries: 0,
            max_bytes: 1000,
        },
        ..UnpackOptions::CONTEXT
    };
    let e = unpack::unpack(dir.path(), &bytes[..], &mut ModesOnly, &opts).unwrap_err();
    assert!(e.to_string().contains("more than 0 entries"), "{e}");
}
