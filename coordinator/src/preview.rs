//! Dry runs: what a job would do, before it exists.
//!
//! Owns the blast-radius report of a validated spec: every target decided exactly as the
//! planner will decide it (the same [`crate::split::Targets`], streamed a batch at a time),
//! counted as sent or skipped (by reason), broken down by group, model and hardware revision,
//! with the time publishing would take at the job's rate. It never stores or publishes
//! anything.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;
use serde::Serialize;
use shared::{job::JobSpec, store::StoreError, topology::Names};

use crate::split::{Decision, Targets};

/// Distinct values kept per breakdown; the rest are counted under `(other)`.
const MAX_BREAKDOWN: usize = 500;
/// Devices read per registry batch.
const BATCH: usize = 1000;

/// What a job would do.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Preview {
    /// Always true: nothing was created.
    pub dry_run: bool,
    /// Devices the job would target (sent and skipped), as the job's `targeted` would say.
    pub targeted: u64,
    /// Devices a task would be published for.
    pub to_send: u64,
    /// Devices that would end SKIPPED.
    pub skipped: u64,
    /// SKIPPED devices by reason.
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Devices to send, by group (a device in two groups counts in both).
    pub by_group: BTreeMap<String, u64>,
    /// Devices to send, by model.
    pub by_model: BTreeMap<String, u64>,
    /// Devices to send, by hardware revision.
    pub by_hardware_revision: BTreeMap<String, u64>,
    /// The publishing rate in devices per second (`None`: as fast as workers take them).
    pub max_per_second: Option<u32>,
    /// Seconds publishing every task would take at that rate (`None` without a rate).
    pub publish_secs: Option<f64>,
}

/// The dry run of `spec`; `default_rate` is the deployment's rate for jobs that set none
/// (0: none).
///
/// # Errors
/// Redis errors.
pub async fn preview(
    redis: &mut ConnectionManager,
    names: &Names,
    spec: &JobSpec,
    default_rate: u32,
) -> Result<Preview, StoreError> {
    // Targets taken from an earlier job are read from a snapshot, as the job would; a dry
    // run's snapshot is its own and short-lived.
    let scratch = uuid::Uuid::now_v7();
    let snapshot = names.job_targets(scratch);
    if let Some(from) = &spec.target.from_job {
        match crate::intake::snapshot_targets(redis, names, from, &snapshot).await {
            Ok(_) => {
                let () = redis::AsyncCommands::expire(redis, &snapshot, 600).await?;
            }
            Err(crate::intake::IntakeError::Store(e)) => return Err(e),
            Err(_) => {} // nothing to copy: no targets from that job
        }
    }
    let result = count_targets(redis, names, &Targets::new(names, scratch, spec, BATCH)).await;
    if spec.target.from_job.is_some() {
        let () = redis::AsyncCommands::del(redis, &snapshot).await?;
    }
    let mut p = result?;
    let rate = spec
        .rollout
        .max_per_second
        .or((default_rate > 0).then_some(default_rate));
    p.max_per_second = rate;
    p.publish_secs = rate.map(|r| p.to_send as f64 / f64::from(r.max(1)));
    Ok(p)
}

/// Every target decided, counted and broken down.
async fn count_targets(
    redis: &mut ConnectionManager,
    names: &Names,
    targets: &Targets,
) -> Result<Preview, StoreError> {
    let mut p = Preview {
        dry_run: true,
        ..Default::default()
    };
    let mut cursor: Option<String> = None;
    loop {
        let (decided, next) = targets
            .next_devices(redis, names, cursor.as_deref())
            .await?;
        for (decision, device) in decided {
            p.targeted += 1;
            match decision {
                Decision::Skip { reason, .. } => {
                    p.skipped += 1;
                    count(&mut p.skipped_by_reason, reason);
                }
                Decision::Send(_) => {
                    p.to_send += 1;
                    if let Some(d) = device {
                        for g in d.groups {
                            count(&mut p.by_group, g);
                        }
                        count(&mut p.by_model, d.model);
                        count(&mut p.by_hardware_revision, d.hardware_revision);
                    }
                }
            }
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(p)
}

fn count(map: &mut BTreeMap<String, u64>, key: String) {
    if map.len() >= MAX_BREAKDOWN && !map.contains_key(&key) {
        *map.entry("(other)".to_owned()).or_default() += 1;
    } else {
        *map.entry(key).or_default() += 1;
    }
}
