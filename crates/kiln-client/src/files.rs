//! A sandbox's files through the proxy, the way the E2B SDK reaches them: envd's
//! `GET|POST /files` for contents and `filesystem.Filesystem/ListDir` for listings.

use base64::Engine;
use kiln_proto::connect;
use kiln_proto::filesystem::{EntryInfo, ListDirRequest, ListDirResponse};
use reqwest::{Method, RequestBuilder};

use crate::{percent_encode, Client, ClientError};

impl Client {
    /// A request to envd in sandbox `id`, acting as `user` (default: the template's).
    fn envd(
        &self,
        method: Method,
        path_and_query: &str,
        id: &str,
        access_token: Option<&str>,
        user: Option<&str>,
    ) -> (String, RequestBuilder) {
        let url = format!("{}{path_and_query}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header(kiln_api::SANDBOX_ID_HEADER, id)
            .header(
                kiln_api::SANDBOX_PORT_HEADER,
                kiln_api::ENVD_PORT.to_string(),
            );
        if let Some(token) = access_token {
            req = req.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
        }
        if let Some(user) = user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            req = req.header("authorization", format!("Basic {basic}"));
        }
        (url, req)
    }

    async fn send_envd(url: String, req: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        crate::checked(resp).await
    }

    /// The contents of file `path` in sandbox `id`, refusing files larger than `max`
    /// bytes.
    pub async fn read_file(
        &self,
        id: &str,
        access_token: Option<&str>,
        path: &str,
        user: Option<&str>,
        max: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let q = format!("/files?path={}", percent_encode(path));
        let (url, req) = self.envd(Method::GET, &q, id, access_token, user);
        let mut resp = Self::send_envd(url, req).await?;
        let mut out = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ClientError::Protocol(format!("reading {path}: {e}")))?
        {
            if out.len() + chunk.len() > max {
                return Err(ClientError::Invalid(format!(
                    "{path} is larger than {max} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Writes `data` to `path` in sandbox `id` (parent directories are made), owned by
    /// `user`.
    pub async fn write_file(
        &self,
        id: &str,
        access_token: Option<&str>,
        path: &str,
        data: Vec<u8>,
        user: Option<&str>,
    ) -> Result<(), ClientError> {
        let q = format!("/files?path={}", percent_encode(path));
        let (url, req) = self.envd(Method::POST, &q, id, access_token, user);
        let req = req
            .header("content-type", "application/octet-stream")
            .body(data);
        Self::send_envd(url, req).await.map(drop)
    }

    /// The entries of directory `path` in sandbox `id`, `depth` levels down (1: its
    /// own entries).
    pub async fn list_dir(
        &self,
        id: &str,
        access_token: Option<&str>,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<EntryInfo>, ClientError> {
        let body = ListDirRequest {
            path: path.to_string(),
            depth,
        };
        let (url, req) = self.envd(
            Method::POST,
            "/filesystem.Filesystem/ListDir",
            id,
            access_token,
            user,
        );
        let req = req
            .header("content-type", connect::CONTENT_TYPE_UNARY)
            .header(connect::HEADER_PROTOCOL_VERSION, "1")
            .json(&body);
        let resp = Self::send_envd(url, req).await?;
        let list: ListDirResponse = resp
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(list.entries)
    }
}
