//! SIGUSR1/SIGUSR2 against the real binary: quiesce before a checkpoint, bind again
//! after the restore, with processes and `/init` settings kept. Tier: unprivileged.

mod common;

use std::time::{Duration, Instant};

use common::{output, shell, Envd};
use serde_json::json;
use tokio::io::AsyncReadExt;

fn signal(envd: &Envd, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(envd.pid()).unwrap());
    nix::sys::signal::kill(pid, sig).expect("signal envd");
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn quiesce_cuts_every_connection_and_resume_serves_the_same_state() {
    let envd = Envd::start();
    let marker = envd.path("run/envd.quiesced");
    let pid_file = envd.path("run/envd.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        envd.pid().to_string(),
        "envd announces its pid"
    );
    let req = hyper::Request::post("/init")
        .header("host", "envd")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"envVars":{"KEPT":"across-the-pause"}}"#,
        )))
        .unwrap();
    assert_eq!(envd.send(req).await.status(), 204);

    // A long-lived stream and an idle connection (no request yet).
    let mut stream = envd
        .stream(
            "process.Process/Start",
            shell("i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"),
            &[],
        )
        .await;
    let first = stream.next_within(10).await.expect("start event");
    let pid = first["event"]["start"]["pid"].as_u64().expect("pid");
    let mut idle = tokio::net::UnixStream::connect(&envd.socket).await.unwrap();

    signal(&envd, nix::sys::signal::Signal::SIGUSR1);
    wait_until("the marker", || marker.exists()).await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ok\n");
    assert!(!envd.socket.exists(), "socket file removed");
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.try_next().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the process stream was cut");
    assert!(stream.end.is_none(), "cut, not ended by envd");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("idle connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A second SIGUSR1 while quiesced only confirms.
    std::fs::remove_file(&marker).unwrap();
    signal(&envd, nix::sys::signal::Signal::SIGUSR1);
    wait_until("the marker again", || marker.exists()).await;

    signal(&envd, nix::sys::signal::Signal::SIGUSR2);
    wait_until("the socket", || envd.socket.exists()).await;
    wait_until("the marker to go", || !marker.exists()).await;
    let (status, list) = envd.unary("process.Process/List", json!({})).await;
    assert_eq!(status, 200);
    assert!(
        list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == pid),
        "the process survived: {list}"
    );
    // Its output goes on on a new connection.
    let mut again = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let mut events = Vec::new();
    while output(&events, "stdout").lines().count() < 3 {
        events.push(again.next_within(10).await.expect("output"));
    }
    let (_, _, envs) = envd.get("/envs").await;
    assert!(String::from_utf8_lossy(&envs).contains("across-the-pause"));
    let (status, _) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn resume_without_quiesce_changes_nothing() {
    let envd = Envd::start();
    signal(&envd, nix::sys::signal::Signal::SIGUSR2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, _) = envd.get("/health").await;
    assert_eq!(status, 204);
}
