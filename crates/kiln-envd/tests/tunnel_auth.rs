//! Tunnel, access token, signatures, health, and the TCP dev listener. Tier:
//! unprivileged (binds only loopback).

mod common;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::Envd;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tunnel_request(port: u16) -> Request<Full<Bytes>> {
    Request::get(kiln_proto::tunnel::path(port))
        .header("host", "envd")
        .header("connection", "Upgrade")
        .header("upgrade", kiln_proto::tunnel::UPGRADE)
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn tunnel_copies_bytes_both_ways() {
    let envd = Envd::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            let reply = [b"echo:".as_slice(), &buf[..n]].concat();
            sock.write_all(&reply).await.unwrap();
        }
    });
    let resp = envd.send(tunnel_request(port)).await;
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["upgrade"], "kiln-tunnel");
    let upgraded = hyper::upgrade::on(resp).await.expect("upgrade");
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"echo:ping");

    // Nothing listening: 502 with a JSON body.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (status, _, body) = common::collect(envd.send(tunnel_request(closed)).await).await;
    assert_eq!(status, 502);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"code": 502, "message": format!("port {closed} is not open in the sandbox")})
    );

    // Without the upgrade headers: 400.
    let plain = Request::get(kiln_proto::tunnel::path(port))
        .header("host", "envd")
        .body(Full::default())
        .unwrap();
    assert_eq!(envd.send(plain).await.status(), 400);
}

async fn init(envd: &Envd, body: &str) -> u16 {
    init_with(envd, body, None).await
}

async fn init_with(envd: &Envd, body: &str, token: Option<&str>) -> u16 {
    let mut req = Request::post("/init")
        .header("host", "envd")
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("x-access-token", token);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    envd.send(req).await.status().as_u16()
}

/// Every RPC route, for the authorization check.
const RPC_ROUTES: &[&str] = &[
    "process.Process/Start",
    "process.Process/Connect",
    "process.Process/List",
    "process.Process/SendInput",
    "process.Process/StreamInput",
    "process.Process/SendSignal",
    "process.Process/CloseStdin",
    "process.Process/Update",
    "filesystem.Filesystem/Stat",
    "filesystem.Filesystem/MakeDir",
    "filesystem.Filesystem/Move",
    "filesystem.Filesystem/ListDir",
    "filesystem.Filesystem/Remove",
    "filesystem.Filesystem/WatchDir",
    "filesystem.Filesystem/CreateWatcher",
    "filesystem.Filesystem/GetWatcherEvents",
    "filesystem.Filesystem/RemoveWatcher",
];

#[tokio::test]
async fn access_token_guards_every_route() {
    let envd = Envd::start();
    assert_eq!(
        envd.unary("process.Process/List", json!({})).await.0,
        200,
        "open without a token"
    );
    assert_eq!(init(&envd, r#"{"accessToken":"s3cret"}"#).await, 204);

    let unauthorized = json!({"code": 401, "message": kiln_proto::envd::UNAUTHORIZED_MESSAGE});
    for route in RPC_ROUTES {
        let (status, body) = envd.unary(route, json!({})).await;
        assert_eq!((status.as_u16(), &body), (401, &unauthorized), "{route}");
        let (status, _) = envd
            .unary_with(route, json!({}), &[("x-access-token", "wrong")])
            .await;
        assert_eq!(status, 401, "{route}");
    }
    for path in ["/envs", "/metrics"] {
        assert_eq!(envd.get(path).await.0, 401, "{path}");
    }
    let (status, _) = envd
        .unary_with(
            "process.Process/List",
            json!({}),
            &[("x-access-token", "s3cret")],
        )
        .await;
    assert_eq!(status, 200);

    // Exempt: health, init, files (which checks itself), tunnel.
    let (status, headers, _) = envd.get("/health").await;
    assert_eq!(status, 204);
    assert_eq!(headers["cache-control"], "no-store");

    common::write(&envd.home.join("f.txt"), "data");
    assert_eq!(
        envd.get("/files?path=f.txt").await.0,
        401,
        "no header, no signature"
    );
    let sign = |path: &str, op: &str, user: &str, exp: Option<i64>| {
        let mut raw = format!("{path}:{op}:{user}:s3cret");
        if let Some(exp) = exp {
            raw.push_str(&format!(":{exp}"));
        }
        let digest = sha2::Sha256::digest(raw.as_bytes());
        let sig = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        );
        // As the SDK sends it: query-encoded.
        sig.replace('+', "%2B").replace('/', "%2F")
    };
    let (status, _, body) = envd
        .get(&format!(
            "/files?path=f.txt&signature={}",
            sign("f.txt", "read", "", None)
        ))
        .await;
    assert_eq!((status.as_u16(), &body[..]), (200, b"data".as_slice()));
    let sig = sign("f.txt", "read", "tester", Some(4_000_000_000));
    let uri = format!(
        "/files?path=f.txt&username=tester&signature={sig}&signature_expiration=4000000000"
    );
    assert_eq!(envd.get(&uri).await.0, 200);
    let expired = sign("f.txt", "read", "", Some(1));
    assert_eq!(
        envd.get(&format!(
            "/files?path=f.txt&signature={expired}&signature_expiration=1"
        ))
        .await
        .0,
        401
    );
    let wrong_op = sign("f.txt", "write", "", None);
    assert_eq!(
        envd.get(&format!("/files?path=f.txt&signature={wrong_op}"))
            .await
            .0,
        401
    );
    let req = Request::get("/files?path=f.txt")
        .header("host", "envd")
        .header("x-access-token", "s3cret")
        .body(Full::default())
        .unwrap();
    assert_eq!(envd.send(req).await.status(), 200);

    // Clearing the token, by its holder, reopens everything.
    assert_eq!(
        init_with(&envd, r#"{"accessToken":null}"#, Some("s3cret")).await,
        204
    );
    assert_eq!(envd.unary("process.Process/List", json!({})).await.0, 200);
}

/// Attack: a caller without the token posts `/init` to drop or replace it (the
/// take-over of a sandbox by anyone who could reach `/init`). 409, nothing changes.
#[tokio::test]
async fn init_cannot_clear_or_replace_a_set_token_without_it() {
    let envd = Envd::start();
    assert_eq!(init(&envd, r#"{"accessToken":"s3cret"}"#).await, 204);
    for (body, token) in [
        (r#"{"accessToken":""}"#, None),
        (r#"{"accessToken":null}"#, None),
        (r#"{"accessToken":"mine"}"#, None),
        (r#"{"accessToken":""}"#, Some("wrong")),
        (r#"{"envVars":{"X":"1"},"defaultUser":"root"}"#, None),
        ("", None),
    ] {
        assert_eq!(init_with(&envd, body, token).await, 409, "{body} {token:?}");
    }
    // Still locked with the original token, and the env untouched.
    assert_eq!(envd.unary("process.Process/List", json!({})).await.0, 401);
    let req = Request::get("/envs")
        .header("host", "envd")
        .header("x-access-token", "s3cret")
        .body(Full::default())
        .unwrap();
    let (status, _, body) = common::collect(envd.send(req).await).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"E2B_SANDBOX": "true"})
    );
    // The holder may replace it.
    assert_eq!(
        init_with(&envd, r#"{"accessToken":"next"}"#, Some("s3cret")).await,
        204
    );
    let (status, _) = envd
        .unary_with(
            "process.Process/List",
            json!({}),
            &[("x-access-token", "next")],
        )
        .await;
    assert_eq!(status, 200);
}

/// `/init` bodies are bounded: a 2 MiB body is refused, not buffered.
#[tokio::test]
async fn init_body_is_limited() {
    let envd = Envd::start();
    let big = format!(r#"{{"envVars":{{"X":"{}"}}}}"#, "a".repeat(2 << 20));
    assert_eq!(init(&envd, &big).await, 413);
}

#[tokio::test]
async fn init_sets_defaults_and_envs() {
    let envd = Envd::start();
    let (status, _, body) = envd.get("/envs").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"E2B_SANDBOX": "true"})
    );
    assert_eq!(
        init(
            &envd,
            r#"{"envVars":{"E2B_SANDBOX_ID":"abc"},"defaultUser":"other","defaultWorkdir":"/tmp"}"#
        )
        .await,
        204
    );
    let (_, _, body) = envd.get("/envs").await;
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"E2B_SANDBOX_ID": "abc"})
    );
    let events = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo $USER; pwd"]}}),
            &[],
        )
        .await
        .drain(10)
        .await;
    assert_eq!(common::output(&events, "stdout"), "other\n/tmp\n");
    assert_eq!(init(&envd, "not json").await, 400);
    assert_eq!(init(&envd, "").await, 204);
}

#[tokio::test]
async fn tcp_listener_is_opt_in() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let envd = Envd::start_with(&["--listen-tcp", &addr]);
    let mut conn = None;
    for _ in 0..100 {
        if let Ok(c) = tokio::net::TcpStream::connect(&addr).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = conn.expect("tcp listener");
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    drop(envd);

    // Socket mode is 0600.
    let envd = Envd::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&envd.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}
