//! The OpenAPI document of Kiln's REST API, generated from [`crate::routes::endpoints`]
//! (the list the router is built from), so it cannot drift from what is served. The
//! checked-in copy is `docs/openapi.json`; a test fails when it differs from this.

use serde_json::{json, Map, Value};

use crate::endpoint::Access;
use crate::routes::endpoints;

/// The document, as pretty JSON with a trailing newline (the checked-in form).
pub fn render() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for e in endpoints() {
        let params: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
            })
            .collect();
        let mut responses = Map::new();
        responses.insert("2XX".into(), json!({"description": "Success"}));
        responses.insert(
            "400".into(),
            json!({"$ref": "#/components/responses/Error"}),
        );
        if e.access != Access::Public {
            responses.insert(
                "401".into(),
                json!({"$ref": "#/components/responses/Error"}),
            );
            // Another team's resource answers as a missing one.
            responses.insert(
                "404".into(),
                json!({"$ref": "#/components/responses/Error"}),
            );
        }
        if e.access == Access::Admin {
            responses.insert(
                "403".into(),
                json!({"$ref": "#/components/responses/Error"}),
            );
        }
        let security = match e.access {
            Access::Public => json!([]),
            Access::Member | Access::Admin => json!([{"ApiKeyAuth": []}]),
        };
        let mut op = json!({
            "summary": e.summary,
            "operationId": operation_id(e.method.as_str(), e.path),
            "security": security,
            "responses": responses,
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if e.access == Access::Admin {
            op["tags"] = json!(["admin"]);
        }
        let item = paths
            .entry(e.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        item[e.method.as_str().to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kiln",
            "description": "Kiln's REST API: E2B's sandbox and template API, plus the operator's \
                            team and key routes. Generated from the server's route table.",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
            },
            "responses": {
                "Error": {
                    "description": "E2B's error body",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "integer"},
                            "message": {"type": "string"},
                        },
                    }}},
                },
            },
        },
    })
}

/// `POST /sandboxes/{id}/pause` → `post_sandboxes_id_pause`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        id.push('_');
        id.extend(seg.chars().filter(|c| !matches!(c, '{' | '}')).map(|c| {
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '_'
            }
        }));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is this document; `KILN_UPDATE_OPENAPI=1` rewrites it.
    #[test]
    fn the_checked_in_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let fresh = render();
        if std::env::var_os("KILN_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == fresh,
            "docs/openapi.json is out of date with the routes; regenerate it with \
             `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-server openapi`"
        );
    }

    #[test]
    fn operation_ids_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in endpoints() {
            assert!(
                seen.insert(operation_id(e.method.as_str(), e.path)),
                "{}",
                e.path
            );
        }
    }
}
