//! A job's report: the devices that did not succeed, grouped by their last error, and the
//! readings summary of a data-retrieval job.
//!
//! Owns composing the report from the job views ([`crate::jobs`]) and the readings
//! ([`crate::readings`]). It never writes.

use shared::redis_conn::RedisConn;
use std::collections::BTreeMap;

use serde::Serialize;
use shared::{state::ExecutionState, store::StoreError, topology::Names};
use uuid::Uuid;

use crate::{
    jobs::{self, DeviceEntry, JobView},
    readings,
};

/// The failure report of a job.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Report {
    /// The job.
    pub job: JobView,
    /// Devices that did not succeed (FAILED, REJECTED, TIMED_OUT, UNHEALTHY, ROLLED_BACK),
    /// with their last error. Per-wave counters are in the job view's `rollout.waves`.
    pub failures: Vec<DeviceEntry>,
    /// How many devices failed with each error.
    pub errors: BTreeMap<String, u64>,
    /// Whether `failures` was cut at the limit.
    pub truncated: bool,
    /// Data-retrieval jobs: per-metric statistics of the readings of devices that succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readings: Option<BTreeMap<String, readings::MetricSummary>>,
}

/// Builds the failure report, listing at most `limit` devices.
///
/// # Errors
/// Redis errors.
pub async fn build(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
    limit: usize,
) -> Result<Option<Report>, StoreError> {
    let Some(job) = jobs::get(redis, names, id).await? else {
        return Ok(None);
    };
    let mut failures = Vec::new();
    let mut errors = BTreeMap::new();
    let mut truncated = false;
    for state in [
        ExecutionState::Failed,
        ExecutionState::Rejected,
        ExecutionState::TimedOut,
        ExecutionState::Unhealthy,
        ExecutionState::RolledBack,
    ] {
        let mut cursor: Option<String> = None;
        loop {
            let page = jobs::devices(
                redis,
                names,
                id,
                Some(state),
                cursor.as_deref().and_then(|c| c.parse().ok()),
                1000,
            )
            .await?;
            for e in page.devices {
                *errors
                    .entry(
                        e.status
                            .error
                            .clone()
                            .unwrap_or_else(|| "(no error given)".into()),
                    )
                    .or_insert(0) += 1;
                if failures.len() < limit {
                    failures.push(e);
                } else {
                    truncated = true;
                }
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    failures.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let readings = readings::summary(redis, names, id).await?;
    Ok(Some(Report {
        job,
        failures,
        errors,
        truncated,
        readings,
    }))
}
