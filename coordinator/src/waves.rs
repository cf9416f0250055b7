//! The planner of a job with waves.
//!
//! Owns three phases, each checkpointed in the job's record so a coordinator that dies at
//! any point resumes where it stopped:
//! 1. **splitting**: the targets are read in id order (SKIPPED devices recorded at once);
//!    each sendable device goes into a pool scored by a fixed shuffle of the job (its
//!    execution id), and into the candidates of every wave whose selector it matches. Then
//!    each wave takes its size from its candidates (or the pool) in shuffle order, and the
//!    last wave takes the rest. The same job always splits the same way.
//! 2. **publishing** a wave: its devices, in shuffle order, at the job's rate and ramp, or
//!    evenly over the wave's `spread_secs`.
//! 3. **gate**, **soak**, **approval**: wait until the wave's gate passes (enough of its
//!    devices finished, enough of those succeeded), then its soak, then (for
//!    `approval = "manual"`) an operator's approve. A failed gate pauses or aborts the job.
//!
//! No device of a wave is published before every earlier wave's gate passed or was released.
//! Paused, nothing is published; canceled or aborted, the devices not yet published end
//! CANCELED. It never consumes results: gates read the per-wave counters the recording
//! script keeps.

use redis::{AsyncCommands, Script};
use serde_json::json;
use shared::redis_conn::RedisConn;
use shared::{
    now_ms,
    rollout::{Approval, Gate, GateFailure, Wave, wave_sizes},
    state::{ExecutionState, JobState},
    store::{self, JobRecord},
};
use uuid::Uuid;

use crate::{
    planner::{self, Pace, Planners},
    split::{Decision, Targets},
    steer::{Steer, SteerError},
};

/// A device's place in the job's shuffle: 48 bits of its execution id (exact as a score).
pub fn shuffle_score(job_id: Uuid, device: &str) -> f64 {
    (shared::state::execution_id(job_id, device).as_u128() >> 80) as f64
}

// KEYS source, pool, wave, wave-of; ARGV n, wave index. Moves up to n devices that are still
// in the pool from the source (the pool itself, or a wave's candidates) into the wave, in
// shuffle order. Returns how many moved.
const TAKE: &str = r"
local n = tonumber(ARGV[1])
local from_pool = KEYS[1] == KEYS[2]
local taken = 0
while taken < n do
  local batch = redis.call('ZRANGE', KEYS[1], 0, n - taken - 1, 'WITHSCORES')
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local d = batch[i]
    redis.call('ZREM', KEYS[1], d)
    if from_pool or redis.call('ZSCORE', KEYS[2], d) then
      if not from_pool then redis.call('ZREM', KEYS[2], d) end
      redis.call('ZADD', KEYS[3], batch[i + 1], d)
      redis.call('HSET', KEYS[4], d, ARGV[2])
      taken = taken + 1
    end
  end
end
return taken
";

/// Plans `record` (a job with waves) from its checkpoint to the end, or until shutdown.
///
/// # Errors
/// Redis or broker errors.
pub async fn plan(p: &Planners, redis: &mut RedisConn, record: &JobRecord) -> anyhow::Result<()> {
    let job_id = record.id;
    let phase = record.rollout.phase.as_str();
    if (phase.is_empty() || phase == "splitting") && !split(p, redis, record).await? {
        return Ok(());
    }
    let waves = &record.spec.rollout.waves;
    let key = p.names.job(job_id);
    let mut pace = Pace::new();
    loop {
        let (phase, wave, offset): (Option<String>, Option<usize>, Option<usize>) = redis::pipe()
            .hget(&key, "phase")
            .hget(&key, "wave")
            .hget(&key, "offset")
            .query_async(redis)
            .await?;
        let (wave, offset) = (wave.unwrap_or(0), offset.unwrap_or(0));
        let step = match phase.as_deref() {
            Some("publishing") => publish(p, redis, record, wave, offset, &mut pace).await?,
            Some("gate" | "soak" | "approval") => gate(p, redis, record, wave).await?,
            Some("stopping") => {
                cancel_rest(p, redis, job_id, waves.len(), wave, offset).await?;
                Step::Done
            }
            _ => Step::Done,
        };
        match step {
            Step::Stopped => return Ok(()),
            Step::Continue => {}
            Step::Next => {
                let () = redis
                    .hset_multiple(
                        &key,
                        &[
                            ("phase", "publishing".to_owned()),
                            ("wave", (wave + 1).to_string()),
                            ("offset", "0".to_owned()),
                        ],
                    )
                    .await?;
                let name = waves[wave + 1].label(wave + 1);
                tracing::info!(%job_id, wave = wave + 1, %name, "wave started");
                p.notifier
                    .job_wave(job_id, wave + 1, &name, "started", json!({}));
            }
            Step::Stopping { wave, offset } => {
                let () = redis
                    .hset_multiple(
                        &key,
                        &[
                            ("phase", "stopping".to_owned()),
                            ("wave", wave.to_string()),
                            ("offset", offset.to_string()),
                        ],
                    )
                    .await?;
            }
            Step::Done => {
                let planned: u64 = redis.hget(&key, "planned").await.unwrap_or(0);
                let () = redis.hset(&key, "phase", "done").await?;
                planner::planning_done(p, redis, job_id, planned).await?;
                return Ok(());
            }
        }
    }
}

/// What a phase ended with.
enum Step {
    /// Shutdown: the next planner resumes from the checkpoint.
    Stopped,
    /// The next wave may start.
    Next,
    /// Canceled or aborted: devices from `wave` at `offset` on end CANCELED.
    Stopping { wave: usize, offset: usize },
    /// Every wave is out (or canceled).
    Done,
    /// The phase changed: read it again.
    Continue,
}

/// Phase 1. Returns whether the split is complete (false: shutdown).
async fn split(p: &Planners, redis: &mut RedisConn, record: &JobRecord) -> anyhow::Result<bool> {
    let job_id = record.id;
    let key = p.names.job(job_id);
    let waves = &record.spec.rollout.waves;
    let pool = p.names.job_wave_pool(job_id);
    let (cursor, planned, listed): (Option<String>, Option<u64>, Option<String>) = redis::pipe()
        .hset(&key, "phase", "splitting")
        .ignore()
        .hget(&key, "cursor")
        .hget(&key, "planned")
        .hget(&key, "listed")
        .query_async(redis)
        .await?;
    let mut cursor = cursor.filter(|c| !c.is_empty());
    let mut planned = planned.unwrap_or(0);
    let targets = Targets::new(&p.names, job_id, &record.spec, 1_000);
    let mut listed = listed.is_some();
    while !listed {
        if p.shutdown.is_cancelled() {
            return Ok(false);
        }
        planner::renew_lease(p, redis, job_id).await?;
        let state = store::load_job_state(redis, &p.names, job_id)
            .await?
            .unwrap_or(JobState::Canceling);
        let (decided, next) = targets
            .next_devices(redis, &p.names, cursor.as_deref())
            .await?;
        let now = now_ms();
        let mut finals = Vec::new();
        // The pool, the candidates and the checkpoint move together.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (decision, device) in &decided {
            match decision {
                Decision::Send(d) if state.is_stopping() => finals.push((
                    d.as_str(),
                    planner::status(
                        ExecutionState::Canceled,
                        planner::stopped_reason(state),
                        now,
                    ),
                )),
                Decision::Send(d) => {
                    let score = shuffle_score(job_id, d);
                    pipe.zadd(&pool, d, score).ignore();
                    for (i, w) in waves.iter().enumerate() {
                        if let (Some(sel), Some(dev)) = (&w.selector, device)
                            && sel.matches(dev)
                        {
                            pipe.zadd(p.names.job_wave_candidates(job_id, i), d, score)
                                .ignore();
                        }
                    }
                }
                Decision::Skip { device, reason } => finals.push((
                    device.as_str(),
                    planner::status(ExecutionState::Skipped, reason, now),
                )),
            }
        }
        planner::conclude(p, redis, job_id, &finals).await?;
        planned += decided.len() as u64;
        match &next {
            Some(c) => pipe.hset(&key, "cursor", c).ignore(),
            None => pipe.hset(&key, "listed", "1").ignore(),
        };
        pipe.hset(&key, "planned", planned).ignore();
        let () = pipe.query_async(redis).await?;
        listed = next.is_none();
        cursor = next;
    }

    // Wave sizes come from the pool as it was when listing ended.
    let total: u64 = {
        let size: u64 = redis.zcard(&pool).await?;
        let _: bool = redis.hset_nx(&key, "wave_total", size).await?;
        redis.hget(&key, "wave_total").await?
    };
    let sizes = wave_sizes(waves, total);
    let take = Script::new(TAKE);
    for (i, w) in waves.iter().enumerate() {
        let last = i + 1 == waves.len();
        let source = match &w.selector {
            Some(_) if !last => p.names.job_wave_candidates(job_id, i),
            _ => pool.clone(),
        };
        loop {
            planner::renew_lease(p, redis, job_id).await?;
            let have: u64 = redis.zcard(p.names.job_wave(job_id, i)).await?;
            let want = if last { u64::MAX } else { sizes[i] };
            if have >= want {
                break;
            }
            let n = (want - have).min(1_000);
            let taken: u64 = take
                .key(&source)
                .key(&pool)
                .key(p.names.job_wave(job_id, i))
                .key(p.names.job_wave_of(job_id))
                .arg(n)
                .arg(i)
                .invoke_async(redis)
                .await?;
            if taken == 0 {
                break;
            }
        }
    }
    let mut pipe = redis::pipe();
    pipe.atomic().del(&pool).ignore();
    for i in 0..waves.len() {
        pipe.del(p.names.job_wave_candidates(job_id, i)).ignore();
    }
    pipe.hset_multiple(
        &key,
        &[
            ("phase", "publishing".to_owned()),
            ("wave", "0".to_owned()),
            ("offset", "0".to_owned()),
        ],
    )
    .ignore();
    let () = pipe.query_async(redis).await?;
    let name = waves[0].label(0);
    tracing::info!(%job_id, total, ?sizes, "targets split into waves");
    p.notifier.job_wave(
        job_id,
        0,
        &name,
        "started",
        json!({"sizes": sizes, "total": total}),
    );
    Ok(true)
}

/// Phase 2: publishes wave `wave` from `offset`.
async fn publish(
    p: &Planners,
    redis: &mut RedisConn,
    record: &JobRecord,
    wave: usize,
    mut offset: usize,
    pace: &mut Pace,
) -> anyhow::Result<Step> {
    let job_id = record.id;
    let key = p.names.job(job_id);
    let waves = &record.spec.rollout.waves;
    let members = p.names.job_wave(job_id, wave);
    let size: u64 = redis.zcard(&members).await?;
    let mut published: u64 = redis.hget(&key, "published").await.unwrap_or(0);
    let default_rate = p.settings.coordinator.default_max_per_second;
    loop {
        let Some(now) = planner::turn(p, redis, job_id).await? else {
            return Ok(Step::Stopped);
        };
        if let Some(end) = planner::ended(&record.spec) {
            planner::apply_end(p, redis, job_id, now.state, end).await?;
            return Ok(Step::Stopping { wave, offset });
        }
        if now.state.is_stopping() || now.state.is_finished() {
            return Ok(Step::Stopping { wave, offset });
        }
        if now.state == JobState::Paused {
            planner::pause(p, planner::WATCH_EVERY).await;
            continue;
        }
        let mut rate = record.spec.rollout.rate(
            default_rate,
            published,
            now.count(ExecutionState::Succeeded),
        );
        if let Some(spread) = waves[wave].spread_secs {
            let even = (size as f64 / spread as f64).max(0.1);
            rate = Some(rate.map_or(even, |r| r.min(even)));
        }
        let n = Pace::batch(rate, p.settings.coordinator.publish_batch);
        let batch: Vec<String> = redis
            .zrange(&members, offset as isize, (offset + n - 1) as isize)
            .await?;
        if batch.is_empty() {
            return Ok(if wave + 1 == waves.len() {
                Step::Done
            } else {
                let () = redis.hset(&key, "phase", "gate").await?;
                Step::Continue
            });
        }
        let devices: Vec<&str> = batch.iter().map(String::as_str).collect();
        planner::send(p, redis, job_id, planner::lane(record), &devices).await?;
        offset += devices.len();
        published += devices.len() as u64;
        planner::checkpoint(
            p,
            redis,
            job_id,
            &[
                ("offset", offset.to_string()),
                ("published", published.to_string()),
                ("updated_at_ms", now_ms().to_string()),
            ],
        )
        .await?;
        pace.after(p, devices.len(), rate).await;
    }
}

/// Phase 3: waits at wave `wave`'s gate, soak and approval.
async fn gate(
    p: &Planners,
    redis: &mut RedisConn,
    record: &JobRecord,
    wave: usize,
) -> anyhow::Result<Step> {
    let job_id = record.id;
    let key = p.names.job(job_id);
    let spec: &Wave = &record.spec.rollout.waves[wave];
    let name = spec.label(wave);
    let size: u64 = redis.zcard(p.names.job_wave(job_id, wave)).await?;
    loop {
        let Some(now) = planner::turn(p, redis, job_id).await? else {
            return Ok(Step::Stopped);
        };
        if let Some(end) = planner::ended(&record.spec) {
            planner::apply_end(p, redis, job_id, now.state, end).await?;
            return Ok(Step::Stopping {
                wave: wave + 1,
                offset: 0,
            });
        }
        if now.state.is_stopping() || now.state.is_finished() {
            return Ok(Step::Stopping {
                wave: wave + 1,
                offset: 0,
            });
        }
        if now.state == JobState::InProgress
            && now.rollout.released.is_some_and(|r| r >= wave as u64)
        {
            if now.rollout.phase == "gate" {
                p.metrics.gates.with_label_values(&["released"]).inc();
            }
            tracing::info!(%job_id, wave, %name, "wave released by an operator");
            return Ok(Step::Next);
        }
        if now.state == JobState::Paused {
            planner::pause(p, planner::WATCH_EVERY).await;
            continue;
        }
        match now.rollout.phase.as_str() {
            "gate" => {
                let all: std::collections::HashMap<String, u64> =
                    redis.hgetall(p.names.job_wave_counts(job_id)).await?;
                let tally = store::tally_of(&store::wave_counts(&all, wave));
                match spec.gate(wave, size, &tally) {
                    Gate::Waiting => {}
                    Gate::Passed => {
                        p.metrics.gates.with_label_values(&["passed"]).inc();
                        let () = redis
                            .hset_multiple(
                                &key,
                                &[
                                    ("phase", "soak".to_owned()),
                                    ("passed_at_ms", now_ms().to_string()),
                                ],
                            )
                            .await?;
                        tracing::info!(%job_id, wave, %name, ?tally, "wave gate passed");
                        p.notifier.job_wave(
                            job_id,
                            wave,
                            &name,
                            "passed",
                            json!({"size": size, "succeeded": tally.succeeded, "terminal": tally.terminal()}),
                        );
                        continue;
                    }
                    Gate::Failed(reason) => {
                        p.metrics.gates.with_label_values(&["failed"]).inc();
                        p.notifier.job_wave(
                            job_id,
                            wave,
                            &name,
                            "failed",
                            json!({"reason": reason, "size": size, "succeeded": tally.succeeded, "terminal": tally.terminal()}),
                        );
                        match spec.on_failure {
                            GateFailure::Abort => {
                                planner::abort(p, redis, job_id, &reason).await?;
                            }
                            GateFailure::Pause => {
                                match crate::steer::steer(
                                    redis,
                                    Some(&p.publisher),
                                    &p.names,
                                    job_id,
                                    Steer::GateFailed(wave as u64),
                                    &reason,
                                )
                                .await
                                {
                                    Ok(state) => {
                                        tracing::warn!(%job_id, wave, %reason, "job paused by its gate");
                                        p.notifier.job_state_because(
                                            job_id,
                                            state,
                                            json!({}),
                                            Some(&reason),
                                        );
                                    }
                                    Err(SteerError::Refused { .. }) => {}
                                    Err(e) => return Err(e.into()),
                                }
                            }
                        }
                        continue;
                    }
                }
            }
            "soak" => {
                let passed: u64 = redis.hget(&key, "passed_at_ms").await.unwrap_or(0);
                if now_ms() >= passed + spec.soak_secs * 1_000 {
                    if spec.approval == Approval::Auto {
                        return Ok(Step::Next);
                    }
                    let () = redis.hset(&key, "phase", "approval").await?;
                    tracing::info!(%job_id, wave, %name, "wave waits for approval");
                    p.notifier
                        .job_wave(job_id, wave, &name, "awaiting_approval", json!({}));
                    continue;
                }
            }
            // "approval": only an operator's approve moves on (checked above).
            _ => {}
        }
        planner::pause(p, planner::WATCH_EVERY).await;
    }
}

/// Records every device from wave `wave` at `offset` on CANCELED (a canceled or aborted job),
/// checkpointing as it goes.
async fn cancel_rest(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    waves: usize,
    mut wave: usize,
    mut offset: usize,
) -> anyhow::Result<()> {
    let key = p.names.job(job_id);
    let state = store::load_job_state(redis, &p.names, job_id)
        .await?
        .unwrap_or(JobState::Canceling);
    let reason = planner::stopped_reason(state);
    while wave < waves {
        planner::renew_lease(p, redis, job_id).await?;
        let batch: Vec<String> = redis
            .zrange(
                p.names.job_wave(job_id, wave),
                offset as isize,
                (offset + 999) as isize,
            )
            .await?;
        if batch.is_empty() {
            (wave, offset) = (wave + 1, 0);
        } else {
            let now = now_ms();
            let finals: Vec<(&str, shared::state::DeviceStatus)> = batch
                .iter()
                .map(|d| {
                    (
                        d.as_str(),
                        planner::status(ExecutionState::Canceled, reason, now),
                    )
                })
                .collect();
            planner::conclude(p, redis, job_id, &finals).await?;
            offset += batch.len();
        }
        let () = redis
            .hset_multiple(
                &key,
                &[("wave", wave.to_string()), ("offset", offset.to_string())],
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shuffle_is_fixed_per_job_and_differs_between_jobs() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert_eq!(shuffle_score(a, "dev-1"), shuffle_score(a, "dev-1"));
        assert_ne!(shuffle_score(a, "dev-1"), shuffle_score(b, "dev-1"));
        // Exact as a score: below 2^48.
        assert!(shuffle_score(a, "dev-1") < (1u64 << 48) as f64);
    }
}
