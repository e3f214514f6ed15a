//! `GET /files` (download) and `POST /files` (upload), spec §3.4–3.5.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use flate2::write::MultiGzDecoder;
use futures::StreamExt;
use kiln_proto::envd::HEADER_METADATA_PREFIX;
use nix::fcntl::{self, FcntlArg, OFlag};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt};

use crate::auth::{check_files_access, Operation, SignatureParams};
use crate::error::HttpError;
use crate::filesystem::{ensure_dirs, xattr};
use crate::state::{Identity, Sandbox};
use crate::users::UsersError;

pub fn routes(sandbox: Sandbox) -> Router {
    Router::new()
        .route(kiln_proto::envd::PATH_FILES, get(download).post(upload))
        .with_state(sandbox)
}

#[derive(Debug, Default, Deserialize)]
struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

/// One uploaded file in the `POST /files` reply.
#[derive(Debug, Serialize)]
struct UploadedEntry {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

/// Parses the query, checks authorization and resolves the acting user.
fn prepare(
    sandbox: &Sandbox,
    headers: &HeaderMap,
    uri: &Uri,
    operation: Operation,
) -> Result<(FilesQuery, Identity), HttpError> {
    let Query(query) = Query::<FilesQuery>::try_from_uri(uri)
        .map_err(|e| HttpError::bad_request(format!("invalid query: {e}")))?;
    let params = SignatureParams {
        path: query.path.as_deref().unwrap_or(""),
        username: query.username.as_deref().unwrap_or(""),
        signature: query.signature.as_deref(),
        expiration: query.signature_expiration.as_deref(),
    };
    let token = sandbox.defaults().access_token;
    check_files_access(
        token.as_deref(),
        headers,
        operation,
        &params,
        chrono::Utc::now().timestamp(),
    )?;
    let identity = sandbox
        .identity(query.username.as_deref())
        .map_err(|e| match e {
            UsersError::UnknownUser(_) => HttpError::unauthorized(e.to_string()),
            UsersError::Read { .. } => HttpError::internal(crate::error::chain(&e)),
        })?;
    Ok((query, identity))
}

fn resolve(identity: &Identity, path: &str) -> Result<PathBuf, HttpError> {
    identity
        .resolve(path)
        .map_err(|e| HttpError::bad_request(e.to_string()))
}

async fn download(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, HttpError> {
    let (query, identity) = prepare(&sandbox, &headers, &uri, Operation::Read)?;
    let path = resolve(&identity, query.path.as_deref().unwrap_or(""))?;
    let (mut file, meta) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || open_regular(&path))
            .await
            .map_err(|e| HttpError::internal(format!("opening a file: {e}")))??
    };
    // Read to EOF, not to `st_size`, as `cat` does: procfs says 0, sysfs a page, and
    // a growing file holds more than it did at `stat`. A file that ends within the
    // first bytes gets an exact Content-Length; a longer one streams chunked.
    let mut first = Vec::new();
    (&mut file)
        .take(SIZED_DOWNLOAD_BYTES)
        .read_to_end(&mut first)
        .await
        .map_err(|e| io_error("reading", &path, e))?;
    let body = if (first.len() as u64) < SIZED_DOWNLOAD_BYTES {
        Body::from(first)
    } else {
        let rest = tokio_util::io::ReaderStream::new(file);
        Body::from_stream(futures::stream::once(async { Ok(Bytes::from(first)) }).chain(rest))
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\'], "_"))
        .unwrap_or_default();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    let mut set = |name: header::HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(header::CONTENT_TYPE, content_type(&path).to_owned());
    set(
        header::CONTENT_DISPOSITION,
        format!("inline; filename=\"{name}\""),
    );
    if let Ok(modified) = meta.modified() {
        let modified: chrono::DateTime<chrono::Utc> = modified.into();
        set(
            header::LAST_MODIFIED,
            modified.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        );
    }
    set(header::VARY, "Accept-Encoding".to_owned());
    Ok(response)
}

/// Downloads that end within this many bytes are answered with a Content-Length.
const SIZED_DOWNLOAD_BYTES: u64 = 64 * 1024;

/// Opens `path` for download if it is a regular file (following symlinks). Devices,
/// FIFOs and sockets are refused before they are opened: opening one can block or
/// act on a device, and reading `/dev/zero` never ends.
fn open_regular(path: &Path) -> Result<(tokio::fs::File, std::fs::Metadata), HttpError> {
    let not_found = || HttpError::not_found(format!("path '{}' does not exist", path.display()));
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(io_error("stat", path, e)),
    };
    check_regular(path, &meta)?;
    // O_NONBLOCK so that a FIFO swapped in since the check cannot block the open.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(io_error("opening", path, e)),
    };
    let meta = file.metadata().map_err(|e| io_error("stat", path, e))?;
    check_regular(path, &meta)?;
    // Blocking reads again, as `cat` does, for the rare kernel file that waits.
    let flags = fcntl::fcntl(&file, FcntlArg::F_GETFL)
        .map(OFlag::from_bits_truncate)
        .and_then(|flags| fcntl::fcntl(&file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)));
    flags.map_err(|e| io_error("opening", path, e.into()))?;
    Ok((tokio::fs::File::from_std(file), meta))
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), HttpError> {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        return Err(HttpError::bad_request(format!(
            "path '{}' is a directory",
            path.display()
        )));
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(HttpError::bad_request(format!(
        "path '{}' is {what}: only regular files can be downloaded",
        path.display()
    )))
}

/// Content type by extension (Go's `mime.TypeByExtension` for common types).
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(OsStr::to_str)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "xml" => "text/xml; charset=utf-8",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        _ => "application/octet-stream",
    }
}

fn io_error(op: &str, path: &Path, e: io::Error) -> HttpError {
    let message = format!("{op} '{}': {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            HttpError::new(StatusCode::INSUFFICIENT_STORAGE, message)
        }
        Some(libc::EISDIR) => HttpError::bad_request(message),
        _ => HttpError::internal(message),
    }
}

/// `X-Metadata-<key>: <value>` headers as a metadata map.
fn metadata_from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, HttpError> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_METADATA_PREFIX) else {
            continue;
        };
        if !xattr::valid_key(OsStr::new(key)) {
            return Err(HttpError::bad_request(format!(
                "invalid metadata key '{key}'"
            )));
        }
        if !xattr::valid_value(value.as_bytes()) {
            return Err(HttpError::bad_request(format!(
                "metadata value for '{key}' must be printable ASCII"
            )));
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.insert(key.to_ascii_lowercase(), value);
    }
    Ok(out)
}

/// Streams one upload into its file (creating parents, truncating, chowning).
struct UploadWriter {
    path: PathBuf,
    file: tokio::fs::File,
    gunzip: Option<MultiGzDecoder<Vec<u8>>>,
}

impl UploadWriter {
    async fn create(path: PathBuf, identity: &Identity, gzip: bool) -> Result<Self, HttpError> {
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
            return Err(HttpError::bad_request(format!(
                "path '{}' is a directory",
                path.display()
            )));
        }
        let (uid, gid) = (identity.user.uid, identity.user.gid);
        if let Some(parent) = path.parent().map(Path::to_owned) {
            let result = tokio::task::spawn_blocking(move || {
                ensure_dirs(&parent, uid, gid).map_err(|e| (parent, e))
            })
            .await
            .map_err(|e| HttpError::internal(format!("directory task failed: {e}")))?;
            result.map_err(|(parent, e)| io_error("creating parent directories of", &parent, e))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&path)
            .await
            .map_err(|e| io_error("opening", &path, e))?;
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .map_err(|e| io_error("chown", &path, e))?;
        Ok(Self {
            path,
            file,
            gunzip: gzip.then(|| MultiGzDecoder::new(Vec::new())),
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), HttpError> {
        match &mut self.gunzip {
            Some(decoder) => {
                decoder
                    .write_all(chunk)
                    .map_err(|e| HttpError::bad_request(format!("invalid gzip body: {e}")))?;
                let plain = std::mem::take(decoder.get_mut());
                self.write_plain(&plain).await
            }
            None => self.write_plain(chunk).await,
        }
    }

    async fn write_plain(&mut self, data: &[u8]) -> Result<(), HttpError> {
        self.file
            .write_all(data)
            .await
            .map_err(|e| io_error("writing", &self.path, e))
    }

    async fn finish(
        mut self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<UploadedEntry, HttpError> {
        if let Some(decoder) = self.gunzip.take() {
            let rest = decoder
                .finish()
                .map_err(|e| HttpError::bad_request(format!("invalid gzip body: {e}")))?;
            self.write_plain(&rest).await?;
        }
        self.file
            .flush()
            .await
            .map_err(|e| io_error("writing", &self.path, e))?;
        xattr::replace(&self.path, metadata)
            .map_err(|e| io_error("storing metadata on", &self.path, e))?;
        Ok(UploadedEntry {
            name: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: self.path.to_string_lossy().into_owned(),
            kind: "file",
            metadata: metadata.clone(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, HttpError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    match value
        .to_str()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        other => Err(HttpError::bad_request(format!(
            "unsupported Content-Encoding '{other}': use gzip or identity"
        ))),
    }
}

async fn upload(State(sandbox): State<Sandbox>, request: Request) -> Result<Response, HttpError> {
    let (query, identity) = prepare(&sandbox, request.headers(), request.uri(), Operation::Write)?;
    let metadata = metadata_from_headers(request.headers())?;
    let encoding = content_encoding(request.headers())?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query_path = query.path.filter(|p| !p.is_empty());

    let entries = if content_type.starts_with("multipart/form-data") {
        if encoding != Encoding::Identity {
            return Err(HttpError::bad_request(
                "Content-Encoding is only supported with application/octet-stream uploads",
            ));
        }
        upload_multipart(request, &identity, query_path.as_deref(), &metadata).await?
    } else if content_type.starts_with("application/octet-stream") {
        let Some(target) = query_path else {
            return Err(HttpError::bad_request(
                "the 'path' query parameter is required for application/octet-stream uploads",
            ));
        };
        let path = resolve(&identity, &target)?;
        let mut writer = UploadWriter::create(path, &identity, encoding == Encoding::Gzip).await?;
        let mut body = request.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| HttpError::bad_request(format!("reading upload body: {e}")))?;
            writer.write(&chunk).await?;
        }
        vec![writer.finish(&metadata).await?]
    } else {
        return Err(HttpError::bad_request(format!(
            "unsupported Content-Type '{content_type}': use multipart/form-data or application/octet-stream"
        )));
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&entries).unwrap_or_default(),
    )
        .into_response())
}

async fn upload_multipart(
    request: Request,
    identity: &Identity,
    query_path: Option<&str>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<UploadedEntry>, HttpError> {
    // The multipart parser stops at the closing boundary, but a chunked body still has
    // its epilogue and final chunk in flight. Answering before they arrive makes the
    // server drop the keep-alive connection under a client that is still writing
    // (the JS SDK's chunked uploads then fail with a broken pipe). So the body is read
    // to its end by a forwarding task, and the answer waits for it.
    let (parts, body) = request.into_parts();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, axum::Error>>(4);
    let drain = tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            let failed = chunk.is_err();
            // Once the parser is done the receiver is gone; keep reading regardless.
            let _ = tx.send(chunk).await;
            if failed {
                break;
            }
        }
    });
    let request = Request::from_parts(
        parts,
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    let result = parse_multipart(request, identity, query_path, metadata).await;
    let _ = drain.await;
    result
}

async fn parse_multipart(
    request: Request,
    identity: &Identity,
    query_path: Option<&str>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<UploadedEntry>, HttpError> {
    let mut multipart = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|e| HttpError::bad_request(format!("invalid multipart body: {e}")))?;
    let mut entries: Vec<UploadedEntry> = Vec::new();
    let bad = |e: axum::extract::multipart::MultipartError| {
        HttpError::bad_request(format!("invalid multipart body: {e}"))
    };
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        if field.name() != Some("file") {
            continue;
        }
        let target = match (query_path, field.file_name()) {
            (Some(path), _) => path.to_owned(),
            (None, Some(name)) if !name.is_empty() => name.to_owned(),
            _ => {
                return Err(HttpError::bad_request(
                    "file part has no filename and no 'path' query parameter was given",
                ))
            }
        };
        let path = resolve(identity, &target)?;
        let shown = path.to_string_lossy();
        if entries.iter().any(|e| e.path == shown) {
            return Err(HttpError::bad_request(format!(
                "cannot upload multiple files to the same path '{shown}'"
            )));
        }
        let mut writer = UploadWriter::create(path, identity, false).await?;
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            writer.write(&chunk).await?;
        }
        entries.push(writer.finish(metadata).await?);
    }
    if entries.is_empty() {
        return Err(HttpError::bad_request(
            "multipart body has no part named 'file'",
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-metadata-owner", HeaderValue::from_static("alice"));
        headers.insert("x-other", HeaderValue::from_static("ignored"));
        let meta = metadata_from_headers(&headers).unwrap();
        assert_eq!(
            meta,
            BTreeMap::from([("owner".to_string(), "alice".to_string())])
        );
        headers.insert(
            "x-metadata-bad",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert!(metadata_from_headers(&headers).is_err());
    }

    #[test]
    fn encodings() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_encoding(&headers).unwrap(), Encoding::Identity);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(content_encoding(&headers).unwrap(), Encoding::Gzip);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(
            content_encoding(&headers).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("/a/b.TXT")),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("/a/b")), "application/octet-stream");
    }
}
