//! Dry runs: what a job would do, before it exists.
//!
//! Owns the blast-radius report of a validated spec: every target decided exactly as the
//! planner will decide it (the same [`crate::split::Targets`], streamed a batch at a time),
//! counted as sent or skipped (by reason), broken down by group, model and hardware revision,
//! the size of each wave, and the time publishing would take at the job's rate, ramp and
//! spread. It never stores or publishes anything.

use shared::redis_conn::RedisConn;
use std::collections::BTreeMap;

use serde::Serialize;
use shared::{job::JobSpec, store::StoreError, topology::Names};

use crate::split::{Decision, Targets};

/// Distinct values kept per breakdown; the rest are counted under `(other)`.
const MAX_BREAKDOWN: usize = 500;
/// Devices read per registry batch.
const BATCH: usize = 1000;

/// What a job would do.
#[derive(Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
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
    /// Seconds publishing every task would take at that rate, following the ramp and each
    /// wave's spread (`None` without a rate or spread).
    pub publish_secs: Option<f64>,
    /// The waves and their sizes (a selector wave holds at most the devices it matches).
    pub waves: Vec<WavePreview>,
    /// Seconds the waves' soaks add (gates also wait for the devices, which no dry run
    /// can know).
    pub soak_secs: u64,
}

/// One wave of a dry run.
#[derive(Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct WavePreview {
    /// Its name.
    pub name: String,
    /// Devices it would take.
    pub size: u64,
}

/// The dry run of `spec`; `default_rate` is the deployment's rate for jobs that set none
/// (0: none).
///
/// # Errors
/// Redis errors.
pub async fn preview(
    redis: &mut RedisConn,
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
    let result = count_targets(
        redis,
        names,
        &Targets::new(names, scratch, spec, BATCH),
        &spec.rollout.waves,
    )
    .await;
    if spec.target.from_job.is_some() {
        let () = redis::AsyncCommands::del(redis, &snapshot).await?;
    }
    let (mut p, matches) = result?;
    let rollout = &spec.rollout;
    p.max_per_second = rollout
        .max_per_second
        .or((default_rate > 0).then_some(default_rate));
    let sizes: Vec<u64> = if rollout.waves.is_empty() {
        vec![p.to_send]
    } else {
        let planned = shared::rollout::wave_sizes(&rollout.waves, p.to_send);
        let mut left = p.to_send;
        let mut sizes = Vec::with_capacity(planned.len());
        for (i, (w, want)) in rollout.waves.iter().zip(planned).enumerate() {
            let size = if i + 1 == rollout.waves.len() {
                left
            } else if w.selector.is_some() {
                want.min(matches[i]).min(left)
            } else {
                want.min(left)
            };
            left -= size;
            sizes.push(size);
            p.waves.push(WavePreview {
                name: w.label(i),
                size,
            });
        }
        p.soak_secs = rollout
            .waves
            .iter()
            .take(rollout.waves.len().saturating_sub(1))
            .map(|w| w.soak_secs)
            .sum();
        sizes
    };
    p.publish_secs = publish_secs(spec, default_rate, &sizes);
    Ok(p)
}

/// Seconds publishing `sizes` (one entry per wave) would take at the spec's rate and ramp,
/// each wave no faster than its spread; `None` when nothing limits the pace.
fn publish_secs(spec: &JobSpec, default_rate: u32, sizes: &[u64]) -> Option<f64> {
    let rollout = &spec.rollout;
    let mut total = 0.0;
    let mut limited = false;
    let mut notified = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        let spread = rollout.waves.get(i).and_then(|w| w.spread_secs);
        let mut secs = 0.0;
        let mut done = 0u64;
        while done < *size {
            let chunk = (*size - done).min(100);
            // A ramp that counts successes is estimated as if every device succeeded.
            if let Some(rate) = rollout.rate(default_rate, notified, notified) {
                secs += chunk as f64 / rate;
                limited = true;
            }
            done += chunk;
            notified += chunk;
        }
        if let Some(s) = spread {
            secs = secs.max(s as f64);
            limited = true;
        }
        total += secs;
    }
    limited.then_some(total)
}

/// Every target decided, counted and broken down; with the count of devices to send that
/// match each wave's selector.
async fn count_targets(
    redis: &mut RedisConn,
    names: &Names,
    targets: &Targets,
    waves: &[shared::rollout::Wave],
) -> Result<(Preview, Vec<u64>), StoreError> {
    let mut p = Preview {
        dry_run: true,
        ..Default::default()
    };
    let mut matches = vec![0u64; waves.len()];
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
                        for (m, w) in matches.iter_mut().zip(waves) {
                            if w.selector.as_ref().is_some_and(|s| s.matches(&d)) {
                                *m += 1;
                            }
                        }
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
    Ok((p, matches))
}

fn count(map: &mut BTreeMap<String, u64>, key: String) {
    if map.len() >= MAX_BREAKDOWN && !map.contains_key(&key) {
        *map.entry("(other)".to_owned()).or_default() += 1;
    } else {
        *map.entry(key).or_default() += 1;
    }
}
