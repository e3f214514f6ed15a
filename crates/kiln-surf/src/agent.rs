//! Computer-use mode: a model behind an OpenAI-compatible Responses API the operator
//! configures (`E2B_SURF_MODEL_URL`) looks at the desktop and says what to do; Surf
//! does it with xdotool and answers with a new screenshot, as E2B Surf's agent loop
//! does (its `computer_call`s, one `action` or a batch of `actions`), until the model
//! answers without one or the session's steps run out.

use std::time::Duration;

use base64::Engine;
use kiln_api::desktop::{self, Button, Resolution};
use serde_json::{json, Value};

use crate::target::Target;
use crate::Surf;

/// The most actions one session carries out.
pub const MAX_ACTIONS: usize = 50;
/// The most model turns one session takes.
const MAX_TURNS: usize = 25;
/// The largest screenshot sent to the model.
const MAX_SCREENSHOT: usize = 16 << 20;
const SCREENSHOT: &str = "/tmp/kiln-surf-screen.png";

/// Where the model is.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The API's base, e.g. `https://api.openai.com/v1` (`E2B_SURF_MODEL_URL`).
    pub url: String,
    /// Sent as a Bearer token (`E2B_SURF_MODEL_KEY`, else `OPENAI_API_KEY`).
    pub key: Option<String>,
    /// `E2B_SURF_MODEL`.
    pub model: String,
}

/// Runs the agent loop for `task` on the desktop of `t`; the model's last words.
pub(crate) async fn run(
    surf: &Surf,
    id: &str,
    t: &Target<'_>,
    task: &str,
    screen: Resolution,
) -> Result<String, String> {
    let model = surf
        .config
        .model
        .as_ref()
        .ok_or("computer-use mode is off")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| format!("an HTTP client for the model: {e}"))?;
    let tools = json!([{
        "type": "computer_use_preview",
        "display_width": screen.width,
        "display_height": screen.height,
        "environment": "linux",
    }]);
    let mut body = json!({
        "model": model.model,
        "tools": tools,
        "truncation": "auto",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": task},
            {"type": "input_image", "image_url": screenshot_url(t).await?},
        ]}],
    });
    let mut actions = 0;
    for _ in 0..MAX_TURNS {
        let answer = ask(&http, model, &body).await?;
        let calls: Vec<&Value> = answer["output"]
            .as_array()
            .map(|o| o.iter().filter(|i| i["type"] == "computer_call").collect())
            .unwrap_or_default();
        if calls.is_empty() {
            return Ok(words_of(&answer));
        }
        let mut outputs = Vec::new();
        for call in calls {
            let batch: Vec<Value> = match (&call["actions"], &call["action"]) {
                (Value::Array(a), _) => a.clone(),
                (_, a @ Value::Object(_)) => vec![a.clone()],
                _ => Vec::new(),
            };
            for action in batch {
                actions += 1;
                if actions > MAX_ACTIONS {
                    return Err(format!(
                        "the model asked for more than {MAX_ACTIONS} actions; stopped"
                    ));
                }
                perform(t, &action).await?;
                surf.sessions.update(id, |s| s.steps.push(action.clone()));
            }
            outputs.push(json!({
                "type": "computer_call_output",
                "call_id": call["call_id"],
                "output": {"type": "computer_screenshot", "image_url": screenshot_url(t).await?},
            }));
        }
        body = json!({
            "model": model.model,
            "tools": tools,
            "truncation": "auto",
            "previous_response_id": answer["id"],
            "input": outputs,
        });
    }
    Err(format!(
        "the model was still acting after {MAX_TURNS} turns; stopped"
    ))
}

async fn ask(http: &reqwest::Client, model: &ModelConfig, body: &Value) -> Result<Value, String> {
    let url = format!("{}/responses", model.url.trim_end_matches('/'));
    let mut req = http.post(&url).json(body);
    if let Some(key) = &model.key {
        req = req.bearer_auth(key);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("asking the model at {url}: {e}"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("reading the model's answer: {e}"))?;
    if !status.is_success() {
        let mut text = text;
        text.truncate(500);
        return Err(format!("the model at {url} answered {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("the model's answer is not JSON: {e}"))
}

/// The text of the model's messages.
fn words_of(answer: &Value) -> String {
    let mut words = Vec::new();
    for item in answer["output"].as_array().into_iter().flatten() {
        for part in item["content"].as_array().into_iter().flatten() {
            if let Some(text) = part["text"].as_str() {
                words.push(text.to_string());
            }
        }
    }
    words.join("\n")
}

async fn screenshot_url(t: &Target<'_>) -> Result<String, String> {
    if t.run(&desktop::screenshot(SCREENSHOT)).await? != 0 {
        return Err(format!("scrot failed in sandbox {}", t.id));
    }
    let png = t
        .client
        .read_file(&t.id, t.token.as_deref(), SCREENSHOT, None, MAX_SCREENSHOT)
        .await
        .map_err(|e| format!("reading the screenshot of sandbox {}: {e}", t.id))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

/// A shell command line, and the environment it reads text from.
type Command = (String, Vec<(&'static str, String)>);

/// The command an action becomes; `None` for one that needs none (`screenshot`).
pub(crate) fn command_of(action: &Value) -> Result<Option<Command>, String> {
    let coord = |key: &str| -> Result<u32, String> {
        action[key]
            .as_f64()
            .filter(|v| (0.0..=16384.0).contains(v))
            .map(|v| v.round() as u32)
            .ok_or_else(|| format!("action {action}: {key} must be a pixel position"))
    };
    let kind = action["type"].as_str().unwrap_or_default();
    let command = match kind {
        "click" => {
            let button = match action["button"].as_str().unwrap_or("left") {
                "left" => Button::Left,
                "right" => Button::Right,
                "middle" | "wheel" => Button::Middle,
                other => return Err(format!("click with button {other:?} is not supported")),
            };
            (desktop::click(coord("x")?, coord("y")?, button, 1), vec![])
        }
        "double_click" => (
            desktop::click(coord("x")?, coord("y")?, Button::Left, 2),
            vec![],
        ),
        "move" => (
            format!("xdotool mousemove --sync {} {}", coord("x")?, coord("y")?),
            vec![],
        ),
        "type" => {
            let text = action["text"].as_str().unwrap_or_default();
            if text.is_empty() || text.len() > 10_000 {
                return Err("a type action's text must be 1 to 10000 bytes".into());
            }
            (
                desktop::TYPE_TEXT.to_string(),
                vec![("KILN_TEXT", text.to_string())],
            )
        }
        "keypress" => {
            let keys: Vec<String> = action["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(x_key)
                .collect();
            let chord = keys.join("+");
            if !desktop::valid_keys(&chord) {
                return Err(format!(
                    "keypress {:?} is not a chord of key names",
                    action["keys"]
                ));
            }
            (desktop::PRESS_KEYS.to_string(), vec![("KILN_KEYS", chord)])
        }
        "scroll" => {
            let dy = action["scroll_y"].as_f64().unwrap_or(0.0);
            let button = if dy < 0.0 {
                Button::WheelUp
            } else {
                Button::WheelDown
            };
            // The model's pixels, in wheel clicks of about 100 px, at most 20.
            let clicks = ((dy.abs() / 100.0).ceil() as u32).clamp(1, 20);
            (
                desktop::click(coord("x")?, coord("y")?, button, clicks),
                vec![],
            )
        }
        "drag" => {
            let path = action["path"].as_array().cloned().unwrap_or_default();
            let (Some(from), Some(to)) = (path.first(), path.last()) else {
                return Err("a drag needs a path of at least one point".into());
            };
            let at = |p: &Value| -> Result<(u32, u32), String> {
                let c = |k: &str| {
                    p[k].as_f64()
                        .filter(|v| (0.0..=16384.0).contains(v))
                        .map(|v| v.round() as u32)
                        .ok_or_else(|| format!("drag point {p}: {k} must be a pixel position"))
                };
                Ok((c("x")?, c("y")?))
            };
            let ((x0, y0), (x1, y1)) = (at(from)?, at(to)?);
            (
                format!(
                    "xdotool mousemove --sync {x0} {y0} mousedown 1 mousemove --sync {x1} {y1} mouseup 1"
                ),
                vec![],
            )
        }
        "wait" => ("sleep 0.8".to_string(), vec![]),
        "screenshot" => return Ok(None),
        other => return Err(format!("action type {other:?} is not supported")),
    };
    Ok(Some(command))
}

/// A key as the Responses API names it (`ENTER`, `CTRL`), as X names it.
fn x_key(key: &str) -> String {
    match key.to_ascii_uppercase().as_str() {
        "ENTER" | "RETURN" => "Return".into(),
        "CTRL" | "CONTROL" => "ctrl".into(),
        "ALT" => "alt".into(),
        "SHIFT" => "shift".into(),
        "ESC" | "ESCAPE" => "Escape".into(),
        "TAB" => "Tab".into(),
        "SPACE" => "space".into(),
        "BACKSPACE" => "BackSpace".into(),
        "DELETE" => "Delete".into(),
        "UP" | "ARROWUP" => "Up".into(),
        "DOWN" | "ARROWDOWN" => "Down".into(),
        "LEFT" | "ARROWLEFT" => "Left".into(),
        "RIGHT" | "ARROWRIGHT" => "Right".into(),
        "CMD" | "META" | "SUPER" => "super".into(),
        _ => key.to_string(),
    }
}

async fn perform(t: &Target<'_>, action: &Value) -> Result<(), String> {
    let Some((command, env)) = command_of(action)? else {
        return Ok(());
    };
    let code = t.run_with(&command, &env).await?;
    if code != 0 {
        return Err(format!(
            "action {action} failed in sandbox {} (exit {code})",
            t.id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_become_xdotool_commands_with_text_outside_the_shell() {
        let cmd = |v: Value| command_of(&v).unwrap().unwrap();
        assert_eq!(
            cmd(json!({"type": "click", "x": 10, "y": 20, "button": "right"})).0,
            "xdotool mousemove --sync 10 20 click 3"
        );
        assert_eq!(
            cmd(json!({"type": "double_click", "x": 1.4, "y": 2})).0,
            "xdotool mousemove --sync 1 2 click --repeat 2 1"
        );
        let (c, env) = cmd(json!({"type": "type", "text": "$(rm -rf /) \"x\""}));
        assert_eq!(c, desktop::TYPE_TEXT);
        assert_eq!(env, vec![("KILN_TEXT", "$(rm -rf /) \"x\"".to_string())]);
        let (_, env) = cmd(json!({"type": "keypress", "keys": ["CTRL", "a"]}));
        assert_eq!(env, vec![("KILN_KEYS", "ctrl+a".to_string())]);
        assert_eq!(
            cmd(json!({"type": "scroll", "x": 5, "y": 5, "scroll_y": -250})).0,
            "xdotool mousemove --sync 5 5 click --repeat 3 4"
        );
        assert!(
            cmd(json!({"type": "drag", "path": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]}))
                .0
                .ends_with("mousemove --sync 3 4 mouseup 1")
        );
        assert!(command_of(&json!({"type": "screenshot"}))
            .unwrap()
            .is_none());
        for bad in [
            json!({"type": "click", "x": -1, "y": 0}),
            json!({"type": "click", "x": "1; reboot", "y": 0}),
            json!({"type": "keypress", "keys": ["a;b"]}),
            json!({"type": "type", "text": ""}),
            json!({"type": "launch_missiles"}),
        ] {
            assert!(command_of(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_models_words_are_its_message_texts() {
        let answer = json!({"output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "Done."}]},
        ]});
        assert_eq!(words_of(&answer), "Done.");
    }
}
