//! `/files` and filesystem.Filesystem against the real binary. Tier: unprivileged.

mod common;

use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use common::Envd;
use http_body_util::Full;
use hyper::Request;
use serde_json::{json, Value};

fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "kilnboundary42";
    let mut body = Vec::new();
    for (field, filename, data) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_files(
    envd: &Envd,
    query: &str,
    content_type: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = Request::post(format!("/files{query}"))
        .header("host", "envd")
        .header("content-type", content_type);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, _, body) = common::collect(
        envd.send(req.body(Full::new(Bytes::from(body))).unwrap())
            .await,
    )
    .await;
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn upload_and_download() {
    let envd = Envd::start();
    let home = envd.home.display().to_string();

    // Multipart with a `path` query; relative paths land in the user's home.
    let (ct, body) = multipart(&[("file", "ignored.txt", b"hello")]);
    let (status, reply) = post_files(
        &envd,
        "?path=notes/a.txt",
        &ct,
        body,
        &[("x-metadata-Owner", "alice")],
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!([{"path": format!("{home}/notes/a.txt"), "name": "a.txt", "type": "file", "metadata": {"owner": "alice"}}])
    );
    let (status, headers, data) = envd.get("/files?path=notes/a.txt").await;
    assert_eq!(status, 200);
    assert_eq!(&data[..], b"hello");
    assert_eq!(headers["content-disposition"], "inline; filename=\"a.txt\"");

    // Multi-file multipart: the filename carries the full path; other fields ignored.
    let d = envd.path("multi");
    let (one, two) = (
        format!("{}/1", d.display()),
        format!("{}/sub/2", d.display()),
    );
    let (ct, body) = multipart(&[
        ("file", &one, b"1"),
        ("other", "x", b"zzz"),
        ("file", &two, b"22"),
    ]);
    let (status, reply) = post_files(&envd, "", &ct, body, &[]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply.as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(&two).unwrap(), b"22");
    let (ct, body) = multipart(&[("file", &one, b"1"), ("file", &one, b"1")]);
    assert_eq!(post_files(&envd, "", &ct, body, &[]).await.0, 400);

    // Octet-stream, plain and gzip, overwriting.
    let target = envd.path("oct/file.bin");
    let q = format!("?path={}", target.display());
    let (status, _) = post_files(
        &envd,
        &q,
        "application/octet-stream",
        vec![0, 1, 2, 255],
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&target).unwrap(), [0, 1, 2, 255]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&vec![b'z'; 100_000]).unwrap();
    let (status, _) = post_files(
        &envd,
        &q,
        "application/octet-stream",
        gz.finish().unwrap(),
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&target).unwrap(), vec![b'z'; 100_000]);
    assert_eq!(
        post_files(
            &envd,
            &q,
            "application/octet-stream",
            b"x".to_vec(),
            &[("content-encoding", "br")]
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post_files(&envd, "", "application/octet-stream", b"x".to_vec(), &[])
            .await
            .0,
        400
    );
    assert_eq!(
        post_files(&envd, &q, "text/plain", b"x".to_vec(), &[])
            .await
            .0,
        400
    );

    // Errors are JSON with integer codes.
    let (status, headers, body) = envd.get("/files?path=/definitely/missing").await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"code": 404, "message": "path '/definitely/missing' does not exist"})
    );
    assert_eq!(
        envd.get(&format!("/files?path={}", envd.path("oct").display()))
            .await
            .0,
        400
    );
    assert_eq!(envd.get("/files?path=a&username=nobody").await.0, 401);
    let (ct, body) = multipart(&[("file", "x", b"x")]);
    let q = format!("?path={}", envd.path("oct").display());
    assert_eq!(
        post_files(&envd, &q, &ct, body, &[]).await.0,
        400,
        "uploading onto a directory"
    );
}

#[tokio::test]
async fn downloads_read_to_eof_and_refuse_special_files() {
    let envd = Envd::start();
    let get = |path: &std::path::Path| format!("/files?path={}", path.display());

    // procfs says its files are empty: the whole content still comes, sized exactly.
    let (status, headers, body) = envd.get("/files?path=/proc/self/status").await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"Name:"), "{body:?}");
    assert_eq!(headers["content-length"], body.len().to_string());
    // sysfs says a page whatever it holds, and the path does not tell (a symlink).
    let online = std::path::Path::new("/sys/devices/system/cpu/online");
    if let Ok(expected) = std::fs::read(online) {
        let link = envd.path("cpu-online");
        std::os::unix::fs::symlink(online, &link).unwrap();
        let (status, headers, body) = envd.get(&get(&link)).await;
        assert_eq!(status, 200);
        assert_eq!(&body[..], &expected[..]);
        assert_eq!(headers["content-length"], expected.len().to_string());
    }

    // A file longer than what is read ahead streams chunked, to its end.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let path = envd.path("big.bin");
    std::fs::write(&path, &big).unwrap();
    let (status, headers, body) = envd.get(&get(&path)).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), big.len());
    assert!(body[..] == big[..]);
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    assert_eq!(headers["transfer-encoding"], "chunked");
    let path = envd.path("empty");
    std::fs::write(&path, b"").unwrap();
    let (status, headers, body) = envd.get(&get(&path)).await;
    assert_eq!((status.as_u16(), body.len()), (200, 0));
    assert_eq!(headers["content-length"], "0");

    // Devices and FIFOs are refused (400, naming the type), never opened or read:
    // /dev/zero would stream forever and a FIFO's open would wait for a writer.
    let fifo = envd.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    for (path, kind) in [
        (std::path::PathBuf::from("/dev/zero"), "a character device"),
        (fifo, "a FIFO"),
    ] {
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(5), envd.get(&get(&path)))
            .await
            .expect("answered at once");
        assert_eq!(status, 400);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["message"],
            format!(
                "path '{}' is {kind}: only regular files can be downloaded",
                path.display()
            )
        );
    }
}

#[tokio::test]
async fn stat_list_make_move_remove() {
    let envd = Envd::start();
    let root = envd.path("tree");
    common::write(&root.join("b/inner/x.txt"), "xx");
    common::write(&root.join("a.txt"), "abc");
    std::os::unix::fs::symlink(root.join("b"), root.join("c")).unwrap();
    let r = root.display().to_string();

    let (status, stat) = envd
        .unary(
            "filesystem.Filesystem/Stat",
            json!({"path": format!("{r}/a.txt")}),
        )
        .await;
    assert_eq!(status, 200);
    let entry = &stat["entry"];
    assert_eq!(entry["type"], "FILE_TYPE_FILE");
    assert_eq!(entry["size"], "3");
    assert_eq!(entry["name"], "a.txt");
    assert_eq!(entry["owner"], "tester");
    let (status, body) = envd
        .unary(
            "filesystem.Filesystem/Stat",
            json!({"path": format!("{r}/nope")}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (404, Some("not_found"))
    );

    let names = |v: &Value| -> Vec<String> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, list) = envd
        .unary(
            "filesystem.Filesystem/ListDir",
            json!({"path": r, "depth": 1}),
        )
        .await;
    assert_eq!(
        names(&list),
        [format!("{r}/a.txt"), format!("{r}/b"), format!("{r}/c")]
    );
    let link = &list["entries"][2];
    assert_eq!(link["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(
        link["symlinkTarget"],
        format!("{}/b", std::fs::canonicalize(&root).unwrap().display())
    );
    let (_, deep) = envd
        .unary(
            "filesystem.Filesystem/ListDir",
            json!({"path": r, "depth": 3}),
        )
        .await;
    assert_eq!(
        names(&deep),
        [
            format!("{r}/a.txt"),
            format!("{r}/b"),
            format!("{r}/b/inner"),
            format!("{r}/b/inner/x.txt"),
            format!("{r}/c")
        ]
    );
    let (status, body) = envd
        .unary(
            "filesystem.Filesystem/ListDir",
            json!({"path": format!("{r}/a.txt")}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    let (status, made) = envd
        .unary(
            "filesystem.Filesystem/MakeDir",
            json!({"path": format!("{r}/new/deep")}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(made["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(made["entry"]["mode"], 0o755);
    let (status, body) = envd
        .unary(
            "filesystem.Filesystem/MakeDir",
            json!({"path": format!("{r}/new/deep")}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (status, _) = envd
        .unary(
            "filesystem.Filesystem/MakeDir",
            json!({"path": format!("{r}/a.txt")}),
        )
        .await;
    assert_eq!(status, 400);

    let (status, moved) = envd
        .unary(
            "filesystem.Filesystem/Move",
            json!({"source": format!("{r}/a.txt"), "destination": format!("{r}/moved/here.txt")}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(moved["entry"]["path"], format!("{r}/moved/here.txt"));
    let (status, _) = envd
        .unary(
            "filesystem.Filesystem/Move",
            json!({"source": format!("{r}/a.txt"), "destination": format!("{r}/z")}),
        )
        .await;
    assert_eq!(status, 404);

    assert_eq!(
        envd.unary(
            "filesystem.Filesystem/Remove",
            json!({"path": format!("{r}/b")})
        )
        .await
        .0,
        200
    );
    assert!(!root.join("b").exists());
    assert_eq!(
        envd.unary(
            "filesystem.Filesystem/Remove",
            json!({"path": format!("{r}/b")})
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn watch_stream_and_polled_watchers() {
    let envd = Envd::start();
    let dir = envd.path("watched");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let d = dir.display().to_string();

    let mut s = envd
        .stream(
            "filesystem.Filesystem/WatchDir",
            json!({"path": d, "recursive": true, "includeEntry": true}),
            &[],
        )
        .await;
    assert_eq!(s.next_within(5).await.unwrap(), json!({"start": {}}));
    std::fs::write(dir.join("sub/new.txt"), b"x").unwrap();
    let ev = s.next_within(5).await.unwrap();
    assert_eq!(ev["filesystem"]["name"], "sub/new.txt");
    assert_eq!(ev["filesystem"]["type"], "EVENT_TYPE_CREATE");
    assert_eq!(ev["filesystem"]["entry"]["name"], "new.txt");
    drop(s);

    let (status, created) = envd
        .unary("filesystem.Filesystem/CreateWatcher", json!({"path": d}))
        .await;
    assert_eq!(status, 200);
    let id = created["watcherId"].as_str().unwrap().to_owned();
    assert!(id.starts_with('w') && id.len() == 21);
    std::fs::write(dir.join("f"), b"1").unwrap();
    std::fs::rename(dir.join("f"), dir.join("g")).unwrap();
    std::fs::remove_file(dir.join("g")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, got) = envd
        .unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!(status, 200);
    let kinds: Vec<(String, String)> = got["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(_, t)| t != "EVENT_TYPE_WRITE" && t != "EVENT_TYPE_CHMOD")
        .collect();
    let expect = |n: &str, t: &str| (n.to_owned(), t.to_owned());
    assert_eq!(
        kinds,
        [
            expect("f", "EVENT_TYPE_CREATE"),
            expect("f", "EVENT_TYPE_RENAME"),
            expect("g", "EVENT_TYPE_CREATE"),
            expect("g", "EVENT_TYPE_REMOVE")
        ]
    );
    let (_, again) = envd
        .unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!(again, json!({}), "the buffer is cleared");
    assert_eq!(
        envd.unary(
            "filesystem.Filesystem/RemoveWatcher",
            json!({"watcherId": id})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        envd.unary(
            "filesystem.Filesystem/RemoveWatcher",
            json!({"watcherId": id})
        )
        .await
        .0,
        404
    );
    assert_eq!(
        envd.unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id})
        )
        .await
        .0,
        404
    );
    let (status, _) = envd
        .unary(
            "filesystem.Filesystem/CreateWatcher",
            json!({"path": format!("{d}/missing")}),
        )
        .await;
    assert_eq!(status, 404);
}
