//! The MCP face: an rmcp `ServerHandler` per session whose `tools/list` and
//! `tools/call` are `ops`, and the stdio transport.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::Value;

use crate::ops;
use crate::session::{Lifetime, Session, Shared};
use crate::shape::ToolOutput;

/// The API key of an HTTP request, put in its extensions by the auth layer.
#[derive(Debug, Clone)]
pub struct CallerKey(pub String);

const INSTRUCTIONS: &str = "Kiln runs code in isolated Linux sandboxes. Use run_code to run \
Python (or javascript, typescript, bash) in a stateful code interpreter: variables persist \
between calls. run_command runs shell commands; read_file, write_file and list_files work \
with the sandbox's files; install_package adds pip packages. Without a sandbox_id, every tool \
works in this session's own sandbox, made on first use and killed when the session ends.";

/// Where a session's calls come from, and so which key they act with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The server's own key (`--api-key`).
    Stdio,
    /// The key the authentication layer put in each request (never a fallback).
    Http,
}

/// One MCP session.
#[derive(Clone)]
pub struct KilnMcp {
    session: Arc<Session>,
    transport: Transport,
}

impl KilnMcp {
    pub fn new(shared: Shared, transport: Transport) -> Self {
        KilnMcp {
            session: Arc::new(Session::new(shared, Lifetime::Session)),
            transport,
        }
    }

    fn key(&self, ctx: &RequestContext<RoleServer>) -> Result<String, ErrorData> {
        let key = match self.transport {
            Transport::Stdio => self.session.shared().default_key.clone(),
            Transport::Http => ctx
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.extensions.get::<CallerKey>())
                .map(|k| k.0.clone()),
        };
        let key =
            key.ok_or_else(|| ErrorData::invalid_request("no API key for this request", None))?;
        // The session caches sandboxes' access tokens: another key presenting its
        // session id must not reach them.
        if !self.session.bind(&key) {
            return Err(ErrorData::invalid_request(
                "this MCP session belongs to another API key; start a session of your own",
                None,
            ));
        }
        Ok(key)
    }
}

/// A tool's answer as MCP content: text, then images; structured content beside.
pub fn call_result(out: ToolOutput) -> CallToolResult {
    let mut content = vec![ContentBlock::text(out.text)];
    content.extend(
        out.images
            .into_iter()
            .map(|i| ContentBlock::image(i.data, i.mime)),
    );
    let mut result = if out.is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    result.structured_content = Some(out.structured);
    result
}

impl ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kiln", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    /// The handshake-era versions only: the 2026-07-28 revision drops sessions, and a
    /// session is what keeps a sandbox's state between calls and kills it at the end.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let key = self.key(&ctx)?;
        Ok(ListToolsResult::with_all_items(
            ops::list_tools(&self.session, &key).await,
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let key = self.key(&ctx)?;
        let args = request.arguments.map(Value::Object);
        let result = match ops::call(&self.session, &key, &request.name, args).await {
            Ok(out) => call_result(out),
            Err(e) => {
                tracing::info!(tool = %request.name, error = %e.message(), "tool call failed");
                e.into_call_result()
            }
        };
        Ok(result.into())
    }
}

/// Serves one MCP session on stdin/stdout until EOF (or SIGINT/SIGTERM), then kills
/// the sandboxes it made.
pub async fn serve_stdio(shared: Shared) -> Result<(), std::io::Error> {
    let handler = KilnMcp::new(shared.clone(), Transport::Stdio);
    let session = handler.session.clone();
    let running = handler
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| std::io::Error::other(format!("starting the MCP session: {e}")))?;
    tokio::select! {
        r = running.waiting() => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "the MCP session ended with an error");
            }
        }
        _ = crate::signal::shutdown_signal() => {}
    }
    session.close().await;
    shared.reaper.shutdown().await;
    Ok(())
}
