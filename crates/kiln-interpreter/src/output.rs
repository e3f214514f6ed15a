//! The NDJSON lines of `POST /execute` (spec A.3) and the Result object built from a
//! Jupyter MIME bundle (A.4).

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

/// One line of the `/execute` stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputLine {
    NumberOfExecutions {
        execution_count: i64,
    },
    Stdout {
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        timestamp: Option<String>,
    },
    Stderr {
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        timestamp: Option<String>,
    },
    Result(ResultFields),
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    Keepalive,
    EndOfExecution,
}

impl OutputLine {
    pub fn error(name: &str, value: impl Into<String>) -> Self {
        OutputLine::Error {
            name: name.to_owned(),
            value: value.into(),
            traceback: String::new(),
        }
    }

    /// The line as sent: compact JSON and exactly one `\n`.
    pub fn to_bytes(&self) -> Bytes {
        // Serializing these plain types cannot fail; fall back to a valid line anyway.
        let mut line =
            serde_json::to_vec(self).unwrap_or_else(|_| br#"{"type":"keepalive"}"#.to_vec());
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// A `result` line's fields: the known formats that were present, `extra`, and
/// `is_main_result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultFields {
    #[serde(flatten)]
    pub formats: Map<String, Value>,
    pub extra: Map<String, Value>,
    pub is_main_result: bool,
}

/// JSON field ← MIME type, in the order the SDK lists formats.
pub const FORMATS: &[(&str, &str)] = &[
    ("text", "text/plain"),
    ("html", "text/html"),
    ("markdown", "text/markdown"),
    ("svg", "image/svg+xml"),
    ("png", "image/png"),
    ("jpeg", "image/jpeg"),
    ("pdf", "application/pdf"),
    ("latex", "text/latex"),
    ("json", "application/json"),
    ("javascript", "application/javascript"),
    ("data", "e2b/data"),
    ("chart", "e2b/chart"),
];

impl ResultFields {
    /// Pops each known MIME type into its field; whatever remains becomes `extra`.
    /// Null values count as absent (the reference serializes with "exclude None").
    pub fn from_bundle(bundle: &Value, is_main_result: bool) -> Self {
        let mut rest: Map<String, Value> = match bundle {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        };
        let mut formats = Map::new();
        for (field, mime) in FORMATS {
            match rest.remove(*mime) {
                None | Some(Value::Null) => {}
                Some(value) => {
                    let value = match (*field, value) {
                        ("text", Value::String(text)) => Value::String(strip_quotes(&text)),
                        // Kernels may split text formats into a list of lines (nbformat).
                        (_, Value::Array(lines))
                            if *mime != "application/json"
                                && !lines.is_empty()
                                && lines.iter().all(Value::is_string) =>
                        {
                            let joined: String = lines.iter().filter_map(Value::as_str).collect();
                            if *field == "text" {
                                Value::String(strip_quotes(&joined))
                            } else {
                                Value::String(joined)
                            }
                        }
                        (_, value) => value,
                    };
                    formats.insert((*field).to_owned(), value);
                }
            }
        }
        rest.retain(|_, v| !v.is_null());
        ResultFields {
            formats,
            extra: rest,
            is_main_result,
        }
    }
}

/// One pair of surrounding `'…'` or `"…"` is removed (a JS string repr becomes its text).
fn strip_quotes(text: &str) -> String {
    for q in ['\'', '"'] {
        if text.len() >= 2 && text.starts_with(q) && text.ends_with(q) {
            return text[1..text.len() - 1].to_owned();
        }
    }
    text.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(l: &OutputLine) -> Value {
        let bytes = l.to_bytes();
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(bytes.iter().filter(|b| **b == b'\n').count(), 1);
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn lines_match_the_sdk_shapes() {
        assert_eq!(
            line(&OutputLine::NumberOfExecutions { execution_count: 3 }),
            json!({"type": "number_of_executions", "execution_count": 3})
        );
        assert_eq!(
            line(&OutputLine::Stdout {
                text: "a\nb\n".into(),
                timestamp: Some("2025-01-01T00:00:00Z".into())
            }),
            json!({"type": "stdout", "text": "a\nb\n", "timestamp": "2025-01-01T00:00:00Z"})
        );
        assert_eq!(
            line(&OutputLine::error(
                "ExecutionAborted",
                "Execution was aborted"
            )),
            json!({"type": "error", "name": "ExecutionAborted", "value": "Execution was aborted", "traceback": ""})
        );
        assert_eq!(line(&OutputLine::Keepalive), json!({"type": "keepalive"}));
        assert_eq!(
            line(&OutputLine::EndOfExecution),
            json!({"type": "end_of_execution"})
        );
    }

    #[test]
    fn result_from_bundle() {
        let bundle = json!({
            "text/plain": "'hello'",
            "image/png": "iVBOR",
            "e2b/chart": {"type": "bar", "elements": []},
            "e2b/data": {"a": [1, 2]},
            "application/json": ["x", "y"],
            "text/html": ["<b>", "x</b>"],
            "image/gif": "R0lG",
            "text/markdown": null,
        });
        let r = ResultFields::from_bundle(&bundle, true);
        assert_eq!(
            line(&OutputLine::Result(r)),
            json!({
                "type": "result",
                "text": "hello",
                "png": "iVBOR",
                "html": "<b>x</b>",
                "chart": {"type": "bar", "elements": []},
                "data": {"a": [1, 2]},
                "json": ["x", "y"],
                "extra": {"image/gif": "R0lG"},
                "is_main_result": true
            })
        );
        let plot = ResultFields::from_bundle(
            &json!({"text/plain": "<Figure size 640x480 with 1 Axes>", "image/png": "x"}),
            false,
        );
        assert!(plot.extra.is_empty());
        assert!(!plot.is_main_result);
    }

    #[test]
    fn quotes() {
        assert_eq!(strip_quotes("'/home/user'"), "/home/user");
        assert_eq!(strip_quotes("\"x\""), "x");
        assert_eq!(strip_quotes("'"), "'");
        assert_eq!(strip_quotes("'a\""), "'a\"");
        assert_eq!(strip_quotes("''"), "");
        assert_eq!(strip_quotes("2"), "2");
    }
}
