//! One task, start to finish.
//!
//! Owns the I/O around a delivery: decode, claim the execution, ask [`crate::decide`] whether
//! to deliver, deliver, ask it what the result means, record and report; and returns an
//! [`Outcome`] that
//! [`crate::consume`] applies to the broker. Errors of Redis or RabbitMQ never turn into a
//! device outcome: the task is handed back instead and nothing is recorded that did not
//! happen.
//!
//! Order of the final steps, and why: the result is stored in the idempotency record first,
//! then published (confirmed), then the task is acked. A worker dying after the record is
//! written leaves a task whose next copy re-publishes the stored result without reaching the
//! device again, so a device is re-sent a task only when a worker died mid-delivery.

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use lapin::types::FieldTable;
use shared::{
    amqp::{self, Publisher},
    config::Settings,
    messages::{DeviceTask, TaskResult, WIRE_VERSION},
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
    store::Scripts,
    topology::Names,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    decide::{self, After, Before},
    deliver::{self, AttemptPolicy, DeliveryRequest, Transport},
    idempotency::{self, NextAction},
    jobs::{JobCache, JobView as Job},
    limits::{self, Slot},
};
use shared::{
    parking::{self, Wait},
    window::Verdict,
};

/// How long a paused job's task waits before it is looked at again (resume wakes it at once).
const PAUSED_RECHECK_MS: u64 = 60_000;
/// How long a task waiting for its device's turn waits at most before it looks again (the
/// end of the job ahead wakes it at once).
const TURN_RECHECK_MS: u64 = 60_000;

/// Everything a handler needs, shared by all handlers of a worker.
#[derive(Debug)]
pub struct Context {
    /// This worker's id (claims, results, logs).
    pub worker_id: String,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Names of queues and keys.
    pub names: Names,
    /// Redis (multiplexed; clone per use).
    pub redis: RedisConn,
    /// Confirmed publishing (forwarded and dead-lettered tasks).
    pub publisher: Publisher,
    /// Batched, confirmed publishing of results.
    pub reporter: crate::report::Reporter,
    /// Job documents and states.
    pub jobs: JobCache,
    /// How devices are reached.
    pub transport: Transport,
    /// Status scripts.
    pub scripts: Scripts,
    /// Claims, merged into one Redis call per batch while the worker is busy.
    pub claims: crate::idempotency::Claims,
    /// Fires when the worker starts shutting down.
    pub shutdown: CancellationToken,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Executions this process is handling now, across its broker sessions. A second copy
    /// of one (a planner that re-published its last batch, or the redelivery of a task whose
    /// handler in the previous session still runs) must wait, not share the claim this
    /// process holds.
    pub active: Active,
}

/// The executions a worker process is handling; one set for the process's whole life.
pub type Active = Arc<std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>>;

/// Removes an execution from [`Context::active`] when its handler ends.
struct ActiveGuard<'a>(&'a Context, uuid::Uuid);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Where a forwarded copy of a task goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardTo {
    /// Back to the tasks queue, at once.
    Tasks,
    /// Delayed-retry queue `n`.
    Retry(usize),
}

/// What to do with the delivery once the handler is done.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Done (result reported, or it had been before): ack.
    Ack,
    /// Publish this updated copy of the task, then ack the original.
    Forward {
        /// Destination.
        to: ForwardTo,
        /// The copy (with updated attempt counts).
        task: DeviceTask,
    },
    /// Bad message: move it to the dead-letter queue with this reason.
    DeadLetter(String),
    /// Infrastructure trouble: give the task back to the broker unchanged.
    Requeue,
}

/// Handles one task of a delivery, with the delivery's headers (its trace context).
pub async fn handle(ctx: &Context, task: &DeviceTask, headers: Option<&FieldTable>) -> Outcome {
    let span = tracing::info_span!(
        "process fleetbatch.tasks",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.destination.name = %ctx.names.tasks_queue(),
        messaging.message.id = %task.execution_id,
        job_id = %task.job_id,
        execution_id = %task.execution_id,
        device_id = %task.device_id,
        attempt = task.attempts.saturating_add(1),
        outcome = Empty,
        trace_id = Empty,
    );
    amqp::link_trace(&span, headers);
    shared::telemetry::record_trace_id(&span);
    async {
        match process(ctx, task).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(
                    error.message = %e,
                    error.cause_chain = %shared::telemetry::chain(e.as_ref()),
                    "task handed back: infrastructure error"
                );
                // Let the next copy be taken at once rather than after our lease. A stored
                // result is never removed by this (only our claim is).
                let mut redis = ctx.redis.clone();
                let _ =
                    idempotency::release(&mut redis, &ctx.names, task.execution_id, &ctx.worker_id)
                        .await;
                // Give the infrastructure a moment instead of spinning on the task.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Outcome::Requeue
            }
        }
    }
    .instrument(span)
    .await
}

async fn process(ctx: &Context, task: &DeviceTask) -> anyhow::Result<Outcome> {
    let mut redis = ctx.redis.clone();
    let Some(job) = ctx.jobs.get(&mut redis, &ctx.names, task.job_id).await? else {
        return Ok(Outcome::DeadLetter(format!("unknown job {}", task.job_id)));
    };
    if let Some(reason) = decide::task_refusal(task) {
        tracing::error!(%reason, security_event = "task_refused", "refusing a task");
        return Ok(Outcome::DeadLetter(reason));
    }
    if job.state == JobState::Paused {
        // Held until the job resumes (which wakes it), without an attempt or a worker slot;
        // looked at again within a minute in any case.
        parking::park(
            &mut redis,
            &ctx.names,
            task,
            Wait::Until(now_ms().saturating_add(PAUSED_RECHECK_MS)),
        )
        .await?;
        mark(ctx, "paused");
        return Ok(Outcome::Ack);
    }
    let mut closes_at = None;
    if job.state.is_live() {
        match wait_if_needed(ctx, &mut redis, task, &job).await? {
            Ok(closes) => closes_at = closes,
            Err(parked) => return Ok(parked),
        }
    }
    if !ctx
        .active
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(task.execution_id)
    {
        // Another handler of this process has it: this copy waits its turn.
        return Ok(Outcome::Forward {
            to: ForwardTo::Retry(0),
            task: task.clone(),
        });
    }
    let _active = ActiveGuard(ctx, task.execution_id);
    let attempt_timeout = decide::attempt_timeout(
        job.spec.retry.attempt_timeout_secs,
        ctx.settings.worker.attempt_timeout(),
    );
    let lease = decide::claim_lease(ctx.settings.worker.claim_lease(), attempt_timeout);

    // A per-tag concurrency limit: a slot before the claim, or the task waits its turn.
    let slot = match &job.spec.rollout.max_in_flight {
        Some(limit) if job.state.is_live() => {
            limits::take(
                &mut redis,
                &ctx.names,
                limit,
                task.job_id,
                &task.device_id,
                task.execution_id,
                lease,
            )
            .await?
        }
        _ => Slot::Unlimited,
    };
    let held = match slot {
        Slot::Full { value } => {
            tracing::debug!(%value, "tag value at its in-flight limit; the task waits its turn");
            mark(ctx, "in_flight_limit");
            return Ok(Outcome::Forward {
                to: ForwardTo::Retry(0),
                task: task.clone(),
            });
        }
        Slot::Held(h) => Some(h),
        Slot::Unlimited => None,
    };
    let _slot = SlotGuard(held.clone().map(|h| (ctx.redis.clone(), h)));

    let claimed = in_progress(ctx, task, task.attempts, None, None);
    let recorded_attempts = match idempotency::try_claim(
        &mut redis,
        &ctx.claims,
        &ctx.names,
        task,
        &ctx.worker_id,
        lease,
        &claimed,
        job.state.is_live() && !job.spec.concurrent,
    )
    .await?
    {
        NextAction::StartProcessing { recorded_attempts } => recorded_attempts,
        NextAction::ReturnSavedResult(result) => {
            mark(ctx, "already_done");
            ctx.reporter.publish(*result).await?;
            return Ok(Outcome::Ack);
        }
        NextAction::AlreadyRecorded => {
            mark(ctx, "already_done");
            return Ok(Outcome::Ack);
        }
        NextAction::NotTargeted => {
            let reason = format!(
                "device {} is not a target of job {}",
                task.device_id, task.job_id
            );
            tracing::error!(%reason, security_event = "task_refused", "refusing a task");
            return Ok(Outcome::DeadLetter(reason));
        }
        NextAction::WaitForTurn { behind } => {
            // Nothing held: the task waits in the parking lot, woken when the job ahead ends
            // on the device (or looked at again within a minute).
            let due = now_ms()
                .saturating_add(TURN_RECHECK_MS)
                .min(job.deadline_ms.unwrap_or(u64::MAX));
            parking::park(&mut redis, &ctx.names, task, Wait::Turn(due)).await?;
            // The job ahead may have ended between the claim and the park, its end then
            // finding nothing to wake: looked at once more, now that the task is parked.
            idempotency::recheck_turn(&mut redis, &ctx.names, task).await?;
            note_waiting(
                ctx,
                task,
                ExecutionState::WaitingForDevice,
                None,
                &format!("waits for job {behind}, which has the device first"),
            )
            .await;
            mark(ctx, "waiting_for_turn");
            return Ok(Outcome::Ack);
        }
        NextAction::HeldByOther { holder } => {
            tracing::debug!(%holder, "execution claimed by another worker; retrying later");
            return Ok(Outcome::Forward {
                to: ForwardTo::Retry(0),
                task: task.clone(),
            });
        }
    };
    // The task's own count may be behind if a holder could not publish its updated copy.
    let attempts_before = task.attempts.max(recorded_attempts);

    let req = DeliveryRequest {
        job_id: task.job_id,
        execution_id: task.execution_id,
        device_id: task.device_id.clone(),
        spec: job.spec.clone(),
        attempt: attempts_before.saturating_add(1),
        signed: job.signed.clone(),
        health_check: false,
    };
    let (state, attempts, error, readings) =
        match decide::before_delivery(job.state.is_live(), job.deadline_ms, now_ms()) {
            Before::Conclude { state, error } => (state, attempts_before, Some(error), None),
            Before::Deliver => {
                let policy = AttemptPolicy {
                    attempt_timeout,
                    max_attempts: job.spec.retry.max_attempts,
                    backoff: ctx.settings.worker.backoff.clone(),
                    deadline_ms: job.deadline_ms,
                    pause_at_ms: closes_at,
                };
                let held = &held;
                let between_attempts = |p: deliver::Progress| async move {
                    if let Some(h) = held {
                        let mut redis = ctx.redis.clone();
                        if !matches!(
                            h.renew(&mut redis, lease.saturating_add(p.delay)).await,
                            Ok(true)
                        ) {
                            // The slot lapsed and was taken: give the task back.
                            return deliver::Claim::Stopping;
                        }
                    }
                    // The window closed, or the device went offline: no further attempt
                    // here; the task goes back and its next handler parks it.
                    if closes_at.is_some_and(|c| now_ms() >= c) {
                        return deliver::Claim::Stopping;
                    }
                    if ctx.transport.announces_presence() {
                        let mut redis = ctx.redis.clone();
                        if matches!(
                            parking::is_offline(&mut redis, &ctx.names, &task.device_id).await,
                            Ok(true)
                        ) {
                            return deliver::Claim::Stopping;
                        }
                    }
                    // Paused, canceled or aborted meanwhile: no further attempt here; the
                    // task goes back and its next handler parks or cancels it.
                    let mut redis = ctx.redis.clone();
                    if let Ok(Some(now)) = ctx.jobs.get(&mut redis, &ctx.names, task.job_id).await
                        && now.state != JobState::InProgress
                    {
                        return deliver::Claim::Stopping;
                    }
                    let status = in_progress(
                        ctx,
                        task,
                        p.attempts,
                        Some(p.error),
                        Some(p.next_attempt_at_ms),
                    );
                    hold_claim(ctx, task, &status, lease.saturating_add(p.delay)).await
                };
                let delivered = deliver::run(
                    &ctx.transport,
                    req.clone(),
                    attempts_before,
                    &policy,
                    &ctx.shutdown,
                    &ctx.metrics,
                    between_attempts,
                )
                .await;
                match decide::after_delivery(
                    delivered,
                    task.parked,
                    &ctx.settings.worker.retry_delays_ms,
                    job.deadline_ms,
                    now_ms(),
                ) {
                    After::Conclude {
                        state: ExecutionState::Succeeded,
                        attempts,
                        error,
                        readings,
                    } if job.spec.health.is_some() => {
                        let health = job
                            .spec
                            .health
                            .as_ref()
                            .map_or((0, 5), |h| (h.window_secs, h.probe_every_secs));
                        match verify(ctx, task, &req, health, attempt_timeout, lease, attempts)
                            .await
                        {
                            Some((state, verdict)) => {
                                (state, attempts, verdict.or(error), readings)
                            }
                            // Stopping, or the claim lapsed: the next copy delivers again (the
                            // device acknowledges the repeat) and verifies.
                            None => return Ok(requeue(ctx, task, attempts).await),
                        }
                    }
                    After::Conclude {
                        state,
                        attempts,
                        error,
                        readings,
                    } => (state, attempts, error, readings),
                    After::Park {
                        queue,
                        due_ms,
                        attempts,
                        error,
                    } => {
                        let status = DeviceStatus {
                            state: ExecutionState::RetryScheduled,
                            attempts,
                            error: Some(error),
                            updated_at_ms: now_ms(),
                            next_attempt_at_ms: Some(due_ms),
                            worker: Some(ctx.worker_id.clone()),
                            published_at_ms: None,
                            readings: None,
                        };
                        hand_back(ctx, task, &status).await;
                        mark(ctx, "retry_scheduled");
                        return Ok(Outcome::Forward {
                            to: ForwardTo::Retry(queue),
                            task: DeviceTask {
                                attempts,
                                parked: task.parked.saturating_add(1),
                                ..task.clone()
                            },
                        });
                    }
                    After::Unavailable { error } => {
                        // Handled like Redis or broker trouble: the task goes back, uncounted.
                        tracing::debug!("device transport unavailable");
                        anyhow::bail!("{error}");
                    }
                    After::ClaimLost { attempts } => {
                        // Only after a real lapse (the worker stalled, or Redis was down for
                        // longer than the lease). The last attempt is then recorded only in this
                        // copy: a stale copy that claims first counts from the attempt before it.
                        tracing::warn!("claim lapsed mid-retry; handing the task back");
                        mark(ctx, "claim_lost");
                        return Ok(Outcome::Forward {
                            to: ForwardTo::Tasks,
                            task: DeviceTask {
                                attempts,
                                ..task.clone()
                            },
                        });
                    }
                    After::HandBack { attempts } => {
                        return Ok(requeue(ctx, task, attempts).await);
                    }
                    After::Wait {
                        attempts,
                        due_ms,
                        wait,
                    } => {
                        return wait_for_device(ctx, task, &req, attempts, due_ms, &wait).await;
                    }
                }
            }
        };

    ctx.transport.conclude(&req, state).await;
    mark(ctx, state.as_str());
    let result = TaskResult {
        version: WIRE_VERSION,
        job_id: task.job_id,
        execution_id: task.execution_id,
        device_id: task.device_id.clone(),
        state,
        attempts,
        error,
        worker: ctx.worker_id.clone(),
        published_at_ms: task.published_at_ms,
        finished_at_ms: now_ms(),
        readings,
    };
    // The outcome is known: wait for Redis rather than lose it (losing it would send the
    // device the job again).
    let retention = Duration::from_secs(ctx.settings.worker.done_retention_secs);
    persist(ctx, || {
        let mut redis = ctx.redis.clone();
        let result = &result;
        async move { idempotency::mark_done(&mut redis, &ctx.names, result, retention).await }
    })
    .await?;
    ctx.reporter.publish(result).await?;
    Ok(Outcome::Ack)
}

/// After a device reported SUCCEEDED on a job with a health confirmation: asks it for its
/// health every `every` seconds (holding the claim, the device shown VERIFYING) until it
/// reports healthy (SUCCEEDED), unhealthy (UNHEALTHY) or rolled back (ROLLED_BACK), or the
/// `window` seconds pass without a healthy report (UNHEALTHY). Returns the terminal state
/// and its reason; `None` when the worker stops or loses the claim first.
async fn verify(
    ctx: &Context,
    task: &DeviceTask,
    req: &DeliveryRequest,
    (window, every): (u64, u64),
    attempt_timeout: Duration,
    lease: Duration,
    attempts: u32,
) -> Option<(ExecutionState, Option<String>)> {
    use devices::protocol::HealthStatus;
    let until = now_ms().saturating_add(window.saturating_mul(1_000));
    let every = Duration::from_secs(every.max(1));
    let probe = DeliveryRequest {
        health_check: true,
        ..req.clone()
    };
    if !ctx.transport.probes_health() {
        return Some((
            ExecutionState::Unhealthy,
            Some("the job asks for a health confirmation, and AWS IoT Jobs devices cannot be asked for one".into()),
        ));
    }
    let mut last = "no health report yet".to_owned();
    loop {
        let status = DeviceStatus {
            state: ExecutionState::Verifying,
            attempts,
            error: Some(last.clone()),
            updated_at_ms: now_ms(),
            next_attempt_at_ms: Some(now_ms() + every.as_millis() as u64),
            worker: Some(ctx.worker_id.clone()),
            published_at_ms: None,
            readings: None,
        };
        if !matches!(
            hold_claim(ctx, task, &status, lease.saturating_add(every)).await,
            deliver::Claim::Held
        ) {
            return None;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = ctx.shutdown.cancelled() => return None,
        }
        let answer = tokio::time::timeout(attempt_timeout, ctx.transport.attempt(&probe)).await;
        match answer {
            Ok(Ok(deliver::Reply {
                health: Some(h), ..
            })) => {
                let version = h.version.unwrap_or_else(|| "an unknown version".into());
                let reason = h.reason.unwrap_or_else(|| "no reason given".into());
                match h.status {
                    HealthStatus::Healthy => {
                        mark(ctx, "healthy");
                        return Some((ExecutionState::Succeeded, None));
                    }
                    HealthStatus::Unhealthy => {
                        return Some((
                            ExecutionState::Unhealthy,
                            Some(format!("unhealthy after install, runs {version}: {reason}")),
                        ));
                    }
                    HealthStatus::RolledBack => {
                        return Some((
                            ExecutionState::RolledBack,
                            Some(format!("device rolled itself back to {version}: {reason}")),
                        ));
                    }
                    HealthStatus::Pending => last = "health check pending on the device".into(),
                }
            }
            Ok(Ok(_)) => last = "an answer without a health report".into(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => {
                last = format!(
                    "no answer to the health probe within {} ms",
                    attempt_timeout.as_millis()
                );
            }
        }
        if now_ms() >= until {
            return Some((
                ExecutionState::Unhealthy,
                Some(format!(
                    "no healthy report within the {window} s health window (last: {last})"
                )),
            ));
        }
    }
}

/// Parks a task whose device may not be contacted now: outside its maintenance window, or
/// announced offline. Its status shows why and until when; no attempt is spent and no slot
/// held: `Err(outcome)`. `Ok(closes_at)`: deliver it now; with windows, no further attempt
/// starts after `closes_at` (one under way finishes). A passed deadline is left to the
/// delivery path (TIMED_OUT).
async fn wait_if_needed(
    ctx: &Context,
    redis: &mut RedisConn,
    task: &DeviceTask,
    job: &Job,
) -> anyhow::Result<Result<Option<u64>, Outcome>> {
    let now = now_ms();
    if job.deadline_ms.is_some_and(|d| now >= d) {
        return Ok(Ok(None));
    }
    let mut closes_at = None;
    if !job.spec.maintenance.is_empty() {
        let device =
            shared::store::read_devices(redis, &ctx.names, std::slice::from_ref(&task.device_id))
                .await?
                .pop()
                .flatten();
        match job.spec.maintenance.verdict(device.as_ref(), now) {
            Verdict::Unrestricted => {}
            Verdict::Open { closes_at_ms } => closes_at = Some(closes_at_ms),
            Verdict::Closed { opens_at_ms } => {
                let due = opens_at_ms
                    .unwrap_or(u64::MAX)
                    .min(job.deadline_ms.unwrap_or(u64::MAX));
                parking::park(redis, &ctx.names, task, Wait::Until(due)).await?;
                let why = match opens_at_ms {
                    Some(_) => "outside its maintenance window",
                    None => "its maintenance window never opens again",
                };
                note_waiting(ctx, task, ExecutionState::WaitingForWindow, Some(due), why).await;
                mark(ctx, "waiting_for_window");
                return Ok(Err(Outcome::Ack));
            }
        }
    }
    if ctx.transport.announces_presence()
        && parking::is_offline(redis, &ctx.names, &task.device_id).await?
        && parking::park(redis, &ctx.names, task, Wait::Device(job.deadline_ms)).await?
    {
        note_waiting(
            ctx,
            task,
            ExecutionState::WaitingForDevice,
            job.deadline_ms,
            "device offline: waits for it to come online",
        )
        .await;
        mark(ctx, "waiting_for_device");
        return Ok(Err(Outcome::Ack));
    }
    Ok(Ok(closes_at))
}

/// Parks a task whose device works at its own pace (AWS IoT Jobs: its execution is QUEUED
/// until the device asks for it, or IN_PROGRESS until it reports): no worker slot and no
/// attempt while it waits; the device's next change to the execution, its step timer or the
/// job's deadline wakes it.
async fn wait_for_device(
    ctx: &Context,
    task: &DeviceTask,
    req: &DeliveryRequest,
    attempts: u32,
    due_ms: Option<u64>,
    wait: &deliver::DeviceWait,
) -> anyhow::Result<Outcome> {
    let waiting = DeviceTask {
        attempts,
        ..task.clone()
    };
    let mut redis = ctx.redis.clone();
    parking::park(&mut redis, &ctx.names, &waiting, Wait::Execution(due_ms)).await?;
    let status = DeviceStatus {
        state: if wait.started {
            ExecutionState::InProgress
        } else {
            ExecutionState::WaitingForDevice
        },
        attempts,
        error: Some(wait.why.clone()),
        updated_at_ms: now_ms(),
        next_attempt_at_ms: due_ms,
        worker: Some(ctx.worker_id.clone()),
        published_at_ms: Some(task.published_at_ms),
        readings: None,
    };
    hand_back(ctx, task, &status).await;
    // The device may have changed the execution between the read and the park, its wake
    // then finding nothing parked: looked at once more, now that the task is parked.
    if ctx.transport.execution_changed(req, wait.version).await {
        parking::wake_device(&mut redis, &ctx.names, &task.device_id, now_ms()).await?;
    }
    mark(
        ctx,
        if wait.started {
            "waiting_for_device_step"
        } else {
            "waiting_for_device"
        },
    );
    Ok(Outcome::Ack)
}

/// Shows a parked task's device as waiting (best effort: the lot holds the task whatever the
/// status says).
async fn note_waiting(
    ctx: &Context,
    task: &DeviceTask,
    state: ExecutionState,
    until: Option<u64>,
    why: &str,
) {
    let status = DeviceStatus {
        state,
        attempts: task.attempts,
        error: Some(why.to_owned()),
        updated_at_ms: now_ms(),
        next_attempt_at_ms: until.filter(|u| *u != u64::MAX),
        worker: Some(ctx.worker_id.clone()),
        published_at_ms: Some(task.published_at_ms),
        readings: None,
    };
    let mut redis = ctx.redis.clone();
    if let Err(e) = ctx
        .scripts
        .record_progress(
            &mut redis,
            &ctx.names,
            task.job_id,
            &task.device_id,
            &status,
        )
        .await
    {
        tracing::debug!(error.message = %e, "waiting status not recorded");
    }
}

/// Hands the task back to the tasks queue with `attempts` made: the device shows QUEUED with
/// them, the claim is given up, and the forwarded copy counts on from there.
async fn requeue(ctx: &Context, task: &DeviceTask, attempts: u32) -> Outcome {
    let status = DeviceStatus {
        state: ExecutionState::Queued,
        attempts,
        error: None,
        updated_at_ms: now_ms(),
        next_attempt_at_ms: None,
        worker: Some(ctx.worker_id.clone()),
        published_at_ms: None,
        readings: None,
    };
    hand_back(ctx, task, &status).await;
    mark(ctx, "handed_back");
    Outcome::Forward {
        to: ForwardTo::Tasks,
        task: DeviceTask {
            attempts,
            ..task.clone()
        },
    }
}

/// Records a task's attempts in its device status (so they survive even if its updated copy
/// cannot be published), then gives up the claim. If the worker is stopping while Redis is
/// unreachable, neither happens: the forwarded copy still carries the attempts, and the claim
/// lapses on its own.
async fn hand_back(ctx: &Context, task: &DeviceTask, status: &DeviceStatus) {
    let recorded = persist(ctx, || {
        let mut redis = ctx.redis.clone();
        async move {
            ctx.scripts
                .record_progress(&mut redis, &ctx.names, task.job_id, &task.device_id, status)
                .await
        }
    })
    .await;
    if let Err(e) = recorded {
        tracing::warn!(error.message = %e, "stopping with Redis unreachable: progress not recorded");
        return;
    }
    let mut redis = ctx.redis.clone();
    if let Err(e) =
        idempotency::release(&mut redis, &ctx.names, task.execution_id, &ctx.worker_id).await
    {
        // The lease expires on its own.
        tracing::debug!(error.message = %e, "claim not released");
    }
}

/// Gives a per-tag slot back when the handler is done with the task, however it ends.
struct SlotGuard(Option<(RedisConn, limits::Held)>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some((mut redis, held)) = self.0.take() {
            tokio::spawn(async move {
                if let Err(e) = held.release(&mut redis).await {
                    tracing::debug!(error.message = %e, "slot not released; it lapses");
                }
            });
        }
    }
}

/// Between two attempts: records the progress and renews the claim past the coming wait.
/// While Redis is unreachable it waits (the task keeps its slot) rather than hand the task
/// back: the attempts made so far exist nowhere else yet, and a stale copy taken up meanwhile
/// would count from an older number.
async fn hold_claim(
    ctx: &Context,
    task: &DeviceTask,
    progress: &DeviceStatus,
    lease: Duration,
) -> deliver::Claim {
    let held = persist(ctx, || {
        let mut redis = ctx.redis.clone();
        async move {
            idempotency::hold(
                &mut redis,
                &ctx.names,
                task,
                &ctx.worker_id,
                lease,
                progress,
            )
            .await
        }
    })
    .await;
    match held {
        Ok(true) => deliver::Claim::Held,
        Ok(false) => deliver::Claim::Lost,
        Err(_) => deliver::Claim::Stopping,
    }
}

/// Runs a Redis write until it succeeds, backing off while Redis is unreachable; gives up
/// only when the worker is stopping.
async fn persist<F, Fut, T, E>(ctx: &Context, mut write: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    shared::backoff::until_ok(
        shared::backoff::outage(Duration::from_millis(100), Duration::from_secs(2)),
        &ctx.shutdown,
        &mut write,
        |e, delay| tracing::warn!(error.message = %e, retry_in_ms = delay.as_millis() as u64, "Redis unreachable; retrying"),
    )
    .await
    .map_err(|stopped| stopped.last_error.into())
}

/// The status of a device this worker holds.
fn in_progress(
    ctx: &Context,
    task: &DeviceTask,
    attempts: u32,
    error: Option<String>,
    next_attempt_at_ms: Option<u64>,
) -> DeviceStatus {
    DeviceStatus {
        state: ExecutionState::InProgress,
        attempts,
        error,
        updated_at_ms: now_ms(),
        next_attempt_at_ms,
        worker: Some(ctx.worker_id.clone()),
        published_at_ms: Some(task.published_at_ms),
        readings: None,
    }
}

/// Notes how a task ended, on its span and in the metrics.
fn mark(ctx: &Context, outcome: &str) {
    tracing::Span::current().record("outcome", outcome);
    ctx.metrics.outcomes.with_label_values(&[outcome]).inc();
}
