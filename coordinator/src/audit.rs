//! The audit log: one entry per state-changing API call (refused ones included) and per job
//! lifecycle change, in an append-only Redis stream trimmed by age.
//!
//! Owns the entry format, appending (with trimming to `coordinator.audit.retention_days`) and
//! reading pages newest first with filters. Nothing here edits or deletes an entry; only age
//! trims the log. It never decides whether a call is allowed.

use shared::redis_conn::RedisConn;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use shared::{now_ms, store::StoreError, topology::Names};

/// One entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Entry {
    /// Its id in the log (the stream id: time-ordered); the cursor of pages.
    #[serde(default)]
    pub id: String,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Who: the token's name, `bootstrap-admin`, `anonymous`, or `coordinator` for job
    /// lifecycle events.
    pub actor: String,
    /// The caller's role (empty when unauthenticated).
    #[serde(default)]
    pub role: String,
    /// What: `POST /v1/jobs`, or `job.<STATE>` for lifecycle events.
    pub action: String,
    /// The path called.
    #[serde(default)]
    pub path: String,
    /// The job concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The HTTP status answered (0 for lifecycle events).
    #[serde(default)]
    pub status: u16,
    /// `ok`, `refused` (4xx) or `error` (5xx).
    pub outcome: String,
    /// The caller's address.
    #[serde(default)]
    pub remote: String,
    /// The request id (`x-request-id`).
    #[serde(default)]
    pub request_id: String,
    /// What the call did or why it was refused (e.g. the job's target summary).
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// The outcome word for an HTTP status.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=399 => "ok",
        400..=499 => "refused",
        _ => "error",
    }
}

/// Filters of a page.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this job.
    pub job_id: Option<String>,
    /// Only this outcome (`ok`, `refused`, `error`).
    pub outcome: Option<String>,
    /// Only actions starting with this (e.g. `POST /v1/jobs`, `job.`).
    pub action: Option<String>,
    /// Entries before this id (the previous page's `next_cursor`).
    pub cursor: Option<String>,
    /// Entries at most.
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, e: &Entry) -> bool {
        self.actor.as_ref().is_none_or(|a| &e.actor == a)
            && self
                .job_id
                .as_ref()
                .is_none_or(|j| e.job_id.as_ref() == Some(j))
            && self.outcome.as_ref().is_none_or(|o| &e.outcome == o)
            && self
                .action
                .as_ref()
                .is_none_or(|a| e.action.starts_with(a.as_str()))
    }
}

/// A page of entries, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page {
    /// The entries.
    pub entries: Vec<Entry>,
    /// Pass as `cursor` for the next (older) page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Appends an entry, trimming entries older than `retention_days`.
///
/// # Errors
/// Redis errors.
pub async fn append(
    redis: &mut RedisConn,
    names: &Names,
    retention_days: u32,
    entry: &Entry,
) -> Result<(), StoreError> {
    // Invariant: an entry of strings, numbers and JSON always serialises.
    let json = serde_json::to_string(entry).unwrap_or_default();
    let min_id = now_ms().saturating_sub(u64::from(retention_days) * 86_400_000);
    let _: String = redis::cmd("XADD")
        .arg(names.audit())
        .arg("MINID")
        .arg("~")
        .arg(min_id)
        .arg("*")
        .arg("e")
        .arg(json)
        .query_async(redis)
        .await?;
    Ok(())
}

/// Largest page.
pub const MAX_PAGE: usize = 1000;

/// A page of entries matching `filter`, newest first. Scans at most 10,000 entries per call
/// (a sparse filter may return a short page with a cursor to go on from).
///
/// # Errors
/// A bad cursor (`Ok(Err)`), Redis errors, a corrupt entry.
pub async fn page(
    redis: &mut RedisConn,
    names: &Names,
    filter: &Filter,
) -> Result<Result<Page, String>, StoreError> {
    let limit = filter.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let mut end = match filter.cursor.as_deref() {
        None | Some("") => "+".to_owned(),
        Some(c) => match parse_stream_id(c) {
            Some((ms, seq)) => match seq.checked_sub(1) {
                Some(s) => format!("{ms}-{s}"),
                None if ms > 0 => format!("{}-{}", ms - 1, u64::MAX),
                None => {
                    return Ok(Ok(Page {
                        entries: vec![],
                        next_cursor: None,
                    }));
                }
            },
            None => return Ok(Err(format!("{c:?} is not an audit cursor"))),
        },
    };
    let mut entries = Vec::new();
    let mut scanned = 0;
    loop {
        let batch: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(names.audit())
            .arg(&end)
            .arg("-")
            .arg("COUNT")
            .arg(500)
            .query_async(redis)
            .await?;
        let Some((last, _)) = batch.last().cloned() else {
            return Ok(Ok(Page {
                entries,
                next_cursor: None,
            }));
        };
        for (id, fields) in batch {
            scanned += 1;
            let raw = fields.get("e").map_or("{}", String::as_str);
            let mut e: Entry = serde_json::from_str(raw).map_err(|err| StoreError::Corrupt {
                key: format!("{} {id}", names.audit()),
                problem: err.to_string(),
            })?;
            e.id = id.clone();
            if filter.matches(&e) {
                entries.push(e);
                if entries.len() == limit {
                    return Ok(Ok(Page {
                        entries,
                        next_cursor: Some(id),
                    }));
                }
            }
        }
        if scanned >= 10_000 {
            return Ok(Ok(Page {
                entries,
                next_cursor: Some(last),
            }));
        }
        match parse_stream_id(&last) {
            Some((ms, 0)) if ms > 0 => end = format!("{}-{}", ms - 1, u64::MAX),
            Some((ms, seq)) if seq > 0 => end = format!("{ms}-{}", seq - 1),
            _ => {
                return Ok(Ok(Page {
                    entries,
                    next_cursor: None,
                }));
            }
        }
    }
}

fn parse_stream_id(s: &str) -> Option<(u64, u64)> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Appends a job lifecycle entry (best effort: a Redis failure is logged, not raised, as the
/// change itself is already recorded on the job).
pub async fn job_event(
    redis: &mut RedisConn,
    names: &Names,
    retention_days: u32,
    job_id: uuid::Uuid,
    state: &str,
    detail: serde_json::Value,
) {
    let entry = Entry {
        at_ms: now_ms(),
        actor: "coordinator".into(),
        action: format!("job.{state}"),
        job_id: Some(job_id.to_string()),
        outcome: "ok".into(),
        detail,
        ..Default::default()
    };
    if let Err(e) = append(redis, names, retention_days, &entry).await {
        tracing::warn!(%job_id, error.message = %e, "audit entry for a job state change not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_on_every_given_field() {
        let e = Entry {
            actor: "ci".into(),
            action: "POST /v1/jobs".into(),
            job_id: Some("j1".into()),
            outcome: "ok".into(),
            ..Default::default()
        };
        assert!(Filter::default().matches(&e));
        let f = Filter {
            actor: Some("ci".into()),
            action: Some("POST".into()),
            job_id: Some("j1".into()),
            outcome: Some("ok".into()),
            ..Default::default()
        };
        assert!(f.matches(&e));
        for f in [
            Filter {
                actor: Some("other".into()),
                ..Default::default()
            },
            Filter {
                job_id: Some("j2".into()),
                ..Default::default()
            },
            Filter {
                outcome: Some("refused".into()),
                ..Default::default()
            },
            Filter {
                action: Some("GET".into()),
                ..Default::default()
            },
        ] {
            assert!(!f.matches(&e), "{f:?}");
        }
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(outcome(201), "ok");
        assert_eq!(outcome(403), "refused");
        assert_eq!(outcome(503), "error");
    }

    #[test]
    fn stream_ids_parse_and_anything_else_does_not() {
        assert_eq!(parse_stream_id("17-3"), Some((17, 3)));
        assert_eq!(parse_stream_id("x"), None);
        assert_eq!(parse_stream_id("1-x"), None);
    }
}
