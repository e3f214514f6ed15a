//! read_file, write_file, list_files.

use base64::Engine;
use kiln_client::FileType;
use serde_json::{json, Value};

use crate::args::*;
use crate::error::ToolError;
use crate::session::Session;
use crate::shape::{Image, ToolOutput};
use crate::tools::ToolName;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn check_path(tool: &str, path: &str) -> Result<(), ToolError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ToolError::invalid(
            tool,
            "path must be a non-empty file path (absolute, or relative to the user's home)",
        ));
    }
    Ok(())
}

pub(super) async fn read_file(
    session: &Session,
    key: &str,
    a: ReadFileArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::ReadFile.as_str();
    check_path(tool, &a.path)?;
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), false)
        .await?;
    let data = session
        .client(key)
        .read_file(
            &target.id,
            target.token.as_deref(),
            &a.path,
            a.user.as_deref(),
            MAX_FILE_BYTES,
        )
        .await
        .map_err(ToolError::api(format!(
            "reading {} in sandbox {}",
            a.path, target.id
        )))?;
    Ok(file_output(&target.id, &a.path, data, a.encoding))
}

/// A file's contents as a tool answer: an image for PNG/JPEG, UTF-8 text, or base64.
pub fn file_output(sandbox_id: &str, path: &str, data: Vec<u8>, encoding: Encoding) -> ToolOutput {
    let size = data.len();
    let image_mime = if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else {
        None
    };
    let (content, encoding_used) = match (encoding, String::from_utf8(data)) {
        (Encoding::Utf8, Ok(text)) => (text, "utf8"),
        (_, Ok(text)) => (B64.encode(text.as_bytes()), "base64"),
        (_, Err(e)) => (B64.encode(e.as_bytes()), "base64"),
    };
    let structured = json!({
        "sandbox_id": sandbox_id,
        "path": path,
        "size": size,
        "encoding": encoding_used,
        "content": content,
    });
    match image_mime {
        Some(mime) => ToolOutput {
            text: format!("{path}: {mime} image, {size} bytes"),
            images: vec![Image {
                data: if encoding_used == "base64" {
                    content
                } else {
                    B64.encode(content.as_bytes())
                },
                mime,
            }],
            structured,
            is_error: false,
        },
        None if encoding_used == "utf8" => ToolOutput {
            text: content,
            structured,
            images: Vec::new(),
            is_error: false,
        },
        None => ToolOutput {
            text: format!(
                "{path}: {size} bytes, not UTF-8 text; base64 in the structured content (content)"
            ),
            structured,
            images: Vec::new(),
            is_error: false,
        },
    }
}

pub(super) async fn write_file(
    session: &Session,
    key: &str,
    a: WriteFileArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::WriteFile.as_str();
    check_path(tool, &a.path)?;
    let data = match a.encoding {
        Encoding::Utf8 => a.content.into_bytes(),
        Encoding::Base64 => B64
            .decode(a.content.trim())
            .map_err(|e| ToolError::invalid(tool, format!("content is not base64: {e}")))?,
    };
    if data.len() > MAX_FILE_BYTES {
        return Err(ToolError::invalid(
            tool,
            format!("content is {} bytes; at most {MAX_FILE_BYTES}", data.len()),
        ));
    }
    let size = data.len();
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    session
        .client(key)
        .write_file(
            &target.id,
            target.token.as_deref(),
            &a.path,
            data,
            a.user.as_deref(),
        )
        .await
        .map_err(ToolError::api(format!(
            "writing {} in sandbox {}",
            a.path, target.id
        )))?;
    let mut out = ToolOutput::json(json!({"sandbox_id": target.id, "path": a.path, "size": size}));
    out.text = format!("wrote {size} bytes to {} in sandbox {}", a.path, target.id);
    Ok(out)
}

pub(super) async fn list_files(
    session: &Session,
    key: &str,
    a: ListFilesArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::ListFiles.as_str();
    let depth = a.depth.unwrap_or(1);
    if !(1..=5).contains(&depth) {
        return Err(ToolError::invalid(
            tool,
            format!("depth must be 1 to 5, got {depth}"),
        ));
    }
    let path = a.path.unwrap_or_default();
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), false)
        .await?;
    let entries = session
        .client(key)
        .list_dir(
            &target.id,
            target.token.as_deref(),
            &path,
            depth,
            a.user.as_deref(),
        )
        .await
        .map_err(ToolError::api(format!(
            "listing {} in sandbox {}",
            if path.is_empty() {
                "the home directory"
            } else {
                &path
            },
            target.id
        )))?;
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "path": e.path,
                "type": match e.file_type {
                    FileType::Directory => "dir",
                    FileType::Symlink => "symlink",
                    _ => "file",
                },
                "size": e.size,
                "permissions": e.permissions,
                "owner": e.owner,
                "modified": e.modified_time.as_ref().map(|t| serde_json::to_value(t).unwrap_or(Value::Null)),
                "symlink_target": e.symlink_target,
            })
        })
        .collect();
    let text = entries
        .iter()
        .map(|e| {
            format!(
                "{} {:>10} {}{}",
                e.permissions,
                e.size,
                e.path,
                if e.file_type == FileType::Directory {
                    "/"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = ToolOutput::json(json!({"sandbox_id": target.id, "entries": items}));
    out.text = if text.is_empty() {
        "(empty directory)".into()
    } else {
        text
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_back_as_text_images_or_base64() {
        let out = file_output("s", "a.txt", b"hello".to_vec(), Encoding::Utf8);
        assert_eq!(out.text, "hello");
        assert_eq!(out.structured["encoding"], "utf8");
        let out = file_output("s", "a.txt", b"hello".to_vec(), Encoding::Base64);
        assert_eq!(out.structured["content"], "aGVsbG8=");
        let out = file_output("s", "b.bin", vec![0xff, 0xfe, 0x00], Encoding::Utf8);
        assert_eq!(out.structured["encoding"], "base64");
        assert!(out.text.contains("not UTF-8"));
        let png = b"\x89PNG\r\n\x1a\nrest".to_vec();
        let out = file_output("s", "c.png", png.clone(), Encoding::Utf8);
        assert_eq!(out.images.len(), 1);
        assert_eq!(out.images[0].mime, "image/png");
        assert_eq!(B64.decode(&out.images[0].data).unwrap(), png);
    }
}
