//! Spells (`/spells`): list, read, define, delete and run.

use kiln_api::spell::{Spell, SpellRun, SpellRunRequest};
use reqwest::Method;

use crate::{percent_encode, Client, ClientError};

impl Client {
    /// Every spell the caller's team can run: Kiln's own, the data directory's, its own.
    pub async fn list_spells(&self) -> Result<Vec<Spell>, ClientError> {
        Self::json(self.call(Method::GET, "/spells", None).await?).await
    }

    pub async fn get_spell(&self, name: &str) -> Result<Spell, ClientError> {
        let path = format!("/spells/{}", percent_encode(name));
        Self::json(self.call(Method::GET, &path, None).await?).await
    }

    /// Define (or replace) one of the team's own spells.
    pub async fn put_spell(&self, spell: &Spell) -> Result<Spell, ClientError> {
        let path = format!("/spells/{}", percent_encode(&spell.name));
        let body = serde_json::to_value(spell).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Self::json(self.call(Method::PUT, &path, Some(body)).await?).await
    }

    pub async fn delete_spell(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/spells/{}", percent_encode(name));
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    /// Run a spell to its end: a fresh sandbox, the code, its output, the sandbox gone.
    pub async fn run_spell(
        &self,
        name: &str,
        req: &SpellRunRequest,
    ) -> Result<SpellRun, ClientError> {
        let path = format!("/spells/{}/runs", percent_encode(name));
        let body = serde_json::to_value(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Self::json(self.call(Method::POST, &path, Some(body)).await?).await
    }
}
