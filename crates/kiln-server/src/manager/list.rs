//! `GET /v2/sandboxes`: filters (state, metadata) and token pagination.

use std::collections::BTreeMap;

use kiln_api::SandboxDetail;
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::SandboxError;
use crate::store::SandboxRecord;

const MAX_LIMIT: usize = 100;

/// Query parameters of `GET /v2/sandboxes` (and `GET /sandboxes`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    pub state: Option<String>,
    pub metadata: Option<String>,
    pub limit: Option<usize>,
    pub next_token: Option<String>,
    /// `asc` (oldest first) or `desc` (newest first, the default), by start time.
    pub order: Option<String>,
    /// Only sandboxes started after this instant (RFC 3339; without an offset: UTC).
    pub started_after: Option<String>,
    /// Only sandboxes of this template (a name, with or without `:tag`).
    pub template: Option<String>,
}

pub struct Page {
    pub items: Vec<SandboxDetail>,
    pub next_token: Option<String>,
}

fn decode(s: &str) -> Result<String, SandboxError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| SandboxError::BadQuery(format!("metadata filter {s:?} is not valid UTF-8")))
}

/// The SDK quotes each key and value, joins them as `k=v&k2=v2`, and the HTTP layer
/// encodes that once more; after ordinary query decoding one level of escaping is
/// left on the whole string and one on each key and value (spec §2.5).
pub fn parse_metadata_filter(raw: &str) -> Result<BTreeMap<String, String>, SandboxError> {
    let once = decode(raw)?;
    let mut out = BTreeMap::new();
    for pair in once.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            SandboxError::BadQuery(format!(
                "metadata filter {pair:?} is not of the form key=value"
            ))
        })?;
        out.insert(decode(k)?, decode(v)?);
    }
    Ok(out)
}

/// The position of a record in a listing: by start time (`descending`: newest first),
/// ties broken by id so pages are stable.
fn sort_key(r: &SandboxRecord, descending: bool) -> (i64, String) {
    let t = r.started_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
    (if descending { -t } else { t }, r.id.clone())
}

fn encode_token(key: &(i64, String)) -> String {
    hex::encode(format!("{}:{}", key.0, key.1))
}

fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, SandboxError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|t| t.and_utc())
        .map_err(|_| {
            SandboxError::BadQuery(format!(
                "startedAfter {s:?} is not a date and time (RFC 3339, e.g. 2026-12-07T06:00:00Z)"
            ))
        })
}

fn decode_token(token: &str) -> Result<(i64, String), SandboxError> {
    let bad = || SandboxError::BadQuery(format!("invalid nextToken {token:?}"));
    let raw = String::from_utf8(hex::decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (t, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((t.parse().map_err(|_| bad())?, id.to_string()))
}

pub(super) fn page(mut all: Vec<SandboxRecord>, q: &ListQuery) -> Result<Page, SandboxError> {
    let states: Vec<&str> = q
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for s in &states {
        if *s != "running" && *s != "paused" {
            return Err(SandboxError::BadQuery(format!(
                "unknown state {s:?}: allowed states are running, paused"
            )));
        }
    }
    let metadata = q
        .metadata
        .as_deref()
        .map(parse_metadata_filter)
        .transpose()?;
    let limit = q.limit.unwrap_or(MAX_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(SandboxError::BadQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    let after = q.next_token.as_deref().map(decode_token).transpose()?;
    let descending = match q.order.as_deref().map(str::trim) {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(SandboxError::BadQuery(format!(
                "unknown order {other:?}: use asc or desc"
            )))
        }
    };
    let started_after = q.started_after.as_deref().map(parse_instant).transpose()?;
    let template = q
        .template
        .as_deref()
        .map(|t| t.split_once(':').map_or(t, |(name, _)| name));

    all.retain(|r| {
        (states.is_empty() || states.contains(&r.state.as_str()))
            && metadata
                .as_ref()
                .is_none_or(|m| m.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
            && started_after.is_none_or(|t| r.started_at >= t)
            && template.is_none_or(|t| r.template_id == t)
    });
    all.sort_by_key(|r| sort_key(r, descending));
    if let Some(after) = after {
        all.retain(|r| sort_key(r, descending) > after);
    }
    let next_token =
        (all.len() > limit).then(|| encode_token(&sort_key(&all[limit - 1], descending)));
    all.truncate(limit);
    Ok(Page {
        items: all.iter().map(super::detail_of).collect(),
        next_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RecordState;
    use chrono::{Duration, Utc};

    fn rec(id: &str, age_s: i64, md: &[(&str, &str)]) -> SandboxRecord {
        let now = Utc::now();
        SandboxRecord {
            id: id.into(),
            template_id: "base".into(),
            state: RecordState::Running,
            runtime: "jail".into(),
            started_at: now - Duration::seconds(age_s),
            end_at: now + Duration::seconds(60),
            cpu_count: 1,
            memory_mb: 1,
            disk_size_mb: 1,
            allow_internet_access: true,
            access_token: None,
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            owner_key_id: 1,
            team_id: 1,
            auto_pause: false,
            network: None,
            traffic_token: None,
            auto_resume: false,
            timeout_secs: 300,
        }
    }

    #[test]
    fn metadata_filter_is_double_decoded() {
        // What arrives for {"a b": "c&d", "k": "v"} after ordinary query decoding.
        let m = parse_metadata_filter("a%2520b%3Dc%2526d%26k%3Dv").unwrap();
        assert_eq!(m.get("a b").map(String::as_str), Some("c&d"));
        assert_eq!(m.get("k").map(String::as_str), Some("v"));
        assert!(parse_metadata_filter("novalue").is_err());
    }

    #[test]
    fn pages_follow_tokens_without_overlap() {
        let all: Vec<_> = (0..5).map(|i| rec(&format!("s{i}"), i, &[])).collect();
        let mut q = ListQuery {
            limit: Some(2),
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let p = page(all.clone(), &q).unwrap();
            seen.extend(p.items.iter().map(|d| d.sandbox_id.clone()));
            match p.next_token {
                Some(t) => q.next_token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4"]);
    }

    #[test]
    fn order_start_time_and_template_filter_and_page() {
        let mut all: Vec<_> = (0..5).map(|i| rec(&format!("s{i}"), i * 10, &[])).collect();
        all[1].template_id = "other".into();
        let ids = |q: &ListQuery| -> Vec<String> {
            let mut q = ListQuery {
                limit: Some(2),
                order: q.order.clone(),
                started_after: q.started_after.clone(),
                template: q.template.clone(),
                ..Default::default()
            };
            let mut seen = Vec::new();
            loop {
                let p = page(all.clone(), &q).unwrap();
                seen.extend(p.items.iter().map(|d| d.sandbox_id.clone()));
                match p.next_token {
                    Some(t) => q.next_token = Some(t),
                    None => return seen,
                }
            }
        };
        let asc = ListQuery {
            order: Some("asc".into()),
            ..Default::default()
        };
        assert_eq!(ids(&asc), ["s4", "s3", "s2", "s1", "s0"]);
        // Started in the last 25 s: s0 (now), s1 (10 s ago), s2 (20 s ago).
        let recent = ListQuery {
            started_after: Some((Utc::now() - Duration::seconds(25)).to_rfc3339()),
            ..Default::default()
        };
        assert_eq!(ids(&recent), ["s0", "s1", "s2"]);
        let naive = ListQuery {
            started_after: Some(
                (Utc::now() - Duration::seconds(25))
                    .naive_utc()
                    .format("%Y-%m-%dT%H:%M:%S%.f")
                    .to_string(),
            ),
            ..Default::default()
        };
        assert_eq!(ids(&naive), ["s0", "s1", "s2"]);
        let other = ListQuery {
            template: Some("other:default".into()),
            ..Default::default()
        };
        assert_eq!(ids(&other), ["s1"]);
        for bad in [
            ListQuery {
                order: Some("sideways".into()),
                ..Default::default()
            },
            ListQuery {
                started_after: Some("yesterday".into()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                page(all.clone(), &bad),
                Err(SandboxError::BadQuery(_))
            ));
        }
    }

    #[test]
    fn filters_by_metadata_and_state() {
        let all = vec![rec("a", 1, &[("team", "x")]), rec("b", 2, &[("team", "y")])];
        let q = ListQuery {
            metadata: Some("team%3Dx".into()),
            ..Default::default()
        };
        let p = page(all.clone(), &q).unwrap();
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.items[0].sandbox_id, "a");
        let paused = ListQuery {
            state: Some("paused".into()),
            ..Default::default()
        };
        assert!(page(all.clone(), &paused).unwrap().items.is_empty());
        let bad = ListQuery {
            state: Some("zombie".into()),
            ..Default::default()
        };
        assert!(page(all.clone(), &bad).is_err());
        let bad_limit = ListQuery {
            limit: Some(0),
            ..Default::default()
        };
        assert!(page(all, &bad_limit).is_err());
    }
}
