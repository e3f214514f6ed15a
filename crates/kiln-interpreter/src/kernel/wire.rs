//! Incoming kernel messages, decoded from the signed multipart frames into plain JSON.
//!
//! `jupyter-zmq-client` checks the HMAC and splits the frames ([`RawMessage`]); we keep the
//! content as JSON instead of its typed structs so that any MIME bundle (including E2B's
//! `e2b/data` and `e2b/chart`) and any odd kernel reach the client unchanged, and one
//! malformed message never costs us the socket.

use jupyter_zmq_client::RawMessage;
use serde_json::Value;

/// One message from the kernel's iopub, shell or control socket.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub msg_type: String,
    /// `msg_id` of the request this message answers (`None` for unsolicited messages).
    pub parent_msg_id: Option<String>,
    /// The header's `date`, passed to the client as the output timestamp.
    pub date: Option<String>,
    pub content: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("kernel message has {0} JSON frames, need 4")]
    Frames(usize),
    #[error("kernel message frame '{frame}' is not JSON")]
    Json {
        frame: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("kernel message header has no msg_type")]
    NoType,
}

pub fn decode(raw: &RawMessage) -> Result<Incoming, WireError> {
    if raw.jparts.len() < 4 {
        return Err(WireError::Frames(raw.jparts.len()));
    }
    let parse = |i: usize, frame: &'static str| {
        serde_json::from_slice::<Value>(&raw.jparts[i])
            .map_err(|source| WireError::Json { frame, source })
    };
    let header = parse(0, "header")?;
    let parent = parse(1, "parent_header")?;
    let content = parse(3, "content")?;
    let msg_type = header
        .get("msg_type")
        .and_then(Value::as_str)
        .ok_or(WireError::NoType)?
        .to_owned();
    Ok(Incoming {
        msg_type,
        parent_msg_id: parent
            .get("msg_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        date: header
            .get("date")
            .and_then(Value::as_str)
            .map(str::to_owned),
        content,
    })
}

impl Incoming {
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.content.get(key).and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn raw(parts: &[&str]) -> RawMessage {
        RawMessage {
            zmq_identities: vec![],
            jparts: parts
                .iter()
                .map(|p| Bytes::from(p.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn decodes_stream_message() {
        let m = decode(&raw(&[
            r#"{"msg_id":"a","msg_type":"stream","date":"2025-01-01T00:00:00.1Z"}"#,
            r#"{"msg_id":"p"}"#,
            "{}",
            r#"{"name":"stdout","text":"hi\n"}"#,
        ]))
        .unwrap();
        assert_eq!(m.msg_type, "stream");
        assert_eq!(m.parent_msg_id.as_deref(), Some("p"));
        assert_eq!(m.date.as_deref(), Some("2025-01-01T00:00:00.1Z"));
        assert_eq!(m.str_field("text"), Some("hi\n"));
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(
            decode(&raw(&["{}", "{}"])),
            Err(WireError::Frames(2))
        ));
        assert!(matches!(
            decode(&raw(&["{", "{}", "{}", "{}"])),
            Err(WireError::Json { .. })
        ));
        assert!(matches!(
            decode(&raw(&["{}", "{}", "{}", "{}"])),
            Err(WireError::NoType)
        ));
        let unsolicited = decode(&raw(&[r#"{"msg_type":"status"}"#, "{}", "{}", "{}"])).unwrap();
        assert_eq!(unsolicited.parent_msg_id, None);
    }
}
