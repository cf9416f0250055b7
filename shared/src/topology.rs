//! Every name two processes must agree on: exchanges, queues, routing keys, AMQP headers and
//! Redis keys, all prefixed by the deployment's namespace; and [`declare`], which creates the
//! broker topology idempotently (whichever process starts first declares it, the others find
//! it in place).
//!
//! ```text
//! {ns}.tasks (direct) ──"task"──▶ queue {ns}.tasks ──reject──▶ {ns}.dead (fanout) ─▶ queue {ns}.dead
//!      ▲                                    │
//!      └── dead-letter after TTL ── queue {ns}.tasks.retry.{n}  (x-message-ttl = retry_delays_ms[n])
//! {ns}.results (direct) ──"result"──▶ queue {ns}.results (the coordinators')
//! {ns}.control (fanout) ──▶ one exclusive queue per worker
//! ```

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use uuid::Uuid;

use lapin::BasicProperties;

use crate::{
    amqp::{AmqpError, Outgoing, PendingConfirm, Publisher, set_header},
    config::Settings,
    state::ExecutionState,
};

/// Routing key of tasks.
pub const TASK_ROUTING_KEY: &str = "task";
/// Routing key of results.
pub const RESULT_ROUTING_KEY: &str = "result";
/// Header carrying the job id (lets tools filter without decoding bodies).
pub const HEADER_JOB_ID: &str = "x-job-id";
/// Header carrying the delivery attempt count.
pub const HEADER_ATTEMPT: &str = "x-attempt";
/// Header naming why a message was dead-lettered.
pub const HEADER_DEAD_REASON: &str = "x-fleetbatch-reason";
/// Header naming the queue a dead-lettered message came from.
pub const HEADER_DEAD_SOURCE: &str = "x-fleetbatch-source-queue";

/// Names of one deployment's exchanges, queues and Redis keys.
#[derive(Debug, Clone)]
pub struct Names {
    ns: String,
    /// `{ns}`: the namespace as a Redis Cluster hash tag, the prefix of every Redis key.
    keys: String,
}

impl Names {
    /// Names under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_owned(),
            keys: format!("{{{namespace}}}"),
        }
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The prefix of every Redis key of the deployment: the namespace as a hash tag
    /// (`{ns}`), so on a Redis Cluster every key of the deployment, and so every key one
    /// script touches, lives in one hash slot.
    pub fn key_prefix(&self) -> &str {
        &self.keys
    }

    /// A pattern matching every Redis key of the deployment (`SCAN MATCH`); the braces of
    /// the hash tag are literal in Redis glob patterns.
    pub fn key_pattern(&self) -> String {
        format!("{}:*", self.keys)
    }

    // ---- AMQP ----

    /// Exchange tasks are published to.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.ns)
    }
    /// The durable queue workers consume.
    pub fn tasks_queue(&self) -> String {
        format!("{}.tasks", self.ns)
    }
    /// Delayed-retry queue `n` (0-based).
    pub fn retry_queue(&self, n: usize) -> String {
        format!("{}.tasks.retry.{n}", self.ns)
    }
    /// Exchange results are published to.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// The coordinators' durable results queue.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// Dead-letter exchange.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// Dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// The coordinators' copy of every dead letter (a dead task's device ends at once).
    pub fn dead_watch_queue(&self) -> String {
        format!("{}.dead.watch", self.ns)
    }
    /// Control broadcast exchange.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.ns)
    }

    // ---- Redis: device registry ----

    /// Hash of one device's attributes.
    pub fn device(&self, id: &str) -> String {
        format!("{}:dev:{id}", self.keys)
    }
    /// Sorted set (all scores 0, ordered by id) of every device.
    pub fn devices(&self) -> String {
        format!("{}:devices", self.keys)
    }
    /// Sorted set of a group's members.
    pub fn group(&self, group: &str) -> String {
        format!("{}:group:{group}", self.keys)
    }
    /// Set of group names.
    pub fn groups(&self) -> String {
        format!("{}:groups", self.keys)
    }

    // ---- Redis: jobs ----

    /// Hash of a job record (spec, state, planner checkpoint).
    pub fn job(&self, job: Uuid) -> String {
        format!("{}:job:{job}", self.keys)
    }
    /// Hash of a job's counters per execution state.
    pub fn job_counts(&self, job: Uuid) -> String {
        format!("{}:job:{job}:counts", self.keys)
    }
    /// Hash device id -> JSON [`crate::state::DeviceStatus`].
    pub fn job_status(&self, job: Uuid) -> String {
        format!("{}:job:{job}:status", self.keys)
    }
    /// Sorted set of a job's targets when they are taken from an earlier job (a rerun):
    /// copied once at creation, read in id order by the planner.
    pub fn job_targets(&self, job: Uuid) -> String {
        format!("{}:job:{job}:targets", self.keys)
    }
    /// Sorted set of a job's sendable targets not yet given a wave, scored by their place in
    /// the job's shuffle ([`crate::rollout`]): the planner's working set while it splits.
    pub fn job_wave_pool(&self, job: Uuid) -> String {
        format!("{}:job:{job}:wave:pool", self.keys)
    }
    /// Sorted set of the devices matching wave `wave`'s selector, while the planner splits.
    pub fn job_wave_candidates(&self, job: Uuid, wave: usize) -> String {
        format!("{}:job:{job}:wave:{wave}:candidates", self.keys)
    }
    /// Sorted set of the devices of wave `wave`, in shuffle order.
    pub fn job_wave(&self, job: Uuid, wave: usize) -> String {
        format!("{}:job:{job}:wave:{wave}", self.keys)
    }
    /// Hash `<wave>:<counter>` -> count: every wave's counters per execution state (as
    /// [`Self::job_counts`], `terminal` included), one hash for the job so the recording
    /// script is given it as a key ([`crate::store::wave_counts`] reads one wave's).
    pub fn job_wave_counts(&self, job: Uuid) -> String {
        format!("{}:job:{job}:wave:counts", self.keys)
    }
    /// Sorted set of the executions of a job in delivery to devices whose limited tag has
    /// the value `value` (hex-encoded in the key), scored by when each slot lapses.
    pub fn job_in_flight(&self, job: Uuid, value: &str) -> String {
        let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}:job:{job}:inflight:{hex}", self.keys)
    }
    /// Hash device id -> the index of its wave.
    pub fn job_wave_of(&self, job: Uuid) -> String {
        format!("{}:job:{job}:waveof", self.keys)
    }
    /// Set of the devices of a job in one terminal state.
    pub fn job_state_set(&self, job: Uuid, state: ExecutionState) -> String {
        format!("{}:job:{job}:in:{}", self.keys, state.as_str())
    }
    /// Sorted set of every job, scored by creation time.
    pub fn jobs(&self) -> String {
        format!("{}:jobs", self.keys)
    }
    /// Set of jobs not finished yet (the coordinator resumes these at start).
    pub fn active_jobs(&self) -> String {
        format!("{}:jobs:active", self.keys)
    }
    /// Set of aborted jobs whose automatic rollback job is not created yet
    /// (`on_abort = "rollback"`); every coordinator start looks at it again.
    pub fn pending_rollbacks(&self) -> String {
        format!("{}:jobs:rollback-pending", self.keys)
    }
    /// The job a create with an idempotency key made (`digest`: SHA-256 of caller and key).
    pub fn create_key(&self, digest: &str) -> String {
        format!("{}:create-key:{digest}", self.keys)
    }
    /// Idempotency record of one execution.
    pub fn idempotency(&self, execution: Uuid) -> String {
        format!("{}:idem:{execution}", self.keys)
    }
    /// Lock held by the coordinator planning a job.
    pub fn planner_lock(&self, job: Uuid) -> String {
        format!("{}:job:{job}:planner", self.keys)
    }

    // ---- Redis: saved device queries ----

    /// Hash query name -> query text.
    pub fn saved_queries(&self) -> String {
        format!("{}:queries", self.keys)
    }

    // ---- Redis: job templates ----

    /// Hash template name -> JSON template document.
    pub fn templates(&self) -> String {
        format!("{}:templates", self.keys)
    }

    // ---- Redis: recurring jobs ----

    /// Sorted set of every recurring schedule, scored by creation time.
    pub fn schedules(&self) -> String {
        format!("{}:schedules", self.keys)
    }
    /// Hash of one schedule: spec, state, creator's scope, the occurrence handled last.
    pub fn schedule(&self, id: Uuid) -> String {
        format!("{}:schedule:{id}", self.keys)
    }
    /// Sorted set of a schedule's child jobs, scored by their occurrence time.
    pub fn schedule_runs(&self, id: Uuid) -> String {
        format!("{}:schedule:{id}:runs", self.keys)
    }

    // ---- Redis: the parking lot (tasks waiting without a worker) ----

    /// Sorted set execution id -> when a parked task is due again (ms since epoch; `+inf`
    /// for one that waits for its device with no deadline).
    pub fn parked_due(&self) -> String {
        format!("{}:parked:due", self.keys)
    }
    /// Hash execution id -> the parked task (a 16-byte park token, then the encoded task).
    pub fn parked_tasks(&self) -> String {
        format!("{}:parked:tasks", self.keys)
    }
    /// Set of a job's parked executions (woken together on cancel, abort or resume).
    pub fn parked_job(&self, job: Uuid) -> String {
        format!("{}:parked:job:{job}", self.keys)
    }
    /// Set of the executions waiting for one device to come online.
    pub fn parked_device(&self, device: &str) -> String {
        format!("{}:parked:device:{device}", self.keys)
    }
    /// Sorted set of the unfinished jobs (ids) that wait for one device, in the order the
    /// device gets them ([`crate::job::lane_score`]): only the first is delivered.
    pub fn device_lane(&self, device: &str) -> String {
        format!("{}:lane:{device}", self.keys)
    }
    /// Hash device id -> `online` | `offline`, as the devices last announced it.
    pub fn presence(&self) -> String {
        format!("{}:presence", self.keys)
    }

    // ---- Redis: API access ----

    /// Hash token id -> JSON token record (never the secret).
    pub fn tokens(&self) -> String {
        format!("{}:tokens", self.keys)
    }
    /// String: the id of the live token whose secret hashes to `sha256_hex`.
    pub fn token_secret(&self, sha256_hex: &str) -> String {
        format!("{}:token:{sha256_hex}", self.keys)
    }
    /// Stream: the audit log, append-only, trimmed by age.
    pub fn audit(&self) -> String {
        format!("{}:audit", self.keys)
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn queue_args(settings: &Settings, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    if settings.amqp.queue_type == crate::config::QueueType::Quorum {
        args.insert(ShortString::from("x-queue-type"), long("quorum"));
        // Every queue of this deployment dead-letters at least once (the at-most-once
        // default could drop a task between a retry queue and the tasks queue); that needs
        // publishers refused, not messages dropped, when a queue is full.
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            long("at-least-once"),
        );
        args.insert(ShortString::from("x-overflow"), long("reject-publish"));
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(i64::from(settings.amqp.delivery_limit)),
        );
    }
    if let Some(ms) = settings.amqp.queue_expires_ms {
        args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongLongInt(ms as i64),
        );
    }
    for (k, v) in extra {
        args.insert(ShortString::from(*k), v.clone());
    }
    args
}

/// Publishes a task again (a forwarded, retried or woken copy) to the tasks exchange, or,
/// with `retry = Some(n)`, to delayed-retry queue `n`; with the job id and attempt count as
/// headers and the current trace context. Returns the broker's pending confirm.
///
/// # Errors
/// Encoding or broker errors.
pub async fn send_task(
    publisher: &Publisher,
    names: &Names,
    retry: Option<usize>,
    task: &crate::messages::DeviceTask,
) -> Result<PendingConfirm, AmqpError> {
    send_tasks(publisher, names, retry, std::slice::from_ref(task)).await
}

/// Publishes several tasks as one message (a [`crate::messages::TaskBatch`]; one task goes
/// as a plain task), to the tasks exchange or delayed-retry queue `n`, like [`send_task`].
/// The headers name the first task's job and attempts; the message id is the first task's
/// execution id.
///
/// # Errors
/// Encoding or broker errors.
///
/// # Panics
/// When `tasks` is empty (a caller's bug).
pub async fn send_tasks(
    publisher: &Publisher,
    names: &Names,
    retry: Option<usize>,
    tasks: &[crate::messages::DeviceTask],
) -> Result<PendingConfirm, AmqpError> {
    let first = tasks.first().expect("send_tasks needs at least one task");
    let (payload, kind) = match tasks {
        [task] => (crate::messages::encode(task)?, crate::messages::TASK_TYPE),
        _ => (
            crate::messages::encode(&crate::messages::TaskBatch {
                version: crate::messages::WIRE_VERSION,
                tasks: tasks.to_vec(),
            })?,
            crate::messages::TASK_BATCH_TYPE,
        ),
    };
    let mut headers = FieldTable::default();
    set_header(&mut headers, HEADER_JOB_ID, &first.job_id.to_string());
    set_header(&mut headers, HEADER_ATTEMPT, &first.attempts.to_string());
    crate::amqp::inject_current_context(&mut headers);
    let (exchange, routing_key) = match retry {
        None => (names.tasks_exchange(), TASK_ROUTING_KEY.to_owned()),
        Some(n) => (String::new(), names.retry_queue(n)),
    };
    publisher
        .send(Outgoing {
            exchange: &exchange,
            routing_key: &routing_key,
            payload: &payload,
            properties: crate::amqp::properties(kind, &first.execution_id.to_string(), headers),
        })
        .await
}

/// Declares exchanges, queues and bindings. Safe to call from every process at every start:
/// declarations with identical arguments are no-ops.
///
/// # Errors
/// The broker refused a declaration (e.g. an existing queue with other arguments) or the
/// connection failed.
pub async fn declare(channel: &Channel, settings: &Settings) -> Result<(), AmqpError> {
    let names = Names::new(&settings.namespace);
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    channel
        .exchange_declare(
            names.dead_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    for q in [names.dead_queue(), names.dead_watch_queue()] {
        channel
            .queue_declare(q.clone().into(), queue, queue_args(settings, &[]))
            .await?;
        channel
            .queue_bind(
                q.into(),
                names.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    let dlx = [("x-dead-letter-exchange", long(&names.dead_exchange()))];
    for (exchange, q, key) in [
        (
            names.tasks_exchange(),
            names.tasks_queue(),
            TASK_ROUTING_KEY,
        ),
        (
            names.results_exchange(),
            names.results_queue(),
            RESULT_ROUTING_KEY,
        ),
    ] {
        channel
            .exchange_declare(
                exchange.clone().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(q.clone().into(), queue, queue_args(settings, &dlx))
            .await?;
        channel
            .queue_bind(
                q.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    for (n, delay) in settings.worker.retry_delays_ms.iter().enumerate() {
        let args = [
            ("x-message-ttl", AMQPValue::LongLongInt(*delay as i64)),
            ("x-dead-letter-exchange", long(&names.tasks_exchange())),
            ("x-dead-letter-routing-key", long(TASK_ROUTING_KEY)),
        ];
        channel
            .queue_declare(
                names.retry_queue(n).into(),
                queue,
                queue_args(settings, &args),
            )
            .await?;
    }

    channel
        .exchange_declare(
            names.control_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Checks, without declaring anything, that what a worker uses exists: the tasks queue, the
/// retry queues, and the results, dead-letter and control exchanges. Passive declarations
/// need no permission, so a worker runs with a broker user that may not declare, delete or
/// purge anything; a coordinator declares the topology first.
///
/// # Errors
/// Something is missing (the broker answers NOT_FOUND: no coordinator has declared this
/// namespace yet), or the connection failed.
pub async fn check(channel: &Channel, settings: &Settings) -> Result<(), AmqpError> {
    let names = Names::new(&settings.namespace);
    let passive_queue = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let passive_exchange = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queues = std::iter::once(names.tasks_queue())
        .chain((0..settings.worker.retry_delays_ms.len()).map(|n| names.retry_queue(n)));
    for q in queues {
        channel
            .queue_declare(q.into(), passive_queue, FieldTable::default())
            .await?;
    }
    for (exchange, kind) in [
        (names.results_exchange(), ExchangeKind::Direct),
        (names.dead_exchange(), ExchangeKind::Fanout),
        (names.control_exchange(), ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(
                exchange.into(),
                kind,
                passive_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Moves a message that cannot be processed to the dead-letter exchange, keeping its body and
/// properties and adding the reason and source queue as headers, so an operator can inspect,
/// repair and replay it. The caller acks the original once this returns.
///
/// # Errors
/// Broker errors (the caller then rejects the original without requeue, which dead-letters
/// it through the queue's own dead-letter exchange, without the reason).
pub async fn dead_letter(
    publisher: &Publisher,
    names: &Names,
    source_queue: &str,
    data: &[u8],
    original: &BasicProperties,
    reason: &str,
) -> Result<(), AmqpError> {
    let mut headers = original.headers().clone().unwrap_or_default();
    set_header(&mut headers, HEADER_DEAD_REASON, reason);
    set_header(&mut headers, HEADER_DEAD_SOURCE, source_queue);
    publisher
        .publish(Outgoing {
            exchange: &names.dead_exchange(),
            routing_key: "",
            payload: data,
            properties: original.clone().with_headers(headers),
        })
        .await
}
