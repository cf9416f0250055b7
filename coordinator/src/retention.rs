//! Retention: a finished job's data does not stay in Redis for ever.
//!
//! Owns the deletion of one job's data, by name: its record, counters, statuses, state sets,
//! waves, targets snapshot, parked tasks, the idempotency record of each of its executions,
//! and the device-side keys named after it (simulator memory, AWS IoT Jobs executions); its
//! in-flight slots lapse by themselves.
//! `DELETE /v1/jobs/{id}` deletes a finished job at once; a sweep on every coordinator deletes
//! jobs finished more than `coordinator.retention_secs` ago. It never deletes a job that is
//! not finished (its planner and workers still write to it).

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use redis::AsyncCommands;
use shared::{
    device_keys::DeviceKeys,
    job::JobSpec,
    now_ms,
    state::{ExecutionState, JobState, execution_id},
    store::StoreError,
    topology::Names,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::AppState;

/// How often the sweep looks for jobs past their retention.
const EVERY: Duration = Duration::from_secs(5);

/// Deletes every key of finished job `id`; returns how many keys went. The caller checks
/// that the job is finished.
///
/// Keys are deleted by name, so the cost follows the job's size, not everything else Redis
/// holds: the job's own keys (per state and per wave of its spec), the simulator's, and, found
/// through its statuses, each execution's idempotency record and AWS IoT Jobs execution.
/// Only a job whose stored spec is corrupt is looked for by pattern over the whole keyspace.
/// Its in-flight slots are not named here: a slot is given back when its delivery ends, and
/// one a stopped worker held lapses with its lease.
///
/// # Errors
/// Redis errors.
pub async fn delete_job_data(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<u64, StoreError> {
    let spec: Option<String> = redis.hget(names.job(id), "spec").await?;
    // (A record already gone took its waves' keys with it: they go in one call.)
    let waves = match spec {
        None => Some(0),
        Some(s) => serde_json::from_str::<JobSpec>(&s)
            .ok()
            .map(|s| s.rollout.waves.len()),
    };
    let mut deleted = 0u64;
    // Per execution, named after the job's devices (read before the status hash goes).
    let job = id.to_string();
    let mut cursor: u64 = 0;
    loop {
        let (next, pairs): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(names.job_status(id))
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !pairs.is_empty() {
            let keys: Vec<String> = pairs
                .iter()
                .flat_map(|(d, _)| {
                    [
                        names.idempotency(execution_id(id, d)),
                        names.aws_execution(&job, d),
                    ]
                })
                .collect();
            let n: u64 = redis.unlink(&keys).await?;
            deleted += n;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // Parked copies of its tasks (a stale copy may wait for a device that never returns).
    let parked: Vec<String> = redis.smembers(names.parked_job(id)).await?;
    for chunk in parked.chunks(1000) {
        let mut pipe = redis::pipe();
        pipe.zrem(names.parked_due(), chunk)
            .ignore()
            .hdel(names.parked_tasks(), chunk)
            .ignore();
        let () = pipe.query_async(redis).await?;
    }
    deleted += match waves {
        Some(waves) => redis.unlink(job_keys(names, id, waves)).await?,
        None => {
            shared::store::delete_matching(redis, &format!("{}:*{id}*", names.key_prefix())).await?
        }
    };
    let mut pipe = redis::pipe();
    pipe.zrem(names.jobs(), id.to_string())
        .ignore()
        .srem(names.active_jobs(), id.to_string())
        .ignore()
        .srem(names.pending_rollbacks(), id.to_string())
        .ignore();
    let () = pipe.query_async(redis).await?;
    tracing::info!(job_id = %id, keys = deleted, "job data deleted");
    Ok(deleted)
}

/// The keys named after job `id` alone (not after one of its devices), for a spec of `waves`
/// waves.
fn job_keys(names: &Names, id: Uuid, waves: usize) -> Vec<String> {
    let mut keys = vec![
        names.job(id),
        names.job_counts(id),
        names.job_status(id),
        names.job_targets(id),
        names.job_wave_pool(id),
        names.job_wave_counts(id),
        names.job_wave_of(id),
        names.planner_lock(id),
        names.parked_job(id),
        names.sim_deliveries(id),
        names.sim_done(id),
        names.sim_applied(id),
        names.sim_totals(id),
        names.sim_log(id),
    ];
    keys.extend(ExecutionState::ALL.map(|s| names.job_state_set(id, s)));
    for wave in 0..waves {
        keys.push(names.job_wave(id, wave));
        keys.push(names.job_wave_candidates(id, wave));
    }
    keys
}

/// Deletes jobs finished more than `coordinator.retention_secs` ago, until `stop` fires
/// (0: keeps every job).
pub async fn run(app: Arc<AppState>, stop: CancellationToken) {
    let retention_ms = app.settings.coordinator.retention_secs.saturating_mul(1000);
    if retention_ms == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let mut redis = app.redis.clone();
        if let Err(e) = sweep(&app.names, &mut redis, retention_ms).await {
            tracing::warn!(error.message = %e, "retention sweep failed; next round");
        }
    }
}

async fn sweep(names: &Names, redis: &mut RedisConn, retention_ms: u64) -> Result<(), StoreError> {
    let now = now_ms();
    let ids: Vec<String> = redis.zrange(names.jobs(), 0, -1).await?;
    let ids: Vec<Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET")
                .arg(names.job(*id))
                .arg("state")
                .arg("finished_at_ms");
        }
        let rows: Vec<(Option<String>, Option<u64>)> = pipe.query_async(redis).await?;
        for (id, (state, finished)) in chunk.iter().zip(rows) {
            let done = state
                .as_deref()
                .and_then(JobState::parse)
                .is_some_and(JobState::is_finished);
            let expired = finished.is_some_and(|f| now >= f.saturating_add(retention_ms));
            if done && expired {
                delete_job_data(redis, names, *id).await?;
            }
        }
    }
    Ok(())
}
