//! Messages of the `filesystem.Filesystem` service (see `proto/filesystem.proto`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pbjson::{self, is_default, null_default, Timestamp};

/// Service path prefix: routes are `/filesystem.Filesystem/{Method}`.
pub const SERVICE: &str = "filesystem.Filesystem";

crate::pb_enum! {
    pub enum FileType {
        Unspecified = 0 => "FILE_TYPE_UNSPECIFIED",
        File = 1 => "FILE_TYPE_FILE",
        Directory = 2 => "FILE_TYPE_DIRECTORY",
        Symlink = 3 => "FILE_TYPE_SYMLINK",
    }
}

crate::pb_enum! {
    pub enum EventType {
        Unspecified = 0 => "EVENT_TYPE_UNSPECIFIED",
        Create = 1 => "EVENT_TYPE_CREATE",
        Write = 2 => "EVENT_TYPE_WRITE",
        Remove = 3 => "EVENT_TYPE_REMOVE",
        Rename = 4 => "EVENT_TYPE_RENAME",
        Chmod = 5 => "EVENT_TYPE_CHMOD",
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryInfo {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(rename = "type", default, skip_serializing_if = "is_default")]
    pub file_type: FileType,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
    /// lstat size in bytes.
    #[serde(default, with = "pbjson::int64", skip_serializing_if = "is_default")]
    pub size: i64,
    /// Permission bits only (0o644 = 420).
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub mode: u32,
    /// Go's `FileMode.String()`, e.g. `-rw-r--r--`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub permissions: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub owner: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub group: String,
    #[serde(
        rename = "modifiedTime",
        alias = "modified_time",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub modified_time: Option<Timestamp>,
    #[serde(
        rename = "symlinkTarget",
        alias = "symlink_target",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub symlink_target: Option<String>,
    /// `user.e2b.*` extended attributes, prefix stripped.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub metadata: BTreeMap<String, String>,
}

/// Request with only a path: `StatRequest`, `MakeDirRequest`, `RemoveRequest`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct PathRequest {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
}

pub type StatRequest = PathRequest;
pub type MakeDirRequest = PathRequest;
pub type RemoveRequest = PathRequest;

/// Response with one entry: `StatResponse`, `MakeDirResponse`, `MoveResponse`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

pub type StatResponse = EntryResponse;
pub type MakeDirResponse = EntryResponse;
pub type MoveResponse = EntryResponse;

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveResponse {}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveRequest {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub source: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub destination: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ListDirRequest {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
    /// 0 means 1.
    #[serde(default, with = "pbjson::uint32", skip_serializing_if = "is_default")]
    pub depth: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ListDirResponse {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entries: Vec<EntryInfo>,
}

/// `WatchDirRequest` and `CreateWatcherRequest` have the same fields.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchDirRequest {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_default"
    )]
    pub recursive: bool,
    #[serde(
        rename = "includeEntry",
        alias = "include_entry",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_default"
    )]
    pub include_entry: bool,
    #[serde(
        rename = "allowNetworkMounts",
        alias = "allow_network_mounts",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_default"
    )]
    pub allow_network_mounts: bool,
}

pub type CreateWatcherRequest = WatchDirRequest;

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesystemEvent {
    /// Path relative to the watched directory.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(rename = "type", default, skip_serializing_if = "is_default")]
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Empty {}

/// `WatchDirResponse.event` (a oneof).
// Messages are built once and serialized; boxing the event would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WatchDirResponse {
    Start(Empty),
    Filesystem(FilesystemEvent),
    Keepalive(Empty),
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct WatcherIdRequest {
    #[serde(
        rename = "watcherId",
        alias = "watcher_id",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub watcher_id: String,
}

pub type CreateWatcherResponse = WatcherIdRequest;
pub type GetWatcherEventsRequest = WatcherIdRequest;
pub type RemoveWatcherRequest = WatcherIdRequest;

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct GetWatcherEventsResponse {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub events: Vec<FilesystemEvent>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveWatcherResponse {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> EntryInfo {
        EntryInfo {
            name: "a.txt".into(),
            file_type: FileType::File,
            path: "/home/user/a.txt".into(),
            size: 3,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: Some(Timestamp::new(1_700_000_000, 5)),
            symlink_target: None,
            metadata: BTreeMap::from([("k".into(), "v".into())]),
        }
    }

    #[test]
    fn entry_info_encodes_like_envd() {
        assert_eq!(
            serde_json::to_value(entry()).unwrap(),
            json!({
                "name": "a.txt", "type": "FILE_TYPE_FILE", "path": "/home/user/a.txt",
                "size": "3", "mode": 420, "permissions": "-rw-r--r--", "owner": "user",
                "group": "user", "modifiedTime": "2023-11-14T22:13:20.000000005Z",
                "metadata": {"k": "v"}
            })
        );
        let back: EntryInfo =
            serde_json::from_value(serde_json::to_value(entry()).unwrap()).unwrap();
        assert_eq!(back, entry());
        let snake: EntryInfo = serde_json::from_value(json!({
            "type": 2, "size": 4096, "modified_time": "1970-01-01T00:00:00Z", "symlink_target": "/x"
        }))
        .unwrap();
        assert_eq!(snake.file_type, FileType::Directory);
        assert_eq!(snake.size, 4096);
        assert_eq!(snake.symlink_target.as_deref(), Some("/x"));
        assert_eq!(snake.modified_time, Some(Timestamp::default()));
    }

    #[test]
    fn sdk_requests_decode() {
        let list: ListDirRequest =
            serde_json::from_str(r#"{"path": "/home/user", "depth": 1}"#).unwrap();
        assert_eq!(
            list,
            ListDirRequest {
                path: "/home/user".into(),
                depth: 1
            }
        );
        let mv: MoveRequest =
            serde_json::from_str(r#"{"source": "a.txt", "destination": "b.txt"}"#).unwrap();
        assert_eq!(mv.destination, "b.txt");
        let watch: WatchDirRequest = serde_json::from_str(
            r#"{"path": "/home/user", "includeEntry": true, "allow_network_mounts": true}"#,
        )
        .unwrap();
        assert!(watch.include_entry && watch.allow_network_mounts && !watch.recursive);
        let id: WatcherIdRequest = serde_json::from_str(r#"{"watcherId": "wabc"}"#).unwrap();
        assert_eq!(id.watcher_id, "wabc");
        let id: WatcherIdRequest = serde_json::from_str(r#"{"watcher_id": "wabc"}"#).unwrap();
        assert_eq!(id.watcher_id, "wabc");
    }

    #[test]
    fn watch_events_encode() {
        assert_eq!(
            serde_json::to_string(&WatchDirResponse::Start(Empty {})).unwrap(),
            r#"{"start":{}}"#
        );
        let ev = WatchDirResponse::Filesystem(FilesystemEvent {
            name: "sub/x".into(),
            event_type: EventType::Create,
            entry: None,
        });
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"filesystem":{"name":"sub/x","type":"EVENT_TYPE_CREATE"}}"#
        );
        assert_eq!(
            serde_json::to_string(&GetWatcherEventsResponse::default()).unwrap(),
            "{}"
        );
        assert_eq!(
            serde_json::to_string(&CreateWatcherResponse {
                watcher_id: "w1".into()
            })
            .unwrap(),
            r#"{"watcherId":"w1"}"#
        );
    }
}
