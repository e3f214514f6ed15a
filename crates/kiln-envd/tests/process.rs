//! process.Process against the real binary. Tier: unprivileged (works as root too).

mod common;

use std::time::{Duration, Instant};

use common::{end_event, output, shell, Envd};
use serde_json::json;

#[tokio::test]
async fn start_streams_start_output_and_end() {
    let envd = Envd::start();
    let mut s = envd
        .stream(
            "process.Process/Start",
            shell("echo out; echo err >&2; exit 3"),
            &[],
        )
        .await;
    let events = s.drain(10).await;
    let pid = events[0]["event"]["start"]["pid"]
        .as_u64()
        .expect("start first");
    assert!(pid > 0);
    assert_eq!(output(&events, "stdout"), "out\n");
    assert_eq!(output(&events, "stderr"), "err\n");
    assert_eq!(
        end_event(&events),
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    assert_eq!(s.end, Some(json!({})));

    let mut ok = envd
        .stream(
            "process.Process/Start",
            shell("cat /proc/self/oom_score_adj"),
            &[],
        )
        .await;
    let events = ok.drain(10).await;
    assert_eq!(
        output(&events, "stdout"),
        "100\n",
        "children are preferred OOM victims"
    );
    assert_eq!(
        end_event(&events),
        json!({"exited": true, "status": "exit status 0"})
    );
}

#[tokio::test]
async fn environment_layers_and_cwd() {
    let envd = Envd::start();
    let (status, _) = {
        let req = hyper::Request::post("/init")
            .header("host", "envd")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"envVars":{"E2B_SANDBOX":"true","SANDBOX_VAR":"s","OVERRIDE":"sandbox"}}"#,
            )))
            .unwrap();
        let resp = envd.send(req).await;
        assert_eq!(resp.headers()["x-envd-version"], "0.6.13");
        (resp.status(), ())
    };
    assert_eq!(status, 204);
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo $HOME $USER $LOGNAME $SANDBOX_VAR $OVERRIDE $E2B_SANDBOX; pwd; env | grep -c KILN_ENVD_LOG"],
        "envs": {"OVERRIDE": "request"}}});
    let events = envd
        .stream("process.Process/Start", req, &[])
        .await
        .drain(10)
        .await;
    let home = envd.home.display().to_string();
    assert_eq!(
        output(&events, "stdout"),
        format!("{home} tester tester s request true\n{home}\n0\n")
    );

    let req = json!({"process": {"cmd": "pwd", "cwd": "/tmp"}});
    let events = envd
        .stream("process.Process/Start", req, &[])
        .await
        .drain(10)
        .await;
    assert_eq!(output(&events, "stdout"), "/tmp\n");

    let mut bad = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "pwd", "cwd": "/no/such/dir"}}),
            &[],
        )
        .await;
    assert!(bad.next().await.is_none());
    let end = bad.end.unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument");
    assert_eq!(end["error"]["message"], "cwd '/no/such/dir' does not exist");

    let mut unknown = envd
        .stream(
            "process.Process/Start",
            shell("true"),
            &[("authorization", "Basic bm9ib2R5Og==")],
        )
        .await;
    assert!(unknown.next().await.is_none());
    assert_eq!(unknown.end.unwrap()["error"]["code"], "unauthenticated");
}

#[tokio::test]
async fn stdin_pipe_send_and_close() {
    let envd = Envd::start();
    // `stdin` absent means a pipe.
    let mut s = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "cat"}}),
            &[],
        )
        .await;
    let start = s.next_within(5).await.unwrap();
    let pid = start["event"]["start"]["pid"].as_u64().unwrap();
    let (status, _) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "aGVsbG8K"}}),
        )
        .await;
    assert_eq!(status, 200);
    let data = s.next_within(5).await.unwrap();
    assert_eq!(data["event"]["data"]["stdout"], "aGVsbG8K");
    let (status, _) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(status, 200);
    let rest = s.drain(5).await;
    assert_eq!(end_event(&rest)["exited"], true);

    // stdin=false: /dev/null, and SendInput is an internal error.
    let mut s = envd
        .stream("process.Process/Start", shell("sleep 5"), &[])
        .await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "eA=="}}),
        )
        .await;
    assert_eq!(status, 500);
    assert_eq!(body["code"], "internal");
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": "eA=="}}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (500, Some("internal"))
    );
    let (status, _) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(status, 200, "closing a missing stdin is a no-op");
    envd.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
}

#[tokio::test]
async fn pty_size_input_and_resize() {
    let envd = Envd::start();
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-i"], "envs": {"TERM": "xterm-256color", "PS1": "$ "}},
        "pty": {"size": {"cols": 80, "rows": 24}}});
    let mut s = envd.stream("process.Process/Start", req, &[]).await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    let send = |text: &str| {
        use base64::Engine as _;
        json!({"process": {"pid": pid}, "input": {"pty": base64::engine::general_purpose::STANDARD.encode(text)}})
    };
    assert_eq!(
        envd.unary("process.Process/SendInput", send("stty size; tty\n"))
            .await
            .0,
        200
    );
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(output(&seen, "pty").contains("24 80") && output(&seen, "pty").contains("/dev/pts/")) {
        assert!(
            Instant::now() < deadline,
            "no stty output: {:?}",
            output(&seen, "pty")
        );
        seen.push(s.next_within(10).await.unwrap());
    }
    let (status, _) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
        )
        .await;
    assert_eq!(status, 200);
    // stdin on a PTY, CloseStdin on a PTY: errors with envd's codes.
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "eA=="}}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (500, Some("internal"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (500, Some("unknown"))
    );

    assert_eq!(
        envd.unary("process.Process/SendInput", send("stty size; exit\n"))
            .await
            .0,
        200
    );
    let rest = s.drain(10).await;
    seen.extend(rest);
    assert!(
        output(&seen, "pty").contains("30 100"),
        "{}",
        output(&seen, "pty")
    );
    assert_eq!(end_event(&seen)["exited"], true);
    // No separate stdout/stderr on a PTY.
    assert_eq!(output(&seen, "stdout"), "");
}

#[tokio::test]
async fn signals_and_list() {
    let envd = Envd::start();
    let req = json!({"process": {"cmd": "sleep", "args": ["30"], "envs": {"A": "1"}}, "tag": "sleeper", "stdin": false});
    let mut s = envd.stream("process.Process/Start", req, &[]).await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();

    let (status, list) = envd.unary("process.Process/List", json!({})).await;
    assert_eq!(status, 200);
    let entry = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .cloned()
        .expect("listed");
    assert_eq!(
        entry,
        json!({"config": {"cmd": "sleep", "args": ["30"], "envs": {"A": "1"}}, "pid": pid, "tag": "sleeper"})
    );

    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": 1}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (501, Some("unimplemented"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (404, Some("not_found"))
    );

    // Select by tag.
    let (status, _) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"tag": "sleeper"}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(status, 200);
    let events = s.drain(10).await;
    assert_eq!(
        end_event(&events),
        json!({"exitCode": -1, "status": "signal: killed", "error": "signal: killed"})
    );
    // Exited processes leave the list but stay connectable for a while.
    let (_, list) = envd.unary("process.Process/List", json!({})).await;
    assert!(!list.to_string().contains("sleeper"));
    let mut c = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let events = c.drain(5).await;
    assert_eq!(events[0]["event"]["start"]["pid"], pid);
    assert_eq!(end_event(&events)["status"], "signal: killed");

    let mut missing = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": 999_999_999u32}}),
            &[],
        )
        .await;
    assert!(missing.next().await.is_none());
    assert_eq!(missing.end.unwrap()["error"]["code"], "not_found");
}

#[tokio::test]
async fn timeout_is_process_lifetime_and_stream_close_does_not_kill() {
    let envd = Envd::start();
    let started = Instant::now();
    let mut s = envd
        .stream(
            "process.Process/Start",
            shell("sleep 20"),
            &[("connect-timeout-ms", "500")],
        )
        .await;
    let events = s.drain(10).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The stream ends with deadline_exceeded (the SDK's TimeoutException), as E2B's
    // envd ends it, and the process is gone: the deadline is its lifetime.
    let end = s.end.clone().expect("an end-of-stream message");
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    let pid = events[0]["event"]["start"]["pid"].as_u64().unwrap();
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(gone, "process {pid} outlived its deadline");

    // Dropping the Start stream leaves the process running; Connect reattaches.
    let marker = envd.path("marker");
    let cmd = format!("sleep 1; echo done > {}; echo finished", marker.display());
    let mut s = envd.stream("process.Process/Start", shell(&cmd), &[]).await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    drop(s);
    let mut c = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[("keepalive-ping-interval", "1")],
        )
        .await;
    let events = c.drain(10).await;
    assert_eq!(events[0]["event"]["start"]["pid"], pid);
    assert_eq!(output(&events, "stdout"), "finished\n");
    assert!(marker.exists());
}

#[tokio::test]
async fn a_deadline_kill_always_ends_with_deadline_exceeded() {
    // The kill's end event and the stream's deadline race; the deadline must win every
    // time (E2B's envd ends so; the SDK raises TimeoutException, not an exit code).
    // Many at once load the runtime, so end events are often queued before a stream
    // is polled again.
    let envd = Envd::start();
    let mut streams = Vec::new();
    for _ in 0..64 {
        let s = envd
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": false}),
                &[("connect-timeout-ms", "300")],
            )
            .await;
        streams.push(s);
    }
    for mut s in streams {
        let events = s.drain(10).await;
        assert!(
            events.iter().all(|e| e["event"].get("end").is_none()),
            "an end event instead of the deadline: {events:?}"
        );
        let end = s.end.clone().expect("an end-of-stream message");
        assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    }
}

#[tokio::test]
async fn keepalives_and_multiple_subscribers() {
    let envd = Envd::start();
    let mut s = envd
        .stream(
            "process.Process/Start",
            shell("sleep 1.5; echo x"),
            &[("keepalive-ping-interval", "1")],
        )
        .await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    let mut c = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let first = s.drain(10).await;
    assert!(
        first.iter().any(|e| e["event"].get("keepalive").is_some()),
        "{first:?}"
    );
    assert_eq!(output(&first, "stdout"), "x\n");
    let second = c.drain(10).await;
    assert_eq!(output(&second, "stdout"), "x\n");
    assert_eq!(end_event(&second)["exited"], true);
}

#[tokio::test]
async fn stream_input_update_and_sigterm() {
    let envd = Envd::start();
    let mut s = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "cat"}}),
            &[],
        )
        .await;
    let pid = s.next_within(5).await.unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();

    // Client streaming: start, data, keepalive, end-of-stream.
    let mut body = Vec::new();
    for msg in [
        json!({"start": {"process": {"pid": pid}}}),
        json!({"data": {"input": {"stdin": "c3RyZWFtZWQK"}}}),
        json!({"keepalive": {}}),
    ] {
        body.extend_from_slice(&kiln_proto::connect::encode_envelope(
            0,
            msg.to_string().as_bytes(),
        ));
    }
    body.extend_from_slice(&kiln_proto::connect::encode_end_stream(None));
    let req = hyper::Request::post("/process.Process/StreamInput")
        .header("host", "envd")
        .header("content-type", "application/connect+json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let (status, headers, reply) = common::collect(envd.send(req).await).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/connect+json");
    let envelopes = kiln_proto::connect::decode_envelopes(&reply, 1 << 20).unwrap();
    assert_eq!(&envelopes[0].payload[..], b"{}");
    assert!(envelopes[1].is_end_stream());
    assert_eq!(&envelopes[1].payload[..], b"{}");
    let data = s.next_within(5).await.unwrap();
    assert_eq!(output(&[data], "stdout"), "streamed\n");

    // Update on a non-PTY process is an internal error.
    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 1, "rows": 1}}}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (500, Some("internal"))
    );

    let (status, _) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
        )
        .await;
    assert_eq!(status, 200);
    let events = s.drain(10).await;
    assert_eq!(
        end_event(&events),
        json!({"exitCode": -1, "status": "signal: terminated", "error": "signal: terminated"})
    );
}

/// Tier: root (switching uid, gid and groups). Skips, saying so, without root.
#[tokio::test]
async fn runs_as_the_resolved_user_with_supplementary_groups() {
    if common::uid() != 0 {
        // CI runs as root: a missing privilege there is a failure, never a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root and CI is set"
        );
        eprintln!("SKIP runs_as_the_resolved_user_with_supplementary_groups: needs root");
        return;
    }
    let envd = Envd::start();
    let passwd = envd.path("passwd");
    let group = envd.path("group");
    let mut text = std::fs::read_to_string(&passwd).unwrap();
    text.push_str("sbxuser:x:64123:64124::/tmp:/bin/sh\n");
    std::fs::write(&passwd, text).unwrap();
    std::fs::write(
        &group,
        "sbxuser:x:64124:\nextra:x:64125:someone,sbxuser\nunrelated:x:64126:someone\n",
    )
    .unwrap();
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "sbxuser:")
    );
    let events = envd
        .stream(
            "process.Process/Start",
            shell("id -u; id -g; id -G; echo $USER $HOME"),
            &[("authorization", &auth)],
        )
        .await
        .drain(10)
        .await;
    assert_eq!(
        output(&events, "stdout"),
        "64123\n64124\n64124 64125\nsbxuser /tmp\n"
    );

    // Files uploaded for that user are owned by it.
    let req = hyper::Request::post(format!(
        "/files?path={}&username=sbxuser",
        envd.path("owned/f").display()
    ))
    .header("host", "envd")
    .header("content-type", "application/octet-stream")
    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
    .unwrap();
    assert_eq!(envd.send(req).await.status(), 200);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(envd.path("owned/f")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (64123, 64124));
    let dir = std::fs::metadata(envd.path("owned")).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (64123, 0o755));
}
