//! A spell's arguments checked against its typed parameters, defaults filled in,
//! before any sandbox starts.

use std::collections::BTreeMap;

use kiln_api::spell::{ParamType, Spell};
use serde_json::Value;

use super::SpellError;

/// The most JSON all arguments of one run may take together.
pub const MAX_ARGS_BYTES: usize = 1 << 20;

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

pub fn fits(t: ParamType, v: &Value) -> bool {
    match t {
        ParamType::String => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Number => v.is_number(),
        ParamType::Boolean => v.is_boolean(),
        ParamType::Array => v.is_array(),
        ParamType::Object => v.is_object(),
    }
}

/// Every parameter's value: the argument given, else the default. Unknown arguments,
/// missing required ones and values of the wrong type are refused, naming them.
pub fn resolve(
    spell: &Spell,
    mut given: BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, SpellError> {
    let bad = |reason: String| SpellError::BadArgs {
        spell: spell.name.clone(),
        reason,
    };
    let size = serde_json::to_vec(&given).map(|v| v.len()).unwrap_or(0);
    if size > MAX_ARGS_BYTES {
        return Err(bad(format!(
            "the arguments take {size} bytes as JSON; at most {MAX_ARGS_BYTES} are accepted"
        )));
    }
    let mut out = BTreeMap::new();
    for p in &spell.parameters {
        let value = match (given.remove(&p.name), &p.default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(bad(format!(
                    "missing argument {:?} ({}{})",
                    p.name,
                    p.kind.as_str(),
                    if p.description.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", p.description)
                    }
                )))
            }
        };
        if !fits(p.kind, &value) {
            let shown: String = value.to_string().chars().take(60).collect();
            return Err(bad(format!(
                "argument {:?} must be {} {}, got {} {shown}",
                p.name,
                if p.kind == ParamType::Integer {
                    "an"
                } else {
                    "a"
                },
                p.kind.as_str(),
                value_kind(&value),
            )));
        }
        out.insert(p.name.clone(), value);
    }
    if let Some(unknown) = given.keys().next() {
        let known: Vec<&str> = spell.parameters.iter().map(|p| p.name.as_str()).collect();
        return Err(bad(format!(
            "unknown argument {unknown:?}; this spell takes {}",
            if known.is_empty() {
                "no arguments".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::spell::{SpellLanguage, SpellParam};
    use serde_json::json;

    fn spell() -> Spell {
        Spell {
            name: "s".into(),
            description: String::new(),
            language: SpellLanguage::Python,
            code: "print(args)".into(),
            template: None,
            parameters: vec![
                SpellParam {
                    name: "n".into(),
                    kind: ParamType::Integer,
                    description: "how many".into(),
                    default: None,
                },
                SpellParam {
                    name: "label".into(),
                    kind: ParamType::String,
                    description: String::new(),
                    default: Some(json!("x")),
                },
            ],
            timeout_secs: None,
            memory_mb: None,
            internet: false,
            packages: vec![],
            source: None,
        }
    }

    fn args(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_fill_in_and_types_are_checked() {
        let got = resolve(&spell(), args(json!({"n": 3}))).unwrap();
        assert_eq!(got, args(json!({"n": 3, "label": "x"})));
        let err = resolve(&spell(), args(json!({"n": "3"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"n\" must be an integer, got string"),
            "{err}"
        );
        let err = resolve(&spell(), args(json!({"n": 1.5})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("got number"), "{err}");
    }

    #[test]
    fn missing_and_unknown_arguments_are_named() {
        let err = resolve(&spell(), args(json!({}))).unwrap_err().to_string();
        assert!(
            err.contains("missing argument \"n\" (integer: how many)"),
            "{err}"
        );
        let err = resolve(&spell(), args(json!({"n": 1, "m": 2})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown argument \"m\"; this spell takes n, label"),
            "{err}"
        );
    }

    #[test]
    fn huge_arguments_are_refused() {
        let big = "x".repeat(MAX_ARGS_BYTES);
        let err = resolve(&spell(), args(json!({"n": 1, "label": big})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most"), "{err}");
    }
}
