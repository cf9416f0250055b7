//! The AWS IoT Jobs device API over MQTT, served by the workers.
//!
//! Owns job executions as AWS IoT Jobs devices see them: state, `versionNumber`,
//! `executionNumber`, times, status details and step timers, kept in Redis so that any worker
//! can answer any device; and the request topics `$aws/things/{thing}/jobs/get`, `start-next`,
//! `{jobId}/get` (`$next` included) and `{jobId}/update`, each request answered by one
//! worker: through a shared subscription where the broker shares `$aws` topics, otherwise
//! by the worker that claims it in Redis. A delivery queues the execution and sends
//! `notify-next`/`notify` when it is new; the attempt then waits a short hold for the
//! device's terminal update (handed over in process when this worker answered it, else
//! routed to the worker holding the task through its reply topic, and polled from Redis). A device that has not finished by then leaves its execution
//! waiting in Redis, QUEUED or IN_PROGRESS, and its task parked without a worker slot; every
//! change a device makes to an execution wakes its task ([`shared::parking::wake_device`]).
//! State changes are Lua scripts: a version check and its write can never interleave with
//! another worker's.
//! It never records fleetbatch outcomes (the task handler does).
//!
//! # Layout
//! - this module: the transport side (queue an execution, wait for the device, conclude);
//! - `api`: the device requests (`get`, `start-next`, `{jobId}/get`, `{jobId}/update`);
//! - `scripts`: the Lua scripts and the stored execution record;
//! - `documents`: the JSON documents AWS IoT Jobs devices receive, and request validation.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use devices::{aws, mqtt::Link};
use redis::Script;
use serde_json::{Map, Value, json};
use shared::{state::ExecutionState, state::Readings, topology::Names};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::request::{DeliverError, DeliveryRequest, DeviceWait, Reply};
use crate::jobs::JobCache;

mod api;
mod copies;
mod documents;
mod scripts;

use documents::{pick_next, secs, summary};
pub(crate) use scripts::Record;
use scripts::{CHECK, CLAIM, START_NEXT};
use scripts::{FINISH, PENDING, PRELUDE, QUEUE, ScriptAnswer, UPDATE};
use shared::coalesce::{ScriptBatcher, script_batcher};

/// How often a waiting attempt re-reads its execution (step timers, missed wake-ups).
const POLL: Duration = Duration::from_secs(2);

/// The jobs API of one worker; cheap to clone.
#[derive(Debug, Clone)]
pub struct AwsJobs(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    link: Link,
    /// This worker's attempts waiting for their device (woken here when this worker holds the
    /// task of an execution a device changed).
    waiting: Arc<super::mqtt::Waiting>,
    redis: RedisConn,
    names: Names,
    holder: String,
    jobs: JobCache,
    retention: Duration,
    /// How long a delivery waits for the device before its task is parked.
    hold: Duration,
    /// The worker's attempt timeout (a job may set its own).
    attempt_timeout: Duration,
    /// Without a shared subscription: the window in which one worker claims each request.
    dedupe: Option<Duration>,
    /// How long an execution waits QUEUED before its device is notified again.
    renotify: Option<Duration>,
    /// Without a shared subscription: which copy of each recent request this is.
    seen: std::sync::Mutex<copies::Copies>,
    /// Without a shared subscription: claims of requests, those made at the same moment
    /// sent in one call.
    claims: Option<ScriptBatcher<i64>>,
    /// The jobs this worker last saw pending on things, newest first: the scripts that read a
    /// thing's pending executions are first given these, and need a second call only when
    /// the thing has another.
    recent: std::sync::Mutex<std::collections::VecDeque<String>>,
    queue: Script,
    check: Script,
    pending: Script,
    start_next: Script,
    update: Script,
    finish: Script,
}

/// What a task whose execution is not terminal waits for: the device to ask for it (and, with
/// `renotify`, a fresh `notify-next` after that long: a device that missed the first one
/// learns of its job then), or to finish it (its step timer, if any).
fn waiting_for(e: &Record, renotify: Option<Duration>, now_ms: u64) -> DeviceWait {
    let started = e.status() == "IN_PROGRESS";
    let step = e.num("step_deadline").filter(|d| started && *d > 0);
    let again = renotify
        .filter(|_| !started)
        .map(|r| now_ms.saturating_add(r.as_millis() as u64));
    DeviceWait {
        until_ms: step.or(again),
        started,
        version: e.num("version").unwrap_or(0),
        why: match (started, step) {
            (false, _) => "QUEUED: waits for the device to ask for its job".into(),
            (true, Some(_)) => "IN_PROGRESS on the device, within its step timer".into(),
            (true, None) => "IN_PROGRESS on the device".into(),
        },
    }
}

/// The AWS status of an execution state fleetbatch reached without the device saying so.
fn concluded_status(state: ExecutionState) -> Option<&'static str> {
    match state {
        ExecutionState::Canceled => Some("CANCELED"),
        ExecutionState::Failed | ExecutionState::TimedOut => Some("TIMED_OUT"),
        _ => None,
    }
}

/// The times the API keeps to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long a job's state is cached.
    pub(crate) job_cache: Duration,
    /// How long a finished execution stays readable.
    pub(crate) retention: Duration,
    /// How long a delivery waits for the device before its task is parked.
    pub(crate) hold: Duration,
    /// The worker's attempt timeout (a job may set its own).
    pub(crate) attempt_timeout: Duration,
    /// Without a shared subscription: the window in which one worker claims each request.
    pub(crate) dedupe: Option<Duration>,
    /// How long an execution waits QUEUED before its device is notified again (`None`: only
    /// when it is new).
    pub(crate) renotify: Option<Duration>,
}

impl AwsJobs {
    /// The API over `link`, with state in `redis`; `holder` is this worker's reply topic.
    pub(crate) fn new(
        link: Link,
        waiting: Arc<super::mqtt::Waiting>,
        redis: RedisConn,
        names: Names,
        holder: String,
        Timing {
            job_cache,
            retention,
            hold,
            attempt_timeout,
            dedupe,
            renotify,
        }: Timing,
    ) -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        // The scripts that wake the thing's parked tasks themselves.
        let waking = |body: &str| {
            Script::new(&format!(
                "{PRELUDE}{}{body}",
                shared::parking::WAKE_DEVICE_LUA
            ))
        };
        let claims =
            dedupe.map(|_| script_batcher(redis.clone(), Arc::new(Script::new(CLAIM)), 64, 4));
        Self(Arc::new(Inner {
            link,
            waiting,
            redis,
            names,
            holder,
            jobs: JobCache::new(job_cache),
            retention,
            hold,
            attempt_timeout,
            dedupe,
            renotify,
            seen: std::sync::Mutex::new(copies::Copies::new(
                dedupe.unwrap_or(Duration::from_millis(1)),
                std::time::Instant::now(),
            )),
            claims,
            recent: std::sync::Mutex::default(),
            queue: script(QUEUE),
            check: script(CHECK),
            pending: script(PENDING),
            start_next: waking(START_NEXT),
            update: waking(UPDATE),
            finish: script(FINISH),
        }))
    }

    async fn run(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<ScriptAnswer, String> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut redis = self.0.redis.clone();
        let raw: String = inv
            .invoke_async(&mut redis)
            .await
            .map_err(|e| format!("execution state unavailable: {e}"))?;
        serde_json::from_str(&raw).map_err(|e| format!("corrupt execution state: {e}"))
    }

    /// Runs PENDING or START_NEXT (keys: the thing's pending set, `lead`, then the jobs'
    /// executions; arguments: those `args` makes of the jobs given, then the jobs), first
    /// with the jobs the caller guesses are pending, then again with the pending jobs the
    /// script names until it knew them all.
    async fn run_over_pending<F>(
        &self,
        script: &Script,
        thing: &str,
        (lead, guess): (&[String], &[String]),
        args: impl Fn(Vec<String>) -> F,
    ) -> Result<ScriptAnswer, String>
    where
        F: std::future::Future<Output = Result<Vec<String>, String>>,
    {
        let mut jobs: Vec<String> = guess.to_vec();
        for job in self.recent_jobs() {
            if !jobs.contains(&job) {
                jobs.push(job);
            }
        }
        for _ in 0..8 {
            let mut keys = vec![self.0.names.aws_pending(thing)];
            keys.extend(lead.iter().cloned());
            keys.extend(jobs.iter().map(|j| self.0.names.aws_execution(j, thing)));
            let mut all = args(jobs.clone()).await?;
            all.extend(jobs.iter().cloned());
            let a = self.run(script, &keys, &all).await?;
            match a.unknown {
                Some(listed) => {
                    jobs = listed.split(',').map(str::to_owned).collect();
                    for job in &jobs {
                        self.saw_pending(job);
                    }
                }
                None => return Ok(a),
            }
        }
        Err("the thing's pending jobs kept changing".into())
    }

    /// How many jobs [`Self::recent_jobs`] remembers.
    const RECENT: usize = 8;

    /// Remembers `job` as pending on some thing.
    fn saw_pending(&self, job: &str) {
        let mut recent = self.0.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.front().is_some_and(|j| j == job) {
            return;
        }
        recent.retain(|j| j != job);
        recent.push_front(job.to_owned());
        recent.truncate(Self::RECENT);
    }

    /// Forgets `job` as pending anywhere (it no longer exists).
    fn forget(&self, job: &str) {
        let mut recent = self.0.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|j| j != job);
    }

    /// The jobs last seen pending, newest first.
    fn recent_jobs(&self) -> Vec<String> {
        let recent = self.0.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    fn exec_keys(&self, job: &str, thing: &str) -> Vec<String> {
        vec![
            self.0.names.aws_execution(job, thing),
            self.0.names.aws_pending(thing),
        ]
    }

    /// One delivery: queue the execution (or find it), notify the thing when its execution
    /// is new, and wait up to the hold time for its final status. A device that has not
    /// finished by then leaves its execution waiting in storage ([`DeliverError::Waiting`]):
    /// the task is parked, and woken when the device asks for, starts or ends it.
    pub(crate) async fn deliver(
        &self,
        req: &DeliveryRequest,
        mut wake: mpsc::UnboundedReceiver<super::mqtt::Routed>,
    ) -> Result<Reply, DeliverError> {
        let job = req.job_id.to_string();
        self.saw_pending(&job);
        let keys = self.exec_keys(&job, &req.device_id);
        let answer = self
            .run(&self.0.queue, &keys, &[job.clone(), self.0.holder.clone()])
            .await
            .map_err(DeliverError::Transient)?;
        let Some(mut exec) = answer.exec else {
            return Err(DeliverError::Transient("execution state vanished".into()));
        };
        if let Some(done) = self.outcome(req, &exec) {
            return done;
        }
        if answer.created || exec.status() == "QUEUED" {
            // notify-next goes out when the thing's next job changes, and again when the task
            // comes back to an execution the device has not asked for (after `renotify`,
            // or a worker's restart): a notification can be lost on the way (a broker drops
            // QoS 1 messages for a client that falls behind), and a device never told of its
            // job would never ask.
            if answer.alone {
                let mut only = exec.clone();
                only.0.insert("job".into(), json!(job));
                self.send_notifications(&req.device_id, &[only], answer.now)
                    .await;
            } else {
                self.notify(&req.device_id, std::slice::from_ref(&job))
                    .await;
            }
        }
        let hold = self.hold(req);
        let until = tokio::time::Instant::now() + hold;
        loop {
            // (A job whose state cannot be read is not taken for stopped.)
            if exec.status() == "QUEUED" && self.stopped(&job).await == Ok(true) {
                // A job canceled while its execution waits for the device: withdrawn now
                // (the device is told its next job), not at the next look.
                self.conclude(req, ExecutionState::Canceled).await;
                return Err(DeliverError::Withdrawn(
                    "the job was canceled before the device started it".into(),
                ));
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(DeliverError::Waiting {
                    wait: waiting_for(&exec, self.0.renotify, shared::now_ms()),
                });
            }
            let concluded = tokio::select! {
                w = wake.recv() => match w {
                    Some(super::mqtt::Routed::Concluded(e)) => Some(*e),
                    _ => None,
                },
                _ = tokio::time::sleep((until - now).min(POLL)) => None,
            };
            exec = match concluded {
                // This worker answered the device's final update: the execution is final as
                // that answer left it, so it needs no read.
                Some(e) => e,
                None => self
                    .run(&self.0.check, &keys, std::slice::from_ref(&job))
                    .await
                    .map_err(DeliverError::Transient)?
                    .exec
                    .ok_or_else(|| DeliverError::Transient("execution state vanished".into()))?,
            };
            if let Some(done) = self.outcome(req, &exec) {
                if exec.status() == "TIMED_OUT" {
                    // The step timer ended it: the thing's next job moves up.
                    self.notify(&req.device_id, &[]).await;
                }
                return done;
            }
        }
    }

    /// How long a delivery waits for the device before parking: the configured hold, at
    /// most half the attempt timeout.
    fn hold(&self, req: &DeliveryRequest) -> Duration {
        let timeout = req
            .spec
            .retry
            .attempt_timeout_secs
            .map_or(self.0.attempt_timeout, Duration::from_secs);
        self.0.hold.min(timeout / 2)
    }

    /// Whether the device changed the execution since `version` (a read error counts as a
    /// change).
    pub(crate) async fn changed_since(&self, req: &DeliveryRequest, version: u64) -> bool {
        let job = req.job_id.to_string();
        let keys = self.exec_keys(&job, &req.device_id);
        match self.run(&self.0.check, &keys, &[job]).await {
            Ok(a) => a
                .exec
                .is_none_or(|e| e.is_terminal() || e.num("version").unwrap_or(0) != version),
            Err(_) => true,
        }
    }

    /// The keys of the thing's parked tasks and of the due set, for scripts that wake them.
    fn parking_keys(&self, thing: &str) -> [String; 2] {
        [self.0.names.parked_device(thing), self.0.names.parked_due()]
    }

    /// The attempt's result once the execution is terminal.
    fn outcome(&self, req: &DeliveryRequest, e: &Record) -> Option<Result<Reply, DeliverError>> {
        if !e.is_terminal() {
            return None;
        }
        let details = e.details();
        let reason = || {
            details
                .as_object()
                .filter(|m| !m.is_empty())
                .map(|m| Value::Object(m.clone()).to_string())
                .unwrap_or_else(|| "no status details".into())
        };
        Some(match e.status() {
            "SUCCEEDED" => {
                let readings: Readings = details
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| {
                        let n = match v {
                            Value::String(s) => s.trim().parse::<f64>().ok(),
                            Value::Number(n) => n.as_f64(),
                            _ => None,
                        }?;
                        Some((k.clone(), n))
                    })
                    .collect();
                Ok(Reply::with_readings(&req.spec, Some(readings)))
            }
            "FAILED" => Err(DeliverError::Permanent(format!(
                "device reported FAILED: {}",
                reason()
            ))),
            "REJECTED" => Err(DeliverError::Rejected(format!(
                "device reported REJECTED: {}",
                reason()
            ))),
            "TIMED_OUT" => Err(DeliverError::TimedOut(
                "stepTimeoutInMinutes elapsed".into(),
            )),
            "CANCELED" => Err(DeliverError::Withdrawn(
                "the job was canceled before the device finished it".into(),
            )),
            other => Err(DeliverError::Permanent(format!("execution {other}"))),
        })
    }

    /// Ends the device-side execution when fleetbatch ended the task without the device.
    pub(crate) async fn conclude(&self, req: &DeliveryRequest, state: ExecutionState) {
        let Some(status) = concluded_status(state) else {
            return;
        };
        let job = req.job_id.to_string();
        let mut inv = self.0.finish.prepare_invoke();
        for k in self.exec_keys(&job, &req.device_id) {
            inv.key(k);
        }
        inv.arg(&job).arg(status).arg(self.0.retention.as_secs());
        let mut redis = self.0.redis.clone();
        match inv.invoke_async::<i64>(&mut redis).await {
            Ok(1) => self.notify(&req.device_id, &[]).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error.message = %e, "execution not concluded; it stays pending for the device")
            }
        }
    }

    /// Whether `job` was canceled, aborted or finished (or no longer exists), as this worker's
    /// cache knows it: its QUEUED executions are withdrawn rather than handed to a device. A
    /// job found gone leaves the jobs remembered as recently pending.
    async fn stopped(&self, job: &str) -> Result<bool, String> {
        let Ok(id) = Uuid::parse_str(job) else {
            return Ok(false);
        };
        let mut redis = self.0.redis.clone();
        match self.0.jobs.get(&mut redis, &self.0.names, id).await {
            Ok(Some(view)) => Ok(view.state.is_stopping() || view.state.is_finished()),
            Ok(None) => {
                self.forget(job);
                Ok(true)
            }
            Err(e) => Err(format!("job state unavailable: {e}")),
        }
    }

    /// Those of `jobs` that are [`Self::stopped`], joined by ',' (as the scripts take them).
    async fn stopped_of(&self, jobs: &[String]) -> Result<String, String> {
        let mut stopped = Vec::new();
        for job in jobs {
            if self.stopped(job).await? {
                stopped.push(job.as_str());
            }
        }
        Ok(stopped.join(","))
    }

    /// The thing's pending executions, those of canceled jobs withdrawn first (`guess`: the
    /// jobs probably pending, saving a call when right).
    async fn pending(&self, thing: &str, guess: &[String]) -> Result<(Vec<Record>, u64), String> {
        let retention = self.0.retention.as_secs().to_string();
        let a = self
            .run_over_pending(&self.0.pending, thing, (&[], guess), |jobs| {
                let retention = retention.clone();
                async move { Ok(vec![self.stopped_of(&jobs).await?, retention]) }
            })
            .await?;
        let list = match a.list {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect(),
            _ => vec![],
        };
        Ok((list, a.now))
    }

    /// Sends `notify-next` (the thing's next pending execution, with its document) and
    /// `notify` (summaries of all pending ones); `guess` as for [`Self::pending`].
    async fn notify(&self, thing: &str, guess: &[String]) {
        match self.pending(thing, guess).await {
            Ok((list, now)) => self.send_notifications(thing, &list, now).await,
            Err(e) => tracing::warn!(thing, error.message = %e, "notifications not sent"),
        }
    }

    /// `notify-next` and `notify` for the thing's pending executions `list`.
    async fn send_notifications(&self, thing: &str, list: &[Record], now: u64) {
        let mut next = Map::new();
        next.insert("timestamp".into(), json!(secs(now)));
        if let Some(e) = pick_next(list) {
            next.insert(
                "execution".into(),
                self.execution(thing, e, now, true).await,
            );
        }
        self.send(&aws::topic(thing, "notify-next"), Value::Object(next))
            .await;
        let mut by_status: Map<String, Value> = Map::new();
        for e in list {
            let entry = by_status
                .entry(e.status().to_owned())
                .or_insert_with(|| json!([]));
            if let Value::Array(a) = entry {
                a.push(summary(e));
            }
        }
        self.send(
            &aws::topic(thing, "notify"),
            json!({"timestamp": secs(now), "jobs": by_status}),
        )
        .await;
    }

    /// The full execution document.
    async fn execution(&self, thing: &str, e: &Record, now: u64, with_document: bool) -> Value {
        let job = e.str("job").unwrap_or_default();
        let mut v = Map::new();
        v.insert("jobId".into(), json!(job));
        v.insert("thingName".into(), json!(thing));
        if with_document && let Some(doc) = self.document(job).await {
            v.insert("jobDocument".into(), doc);
        }
        v.insert("status".into(), json!(e.status()));
        v.insert("statusDetails".into(), e.details());
        v.insert("queuedAt".into(), json!(secs(e.num("queued").unwrap_or(0))));
        if let Some(s) = e.num("started") {
            v.insert("startedAt".into(), json!(secs(s)));
        }
        v.insert(
            "lastUpdatedAt".into(),
            json!(secs(e.num("updated").unwrap_or(0))),
        );
        v.insert("versionNumber".into(), json!(e.num("version").unwrap_or(1)));
        v.insert(
            "executionNumber".into(),
            json!(e.num("number").unwrap_or(1)),
        );
        if let Some(d) = e
            .num("step_deadline")
            .filter(|_| e.status() == "IN_PROGRESS")
        {
            v.insert(
                "approximateSecondsBeforeTimedOut".into(),
                json!(secs(d.saturating_sub(now))),
            );
        }
        Value::Object(v)
    }

    /// The job document devices see: the job's action, tagged by `type`.
    async fn document(&self, job: &str) -> Option<Value> {
        let id = Uuid::parse_str(job).ok()?;
        let mut redis = self.0.redis.clone();
        let view = self
            .0
            .jobs
            .get(&mut redis, &self.0.names, id)
            .await
            .ok()??;
        let mut doc = serde_json::to_value(&view.spec.action).ok()?;
        // The signed document rides inside the AWS job document, for devices that verify.
        if let (Some(signed), Value::Object(map)) = (&view.signed, &mut doc) {
            map.insert(
                "fleetbatchSignature".into(),
                serde_json::to_value(signed.as_ref()).ok()?,
            );
        }
        Some(doc)
    }

    async fn send(&self, topic: &str, body: Value) {
        let Ok(payload) = serde_json::to_vec(&body) else {
            return;
        };
        if let Err(e) = self.0.link.publish(topic, payload, None).await {
            tracing::warn!(topic, error.message = %e, "jobs message not sent");
        }
    }
}
