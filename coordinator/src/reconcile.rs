//! Reconciliation: no job stays open because a device's task vanished.
//!
//! A task can be lost on its way: a message the broker drops (a TTL dead-letter is
//! at-most-once), a retry queue deleted while a task waits in it, a task dead-lettered as
//! poison, Redis losing its last writes. Its device then stays non-terminal and the job open
//! for ever. Every few seconds each coordinator looks at the unfinished jobs that could have
//! such a device: past their deadline plus a grace (`coordinator.reconcile_grace_secs`), or
//! without a device finishing for `coordinator.reconcile_silence_secs`. A device there that
//! is not terminal, not held by a worker (no claim) and not parked is lost: it ends TIMED_OUT
//! (deadline) or FAILED (silence) with a reason that says so, recorded by the same script as
//! every outcome (first outcome wins, so a worker finishing it at the same moment is never
//! contradicted). Before that, a device stranded on its way to a retry (RETRY_SCHEDULED and
//! overdue by `coordinator.reconcile_resend_secs` in a job quiet as long, nothing holding
//! it) is sent a copy of its task: a retry queue whose broker stopped forwarding (RabbitMQ
//! 3.10's at-least-once dead-lettering after a quorum queue's leader died) loses no
//! device; a copy delivered after all is absorbed by the workers' idempotency keys. So is a
//! device IN_PROGRESS whose worker saved a result that is not recorded (a Redis failover
//! lost the outcome's write): the copy makes a worker publish the saved result again,
//! without a delivery. It never touches a device that something holds.

use shared::redis_conn::RedisConn;
use std::{collections::HashMap, sync::Arc, time::Duration};

use redis::AsyncCommands;
use shared::{
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
    store::{self, Reporter, Scripts, TerminalStatus},
    topology::Names,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::AppState;

/// How often the sweep runs.
const EVERY: Duration = Duration::from_secs(5);

/// What becomes of an unfinished device nothing holds: `None` while it may still be on its
/// way.
pub fn verdict(
    status: &DeviceStatus,
    now_ms: u64,
    deadline_ms: Option<u64>,
    grace_ms: u64,
    silent_since_ms: Option<u64>,
    silence_ms: u64,
) -> Option<(ExecutionState, String)> {
    if status.state.is_terminal() {
        return None;
    }
    let last = match &status.error {
        Some(e) => format!("{} ({e})", status.state.as_str()),
        None => status.state.as_str().to_owned(),
    };
    if deadline_ms.is_some_and(|d| now_ms >= d.saturating_add(grace_ms)) {
        return Some((
            ExecutionState::TimedOut,
            format!(
                "lost: no copy of its task was left after the job's deadline (last seen {last})"
            ),
        ));
    }
    let quiet = |since: u64| now_ms.saturating_sub(since) >= silence_ms;
    if silence_ms > 0 && silent_since_ms.is_some_and(quiet) && quiet(status.updated_at_ms) {
        return Some((
            ExecutionState::Failed,
            format!(
                "lost: no copy of its task was left and nothing happened for {} s (last seen {last})",
                silence_ms / 1000
            ),
        ));
    }
    None
}

/// Whether `status` waits for a retry that is `resend_ms` overdue (its copy of the task is
/// stranded on the way).
pub fn stranded(status: &DeviceStatus, now_ms: u64, resend_ms: u64) -> bool {
    resend_ms > 0
        && status.state == ExecutionState::RetryScheduled
        && status
            .next_attempt_at_ms
            .is_some_and(|due| now_ms >= due.saturating_add(resend_ms))
}

/// Runs the sweep until `stop` fires.
pub async fn run(app: Arc<AppState>, stop: CancellationToken) {
    let scripts = Scripts::new();
    // Per job: its terminal count when last seen and since when it has not moved.
    let mut progress: HashMap<Uuid, (u64, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let mut redis = app.redis.clone();
        if let Err(e) = sweep(&app, &scripts, &mut redis, &mut progress).await {
            tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "reconciliation sweep failed; next round");
        }
    }
}

async fn sweep(
    app: &AppState,
    scripts: &Scripts,
    redis: &mut RedisConn,
    progress: &mut HashMap<Uuid, (u64, u64)>,
) -> anyhow::Result<()> {
    let c = &app.settings.coordinator;
    let grace_ms = c.reconcile_grace_secs.saturating_mul(1000);
    let silence_ms = c.reconcile_silence_secs.saturating_mul(1000);
    let active: Vec<String> = redis.smembers(app.names.active_jobs()).await?;
    let now = now_ms();
    progress.retain(|id, _| active.contains(&id.to_string()));
    for id in active.iter().filter_map(|i| i.parse::<Uuid>().ok()) {
        let Some(job) = store::load_job(redis, &app.names, id).await? else {
            continue;
        };
        // Only jobs whose every task was sent, and not held back on purpose.
        if !job.planning_done || matches!(job.state, JobState::Paused | JobState::Scheduled) {
            progress.remove(&id);
            continue;
        }
        let terminal = job.terminal();
        let since = match progress.get(&id) {
            Some((t, since)) if *t == terminal => *since,
            _ => {
                progress.insert(id, (terminal, now));
                now
            }
        };
        let resend_ms = c.reconcile_resend_secs.saturating_mul(1000);
        if job.state == JobState::InProgress
            && resend_ms > 0
            && now.saturating_sub(since) >= resend_ms
            && resend(app, redis, &job, now, resend_ms).await? > 0
        {
            // The copies get their chance before anything is judged lost.
            progress.insert(id, (terminal, now));
            continue;
        }
        let past_deadline = job
            .deadline_ms()
            .is_some_and(|d| now >= d.saturating_add(grace_ms));
        let silent = silence_ms > 0 && now.saturating_sub(since) >= silence_ms;
        if past_deadline || silent {
            settle(
                app,
                scripts,
                redis,
                &job,
                now,
                (grace_ms, since, silence_ms),
            )
            .await?;
        }
    }
    Ok(())
}

/// Ends the job's lost devices.
async fn settle(
    app: &AppState,
    scripts: &Scripts,
    redis: &mut RedisConn,
    job: &store::JobRecord,
    now: u64,
    (grace_ms, since, silence_ms): (u64, u64, u64),
) -> anyhow::Result<()> {
    let names = &app.names;
    let mut cursor: u64 = 0;
    loop {
        let (next, statuses) = status_page(redis, names, job.id, cursor).await?;
        let mut lost = Vec::new();
        for (device, status) in statuses {
            if let Some(v) = verdict(
                &status,
                now,
                job.deadline_ms(),
                grace_ms,
                Some(since),
                silence_ms,
            ) {
                lost.push((device, status, v));
            }
        }
        let lost = unheld(redis, names, job.id, lost).await?;
        for (device, _, (state, reason)) in &lost {
            tracing::warn!(job_id = %job.id, device_id = %device, state = state.as_str(), %reason, "device reconciled");
        }
        let ended = lost
            .into_iter()
            .map(|(device, old, (state, reason))| (device, ended(old, state, reason, now)))
            .collect();
        end(app, scripts, redis, job.id, ended).await?;
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// One page of `job`'s device statuses from `cursor` (HSCAN), and where the next starts
/// (0: none); a status that does not parse is skipped.
async fn status_page(
    redis: &mut RedisConn,
    names: &Names,
    job: Uuid,
    cursor: u64,
) -> anyhow::Result<(u64, Vec<(String, DeviceStatus)>)> {
    let (next, pairs): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
        .arg(names.job_status(job))
        .arg(cursor)
        .arg("COUNT")
        .arg(1000)
        .query_async(redis)
        .await?;
    let statuses = pairs
        .into_iter()
        .filter_map(|(device, raw)| Some((device, serde_json::from_str(&raw).ok()?)))
        .collect();
    Ok((next, statuses))
}

/// Sends a copy of the task of every device of `job` held by nothing (no claim, not parked)
/// that is stranded on its way to a retry, or IN_PROGRESS with a result its worker saved
/// (the recorded outcome was lost); returns how many.
async fn resend(
    app: &AppState,
    redis: &mut RedisConn,
    job: &store::JobRecord,
    now: u64,
    resend_ms: u64,
) -> anyhow::Result<usize> {
    let Some(broker) = app.broker() else {
        return Ok(0);
    };
    let mut cursor: u64 = 0;
    let mut sent = 0;
    loop {
        let (next, statuses) = status_page(redis, &app.names, job.id, cursor).await?;
        // Candidates: waiting for a retry, or IN_PROGRESS (what a device's status is while a
        // worker delivers, and so what a lost outcome leaves). Waiting and parked devices are
        // not read here.
        let open: Vec<(String, DeviceStatus)> = statuses
            .into_iter()
            .filter(|(_, status)| {
                status.state == ExecutionState::InProgress || stranded(status, now, resend_ms)
            })
            .collect();
        let holds = holds(
            redis,
            &app.names,
            job.id,
            open.iter().map(|(d, _)| d.as_str()),
        )
        .await?;
        // Stranded on the way to a retry, or finished by a worker (its saved result is in
        // the idempotency record) with the recorded outcome gone: a Redis failover lost
        // the write. A copy of the task makes the worker publish the saved result again.
        let stuck: Vec<(String, DeviceStatus)> = open
            .into_iter()
            .zip(holds)
            .filter(|((_, status), (record, parked))| {
                let done = record.as_deref().is_some_and(|r| r.starts_with(b"d:"));
                let claimed = record.as_deref().is_some_and(|r| r.starts_with(b"c:"));
                !parked && !claimed && (done || stranded(status, now, resend_ms))
            })
            .map(|(l, _)| l)
            .collect();
        let mut confirms = Vec::with_capacity(stuck.len());
        for (device, status) in &stuck {
            tracing::warn!(job_id = %job.id, device_id = %device, attempts = status.attempts, state = status.state.as_str(), "a stranded task sent again");
            let task = shared::messages::DeviceTask {
                version: shared::messages::WIRE_VERSION,
                job_id: job.id,
                execution_id: shared::state::execution_id(job.id, device),
                device_id: device.clone(),
                attempts: status.attempts,
                parked: 0,
                published_at_ms: status.published_at_ms.unwrap_or(now),
            };
            confirms.push(
                shared::topology::send_task(&broker.publisher, &app.names, None, &task).await?,
            );
        }
        for confirm in confirms {
            confirm.wait().await?;
        }
        sent += stuck.len();
        if next == 0 {
            return Ok(sent);
        }
        cursor = next;
    }
}

/// `old` ended in `state` with `reason` at `now`.
pub(crate) fn ended(
    old: DeviceStatus,
    state: ExecutionState,
    reason: String,
    now: u64,
) -> DeviceStatus {
    DeviceStatus {
        state,
        error: Some(reason),
        updated_at_ms: now,
        next_attempt_at_ms: None,
        worker: None,
        readings: None,
        ..old
    }
}

/// Records these terminal statuses of `job`'s devices through the outcome script (a device
/// that already finished keeps its outcome) and announces the job if that finished it.
pub(crate) async fn end(
    app: &AppState,
    scripts: &Scripts,
    redis: &mut RedisConn,
    job: Uuid,
    statuses: Vec<(String, DeviceStatus)>,
) -> anyhow::Result<()> {
    if statuses.is_empty() {
        return Ok(());
    }
    let outcomes: Vec<TerminalStatus<'_>> = statuses
        .iter()
        .map(|(device, status)| TerminalStatus {
            job_id: job,
            device_id: device,
            status,
        })
        .collect();
    let summary = scripts
        .record_terminal(redis, &app.names, &outcomes, Reporter::Planner)
        .await?;
    for finished in summary.finished_jobs {
        app.notifier.job_finished(redis, &app.names, finished).await;
    }
    Ok(())
}

pub(crate) type Lost = (String, DeviceStatus, (ExecutionState, String));

/// Keeps the devices no worker holds (no claim on their execution) and that are not parked.
pub(crate) async fn unheld(
    redis: &mut RedisConn,
    names: &Names,
    job: Uuid,
    lost: Vec<Lost>,
) -> anyhow::Result<Vec<Lost>> {
    let holds = holds(redis, names, job, lost.iter().map(|(d, _, _)| d.as_str())).await?;
    Ok(lost
        .into_iter()
        .zip(holds)
        .filter(|(_, (record, parked))| {
            !record.as_deref().is_some_and(|c| c.starts_with(b"c:")) && !parked
        })
        .map(|(l, _)| l)
        .collect())
}

/// Per device of `job`: its execution's idempotency record (`c:<worker>` claim or
/// `d:<result>` done, as bytes: a result is MessagePack) and whether its task is parked.
async fn holds<'a>(
    redis: &mut RedisConn,
    names: &Names,
    job: Uuid,
    devices: impl Iterator<Item = &'a str>,
) -> anyhow::Result<Vec<(Option<Vec<u8>>, bool)>> {
    let mut pipe = redis::pipe();
    let mut any = false;
    for device in devices {
        any = true;
        let execution = shared::state::execution_id(job, device);
        pipe.get(names.idempotency(execution))
            .zscore(names.parked_due(), execution.to_string());
    }
    if !any {
        return Ok(Vec::new());
    }
    let held: Vec<(Option<Vec<u8>>, Option<f64>)> = pipe.query_async(redis).await?;
    Ok(held.into_iter().map(|(r, p)| (r, p.is_some())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ExecutionState, updated_at_ms: u64) -> DeviceStatus {
        DeviceStatus {
            state,
            attempts: 1,
            error: None,
            updated_at_ms,
            next_attempt_at_ms: None,
            worker: None,
            published_at_ms: None,
            readings: None,
        }
    }

    #[test]
    fn a_device_is_lost_only_past_the_deadline_and_its_grace_or_a_long_silence() {
        let queued = status(ExecutionState::Queued, 1_000);
        // Before deadline + grace: may still be on its way.
        assert_eq!(verdict(&queued, 10_999, Some(10_000), 1_000, None, 0), None);
        let (state, why) = verdict(&queued, 11_000, Some(10_000), 1_000, None, 0).expect("lost");
        assert_eq!(state, ExecutionState::TimedOut);
        assert!(why.contains("lost") && why.contains("QUEUED"), "{why}");
        // No deadline: only a job silent for the whole silence, on a device silent as long.
        assert_eq!(
            verdict(&queued, 50_000, None, 0, Some(20_000), 60_000),
            None
        );
        assert_eq!(verdict(&queued, 90_000, None, 0, Some(20_000), 0), None);
        let (state, _) = verdict(&queued, 90_000, None, 0, Some(20_000), 60_000).expect("silent");
        assert_eq!(state, ExecutionState::Failed);
        let recent = status(ExecutionState::RetryScheduled, 80_000);
        assert_eq!(
            verdict(&recent, 90_000, None, 0, Some(20_000), 60_000),
            None
        );
        // A finished device is never touched.
        let done = status(ExecutionState::Succeeded, 0);
        assert_eq!(verdict(&done, u64::MAX, Some(0), 0, Some(0), 1), None);
    }

    #[test]
    fn only_a_retry_overdue_by_the_whole_resend_time_is_stranded() {
        let mut waiting = status(ExecutionState::RetryScheduled, 1_000);
        waiting.next_attempt_at_ms = Some(5_000);
        assert!(!stranded(&waiting, 64_999, 60_000));
        assert!(stranded(&waiting, 65_000, 60_000));
        // Off, another state, or no due time: never.
        assert!(!stranded(&waiting, u64::MAX, 0));
        let mut running = waiting.clone();
        running.state = ExecutionState::InProgress;
        assert!(!stranded(&running, u64::MAX, 1));
        waiting.next_attempt_at_ms = None;
        assert!(!stranded(&waiting, u64::MAX, 1));
    }
}
