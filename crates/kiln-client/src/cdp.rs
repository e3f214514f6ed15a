//! A DevTools (CDP) client for a sandbox's browser, through Kiln's CDP route: the
//! port the sandbox's template declares (`cdp_port`), reached with the routing headers
//! and this client's API key, which the route wants. One page target per client.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kiln_api::{API_KEY_HEADER, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{checked, Client, ClientError};

/// How long one DevTools call may take (a navigation waits for its load separately).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A DevTools session on one page of a sandbox's browser.
pub struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

fn protocol(what: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(format!("DevTools: {what}"))
}

impl Client {
    /// A DevTools session on a page of the browser listening on `port` in sandbox
    /// `id`: its first page, or a new blank one.
    pub async fn devtools_page(&self, id: &str, port: u16) -> Result<Cdp, ClientError> {
        let targets: Vec<Value> = self.devtools_json(id, port, "GET", "/json/list").await?;
        let page = match targets.into_iter().find(|t| t["type"] == "page") {
            Some(t) => t,
            None => {
                self.devtools_json(id, port, "PUT", "/json/new?about:blank")
                    .await?
            }
        };
        let url = page["webSocketDebuggerUrl"]
            .as_str()
            .ok_or_else(|| protocol("the page target has no webSocketDebuggerUrl"))?;
        if !url.starts_with("ws://") {
            return Err(ClientError::Invalid(format!(
                "DevTools answered {url}: this client speaks plain ws:// only; give it Kiln's \
                 API listener (http://...), not the TLS sandbox hosts"
            )));
        }
        let mut req = url
            .into_client_request()
            .map_err(|e| protocol(format!("bad WebSocket URL {url}: {e}")))?;
        for (name, value) in [
            (SANDBOX_ID_HEADER, id.to_string()),
            (SANDBOX_PORT_HEADER, port.to_string()),
            (API_KEY_HEADER, self.api_key.clone()),
        ] {
            let value = value
                .parse()
                .map_err(|_| ClientError::Invalid(format!("{name} cannot carry {value:?}")))?;
            req.headers_mut().insert(name, value);
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| protocol(format!("connecting to {url}: {e}")))?;
        Ok(Cdp { ws, next_id: 1 })
    }

    async fn devtools_json<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| ClientError::Invalid(format!("bad method {method}")))?;
        let resp = self
            .http
            .request(method, &url)
            .header(API_KEY_HEADER, &self.api_key)
            .header(SANDBOX_ID_HEADER, id)
            .header(SANDBOX_PORT_HEADER, port.to_string())
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        checked(resp)
            .await?
            .json()
            .await
            .map_err(|e| protocol(format!("{path}: {e}")))
    }
}

impl Cdp {
    /// Calls `method` with `params` and returns its `result`; events in between are
    /// skipped.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .map_err(|e| protocol(format!("sending {method}: {e}")))?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(msg) = self.ws.next().await {
                let text = match msg.map_err(|e| protocol(format!("{method}: {e}")))? {
                    Message::Text(t) => t,
                    Message::Close(_) => break,
                    _ => continue,
                };
                let v: Value = serde_json::from_str(&text).map_err(protocol)?;
                if v["id"].as_u64() == Some(id) {
                    return Ok(v);
                }
            }
            Err(protocol(format!(
                "the browser closed the session during {method}"
            )))
        })
        .await
        .map_err(|_| protocol(format!("{method} got no answer within {CALL_TIMEOUT:?}")))??;
        if let Some(err) = answer.get("error") {
            return Err(protocol(format!(
                "{method}: {}",
                err["message"].as_str().unwrap_or("failed")
            )));
        }
        Ok(answer["result"].clone())
    }

    /// The value of a JavaScript expression in the page (awaited if a promise).
    pub async fn evaluate(&mut self, expression: &str) -> Result<Value, ClientError> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(ex) = result.get("exceptionDetails") {
            return Err(protocol(format!(
                "the page's script failed: {}",
                ex["exception"]["description"]
                    .as_str()
                    .or(ex["text"].as_str())
                    .unwrap_or("an exception")
            )));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Opens `url` and waits (up to `wait`) until the document has loaded. A page that
    /// cannot be loaded (no server, a bad name) is an error naming Chromium's reason.
    pub async fn navigate(&mut self, url: &str, wait: Duration) -> Result<(), ClientError> {
        let nav = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            return Err(ClientError::Invalid(format!("{url} did not load: {err}")));
        }
        let end = tokio::time::Instant::now() + wait;
        loop {
            if self.evaluate("document.readyState").await? == "complete" {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                return Err(ClientError::Invalid(format!(
                    "{url} did not finish loading within {wait:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG of what the page shows.
    pub async fn screenshot(&mut self) -> Result<Vec<u8>, ClientError> {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| protocol("Page.captureScreenshot answered no data"))?;
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| protocol(format!("the screenshot is not base64: {e}")))
    }
}
