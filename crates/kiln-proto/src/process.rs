//! Messages of the `process.Process` service (see `proto/process.proto`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pbjson::{self, is_default, null_default};

/// Service path prefix: routes are `/process.Process/{Method}`.
pub const SERVICE: &str = "process.Process";

crate::pb_enum! {
    /// Signals `SendSignal` accepts.
    pub enum Signal {
        Unspecified = 0 => "SIGNAL_UNSPECIFIED",
        Sigkill = 9 => "SIGNAL_SIGKILL",
        Sigterm = 15 => "SIGNAL_SIGTERM",
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtySize {
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub cols: u32,
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub rows: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Pty {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<PtySize>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessConfig {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub cmd: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub args: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub envs: BTreeMap<String, String>,
    /// proto3 `optional`: emitted whenever set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Identifies a process by pid or by the tag given at `Start`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(try_from = "RawSelector", into = "RawSelector")]
pub enum ProcessSelector {
    Pid(u32),
    Tag(String),
}

#[derive(Serialize, Deserialize, Default)]
struct RawSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<PidField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct PidField(#[serde(with = "pbjson::uint32")] u32);

impl TryFrom<RawSelector> for ProcessSelector {
    type Error = String;

    fn try_from(raw: RawSelector) -> Result<Self, Self::Error> {
        match (raw.pid, raw.tag) {
            (Some(pid), None) => Ok(Self::Pid(pid.0)),
            (None, Some(tag)) => Ok(Self::Tag(tag)),
            (None, None) => Err("process selector must set `pid` or `tag`".into()),
            (Some(_), Some(_)) => Err("process selector sets both `pid` and `tag`".into()),
        }
    }
}

impl From<ProcessSelector> for RawSelector {
    fn from(sel: ProcessSelector) -> Self {
        match sel {
            ProcessSelector::Pid(pid) => Self {
                pid: Some(PidField(pid)),
                tag: None,
            },
            ProcessSelector::Tag(tag) => Self {
                pid: None,
                tag: Some(tag),
            },
        }
    }
}

impl std::fmt::Display for ProcessSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::Tag(tag) => write!(f, "tag '{tag}'"),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    #[serde(default)]
    pub config: ProcessConfig,
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ListResponse {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub processes: Vec<ProcessInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct StartRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Absent means `true` (a stdin pipe), for compatibility with old clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateResponse {}

/// `ProcessEvent` (a oneof): `{"start":{…}}`, `{"data":{…}}`, `{"end":{…}}` or
/// `{"keepalive":{}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProcessEvent {
    Start(StartEvent),
    Data(DataEvent),
    End(EndEvent),
    Keepalive(KeepAlive),
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartEvent {
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub pid: u32,
}

/// `DataEvent.output` (a oneof) with raw bytes (base64 on the wire).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataEvent {
    Stdout(#[serde(with = "pbjson::bytes")] Vec<u8>),
    Stderr(#[serde(with = "pbjson::bytes")] Vec<u8>),
    Pty(#[serde(with = "pbjson::bytes")] Vec<u8>),
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct EndEvent {
    /// Exit status, or -1 when killed by a signal.
    #[serde(
        rename = "exitCode",
        alias = "exit_code",
        default,
        with = "pbjson::int32",
        skip_serializing_if = "is_default"
    )]
    pub exit_code: i32,
    /// True only for a normal exit.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_default"
    )]
    pub exited: bool,
    /// Go's `ProcessState.String()`: `"exit status 1"`, `"signal: killed"`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub status: String,
    /// Set when the exit is not clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAlive {}

/// `StartResponse` and `ConnectResponse` share this shape: `{"event":{…}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StartResponse {
    pub event: ProcessEvent,
}

/// `ConnectResponse` is field-for-field a `StartResponse`.
pub type ConnectResponse = StartResponse;

/// `ProcessInput.input` (a oneof).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProcessInput {
    Stdin(#[serde(with = "pbjson::bytes")] Vec<u8>),
    Pty(#[serde(with = "pbjson::bytes")] Vec<u8>),
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SendInputRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ProcessInput>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SendInputResponse {}

/// `StreamInputRequest.event` (a oneof), for the client-streaming `StreamInput`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamInputRequest {
    Start(StreamInputStart),
    Data(StreamInputData),
    Keepalive(KeepAlive),
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamInputStart {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamInputData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ProcessInput>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamInputResponse {}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SendSignalRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub signal: Signal,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SendSignalResponse {}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseStdinRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseStdinResponse {}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSelector>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn sdk_start_requests_decode() {
        let run: StartRequest = serde_json::from_str(
            r#"{"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "sleep 10"], "envs": {"X": "1"}, "cwd": "/srv"}, "stdin": false}"#,
        )
        .unwrap();
        let process = run.process.unwrap();
        assert_eq!(process.cmd, "/bin/bash");
        assert_eq!(process.args, ["-l", "-c", "sleep 10"]);
        assert_eq!(process.envs.get("X").map(String::as_str), Some("1"));
        assert_eq!(process.cwd.as_deref(), Some("/srv"));
        assert_eq!(run.stdin, Some(false));
        assert!(run.pty.is_none());

        let pty: StartRequest = serde_json::from_str(
            r#"{"process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color"}}, "pty": {"size": {"cols": 80, "rows": 24}}}"#,
        )
        .unwrap();
        assert_eq!(pty.pty.unwrap().size, Some(PtySize { cols: 80, rows: 24 }));
        assert_eq!(pty.stdin, None);
    }

    #[test]
    fn process_events_encode_like_envd() {
        let start = StartResponse {
            event: ProcessEvent::Start(StartEvent { pid: 42 }),
        };
        assert_eq!(to_json(&start), r#"{"event":{"start":{"pid":42}}}"#);
        let data = StartResponse {
            event: ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
        };
        assert_eq!(to_json(&data), r#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        let keepalive = StartResponse {
            event: ProcessEvent::Keepalive(KeepAlive {}),
        };
        assert_eq!(to_json(&keepalive), r#"{"event":{"keepalive":{}}}"#);
        let ok = EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        };
        assert_eq!(
            to_json(&StartResponse {
                event: ProcessEvent::End(ok)
            }),
            r#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#
        );
        let killed = EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some("signal: killed".into()),
        };
        assert_eq!(
            to_json(&killed),
            r#"{"exitCode":-1,"status":"signal: killed","error":"signal: killed"}"#
        );
    }

    #[test]
    fn process_events_round_trip_and_accept_snake_case() {
        let events = [
            ProcessEvent::Start(StartEvent { pid: 7 }),
            ProcessEvent::Data(DataEvent::Stderr(vec![0, 255, 10])),
            ProcessEvent::Data(DataEvent::Pty(b"\x1b[0m".to_vec())),
            ProcessEvent::End(EndEvent {
                exit_code: 3,
                exited: true,
                status: "exit status 3".into(),
                error: Some("exit status 3".into()),
            }),
            ProcessEvent::Keepalive(KeepAlive {}),
        ];
        for event in events {
            let resp = StartResponse { event };
            let back: StartResponse = serde_json::from_str(&to_json(&resp)).unwrap();
            assert_eq!(back, resp);
        }
        let end: EndEvent =
            serde_json::from_value(json!({"exit_code": "2", "exited": true})).unwrap();
        assert_eq!(end.exit_code, 2);
    }

    #[test]
    fn selectors_and_inputs() {
        let req: SendInputRequest =
            serde_json::from_str(r#"{"process": {"pid": 42}, "input": {"stdin": "ZGF0YQ=="}}"#)
                .unwrap();
        assert_eq!(req.process, Some(ProcessSelector::Pid(42)));
        assert_eq!(req.input, Some(ProcessInput::Stdin(b"data".to_vec())));
        let req: SendInputRequest =
            serde_json::from_str(r#"{"process": {"tag": "web"}, "input": {"pty": "bHMK"}}"#)
                .unwrap();
        assert_eq!(req.process, Some(ProcessSelector::Tag("web".into())));
        assert_eq!(req.input, Some(ProcessInput::Pty(b"ls\n".to_vec())));
        assert_eq!(to_json(&ProcessSelector::Pid(5)), r#"{"pid":5}"#);
        assert!(serde_json::from_str::<SendInputRequest>(r#"{"process": {}}"#).is_err());
        let pid_str: ConnectRequest = serde_json::from_str(r#"{"process":{"pid":"9"}}"#).unwrap();
        assert_eq!(pid_str.process, Some(ProcessSelector::Pid(9)));
    }

    #[test]
    fn signals_by_name_or_number() {
        let req: SendSignalRequest =
            serde_json::from_str(r#"{"process": {"pid": 44}, "signal": "SIGNAL_SIGKILL"}"#)
                .unwrap();
        assert_eq!(req.signal, Signal::Sigkill);
        let req: SendSignalRequest = serde_json::from_str(r#"{"signal": 15}"#).unwrap();
        assert_eq!(req.signal, Signal::Sigterm);
        let req: SendSignalRequest = serde_json::from_str(r#"{"signal": "SIGHUP"}"#).unwrap();
        assert_eq!(req.signal, Signal::Unspecified);
        assert_eq!(
            to_json(&SendSignalRequest {
                process: None,
                signal: Signal::Sigterm
            }),
            r#"{"signal":"SIGNAL_SIGTERM"}"#
        );
    }

    #[test]
    fn list_response_keeps_original_config() {
        let resp = ListResponse {
            processes: vec![ProcessInfo {
                config: ProcessConfig {
                    cmd: "/bin/bash".into(),
                    args: vec!["-l".into()],
                    envs: BTreeMap::new(),
                    cwd: None,
                },
                pid: 10,
                tag: None,
            }],
        };
        assert_eq!(
            to_json(&resp),
            r#"{"processes":[{"config":{"cmd":"/bin/bash","args":["-l"]},"pid":10}]}"#
        );
        assert_eq!(to_json(&ListResponse::default()), "{}");
        let update: UpdateRequest = serde_json::from_str(
            r#"{"process": {"pid": 43}, "pty": {"size": {"cols": 100, "rows": 30}}}"#,
        )
        .unwrap();
        assert_eq!(
            update.pty.unwrap().size.unwrap(),
            PtySize {
                cols: 100,
                rows: 30
            }
        );
    }

    #[test]
    fn stream_input_messages() {
        let start: StreamInputRequest =
            serde_json::from_str(r#"{"start":{"process":{"pid":1}}}"#).unwrap();
        assert_eq!(
            start,
            StreamInputRequest::Start(StreamInputStart {
                process: Some(ProcessSelector::Pid(1))
            })
        );
        let data: StreamInputRequest =
            serde_json::from_str(r#"{"data":{"input":{"stdin":"eA=="}}}"#).unwrap();
        assert_eq!(
            data,
            StreamInputRequest::Data(StreamInputData {
                input: Some(ProcessInput::Stdin(b"x".to_vec()))
            })
        );
    }
}
