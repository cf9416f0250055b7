//! The coordinator's Prometheus metrics.
//!
//! Owns metric names and their meaning. Counters are bumped where things happen (planner,
//! aggregator); gauges that describe state (queue depths, jobs by state, per-job progress)
//! are read from RabbitMQ and Redis when `/metrics` is scraped, so they are never stale.
//! `fleetbatch_queue_messages{queue="<ns>.tasks"}` is the backlog an autoscaler should size
//! the worker deployment by.

use lapin::{options::QueueDeclareOptions, types::FieldTable};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use redis::AsyncCommands;
use shared::redis_conn::RedisConn;
use shared::{
    state::{ExecutionState, JobState},
    topology::Names,
};
use uuid::Uuid;

/// Every metric of a coordinator.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Task messages published (confirmed).
    pub tasks_published: IntCounter,
    /// Results recorded, by terminal state.
    pub results_recorded: IntCounterVec,
    /// Results ignored because the device already had an outcome.
    pub results_duplicate: IntCounter,
    /// Devices recorded by the planner without a task (SKIPPED, or CANCELED before publishing).
    pub planner_recorded: IntCounterVec,
    /// Messages moved to the dead-letter queue by the coordinator.
    pub dead_lettered: IntCounter,
    /// Time from a task's first publication to its result being recorded.
    pub task_latency_seconds: Histogram,
    /// Webhook POSTs by result (sent, failed, dropped).
    pub webhooks: IntCounterVec,
    /// Jobs aborted by a criterion or a gate.
    pub jobs_aborted: IntCounter,
    /// Wave gates judged, by verdict (passed, failed, released).
    pub gates: IntCounterVec,
    /// Parked tasks published again (window opened, device online, job woken).
    pub tasks_woken: IntCounter,
    /// Tasks waiting in the parking lot (closed windows, offline devices).
    pub tasks_parked: prometheus::IntGauge,
    /// 1 while Redis is at or above `coordinator.redis_memory_high_percent` of its
    /// `maxmemory`: planners then publish nothing.
    pub redis_memory_alarm: prometheus::IntGauge,
    /// Redis `used_memory`, as last read.
    pub redis_memory_used: prometheus::IntGauge,
    /// Redis `maxmemory` (0: none), as last read.
    pub redis_memory_max: prometheus::IntGauge,
    wave_devices: IntGaugeVec,
    queue_messages: IntGaugeVec,
    queue_consumers: IntGaugeVec,
    jobs: IntGaugeVec,
    job_devices: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        // Every `expect` below is on a static, valid metric definition: it cannot fail.
        let registry = Registry::new();
        let tasks_published = IntCounter::new(
            "fleetbatch_tasks_published_total",
            "Task messages published and confirmed",
        )
        .expect("static metric definition");
        let results_recorded = IntCounterVec::new(
            Opts::new(
                "fleetbatch_results_recorded_total",
                "Device outcomes recorded from results, by state",
            ),
            &["state"],
        )
        .expect("static metric definition");
        let results_duplicate = IntCounter::new(
            "fleetbatch_results_duplicate_total",
            "Results ignored because the device already had an outcome",
        )
        .expect("static metric definition");
        let planner_recorded = IntCounterVec::new(
            Opts::new(
                "fleetbatch_planner_recorded_total",
                "Devices the planner recorded without sending a task, by state",
            ),
            &["state"],
        )
        .expect("static metric definition");
        let dead_lettered = IntCounter::new(
            "fleetbatch_dead_lettered_total",
            "Messages the coordinator dead-lettered",
        )
        .expect("static metric definition");
        let task_latency_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fleetbatch_task_latency_seconds",
                "From a task's first publication to its outcome being recorded",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
            ]),
        )
        .expect("static metric definition");
        let webhooks = IntCounterVec::new(
            Opts::new(
                "fleetbatch_webhooks_total",
                "Webhook notifications by result (sent, failed, dropped)",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let jobs_aborted = IntCounter::new(
            "fleetbatch_jobs_aborted_total",
            "Jobs aborted by an abort criterion or a failed gate",
        )
        .expect("static metric definition");
        let gates = IntCounterVec::new(
            Opts::new(
                "fleetbatch_wave_gates_total",
                "Wave gates judged, by verdict (passed, failed, released by an operator)",
            ),
            &["verdict"],
        )
        .expect("static metric definition");
        let tasks_woken = IntCounter::new(
            "fleetbatch_tasks_woken_total",
            "Parked tasks published again (a window opened, a device came online, a job was woken)",
        )
        .expect("static metric definition");
        let tasks_parked = prometheus::IntGauge::new(
            "fleetbatch_tasks_parked",
            "Tasks waiting without a worker: outside their window or for an offline device",
        )
        .expect("static metric definition");
        let redis_memory_alarm = prometheus::IntGauge::new(
            "fleetbatch_redis_memory_alarm",
            "1 while Redis memory is at or above the alarm level: planning is paused",
        )
        .expect("static metric definition");
        let redis_memory_used = prometheus::IntGauge::new(
            "fleetbatch_redis_memory_used_bytes",
            "Redis used_memory, as last read by the memory watch",
        )
        .expect("static metric definition");
        let redis_memory_max = prometheus::IntGauge::new(
            "fleetbatch_redis_memory_max_bytes",
            "Redis maxmemory (0: none), as last read by the memory watch",
        )
        .expect("static metric definition");
        let wave_devices = IntGaugeVec::new(
            Opts::new(
                "fleetbatch_wave_devices",
                "Devices of each wave of an unfinished job, by state (size and terminal included)",
            ),
            &["job_id", "wave", "state"],
        )
        .expect("static metric definition");
        let queue_messages = IntGaugeVec::new(
            Opts::new("fleetbatch_queue_messages", "Messages ready in a queue"),
            &["queue"],
        )
        .expect("static metric definition");
        let queue_consumers = IntGaugeVec::new(
            Opts::new("fleetbatch_queue_consumers", "Consumers of a queue"),
            &["queue"],
        )
        .expect("static metric definition");
        let jobs = IntGaugeVec::new(
            Opts::new("fleetbatch_jobs", "Jobs by state (the newest 1000)"),
            &["state"],
        )
        .expect("static metric definition");
        let job_devices = IntGaugeVec::new(
            Opts::new(
                "fleetbatch_job_devices",
                "Devices of each unfinished job, by state (targeted and pending included)",
            ),
            &["job_id", "state"],
        )
        .expect("static metric definition");
        for m in [
            Box::new(tasks_published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(results_recorded.clone()),
            Box::new(results_duplicate.clone()),
            Box::new(planner_recorded.clone()),
            Box::new(dead_lettered.clone()),
            Box::new(task_latency_seconds.clone()),
            Box::new(webhooks.clone()),
            Box::new(jobs_aborted.clone()),
            Box::new(gates.clone()),
            Box::new(tasks_woken.clone()),
            Box::new(tasks_parked.clone()),
            Box::new(redis_memory_alarm.clone()),
            Box::new(redis_memory_used.clone()),
            Box::new(redis_memory_max.clone()),
            Box::new(wave_devices.clone()),
            Box::new(queue_messages.clone()),
            Box::new(queue_consumers.clone()),
            Box::new(jobs.clone()),
            Box::new(job_devices.clone()),
        ] {
            let _ = registry.register(m);
        }
        Self {
            registry,
            tasks_published,
            results_recorded,
            results_duplicate,
            planner_recorded,
            dead_lettered,
            task_latency_seconds,
            webhooks,
            jobs_aborted,
            gates,
            tasks_woken,
            tasks_parked,
            redis_memory_alarm,
            redis_memory_used,
            redis_memory_max,
            wave_devices,
            queue_messages,
            queue_consumers,
            jobs,
            job_devices,
        }
    }

    /// Refreshes the state gauges (queue depths through `broker` when connected, job
    /// counters from Redis) and renders every metric. `retry_queues` is how many delayed-retry
    /// queues the deployment has.
    pub async fn render(
        &self,
        broker: Option<&lapin::Connection>,
        redis: &RedisConn,
        names: &Names,
        retry_queues: usize,
    ) -> String {
        if let Some(connection) = broker {
            self.refresh_queues(connection, names, retry_queues).await;
        }
        let mut redis = redis.clone();
        if let Err(e) = self.refresh_jobs(&mut redis, names).await {
            tracing::warn!(error.message = %e, "job gauges not refreshed");
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    async fn refresh_queues(&self, connection: &lapin::Connection, names: &Names, retry: usize) {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let mut queues = vec![
            names.tasks_queue(),
            names.results_queue(),
            names.dead_queue(),
        ];
        queues.extend((0..retry).map(|n| names.retry_queue(n)));
        for q in queues {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            // A failed passive declare closes the channel: stop there.
            let Ok(info) = channel
                .queue_declare(q.clone().into(), passive, FieldTable::default())
                .await
            else {
                break;
            };
            self.queue_messages
                .with_label_values(&[q.as_str()])
                .set(i64::from(info.message_count()));
            self.queue_consumers
                .with_label_values(&[q.as_str()])
                .set(i64::from(info.consumer_count()));
        }
        let _ = channel.close(200, "metrics".into()).await;
    }

    async fn refresh_jobs(
        &self,
        redis: &mut RedisConn,
        names: &Names,
    ) -> Result<(), shared::store::StoreError> {
        let recent: Vec<String> = redis.zrevrange(names.jobs(), 0, 999).await?;
        let mut pipe = redis::pipe();
        for id in recent.iter().filter_map(|s| Uuid::parse_str(s).ok()) {
            pipe.cmd("HGET").arg(names.job(id)).arg("state");
        }
        let states: Vec<Option<String>> = pipe.query_async(redis).await?;
        self.jobs.reset();
        for s in JobState::ALL {
            self.jobs.with_label_values(&[s.as_str()]).set(0);
        }
        for s in states.into_iter().flatten() {
            self.jobs.with_label_values(&[s.as_str()]).inc();
        }
        let active: Vec<String> = redis.smembers(names.active_jobs()).await?;
        self.job_devices.reset();
        self.wave_devices.reset();
        for id in active.iter().filter_map(|s| Uuid::parse_str(s).ok()) {
            let Some(job) = shared::store::load_job(redis, names, id).await? else {
                continue;
            };
            let label = id.to_string();
            for state in ExecutionState::TERMINAL {
                self.job_devices
                    .with_label_values(&[label.as_str(), state.counter()])
                    .set(job.count(state) as i64);
            }
            self.job_devices
                .with_label_values(&[label.as_str(), "targeted"])
                .set(job.planned as i64);
            self.job_devices
                .with_label_values(&[label.as_str(), "pending"])
                .set(job.planned.saturating_sub(job.terminal()) as i64);
            for wave in shared::store::load_waves(redis, names, &job).await? {
                let index = wave.index.to_string();
                self.wave_devices
                    .with_label_values(&[label.as_str(), index.as_str(), "size"])
                    .set(wave.size as i64);
                for (state, n) in &wave.counts {
                    self.wave_devices
                        .with_label_values(&[label.as_str(), index.as_str(), state.as_str()])
                        .set(*n as i64);
                }
            }
        }
        Ok(())
    }
}
