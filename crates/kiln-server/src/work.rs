//! Work requested over NATS (with `--nats-url`): spells to run and desktops to start,
//! each answered on its reply subject. The subjects are the seed's:
//!
//! | request | answers |
//! |---|---|
//! | `e2b.spell.execute.v1` `{request_id, spell, args, agent_id}` | `e2b.spell.completed.v1` `{request_id, agent_id, spell, result}` (the run, whatever its exit code) or `e2b.spell.failed.v1` `{request_id, agent_id, spell, error}` (it could not run) |
//! | `e2b.desktop.request.v1` `{request_id, agent_id, duration, memory_mb, cpu_limit}` | `e2b.desktop.ready.v1` `{request_id, agent_id, sandbox_id, stream_url}`, then `e2b.desktop.completed.v1` when the sandbox ends; or `e2b.desktop.failed.v1` `{request_id, agent_id, error}` |
//!
//! A message that is not such a request gets a `failed` answer naming the problem
//! (with its `request_id` when one could be read); none is dropped silently. A request
//! carrying a NATS reply subject gets the answer there too. Work runs as the team the
//! operator names (`KILN_NATS_TEAM`, default `default`), under that team's quotas;
//! queue group `kiln`, so several servers share the work.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln_api::NewSandbox;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::authz::Caller;
use crate::manager::SandboxManager;
use crate::report::chain;
use crate::spells::Spells;

pub const SPELL_EXECUTE: &str = "e2b.spell.execute.v1";
pub const SPELL_COMPLETED: &str = "e2b.spell.completed.v1";
pub const SPELL_FAILED: &str = "e2b.spell.failed.v1";
pub const DESKTOP_REQUEST: &str = "e2b.desktop.request.v1";
pub const DESKTOP_READY: &str = "e2b.desktop.ready.v1";
pub const DESKTOP_COMPLETED: &str = "e2b.desktop.completed.v1";
pub const DESKTOP_FAILED: &str = "e2b.desktop.failed.v1";

/// Requests handled at once; more wait in the subscription.
const CONCURRENCY: usize = 8;
/// The template a desktop request starts.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpellRequest {
    request_id: String,
    spell: String,
    #[serde(default)]
    args: BTreeMap<String, Value>,
    #[serde(default)]
    agent_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DesktopRequest {
    request_id: String,
    #[serde(default)]
    agent_id: Option<String>,
    /// Seconds the desktop lives (default 300).
    #[serde(default)]
    duration: Option<i64>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    cpu_limit: Option<u32>,
}

/// What work handlers share.
pub struct Worker {
    pub manager: Arc<SandboxManager>,
    pub spells: Arc<Spells>,
    /// The team work runs as.
    pub team_id: i64,
    /// Where stream URLs point: `{port}-{id}.{domain}` over https with a domain, else
    /// `{port}-{id}.localhost:{port}` on the server's own port.
    pub domain: Option<String>,
    pub listen_port: u16,
    /// The screen of the desktops it starts (`E2B_DESKTOP_RESOLUTION`).
    pub desktop_resolution: kiln_api::desktop::Resolution,
}

impl Worker {
    fn caller(&self) -> Caller {
        Caller {
            key_id: 0,
            team_id: self.team_id,
            admin: false,
        }
    }
}

/// Serve work requests from the NATS server at `url` until the process ends
/// (connecting, and reconnecting, in the background).
pub fn start(url: String, worker: Worker) {
    tokio::spawn(async move {
        if let Err(e) = serve(&url, Arc::new(worker)).await {
            tracing::error!(%url, error = %e, "NATS work requests are not served");
        }
    });
}

async fn serve(url: &str, worker: Arc<Worker>) -> Result<(), async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .name("kiln-work")
        .retry_on_initial_connect()
        .connect(url)
        .await?;
    let mut spells = client.queue_subscribe(SPELL_EXECUTE, "kiln".into()).await?;
    let mut desktops = client
        .queue_subscribe(DESKTOP_REQUEST, "kiln".into())
        .await?;
    tracing::info!(%url, "serving spell and desktop requests from NATS");
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    loop {
        let (msg, desktop) = tokio::select! {
            Some(m) = spells.next() => (m, false),
            Some(m) = desktops.next() => (m, true),
            else => return Ok(()),
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (client, worker) = (client.clone(), worker.clone());
        tokio::spawn(async move {
            let answers = if desktop {
                desktop_request(&worker, &client, &msg.payload).await
            } else {
                vec![spell_request(&worker, &msg.payload).await]
            };
            for (subject, body) in answers {
                let payload = serde_json::to_vec(&body).expect("JSON values always serialize");
                if let Err(e) = client.publish(subject, payload.clone().into()).await {
                    tracing::warn!(subject, error = %e, "publishing a work answer failed");
                }
                if let Some(reply) = &msg.reply {
                    let _ = client.publish(reply.clone(), payload.into()).await;
                }
            }
            drop(permit);
        });
    }
}

/// The `request_id` and `agent_id` of a message that did not parse as a request,
/// where they can be read.
fn ids_of(payload: &[u8]) -> (Value, Value) {
    let v: Value = serde_json::from_slice(payload).unwrap_or_default();
    (
        v.get("request_id").cloned().unwrap_or(Value::Null),
        v.get("agent_id").cloned().unwrap_or(Value::Null),
    )
}

fn malformed(payload: &[u8], subject: &str, e: &serde_json::Error) -> Value {
    let (request_id, agent_id) = ids_of(payload);
    json!({
        "request_id": request_id,
        "agent_id": agent_id,
        "error": format!("malformed {subject} message: {e}"),
    })
}

async fn spell_request(worker: &Worker, payload: &[u8]) -> (&'static str, Value) {
    let req: SpellRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => return (SPELL_FAILED, malformed(payload, SPELL_EXECUTE, &e)),
    };
    let caller = worker.caller();
    let ran = match worker.spells.get(&caller, &req.spell) {
        Ok(spell) => {
            crate::spells::run::run(
                &worker.manager,
                worker.spells.limits(),
                caller,
                &spell,
                req.args,
                req.agent_id.as_deref(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    match ran {
        Ok(result) => (
            SPELL_COMPLETED,
            json!({"request_id": req.request_id, "agent_id": req.agent_id,
                   "spell": req.spell, "result": result}),
        ),
        Err(e) => {
            tracing::info!(request_id = %req.request_id, error = %chain(&e), "a spell requested over NATS failed");
            (
                SPELL_FAILED,
                json!({"request_id": req.request_id, "agent_id": req.agent_id,
                       "spell": req.spell, "error": crate::error::AppError::from(e).to_string()}),
            )
        }
    }
}

/// Start a desktop and answer `ready`; `completed` follows (published here) when its
/// sandbox ends.
async fn desktop_request(
    worker: &Arc<Worker>,
    client: &async_nats::Client,
    payload: &[u8],
) -> Vec<(&'static str, Value)> {
    let req: DesktopRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => return vec![(DESKTOP_FAILED, malformed(payload, DESKTOP_REQUEST, &e))],
    };
    let failed = |error: String| {
        vec![(
            DESKTOP_FAILED,
            json!({"request_id": req.request_id, "agent_id": req.agent_id, "error": error}),
        )]
    };
    let mut metadata = BTreeMap::from([("kiln.request_id".to_string(), req.request_id.clone())]);
    if let Some(agent) = &req.agent_id {
        metadata.insert("agent_id".to_string(), agent.clone());
    }
    let create = NewSandbox {
        template_id: crate::builtin_projects::DESKTOP.into(),
        timeout: Some(req.duration.unwrap_or(300)),
        secure: Some(true),
        metadata: Some(metadata),
        env_vars: Some(BTreeMap::from([("DISPLAY".to_string(), ":0".to_string())])),
        memory_mb: req.memory_mb,
        cpu_count: req.cpu_limit,
        ..Default::default()
    };
    let sandbox = match worker
        .manager
        .clone()
        .create_detached(create, worker.caller())
        .await
    {
        Ok(s) => s,
        Err(e) => return failed(crate::error::AppError::from(e).to_string()),
    };
    let id = sandbox.sandbox_id.clone();
    let password = crate::keys::generate()
        .trim_start_matches("e2b_")
        .chars()
        .take(16)
        .collect::<String>();
    let started = match worker.manager.get(&id) {
        Some(entry) => {
            start_desktop(
                &entry.envd_socket,
                sandbox.envd_access_token.as_deref(),
                &password,
                worker.desktop_resolution,
            )
            .await
        }
        None => Err("the desktop's sandbox ended while starting".to_string()),
    };
    if let Err(e) = started {
        let _ = worker.manager.kill(&Caller::OPERATOR, &id).await;
        return failed(format!("starting the desktop failed: {e}"));
    }
    let host = match &worker.domain {
        Some(d) => format!("https://6080-{id}.{d}"),
        None => format!("http://6080-{id}.localhost:{}", worker.listen_port),
    };
    let mut stream_url =
        format!("{host}/vnc.html?autoconnect=true&resize=scale&password={password}");
    // Its ports are public: the live view wants the operator's token, if one is set.
    if let Some(token) = worker.manager.desktop_token() {
        stream_url = token.add_to(&stream_url);
    }
    // `completed` once the sandbox is gone (killed, or at its deadline).
    let (w, c, request_id, agent_id, sid) = (
        worker.clone(),
        client.clone(),
        req.request_id.clone(),
        req.agent_id.clone(),
        id.clone(),
    );
    tokio::spawn(async move {
        while w.manager.get(&sid).is_some() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let body = json!({"request_id": request_id, "agent_id": agent_id, "sandbox_id": sid});
        let _ = c
            .publish(
                DESKTOP_COMPLETED,
                serde_json::to_vec(&body).unwrap_or_default().into(),
            )
            .await;
    });
    vec![(
        DESKTOP_READY,
        json!({"request_id": req.request_id, "agent_id": req.agent_id,
               "sandbox_id": id, "stream_url": stream_url}),
    )]
}

/// Xvfb, the XFCE session, x11vnc with a password and noVNC on port 6080, as
/// `e2b-desktop` starts them; ready when noVNC listens.
async fn start_desktop(
    socket: &std::path::Path,
    token: Option<&str>,
    password: &str,
    resolution: kiln_api::desktop::Resolution,
) -> Result<(), String> {
    let run = |cmd: String, wait: bool| async move {
        crate::envd::run_with_token(socket, &cmd, "user", wait, token, None)
            .await
            .map_err(|e| chain(&e))
    };
    let until_ok = |cmd: &'static str| async move {
        for _ in 0..100 {
            if let Ok(Some(exit)) = crate::envd::run_with_token(
                socket,
                cmd,
                "user",
                true,
                token,
                Some(Duration::from_secs(5)),
            )
            .await
            {
                if exit.code == 0 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("`{cmd}` did not succeed within 10 s"))
    };
    run(resolution.xvfb_command(), false).await?;
    until_ok(kiln_api::desktop::DISPLAY_UP).await?;
    run(kiln_api::desktop::START_XFCE.into(), false).await?;
    let vnc = run(kiln_api::desktop::start_x11vnc(password), true).await?;
    if let Some(exit) = vnc.filter(|e| e.code != 0) {
        return Err(format!("x11vnc exited {}: {}", exit.code, exit.output));
    }
    run(kiln_api::desktop::START_NOVNC.into(), false).await?;
    until_ok(kiln_api::desktop::STREAM_UP).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_messages_name_the_problem_and_keep_the_request_id() {
        let payload = br#"{"request_id": "r1", "spell": 7}"#;
        let e = serde_json::from_slice::<SpellRequest>(payload).unwrap_err();
        let v = malformed(payload, SPELL_EXECUTE, &e);
        assert_eq!(v["request_id"], "r1");
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.starts_with("malformed e2b.spell.execute.v1 message: invalid type"),
            "{msg}"
        );
        let e = serde_json::from_slice::<SpellRequest>(b"not json").unwrap_err();
        assert!(malformed(b"not json", SPELL_EXECUTE, &e)["request_id"].is_null());
    }
}
