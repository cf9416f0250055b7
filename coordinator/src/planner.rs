//! The planner: publishes a job's tasks.
//!
//! Owns the loop that walks a job's targets ([`crate::split`]) and, batch by batch:
//! publishes a task per device on a confirm channel (persistent, mandatory), waits for every
//! confirm, records SKIPPED devices, and checkpoints its cursor and count in Redis. A
//! coordinator that dies mid-job resumes from the checkpoint: at most one batch is published
//! again, and the workers' idempotency keys absorb it. When the job is canceled, devices not
//! yet published are recorded CANCELED instead; while it is PAUSED nothing is published. The
//! rate follows the job's ramp. A job with waves is planned by [`crate::waves`] with the
//! helpers here; a job with abort criteria is watched by its planner until it finishes. One
//! planner per job runs at a time across coordinators (a lease in Redis). It never consumes
//! results.

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use redis::AsyncCommands;
use shared::{
    amqp::Publisher,
    backoff,
    config::Settings,
    messages::{DeviceTask, WIRE_VERSION},
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
    store::{self, Scripts, TerminalStatus},
    topology::Names,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::split::{Decision, Targets};

/// What every planner shares.
#[derive(Debug)]
pub struct Planners {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Names.
    pub names: Names,
    /// Redis.
    pub redis: RedisConn,
    /// Confirmed publishing.
    pub publisher: Publisher,
    /// Status scripts.
    pub scripts: Scripts,
    /// This coordinator's id (planner leases).
    pub instance: String,
    /// Fires on shutdown; planners stop after their current batch.
    pub shutdown: CancellationToken,
    /// Jobs this process is planning now (a job is never planned twice at once).
    pub running: std::sync::Mutex<std::collections::HashSet<Uuid>>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Webhooks.
    pub notifier: crate::notify::Notifier,
    /// Where webhooks of jobs the planner creates (automatic rollbacks) may go.
    pub outbound: crate::outbound::Policy,
    /// Signs the documents of jobs the planner creates, when the deployment signs.
    pub signer: Option<shared::signing::Signer25519>,
    /// The session's tasks: planners, and the planners of jobs they create.
    pub tracker: tokio_util::task::TaskTracker,
}

/// Starts planning `job_id` on the session's tracker.
pub fn start(p: &Arc<Planners>, job_id: Uuid) {
    let p = p.clone();
    p.tracker.clone().spawn(async move {
        if let Err(e) = run(p, job_id).await {
            tracing::error!(%job_id, error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "planner stopped; the job resumes with the next broker session");
        }
    });
}

/// Removes a job from [`Planners::running`] when its planner ends, however it ends.
struct RunningGuard(Arc<Planners>, Uuid);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

pub(crate) const LEASE: Duration = Duration::from_secs(15);
/// How often a coordinator waiting for another's lease on a job tries to take it: a dead
/// planner's job is taken over within the lease and this.
const LEASE_POLL: Duration = Duration::from_millis(250);

/// Plans `job_id` to the end (or until shutdown). Waits for another coordinator's lease to
/// lapse if one holds it.
///
/// # Errors
/// Redis or broker errors that outlasted their retries.
pub async fn run(p: Arc<Planners>, job_id: Uuid) -> anyhow::Result<()> {
    if !p
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(job_id)
    {
        return Ok(());
    }
    let _running = RunningGuard(p.clone(), job_id);
    let span = tracing::info_span!(
        "plan job",
        job_id = %job_id,
        otel.kind = "producer",
        trace_id = tracing::field::Empty
    );
    // Join the trace of the request that created the job.
    let mut redis = p.redis.clone();
    let trace: Option<String> = redis
        .hget(p.names.job(job_id), "trace")
        .await
        .unwrap_or(None);
    if let Some(t) = trace.filter(|t| !t.is_empty()) {
        shared::amqp::continue_traceparent(&span, &t);
    }
    shared::telemetry::record_trace_id(&span);
    async move {
        let mut redis = p.redis.clone();
        let lock = p.names.planner_lock(job_id);
        loop {
            let opts = redis::SetOptions::default()
                .conditional_set(redis::ExistenceCheck::NX)
                .with_expiration(redis::SetExpiry::PX(LEASE.as_millis() as u64));
            let got: Option<String> = redis.set_options(&lock, &p.instance, opts).await?;
            let holder: Option<String> = redis.get(&lock).await?;
            if got.is_some() || holder.as_deref() == Some(p.instance.as_str()) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(LEASE_POLL) => {}
                _ = p.shutdown.cancelled() => return Ok(()),
            }
        }
        // Redis or broker trouble mid-plan: retry from the checkpoint until it works or the
        // coordinator stops (a broker outage rebuilds the whole coordinator, which resumes
        // this job with a fresh planner).
        let result = backoff::until_ok(
            backoff::outage(Duration::from_millis(250), Duration::from_secs(10)),
            &p.shutdown,
            || {
                let mut redis = redis.clone();
                let p = &p;
                async move {
                    match plan(p, &mut redis, job_id).await {
                        Err(e) if e.downcast_ref::<LeaseLost>().is_some() => {
                            tracing::warn!(%job_id, "planner lease lost; another coordinator plans the job");
                            Ok(())
                        }
                        other => other,
                    }
                }
            },
            |e, delay| tracing::warn!(%job_id, error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), retry_in_ms = delay.as_millis() as u64, "planning interrupted; resuming from the checkpoint"),
        )
        .await
        // Stopped: the planner of the next start resumes from the checkpoint.
        .or(Ok(()));
        let ours: Option<String> = redis.get(&lock).await.unwrap_or(None);
        if result.is_ok() && !p.shutdown.is_cancelled() && ours.as_deref() == Some(p.instance.as_str()) {
            match rollback_if_aborted(&p, &mut redis, job_id).await {
                Ok(Some(rollback)) => start(&p, rollback),
                Ok(None) => {}
                Err(e) => tracing::warn!(%job_id, error.message = %e, "automatic rollback not created yet; the next start tries again"),
            }
        }
        let _ = release(&mut redis, &lock, &p.instance).await;
        result
    }
    .instrument(span)
    .await
}

async fn plan(p: &Planners, redis: &mut RedisConn, job_id: Uuid) -> anyhow::Result<()> {
    let Some(mut record) = store::load_job(redis, &p.names, job_id).await? else {
        anyhow::bail!("job {job_id} vanished before planning");
    };
    if record.state == JobState::Scheduled {
        if let Some(score) = lane(&record) {
            reserve_lanes(p, redis, &record, score).await?;
        }
        if !wait_for_start(p, redis, &record).await? {
            return Ok(());
        }
        let Some(now) = store::load_job(redis, &p.names, job_id).await? else {
            anyhow::bail!("job {job_id} vanished before planning");
        };
        record = now;
    }
    if !record.planning_done {
        if record.spec.rollout.waves.is_empty() {
            plan_flat(p, redis, job_id, &record).await?;
        } else {
            crate::waves::plan(p, redis, &record).await?;
        }
    }
    if p.shutdown.is_cancelled() {
        return Ok(());
    }
    // Abort criteria hold until the last device finished; an automatic rollback waits for
    // the aborted job to finish.
    if !record.spec.rollout.abort.is_empty()
        || record.spec.rollout.on_abort == shared::rollout::OnAbort::Rollback
    {
        loop {
            let now = watch(p, redis, job_id).await?;
            if now.state.is_finished() || p.shutdown.is_cancelled() {
                break;
            }
            renew_lease(p, redis, job_id).await?;
            pause(p, WATCH_EVERY).await;
        }
    }
    Ok(())
}

/// Puts a SCHEDULED job in the lane of every device it is to be sent to, so that jobs
/// starting at the same time reach each device in priority order, whichever planner
/// publishes first. Repeating it (a restarted planner) changes nothing.
async fn reserve_lanes(
    p: &Planners,
    redis: &mut RedisConn,
    record: &store::JobRecord,
    score: f64,
) -> anyhow::Result<()> {
    let mut targets = Targets::new(&p.names, record.id, &record.spec, 1);
    targets.set_batch(LANE_BATCH);
    let mut cursor: Option<String> = None;
    loop {
        if p.shutdown.is_cancelled() {
            return Ok(());
        }
        renew_lease(p, redis, record.id).await?;
        let (decisions, next) = targets
            .next_batch(redis, &p.names, cursor.as_deref())
            .await
            .context("reading targets")?;
        let devices: Vec<&str> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Send(device) => Some(device.as_str()),
                Decision::Skip { .. } => None,
            })
            .collect();
        if !devices.is_empty() {
            let mut pipe = redis::pipe();
            join_lanes(&mut pipe, &p.names, record.id, score, &devices);
            let () = pipe.query_async(redis).await?;
        }
        match next {
            Some(n) => cursor = Some(n),
            None => return Ok(()),
        }
    }
}

/// Devices put in their lanes per round trip before a scheduled job starts.
const LANE_BATCH: usize = 2_000;

/// Holds a SCHEDULED job until its start time, then starts it. Returns false on shutdown;
/// true once the job started (or was canceled meanwhile: planning then cancels its devices).
async fn wait_for_start(
    p: &Planners,
    redis: &mut RedisConn,
    record: &store::JobRecord,
) -> anyhow::Result<bool> {
    let job_id = record.id;
    let start = record
        .spec
        .schedule
        .as_ref()
        .and_then(shared::job::Schedule::start_ms)
        .unwrap_or(0);
    loop {
        if p.shutdown.is_cancelled() {
            return Ok(false);
        }
        renew_lease(p, redis, job_id).await?;
        let state = store::load_job_state(redis, &p.names, job_id)
            .await?
            .unwrap_or(JobState::Canceling);
        if state != JobState::Scheduled {
            return Ok(true);
        }
        if now_ms() >= start {
            match crate::steer::steer(
                redis,
                None,
                &p.names,
                job_id,
                crate::steer::Steer::Start,
                "schedule.start_at reached",
            )
            .await
            {
                Ok(state) => {
                    tracing::info!(%job_id, "scheduled job started");
                    p.notifier.job_state(job_id, state, serde_json::json!({}));
                }
                Err(crate::steer::SteerError::Refused { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(true);
        }
        let left = Duration::from_millis(start.saturating_sub(now_ms()));
        pause(p, left.min(WATCH_EVERY)).await;
    }
}

/// Whether the job's `schedule.end_at` has passed, and what it then does.
pub(crate) fn ended(spec: &shared::job::JobSpec) -> Option<shared::job::EndBehavior> {
    let s = spec.schedule.as_ref()?;
    (s.end_ms()? <= now_ms()).then_some(s.end_behavior)
}

/// Applies a passed `schedule.end_at` to a running job: with `cancel` the job is canceled
/// (CANCELING); with `stop` nothing changes but the planner sends no more. Returns the
/// state to plan with.
pub(crate) async fn apply_end(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    state: JobState,
    end: shared::job::EndBehavior,
) -> anyhow::Result<JobState> {
    if end != shared::job::EndBehavior::Cancel || state.is_stopping() || state.is_finished() {
        return Ok(state);
    }
    match crate::jobs::cancel(redis, &p.publisher, &p.names, job_id).await {
        Ok(()) => {
            tracing::info!(%job_id, "schedule.end_at reached: job canceled");
            p.notifier.job_state_because(
                job_id,
                JobState::Canceling,
                serde_json::json!({}),
                Some("schedule.end_at reached"),
            );
            Ok(JobState::Canceling)
        }
        Err(crate::jobs::CancelError::NotCancelable { .. }) => Ok(state),
        Err(e) => Err(e.into()),
    }
}

/// How often a waiting planner (paused, at a gate, watching abort criteria) looks again.
pub(crate) const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Sleeps, or returns early on shutdown.
pub(crate) async fn pause(p: &Planners, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = p.shutdown.cancelled() => {}
    }
}

/// The planner lost its lease on the job (it lapsed, and another coordinator may have
/// taken the job): it stops at once without writing anything more.
#[derive(Debug, thiserror::Error)]
#[error("planner lease on job {0} lost")]
pub struct LeaseLost(pub Uuid);

// KEYS lease; ARGV owner, ms. Renews only the owner's lease: 1, else 0.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

// KEYS lease; ARGV owner. Deletes only the owner's lease.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Keeps this coordinator's lease on the job.
///
/// # Errors
/// [`LeaseLost`] when the lease is no longer ours (the planner must stop: another
/// coordinator may be planning the job); Redis errors.
pub(crate) async fn renew_lease(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
) -> anyhow::Result<()> {
    if renew(redis, &p.names.planner_lock(job_id), &p.instance, LEASE).await? {
        Ok(())
    } else {
        Err(LeaseLost(job_id).into())
    }
}

/// Renews `owner`'s lease `key` for `ttl`; false if `owner` does not hold it.
async fn renew(
    redis: &mut RedisConn,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Result<bool, redis::RedisError> {
    let renewed: i64 = redis::Script::new(RENEW)
        .key(key)
        .arg(owner)
        .arg(ttl.as_millis() as u64)
        .invoke_async(redis)
        .await?;
    Ok(renewed == 1)
}

/// Writes checkpoint fields only while the writer holds the job's lease: a fence, so a
/// planner stalled past its lease (a long GC-like pause, SIGSTOP) can never move back the
/// cursor of the coordinator that took the job over. KEYS lease, job; ARGV owner, then
/// field/value pairs. Returns 1 if written.
const CHECKPOINT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
";

/// Writes `fields` into `job_key` if `owner` holds `lease`; false (nothing written) if not.
async fn fenced_write(
    redis: &mut RedisConn,
    lease: &str,
    owner: &str,
    job_key: &str,
    fields: &[(&str, String)],
) -> Result<bool, redis::RedisError> {
    let script = redis::Script::new(CHECKPOINT);
    let mut call = script.key(lease);
    call.key(job_key).arg(owner);
    for (f, v) in fields {
        call.arg(*f).arg(v);
    }
    let written: i64 = call.invoke_async(redis).await?;
    Ok(written == 1)
}

/// The planner's checkpoint of job `job_id`, fenced by its lease.
///
/// # Errors
/// [`LeaseLost`] when another coordinator holds the job now; Redis errors.
pub(crate) async fn checkpoint(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    fields: &[(&str, String)],
) -> anyhow::Result<()> {
    if fenced_write(
        redis,
        &p.names.planner_lock(job_id),
        &p.instance,
        &p.names.job(job_id),
        fields,
    )
    .await?
    {
        Ok(())
    } else {
        Err(LeaseLost(job_id).into())
    }
}

/// Gives up `owner`'s lease `key`, if it still holds it.
async fn release(redis: &mut RedisConn, key: &str, owner: &str) -> Result<bool, redis::RedisError> {
    let released: i64 = redis::Script::new(RELEASE)
        .key(key)
        .arg(owner)
        .invoke_async(redis)
        .await?;
    Ok(released == 1)
}

/// One turn of a planner's loop: `None` on shutdown; otherwise renews the lease and returns
/// the job as [`watch`] sees it.
///
/// # Errors
/// As [`watch`].
pub(crate) async fn turn(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
) -> anyhow::Result<Option<store::JobRecord>> {
    if p.shutdown.is_cancelled() {
        return Ok(None);
    }
    renew_lease(p, redis, job_id).await?;
    watch(p, redis, job_id).await.map(Some)
}

/// Reads the job and judges its abort criteria: a criterion that trips aborts the job (the
/// record returned is then ABORTING).
///
/// # Errors
/// Redis errors, or the job vanished.
pub(crate) async fn watch(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
) -> anyhow::Result<store::JobRecord> {
    let Some(mut record) = store::load_job(redis, &p.names, job_id).await? else {
        anyhow::bail!("job {job_id} vanished while planning");
    };
    if matches!(record.state, JobState::InProgress | JobState::Paused) {
        let tally = record.tally();
        if let Some(reason) = record
            .spec
            .rollout
            .abort
            .iter()
            .find_map(|c| c.trips(&tally))
        {
            abort(p, redis, job_id, &reason).await?;
            record.state = JobState::Aborting;
            record.state_reason = Some(reason);
        }
    }
    Ok(record)
}

/// Aborts the job with `reason`, telling the workers and the job's listeners.
pub(crate) async fn abort(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    reason: &str,
) -> anyhow::Result<()> {
    match crate::steer::steer(
        redis,
        Some(&p.publisher),
        &p.names,
        job_id,
        crate::steer::Steer::Abort,
        reason,
    )
    .await
    {
        Ok(state) => {
            tracing::warn!(%job_id, %reason, "job aborted");
            if let Ok(Some(job)) = store::load_job(redis, &p.names, job_id).await
                && job.spec.rollout.on_abort == shared::rollout::OnAbort::Rollback
            {
                let _: i64 = redis
                    .sadd(p.names.pending_rollbacks(), job_id.to_string())
                    .await?;
            }
            p.metrics.jobs_aborted.inc();
            p.notifier
                .job_state_because(job_id, state, serde_json::json!({}), Some(reason));
            Ok(())
        }
        // Canceled or paused-then-canceled meanwhile: nothing to abort.
        Err(crate::steer::SteerError::Refused { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates the rollback job of `job_id` once it is ABORTED, when it asked for one
/// (`on_abort = "rollback"`): the spec's `rollback` action for the devices that SUCCEEDED or
/// FAILED. Exactly once, across restarts (an idempotency key per aborted job). Returns the
/// new job to plan.
///
/// # Errors
/// Redis errors (the next start tries again).
async fn rollback_if_aborted(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
) -> anyhow::Result<Option<Uuid>> {
    let pending: bool = redis
        .sismember(p.names.pending_rollbacks(), job_id.to_string())
        .await?;
    if !pending {
        return Ok(None);
    }
    let Some(job) = store::load_job(redis, &p.names, job_id).await? else {
        let _: i64 = redis
            .srem(p.names.pending_rollbacks(), job_id.to_string())
            .await?;
        return Ok(None);
    };
    if job.state != JobState::Aborted {
        return Ok(None);
    }
    let spec =
        crate::intake::follow_up_spec(&job, crate::intake::FollowUp::Rollback, Vec::new(), None);
    let created = match spec {
        Ok(spec) => {
            let text = serde_json::to_string(&spec)?;
            let caller = format!("job:{job_id}");
            let c = &p.settings.coordinator;
            crate::intake::create(
                redis,
                &p.names,
                crate::intake::NewJob {
                    text: &text,
                    format: shared::job::SpecFormat::Json,
                    limits: shared::job::SpecLimits {
                        max_document_bytes: c.max_document_bytes,
                        max_explicit_devices: c.max_explicit_devices,
                    },
                    can_sign_webhooks: c.webhook_secret.is_some(),
                    scope: None,
                    trace: shared::amqp::current_traceparent(),
                    outbound: &p.outbound,
                    signer: p.signer.as_ref(),
                    idempotency: Some(crate::intake::Idempotency {
                        key: "on-abort-rollback",
                        caller: &caller,
                    }),
                    created_by: &caller,
                },
            )
            .await
        }
        Err(e) => Err(e.into()),
    };
    let new = match created {
        Ok(crate::intake::Creation::New(id, _)) => {
            tracing::warn!(%job_id, rollback_job_id = %id, "rollback job created for the aborted job");
            p.notifier.job_state_because(
                id,
                JobState::InProgress,
                serde_json::json!({}),
                Some(&format!("rollback of aborted job {job_id}")),
            );
            Some(id)
        }
        Ok(crate::intake::Creation::Existing(_)) => None,
        Err(crate::intake::IntakeError::Store(e)) => return Err(e.into()),
        Err(e) => {
            // Nothing to roll back (no device succeeded or failed), or a spec the
            // deployment refuses: said once, not retried.
            tracing::error!(%job_id, error.message = %e, "no automatic rollback for the aborted job");
            None
        }
    };
    let _: i64 = redis
        .srem(p.names.pending_rollbacks(), job_id.to_string())
        .await?;
    Ok(new)
}

/// Paces publishing: after `n` devices at `rate` per second the next batch waits `n / rate`
/// seconds from when this one started (never bursting to catch up after a pause).
#[derive(Debug)]
pub(crate) struct Pace {
    due: tokio::time::Instant,
}

impl Pace {
    pub(crate) fn new() -> Self {
        Self {
            due: tokio::time::Instant::now(),
        }
    }

    /// Devices per batch at `rate`: about four batches a second, at most `max`.
    pub(crate) fn batch(rate: Option<f64>, max: usize) -> usize {
        match rate {
            Some(r) => max.min(((r / 4.0) as usize).max(1)),
            None => max,
        }
        .max(1)
    }

    /// Waits before the next batch after `n` devices were published at `rate`.
    pub(crate) async fn after(&mut self, p: &Planners, n: usize, rate: Option<f64>) {
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            return;
        };
        let now = tokio::time::Instant::now();
        self.due = self.due.max(now - Duration::from_millis(50))
            + Duration::from_secs_f64(n as f64 / rate);
        tokio::select! {
            _ = tokio::time::sleep_until(self.due) => {}
            _ = p.shutdown.cancelled() => {}
        }
    }
}

/// A job's place in its devices' lanes (one job at a time per device), or `None` for a
/// job that may run alongside others.
pub(crate) fn lane(record: &store::JobRecord) -> Option<f64> {
    (!record.spec.concurrent)
        .then(|| shared::job::lane_score(record.spec.priority, record.created_at_ms))
}

/// Marks `devices` QUEUED (a device without a status is not a target: workers and the
/// aggregator refuse tasks and results for it) and puts the job in each device's lane
/// (`lane`: see [`lane`]), then publishes their tasks.
pub(crate) async fn send(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    lane: Option<f64>,
    devices: &[&str],
) -> anyhow::Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    wait_for_room(p, redis, job_id, devices.len()).await?;
    let now = now_ms();
    let queued = serde_json::to_string(&DeviceStatus {
        state: ExecutionState::Queued,
        attempts: 0,
        error: None,
        updated_at_ms: now,
        next_attempt_at_ms: None,
        worker: None,
        published_at_ms: None,
        readings: None,
    })?;
    let mut pipe = redis::pipe();
    for device in devices {
        pipe.hset_nx(p.names.job_status(job_id), *device, &queued)
            .ignore();
    }
    if let Some(score) = lane {
        join_lanes(&mut pipe, &p.names, job_id, score, devices);
    }
    let () = pipe.query_async(redis).await?;
    publish_batch(p, job_id, devices, now).await
}

/// Waits until Redis is under its memory alarm ([`crate::memory`]) and the tasks queue has
/// room for `n` more tasks under `coordinator.max_queued_tasks` (a batch larger than the
/// bound goes once the queue is empty), both true at the same look, keeping the planner's
/// lease meanwhile.
async fn wait_for_room(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    n: usize,
) -> anyhow::Result<()> {
    let bound = u64::from(p.settings.coordinator.max_queued_tasks);
    let mut waited = Duration::ZERO;
    while !p.shutdown.is_cancelled() {
        if p.metrics.redis_memory_alarm.get() != 1
            && (bound == 0 || has_room(p, n as u64, bound).await?)
        {
            return Ok(());
        }
        pause(p, ROOM_POLL).await;
        waited += ROOM_POLL;
        if waited >= Duration::from_secs(1) {
            renew_lease(p, redis, job_id).await?;
            waited = Duration::ZERO;
        }
    }
    Ok(())
}

/// Whether the tasks queue takes `n` more tasks under `bound` (or is empty).
async fn has_room(p: &Planners, n: u64, bound: u64) -> anyhow::Result<bool> {
    let depth = u64::from(
        p.publisher
            .channel()
            .queue_declare(
                p.names.tasks_queue().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .context("reading the tasks queue's depth")?
            .message_count(),
    );
    // The queue counts messages; a planner's message carries up to `tasks_per_message`.
    let depth = depth.saturating_mul(u64::from(p.settings.amqp.tasks_per_message.max(1)));
    Ok(depth == 0 || depth + n <= bound)
}

/// How often a planner waiting for room looks at the tasks queue again.
const ROOM_POLL: Duration = Duration::from_millis(50);

/// Adds the job to each device's lane (kept where it already is).
fn join_lanes(
    pipe: &mut redis::Pipeline,
    names: &Names,
    job_id: Uuid,
    score: f64,
    devices: &[&str],
) {
    let id = job_id.to_string();
    for device in devices {
        pipe.cmd("ZADD")
            .arg(names.device_lane(device))
            .arg("NX")
            .arg(score)
            .arg(&id)
            .ignore();
    }
}

/// Records devices that end without a task (SKIPPED, or CANCELED before being sent).
pub(crate) async fn conclude(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    finals: &[(&str, DeviceStatus)],
) -> anyhow::Result<()> {
    let outcomes: Vec<TerminalStatus<'_>> = finals
        .iter()
        .map(|(device, status)| TerminalStatus {
            job_id,
            device_id: device,
            status,
        })
        .collect();
    let summary = p
        .scripts
        .record_terminal(redis, &p.names, &outcomes, store::Reporter::Planner)
        .await?;
    for job in summary.finished_jobs {
        p.notifier.job_finished(redis, &p.names, job).await;
    }
    Ok(())
}

/// Marks the job's planning done with `planned` targets; if that finishes the job (every
/// device already terminal: all SKIPPED, canceled while planning, results that came first),
/// announces it as the aggregator does for a job its last result finishes.
pub(crate) async fn planning_done(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    planned: u64,
) -> anyhow::Result<()> {
    let finished = p
        .scripts
        .finish_planning(redis, &p.names, job_id, planned)
        .await?;
    tracing::info!(%job_id, planned, finished, "planning done");
    if finished {
        p.notifier.job_finished(redis, &p.names, job_id).await;
    }
    Ok(())
}

/// How often a continuous job looks for devices that came to match its target.
const CONTINUOUS_RESCAN: Duration = Duration::from_secs(3);

/// The decisions about devices the job has no status for yet.
async fn new_devices(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    decisions: Vec<Decision>,
) -> anyhow::Result<Vec<Decision>> {
    if decisions.is_empty() {
        return Ok(decisions);
    }
    let ids: Vec<&str> = decisions.iter().map(Decision::device).collect();
    let known: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(p.names.job_status(job_id))
        .arg(&ids)
        .query_async(redis)
        .await?;
    let fresh: Vec<Decision> = decisions
        .into_iter()
        .zip(known)
        .filter(|(_, k)| k.is_none())
        .map(|(d, _)| d)
        .collect();
    if !fresh.is_empty() {
        tracing::info!(%job_id, new = fresh.len(), "continuous job: devices that came to match");
    }
    Ok(fresh)
}

/// Plans a job without waves: every target in id order, at the job's rate and ramp.
async fn plan_flat(
    p: &Planners,
    redis: &mut RedisConn,
    job_id: Uuid,
    record: &store::JobRecord,
) -> anyhow::Result<()> {
    let job_key = p.names.job(job_id);
    let (cursor, planned, published): (Option<String>, Option<u64>, Option<u64>) = redis::pipe()
        .hget(&job_key, "cursor")
        .hget(&job_key, "planned")
        .hget(&job_key, "published")
        .query_async(redis)
        .await?;
    let mut cursor = cursor.filter(|c| !c.is_empty());
    let mut planned = planned.unwrap_or(0);
    let mut published = published.unwrap_or(0);
    if cursor.is_some() {
        tracing::info!(%job_id, planned, "resuming planning from checkpoint");
    }
    let rollout = &record.spec.rollout;
    let default_rate = p.settings.coordinator.default_max_per_second;
    let mut targets = Targets::new(&p.names, record.id, &record.spec, 1);
    let mut pace = Pace::new();
    let mut state = record.state;
    let mut succeeded = record.count(ExecutionState::Succeeded);
    let mut batches = 0u64;

    loop {
        if p.shutdown.is_cancelled() {
            tracing::info!(%job_id, planned, "planner stopping for shutdown; will resume");
            return Ok(());
        }
        renew_lease(p, redis, job_id).await?;
        // The state (and, with abort criteria, the counters) before every batch; a ramp
        // that counts successes reads them every few batches.
        if !state.is_stopping() {
            let now = if rollout.abort.is_empty() && !needs_counts(rollout, batches) {
                store::load_job_state(redis, &p.names, job_id)
                    .await?
                    .unwrap_or(JobState::Canceling)
            } else {
                let r = watch(p, redis, job_id).await?;
                succeeded = r.count(ExecutionState::Succeeded);
                r.state
            };
            state = now;
        }
        batches += 1;
        let end = ended(&record.spec);
        if let Some(behavior) = end {
            state = apply_end(p, redis, job_id, state, behavior).await?;
        }
        if state == JobState::Paused && end.is_none() {
            pause(p, WATCH_EVERY).await;
            continue;
        }
        let rate = rollout.rate(default_rate, published, succeeded);
        targets.set_batch(Pace::batch(rate, p.settings.coordinator.publish_batch));
        let (decisions, next) = targets
            .next_batch(redis, &p.names, cursor.as_deref())
            .await
            .context("reading targets")?;
        let Some(next) = next else {
            if record.spec.continuous && !state.is_stopping() && end.is_none() {
                // Every target so far has the job: look again for devices that came to
                // match meanwhile, from the start.
                cursor = None;
                let () = redis.hset(&job_key, "cursor", "").await?;
                pause(p, CONTINUOUS_RESCAN).await;
                continue;
            }
            planning_done(p, redis, job_id, planned).await?;
            return Ok(());
        };
        // A continuous job passes over its targets again and again: only devices without a
        // status yet are new.
        let decisions = if record.spec.continuous {
            new_devices(p, redis, job_id, decisions).await?
        } else {
            decisions
        };

        let canceling = state.is_stopping() || end.is_some();
        let now = now_ms();
        let mut sent = Vec::new();
        let mut final_statuses = Vec::new();
        for d in &decisions {
            match d {
                Decision::Send(device) if !canceling => sent.push(device.as_str()),
                Decision::Send(device) => final_statuses.push((
                    device.as_str(),
                    status(ExecutionState::Canceled, stopped_reason(state), now),
                )),
                Decision::Skip { device, reason } => final_statuses.push((
                    device.as_str(),
                    status(ExecutionState::Skipped, reason, now),
                )),
            }
        }
        send(p, redis, job_id, lane(record), &sent).await?;
        conclude(p, redis, job_id, &final_statuses).await?;

        // Checkpoint: cursor and counts move together, after the batch is safely out.
        planned += decisions.len() as u64;
        published += sent.len() as u64;
        checkpoint(
            p,
            redis,
            job_id,
            &[
                ("cursor", next.clone()),
                ("planned", planned.to_string()),
                ("published", published.to_string()),
                ("updated_at_ms", now_ms().to_string()),
            ],
        )
        .await?;
        cursor = Some(next);
        pace.after(p, sent.len(), rate).await;
    }
}

/// Whether a ramp counting successes needs fresh counters for batch `n` (every 4th).
fn needs_counts(rollout: &shared::rollout::Rollout, n: u64) -> bool {
    rollout
        .ramp
        .as_ref()
        .is_some_and(|r| r.increase_after.succeeded.is_some())
        && n.is_multiple_of(4)
}

/// The error recorded on devices canceled before they were sent the job (a running job's
/// devices end so when its `schedule.end_at` passed).
pub(crate) fn stopped_reason(state: JobState) -> &'static str {
    match state {
        JobState::Aborting => "job aborted before the device was sent the job",
        JobState::Canceling | JobState::Canceled => {
            "job canceled before the device was sent the job"
        }
        _ => "job reached its schedule.end_at before the device was sent the job",
    }
}

pub(crate) fn status(state: ExecutionState, reason: &str, now: u64) -> DeviceStatus {
    DeviceStatus {
        state,
        attempts: 0,
        error: Some(reason.to_owned()),
        updated_at_ms: now,
        next_attempt_at_ms: None,
        worker: None,
        published_at_ms: None,
        readings: None,
    }
}

/// Publishes the devices' tasks, `amqp.tasks_per_message` to a message, and waits for all
/// confirms.
async fn publish_batch(
    p: &Planners,
    job_id: Uuid,
    devices: &[&str],
    now: u64,
) -> anyhow::Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let span = tracing::info_span!(
        "publish fleetbatch.tasks",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.destination.name = %p.names.tasks_exchange(),
        job_id = %job_id,
        messaging.batch.message_count = devices.len().div_ceil(usize::from(p.settings.amqp.tasks_per_message.max(1))),
        tasks = devices.len(),
    );
    async {
        let per_message = usize::from(p.settings.amqp.tasks_per_message.max(1));
        let mut pending = Vec::with_capacity(devices.len().div_ceil(per_message));
        for chunk in devices.chunks(per_message) {
            let tasks: Vec<DeviceTask> = chunk
                .iter()
                .map(|device| DeviceTask {
                    version: WIRE_VERSION,
                    job_id,
                    execution_id: shared::state::execution_id(job_id, device),
                    device_id: (*device).to_owned(),
                    attempts: 0,
                    parked: 0,
                    published_at_ms: now,
                })
                .collect();
            pending.push(shared::topology::send_tasks(&p.publisher, &p.names, None, &tasks).await?);
        }
        for confirm in pending {
            confirm.wait().await.context("publishing tasks")?;
        }
        p.metrics.tasks_published.inc_by(devices.len() as u64);
        Ok(())
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_owner_renews_or_releases_a_lease() {
        let mut redis = shared::store::connect(&shared::config::RedisSettings::for_tests(), "")
            .await
            .expect("redis");
        let key = format!("u{}:lease", Uuid::new_v4().simple());
        let ttl = Duration::from_secs(5);
        // Nobody holds it: renewing does not take it.
        assert!(!renew(&mut redis, &key, "a", ttl).await.expect("renew"));
        let () = redis.set(&key, "a").await.expect("set");
        assert!(renew(&mut redis, &key, "a", ttl).await.expect("renew"));
        // Another coordinator can neither renew nor release it.
        assert!(!renew(&mut redis, &key, "b", ttl).await.expect("renew"));
        assert!(!release(&mut redis, &key, "b").await.expect("release"));
        let holder: Option<String> = redis.get(&key).await.expect("get");
        assert_eq!(holder.as_deref(), Some("a"));
        assert!(release(&mut redis, &key, "a").await.expect("release"));
        let holder: Option<String> = redis.get(&key).await.expect("get");
        assert_eq!(holder, None);
    }

    #[tokio::test]
    async fn a_checkpoint_is_written_only_by_the_lease_holder() {
        let mut redis = shared::store::connect(&shared::config::RedisSettings::for_tests(), "")
            .await
            .expect("redis");
        let ns = format!("u{}", Uuid::new_v4().simple());
        let (lease, job) = (format!("{ns}:lease"), format!("{ns}:job"));
        let () = redis.set(&lease, "a").await.expect("set");
        let fields = [("cursor", "dev-9".to_owned()), ("planned", "10".to_owned())];
        assert!(
            fenced_write(&mut redis, &lease, "a", &job, &fields)
                .await
                .expect("write")
        );
        // Stalled past its lease, "b" comes back: its older cursor is not written.
        let stale = [("cursor", "dev-3".to_owned()), ("planned", "4".to_owned())];
        assert!(
            !fenced_write(&mut redis, &lease, "b", &job, &stale)
                .await
                .expect("write")
        );
        let () = redis.del(&lease).await.expect("lapse");
        assert!(
            !fenced_write(&mut redis, &lease, "a", &job, &stale)
                .await
                .expect("write")
        );
        let cursor: Option<String> = redis.hget(&job, "cursor").await.expect("get");
        assert_eq!(cursor.as_deref(), Some("dev-9"));
        let _: () = redis.del(&[&lease, &job]).await.expect("clean");
    }
}
