//! Drift check between the documented contract (`proto/*.proto`) and the serde types:
//! every proto field must appear, under its protobuf-JSON name, in the JSON of fully
//! populated messages, and every enum value name must be known to the Rust enums.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::filesystem as fs;
use kiln_proto::pbjson::Timestamp;
use kiln_proto::process as pr;
use serde_json::Value;

fn proto(name: &str) -> String {
    let path = format!("{}/../../proto/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn lower_camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// (JSON field names, enum value names) declared in a .proto file.
fn declared(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut fields = BTreeSet::new();
    let mut values = BTreeSet::new();
    let mut blocks: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("syntax ") || line.starts_with("option ") {
            continue;
        }
        if let Some(rest) = line.strip_suffix('{') {
            blocks.push(if rest.trim_start().starts_with("enum ") {
                "enum"
            } else {
                "other"
            });
            continue;
        }
        if line == "}" || line.ends_with("{}") {
            if line == "}" {
                blocks.pop();
            }
            continue;
        }
        let Some((decl, _number)) = line.trim_end_matches(';').split_once(" = ") else {
            continue;
        };
        if blocks.last() == Some(&"enum") {
            values.insert(decl.trim().to_owned());
        } else if let Some(name) = decl.split_whitespace().last() {
            fields.insert(lower_camel(name));
        }
    }
    (fields, values)
}

fn keys(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

fn entry() -> fs::EntryInfo {
    fs::EntryInfo {
        name: "n".into(),
        file_type: fs::FileType::File,
        path: "/n".into(),
        size: 1,
        mode: 0o644,
        permissions: "-rw-r--r--".into(),
        owner: "o".into(),
        group: "g".into(),
        modified_time: Some(Timestamp::new(1, 0)),
        symlink_target: Some("/t".into()),
        metadata: BTreeMap::from([("k".into(), "v".into())]),
    }
}

fn samples() -> Vec<Value> {
    let config = pr::ProcessConfig {
        cmd: "c".into(),
        args: vec!["a".into()],
        envs: BTreeMap::from([("K".into(), "V".into())]),
        cwd: Some("/".into()),
    };
    let pty = pr::Pty {
        size: Some(pr::PtySize { cols: 1, rows: 1 }),
    };
    let event = |e: pr::ProcessEvent| serde_json::to_value(pr::StartResponse { event: e }).unwrap();
    let v = |x: &dyn erased::Ser| x.value();
    vec![
        v(&pr::StartRequest {
            process: Some(config.clone()),
            pty: Some(pty.clone()),
            tag: Some("t".into()),
            stdin: Some(true),
        }),
        v(&pr::ListResponse {
            processes: vec![pr::ProcessInfo {
                config,
                pid: 1,
                tag: Some("t".into()),
            }],
        }),
        v(&pr::UpdateRequest {
            process: Some(pr::ProcessSelector::Tag("t".into())),
            pty: Some(pty),
        }),
        event(pr::ProcessEvent::Start(pr::StartEvent { pid: 1 })),
        event(pr::ProcessEvent::Data(pr::DataEvent::Stdout(vec![1]))),
        event(pr::ProcessEvent::Data(pr::DataEvent::Stderr(vec![1]))),
        event(pr::ProcessEvent::Data(pr::DataEvent::Pty(vec![1]))),
        event(pr::ProcessEvent::End(pr::EndEvent {
            exit_code: 1,
            exited: true,
            status: "s".into(),
            error: Some("e".into()),
        })),
        event(pr::ProcessEvent::Keepalive(pr::KeepAlive {})),
        v(&pr::SendInputRequest {
            process: Some(pr::ProcessSelector::Pid(1)),
            input: Some(pr::ProcessInput::Stdin(vec![1])),
        }),
        v(&pr::SendInputRequest {
            process: None,
            input: Some(pr::ProcessInput::Pty(vec![1])),
        }),
        v(&pr::StreamInputRequest::Start(pr::StreamInputStart {
            process: Some(pr::ProcessSelector::Pid(1)),
        })),
        v(&pr::StreamInputRequest::Data(pr::StreamInputData {
            input: Some(pr::ProcessInput::Stdin(vec![1])),
        })),
        v(&pr::StreamInputRequest::Keepalive(pr::KeepAlive {})),
        v(&pr::SendSignalRequest {
            process: Some(pr::ProcessSelector::Pid(1)),
            signal: pr::Signal::Sigkill,
        }),
        v(&pr::ConnectRequest {
            process: Some(pr::ProcessSelector::Pid(1)),
        }),
        v(&fs::EntryResponse {
            entry: Some(entry()),
        }),
        v(&fs::MoveRequest {
            source: "a".into(),
            destination: "b".into(),
        }),
        v(&fs::PathRequest { path: "p".into() }),
        v(&fs::ListDirRequest {
            path: "p".into(),
            depth: 1,
        }),
        v(&fs::ListDirResponse {
            entries: vec![entry()],
        }),
        v(&fs::WatchDirRequest {
            path: "p".into(),
            recursive: true,
            include_entry: true,
            allow_network_mounts: true,
        }),
        v(&fs::WatchDirResponse::Start(fs::Empty {})),
        v(&fs::WatchDirResponse::Keepalive(fs::Empty {})),
        v(&fs::WatchDirResponse::Filesystem(fs::FilesystemEvent {
            name: "n".into(),
            event_type: fs::EventType::Create,
            entry: Some(entry()),
        })),
        v(&fs::WatcherIdRequest {
            watcher_id: "w".into(),
        }),
        v(&fs::GetWatcherEventsResponse {
            events: vec![fs::FilesystemEvent {
                name: "n".into(),
                event_type: fs::EventType::Write,
                entry: None,
            }],
        }),
    ]
}

mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn serde_types_cover_the_proto_contract() {
    let mut emitted = BTreeSet::new();
    for sample in samples() {
        keys(&sample, &mut emitted);
    }
    for file in ["process.proto", "filesystem.proto"] {
        let (fields, values) = declared(&proto(file));
        assert!(
            fields.len() > 15,
            "{file}: parsed too few fields: {fields:?}"
        );
        let missing: Vec<_> = fields.difference(&emitted).collect();
        assert!(
            missing.is_empty(),
            "{file}: fields without a serde counterpart: {missing:?}"
        );
        for value in &values {
            let known = pr::Signal::from_name(value).is_some()
                || fs::FileType::from_name(value).is_some()
                || fs::EventType::from_name(value).is_some();
            assert!(known, "{file}: enum value {value} unknown to kiln-proto");
        }
    }
}
