//! The AWS IoT Jobs device API over MQTT, served by the workers.
//!
//! Owns job executions as AWS IoT Jobs devices see them: state, `versionNumber`,
//! `executionNumber`, times, status details and step timers, kept in Redis so that any worker
//! can answer any device; and the request topics `$aws/things/{thing}/jobs/get`, `start-next`,
//! `{jobId}/get` (`$next` included) and `{jobId}/update`, subscribed with a shared
//! subscription so each request reaches one worker. A delivery queues the execution and sends
//! `notify-next`/`notify`; the attempt then waits for the device's terminal update (routed to
//! the worker holding the task through its reply topic, and polled from Redis). State changes
//! are Lua scripts: a version check and its write can never interleave with another worker's.
//! It never records fleetbatch outcomes (the task handler does).

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use devices::{
    aws,
    mqtt::{Link, Message},
};
use redis::{Script, aio::ConnectionManager};
use serde_json::{Map, Value, json};
use shared::{state::ExecutionState, state::Readings, topology::Names};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{DeliverError, DeliveryRequest, Reply};
use crate::jobs::JobCache;

/// How often a waiting attempt re-reads its execution (step timers, missed wake-ups).
const POLL: Duration = Duration::from_secs(2);
/// Longest step timeout AWS IoT Jobs accepts, in minutes (7 days).
const MAX_STEP_MINUTES: u64 = 10_080;

/// Lua shared by the scripts: the Redis clock, and the step-timer check that turns an
/// IN_PROGRESS execution whose timer ran out into TIMED_OUT before anything reads it.
const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function expire(key, zkey, job, now)
  local st = redis.call('HGET', key, 'status')
  if st == 'IN_PROGRESS' then
    local d = tonumber(redis.call('HGET', key, 'step_deadline') or '0')
    if d and d > 0 and now >= d then
      redis.call('HSET', key, 'status', 'TIMED_OUT', 'updated', now)
      redis.call('HINCRBY', key, 'version', 1)
      redis.call('ZREM', zkey, job)
      return 'TIMED_OUT'
    end
  end
  return st
end
local function tbl(key)
  local r = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #r, 2 do t[r[i]] = r[i + 1] end
  return t
end
";

/// QUEUE: KEYS exec, pending; ARGV job, holder. Creates the execution (QUEUED, version 1)
/// or refreshes its holder.
const QUEUE: &str = r"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'queued', now, 'updated', now,
    'version', 1, 'number', 1, 'holder', ARGV[2])
  redis.call('ZADD', KEYS[2], now, ARGV[1])
else
  expire(KEYS[1], KEYS[2], ARGV[1], now)
  redis.call('HSET', KEYS[1], 'holder', ARGV[2])
end
return cjson.encode({exec = tbl(KEYS[1]), now = now})
";

/// CHECK: KEYS exec, pending; ARGV job.
const CHECK: &str = r"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then return cjson.encode({now = now}) end
expire(KEYS[1], KEYS[2], ARGV[1], now)
return cjson.encode({exec = tbl(KEYS[1]), now = now})
";

/// PENDING: KEYS pending; ARGV exec prefix, thing. The thing's QUEUED and IN_PROGRESS
/// executions in queue order.
const PENDING: &str = r"
local now = now_ms()
local out = {}
for _, job in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. job .. ':' .. ARGV[2]
  local st = expire(key, KEYS[1], job, now)
  if st == 'QUEUED' or st == 'IN_PROGRESS' then
    local e = tbl(key)
    e.job = job
    table.insert(out, e)
  elseif not st then
    redis.call('ZREM', KEYS[1], job)
  end
end
return cjson.encode({list = out, now = now})
";

/// START_NEXT: KEYS pending; ARGV exec prefix, thing, details JSON or '', step minutes or ''.
const START_NEXT: &str = r"
local now = now_ms()
local ip, q
for _, job in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. job .. ':' .. ARGV[2]
  local st = expire(key, KEYS[1], job, now)
  if st == 'IN_PROGRESS' and not ip then ip = job
  elseif st == 'QUEUED' and not q then q = job
  elseif not st then redis.call('ZREM', KEYS[1], job) end
end
local job = ip or q
if not job then return cjson.encode({now = now}) end
local key = ARGV[1] .. job .. ':' .. ARGV[2]
if not ip then
  redis.call('HSET', key, 'status', 'IN_PROGRESS', 'started', now, 'updated', now)
  redis.call('HINCRBY', key, 'version', 1)
  if ARGV[3] ~= '' then redis.call('HSET', key, 'details', ARGV[3]) end
  if ARGV[4] ~= '' then
    redis.call('HSET', key, 'step_deadline', now + tonumber(ARGV[4]) * 60000)
  end
end
local e = tbl(key)
e.job = job
return cjson.encode({exec = e, now = now})
";

/// UPDATE: KEYS exec, pending; ARGV job, status, details JSON or '', expected version or '',
/// step minutes or '', retention seconds.
const UPDATE: &str = r"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then
  return cjson.encode({code = 'ResourceNotFound', now = now})
end
local st = expire(KEYS[1], KEYS[2], ARGV[1], now)
if st ~= 'QUEUED' and st ~= 'IN_PROGRESS' then
  return cjson.encode({code = 'InvalidStateTransition', exec = tbl(KEYS[1]), now = now})
end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= tonumber(redis.call('HGET', KEYS[1], 'version')) then
  return cjson.encode({code = 'VersionMismatch', exec = tbl(KEYS[1]), now = now})
end
local new = ARGV[2]
redis.call('HSET', KEYS[1], 'status', new, 'updated', now)
redis.call('HINCRBY', KEYS[1], 'version', 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'details', ARGV[3]) end
if new == 'IN_PROGRESS' then
  if not redis.call('HGET', KEYS[1], 'started') then redis.call('HSET', KEYS[1], 'started', now) end
  if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], 'step_deadline', now + tonumber(ARGV[5]) * 60000)
  end
else
  redis.call('HDEL', KEYS[1], 'step_deadline')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return cjson.encode({exec = tbl(KEYS[1]), now = now})
";

/// FINISH: KEYS exec, pending; ARGV job, status, retention seconds. Ends a pending execution
/// the device did not finish; returns whether it changed anything.
const FINISH: &str = r"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = expire(KEYS[1], KEYS[2], ARGV[1], now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if st ~= 'QUEUED' and st ~= 'IN_PROGRESS' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated', now)
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

/// One execution as stored (every field a string, as Redis keeps them).
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Record(HashMap<String, Value>);

impl Record {
    fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(Value::as_str)
    }
    fn num(&self, k: &str) -> Option<u64> {
        match self.0.get(k)? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }
    fn status(&self) -> &str {
        self.str("status").unwrap_or("QUEUED")
    }
    fn details(&self) -> Value {
        self.str("details")
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| json!({}))
    }
    fn is_terminal(&self) -> bool {
        !matches!(self.status(), "QUEUED" | "IN_PROGRESS")
    }
}

/// What the scripts return.
#[derive(Debug, serde::Deserialize)]
struct ScriptAnswer {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    exec: Option<Record>,
    /// cjson encodes an empty list as `{}`: read it as a value.
    #[serde(default)]
    list: Value,
    now: u64,
}

/// The jobs API of one worker; cheap to clone.
#[derive(Debug, Clone)]
pub struct AwsJobs(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    link: Link,
    redis: ConnectionManager,
    names: Names,
    holder: String,
    jobs: JobCache,
    retention: Duration,
    /// Without a shared subscription: the window in which one worker claims each request.
    dedupe: Option<Duration>,
    /// Without a shared subscription: identical requests seen, by hash: (count, last seen).
    seen: std::sync::Mutex<HashMap<u128, (u32, std::time::Instant)>>,
    queue: Script,
    check: Script,
    pending: Script,
    start_next: Script,
    update: Script,
    finish: Script,
}

/// The AWS status of an execution state fleetbatch reached without the device saying so.
fn concluded_status(state: ExecutionState) -> Option<&'static str> {
    match state {
        ExecutionState::Canceled => Some("CANCELED"),
        ExecutionState::Failed | ExecutionState::TimedOut => Some("TIMED_OUT"),
        _ => None,
    }
}

fn secs(ms: u64) -> u64 {
    ms / 1000
}

/// A rejected request: the AWS error document.
#[derive(Debug)]
struct Rejection {
    code: &'static str,
    message: String,
    state: Option<Record>,
}

fn reject(code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
        state: None,
    }
}

impl AwsJobs {
    /// The API over `link`, with state in `redis`; `holder` is this worker's reply topic.
    pub(crate) fn new(
        link: Link,
        redis: ConnectionManager,
        names: Names,
        holder: String,
        job_cache: Duration,
        retention: Duration,
        dedupe: Option<Duration>,
    ) -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self(Arc::new(Inner {
            link,
            redis,
            names,
            holder,
            jobs: JobCache::new(job_cache),
            retention,
            dedupe,
            seen: Default::default(),
            queue: script(QUEUE),
            check: script(CHECK),
            pending: script(PENDING),
            start_next: script(START_NEXT),
            update: script(UPDATE),
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

    fn exec_keys(&self, job: &str, thing: &str) -> Vec<String> {
        vec![
            self.0.names.aws_execution(job, thing),
            self.0.names.aws_pending(thing),
        ]
    }

    /// One delivery: queue the execution (or find it), notify the thing, and wait for its
    /// final status.
    pub(crate) async fn deliver(
        &self,
        req: &DeliveryRequest,
        mut wake: mpsc::UnboundedReceiver<Bytes>,
    ) -> Result<Reply, DeliverError> {
        let job = req.job_id.to_string();
        let keys = self.exec_keys(&job, &req.device_id);
        let answer = self
            .run(&self.0.queue, &keys, &[job.clone(), self.0.holder.clone()])
            .await
            .map_err(DeliverError::Transient)?;
        if let Some(done) = answer.exec.as_ref().and_then(|e| self.outcome(req, e)) {
            return done;
        }
        self.notify(&req.device_id).await;
        loop {
            tokio::select! {
                _ = wake.recv() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            let answer = self
                .run(&self.0.check, &keys, std::slice::from_ref(&job))
                .await
                .map_err(DeliverError::Transient)?;
            match answer.exec {
                None => return Err(DeliverError::Transient("execution state vanished".into())),
                Some(e) => {
                    if let Some(done) = self.outcome(req, &e) {
                        if e.status() == "TIMED_OUT" {
                            // The step timer ended it: the thing's next job moves up.
                            self.notify(&req.device_id).await;
                        }
                        return done;
                    }
                }
            }
        }
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
            Ok(1) => self.notify(&req.device_id).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error.message = %e, "execution not concluded; it stays pending for the device")
            }
        }
    }

    async fn pending(&self, thing: &str) -> Result<(Vec<Record>, u64), String> {
        let a = self
            .run(
                &self.0.pending,
                &[self.0.names.aws_pending(thing)],
                &[self.0.names.aws_execution_prefix(), thing.to_owned()],
            )
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
    /// `notify` (summaries of all pending ones).
    async fn notify(&self, thing: &str) {
        let (list, now) = match self.pending(thing).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(thing, error.message = %e, "notifications not sent");
                return;
            }
        };
        let mut next = Map::new();
        next.insert("timestamp".into(), json!(secs(now)));
        if let Some(e) = pick_next(&list) {
            next.insert(
                "execution".into(),
                self.execution(thing, e, now, true).await,
            );
        }
        self.send(&aws::topic(thing, "notify-next"), Value::Object(next))
            .await;
        let mut by_status: Map<String, Value> = Map::new();
        for e in &list {
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
        serde_json::to_value(&view.spec.action).ok()
    }

    async fn send(&self, topic: &str, body: Value) {
        let Ok(payload) = serde_json::to_vec(&body) else {
            return;
        };
        if let Err(e) = self.0.link.publish(topic, payload, None).await {
            tracing::warn!(topic, error.message = %e, "jobs message not sent");
        }
    }

    /// The name under which workers claim request `m` when they all receive it (no shared
    /// subscription): its topic and payload, and how many identical messages came before it
    /// within the window. Every worker sees one device's messages in the same order, so the
    /// n-th copy of a request has the same name everywhere, while a device that repeats a
    /// request sends a new one. Called in arrival order.
    pub(crate) fn request_name(&self, m: &Message) -> Option<String> {
        let window = self.0.dedupe?;
        let mut id = m.topic.as_bytes().to_vec();
        id.push(0);
        id.extend_from_slice(&m.payload);
        let hash = xxhash_rust::xxh3::xxh3_128(&id);
        let now = std::time::Instant::now();
        let mut seen = self.0.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (_, last)| now.duration_since(*last) < window);
        }
        let entry = seen.entry(hash).or_insert((0, now));
        if now.duration_since(entry.1) >= window {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        Some(format!(
            "{}:aws:req:{hash:032x}:{}",
            self.0.names.namespace(),
            entry.0
        ))
    }

    /// Whether this worker answers a request: always with a shared subscription; otherwise
    /// when it is the first worker to claim the request's name in Redis.
    async fn claim_request(&self, name: Option<String>) -> bool {
        let (Some(name), Some(window)) = (name, self.0.dedupe) else {
            return true;
        };
        let mut redis = self.0.redis.clone();
        let claimed: Result<Option<String>, _> = redis::cmd("SET")
            .arg(&name)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(&mut redis)
            .await;
        match claimed {
            Ok(r) => r.is_some(),
            Err(e) => {
                tracing::warn!(error.message = %e, "request not claimed: Redis unavailable");
                false
            }
        }
    }

    /// Answers one request from a device.
    pub(crate) async fn handle_request(&self, m: Message, name: Option<String>) {
        let Some((thing, op)) = aws::parse(&m.topic) else {
            return;
        };
        if !self.claim_request(name).await {
            return;
        }
        let thing = thing.to_owned();
        let body: Value = if m.payload.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&m.payload) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    self.respond(
                        &m.topic,
                        None,
                        Err(reject(
                            "InvalidJson",
                            "the request body is not a JSON object",
                        )),
                    )
                    .await;
                    return;
                }
            }
        };
        let token = body.get("clientToken").cloned();
        let answer = match op {
            "get" => self.get_pending(&thing).await,
            "start-next" => self.start_next(&thing, &body).await,
            op => match op.rsplit_once('/') {
                Some((job, "get")) => self.describe(&thing, job, &body).await,
                Some((job, "update")) => self.update(&thing, job, &body).await,
                _ => return,
            },
        };
        self.respond(&m.topic, token, answer).await;
    }

    async fn respond(&self, topic: &str, token: Option<Value>, answer: Result<Value, Rejection>) {
        let now = secs(shared::now_ms());
        let (suffix, mut body) = match answer {
            Ok(v) => ("accepted", v),
            Err(r) => {
                let mut v = json!({"code": r.code, "message": r.message});
                if let Some(s) = r.state {
                    v["executionState"] = execution_state(&s);
                }
                ("rejected", v)
            }
        };
        if let Value::Object(map) = &mut body {
            map.insert("timestamp".into(), json!(now));
            if let Some(t) = token {
                map.insert("clientToken".into(), t);
            }
        }
        self.send(&format!("{topic}/{suffix}"), body).await;
    }

    async fn get_pending(&self, thing: &str) -> Result<Value, Rejection> {
        let (list, _) = self
            .pending(thing)
            .await
            .map_err(|e| reject("InternalError", e))?;
        let of = |status: &str| -> Vec<Value> {
            list.iter()
                .filter(|e| e.status() == status)
                .map(summary)
                .collect()
        };
        Ok(json!({"inProgressJobs": of("IN_PROGRESS"), "queuedJobs": of("QUEUED")}))
    }

    async fn start_next(&self, thing: &str, body: &Value) -> Result<Value, Rejection> {
        let details = status_details(body)?;
        let step = step_minutes(body)?;
        let a = self
            .run(
                &self.0.start_next,
                &[self.0.names.aws_pending(thing)],
                &[
                    self.0.names.aws_execution_prefix(),
                    thing.to_owned(),
                    details.unwrap_or_default(),
                    step.map(|s| s.to_string()).unwrap_or_default(),
                ],
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        Ok(match a.exec {
            Some(e) => json!({"execution": self.execution(thing, &e, a.now, true).await}),
            None => json!({}),
        })
    }

    async fn describe(&self, thing: &str, job: &str, body: &Value) -> Result<Value, Rejection> {
        let with_doc = body
            .get("includeJobDocument")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        if job == "$next" {
            let (list, now) = self
                .pending(thing)
                .await
                .map_err(|e| reject("InternalError", e))?;
            return Ok(match pick_next(&list) {
                Some(e) => json!({"execution": self.execution(thing, e, now, with_doc).await}),
                None => json!({}),
            });
        }
        let a = self
            .run(
                &self.0.check,
                &self.exec_keys(job, thing),
                &[job.to_owned()],
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        match a.exec {
            Some(mut e) => {
                e.0.insert("job".into(), json!(job));
                Ok(json!({"execution": self.execution(thing, &e, a.now, with_doc).await}))
            }
            None => Err(reject(
                "ResourceNotFound",
                format!("no execution of job {job} on thing {thing}"),
            )),
        }
    }

    async fn update(&self, thing: &str, job: &str, body: &Value) -> Result<Value, Rejection> {
        let status = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(status, "IN_PROGRESS" | "SUCCEEDED" | "FAILED" | "REJECTED") {
            return Err(reject(
                "InvalidRequest",
                format!("status {status:?} is not one of IN_PROGRESS, SUCCEEDED, FAILED, REJECTED"),
            ));
        }
        let details = status_details(body)?;
        let step = step_minutes(body)?;
        let expected = match body.get("expectedVersion") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| reject("InvalidRequest", "expectedVersion must be a number"))?,
            ),
        };
        let a = self
            .run(
                &self.0.update,
                &self.exec_keys(job, thing),
                &[
                    job.to_owned(),
                    status.to_owned(),
                    details.unwrap_or_default(),
                    expected.map(|v| v.to_string()).unwrap_or_default(),
                    step.map(|s| s.to_string()).unwrap_or_default(),
                    self.0.retention.as_secs().to_string(),
                ],
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        if let Some(code) = a.code.as_deref() {
            let (code, message) = match code {
                "ResourceNotFound" => (
                    "ResourceNotFound",
                    format!("no execution of job {job} on thing {thing}"),
                ),
                "VersionMismatch" => (
                    "VersionMismatch",
                    format!(
                        "expectedVersion {} does not match the execution's versionNumber",
                        expected.unwrap_or(0)
                    ),
                ),
                _ => (
                    "InvalidStateTransition",
                    format!(
                        "the execution is {} and cannot be updated",
                        a.exec.as_ref().map(Record::status).unwrap_or("finished")
                    ),
                ),
            };
            return Err(Rejection {
                code,
                message,
                state: a.exec,
            });
        }
        let Some(mut e) = a.exec else {
            return Err(reject("InternalError", "execution vanished"));
        };
        e.0.insert("job".into(), json!(job));
        if e.is_terminal() {
            // Wake the worker holding the task, then move the thing on to its next job.
            if let (Some(holder), Ok(id)) = (e.str("holder"), Uuid::parse_str(job)) {
                let wake = json!({"executionId": shared::state::execution_id(id, thing)});
                self.send(holder, wake).await;
            }
            self.notify(thing).await;
        }
        let mut out = Map::new();
        if body
            .get("includeJobExecutionState")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            out.insert("executionState".into(), execution_state(&e));
        }
        if body
            .get("includeJobDocument")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            && let Some(doc) = self.document(job).await
        {
            out.insert("jobDocument".into(), doc);
        }
        Ok(Value::Object(out))
    }
}

/// IN_PROGRESS first, then the oldest QUEUED.
fn pick_next(list: &[Record]) -> Option<&Record> {
    list.iter()
        .find(|e| e.status() == "IN_PROGRESS")
        .or_else(|| list.iter().find(|e| e.status() == "QUEUED"))
}

fn summary(e: &Record) -> Value {
    let mut v = json!({
        "jobId": e.str("job").unwrap_or_default(),
        "queuedAt": secs(e.num("queued").unwrap_or(0)),
        "lastUpdatedAt": secs(e.num("updated").unwrap_or(0)),
        "versionNumber": e.num("version").unwrap_or(1),
        "executionNumber": e.num("number").unwrap_or(1),
    });
    if let Some(s) = e.num("started") {
        v["startedAt"] = json!(secs(s));
    }
    v
}

fn execution_state(e: &Record) -> Value {
    json!({
        "status": e.status(),
        "statusDetails": e.details(),
        "versionNumber": e.num("version").unwrap_or(1),
    })
}

/// `statusDetails` as JSON text: an object of string values, as AWS IoT Jobs requires.
fn status_details(body: &Value) -> Result<Option<String>, Rejection> {
    match body.get("statusDetails") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {
            Ok(Some(Value::Object(m.clone()).to_string()))
        }
        Some(_) => Err(reject(
            "InvalidRequest",
            "statusDetails must be an object of string values",
        )),
    }
}

/// `stepTimeoutInMinutes`, 1 to 10080.
fn step_minutes(body: &Value) -> Result<Option<u64>, Rejection> {
    match body.get("stepTimeoutInMinutes") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(m) if (1..=MAX_STEP_MINUTES).contains(&m) => Ok(Some(m)),
            _ => Err(reject(
                "InvalidRequest",
                format!("stepTimeoutInMinutes must be between 1 and {MAX_STEP_MINUTES}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_details_must_be_strings_and_step_timeouts_in_range() {
        assert!(status_details(&json!({"statusDetails": {"a": "1"}})).is_ok());
        assert_eq!(
            status_details(&json!({"statusDetails": {"a": 1}}))
                .err()
                .map(|r| r.code),
            Some("InvalidRequest")
        );
        assert_eq!(
            step_minutes(&json!({"stepTimeoutInMinutes": 5})).ok(),
            Some(Some(5))
        );
        assert!(step_minutes(&json!({"stepTimeoutInMinutes": 0})).is_err());
        assert!(step_minutes(&json!({"stepTimeoutInMinutes": 10081})).is_err());
    }

    #[test]
    fn next_prefers_the_execution_in_progress() {
        let rec = |job: &str, status: &str| {
            Record(HashMap::from([
                ("job".to_owned(), json!(job)),
                ("status".to_owned(), json!(status)),
            ]))
        };
        let list = vec![rec("a", "QUEUED"), rec("b", "IN_PROGRESS")];
        assert_eq!(pick_next(&list).and_then(|e| e.str("job")), Some("b"));
        assert_eq!(pick_next(&list[..1]).and_then(|e| e.str("job")), Some("a"));
        assert!(pick_next(&[]).is_none());
    }
}
