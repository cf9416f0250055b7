//! Building and running a worker.
//!
//! Owns the worker's lifetime: connections, topology, the transport, the tasks consumer and
//! the control listener, and the shutdown sequence (stop consuming, hand back what has not
//! started, let in-flight deliveries finish within the grace period, close the connection).

use shared::redis_conn::RedisConn;
use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use futures::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use shared::{amqp, config::Settings, messages, store, topology};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    consume,
    deliver::{Transport, http::HttpTransport, mqtt::MqttTransport, simulator::Simulator},
    handle::Context,
    jobs::JobCache,
};

/// A unique id for this worker process: host, pid and a random suffix.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}

/// Runs a worker process: serves `/metrics`, `/healthz` and `/readyz` for the whole
/// process, and keeps a connected [`Worker`] running (rebuilding it after broker or Redis
/// outages) until `stop` fires.
///
/// # Errors
/// The metrics address cannot be bound.
pub async fn run(
    settings: Settings,
    worker_id: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(crate::metrics::Metrics::new());
    metrics.stall_ms.store(
        settings.worker.stall_secs.saturating_mul(1000),
        std::sync::atomic::Ordering::Relaxed,
    );
    let listener = tokio::net::TcpListener::bind(&settings.worker.listen)
        .await
        .with_context(|| format!("binding the metrics endpoint to {}", settings.worker.listen))?;
    tracing::info!(address = %listener.local_addr()?, worker_id = %worker_id, "metrics and health listening");
    let http_stop = stop.clone();
    let server = tokio::spawn(
        axum::serve(listener, crate::metrics::router(metrics.clone()))
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .into_future(),
    );
    // The transport lives as long as the process: its device connections outlast broker
    // and Redis outages, and close only after in-flight deliveries are done.
    let transport = Arc::new(tokio::sync::OnceCell::new());
    let transport_stop = CancellationToken::new();
    // Handlers of a lost broker session may still be delivering when the next session
    // starts: both see the same executions in hand, so no execution is delivered twice at
    // once by this process.
    let active = crate::handle::Active::default();
    let result = shared::supervise::with_reconnect("worker", stop, |stop| {
        let (settings, id, metrics) = (settings.clone(), worker_id.clone(), metrics.clone());
        let (transport, transport_stop) = (transport.clone(), transport_stop.clone());
        let active = active.clone();
        async move {
            let worker = Worker::build(settings, id, metrics, &transport, transport_stop, active)
                .await
                .context("starting the worker")?;
            worker.run_until_stopped(stop.cancelled_owned()).await
        }
    })
    .await;
    transport_stop.cancel();
    server.abort();
    result
}

/// A worker, connected and ready to run.
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Context>,
    connection: Connection,
    tasks_channel: Channel,
    control_channel: Channel,
}

impl Worker {
    /// Connects to RabbitMQ and Redis, declares the topology and prepares the transport.
    ///
    /// # Errors
    /// Unreachable services or a topology conflict.
    pub async fn build(
        settings: Settings,
        worker_id: String,
        metrics: Arc<crate::metrics::Metrics>,
        transport: &tokio::sync::OnceCell<Transport>,
        transport_stop: CancellationToken,
        active: crate::handle::Active,
    ) -> anyhow::Result<Self> {
        let names = topology::Names::new(&settings.namespace);
        let connection = amqp::connect(&settings.amqp, &format!("fleetbatch-worker {worker_id}"))
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", settings.amqp.safe_url()))?;
        let publisher = amqp::Publisher::new(&connection, &settings.amqp).await?;
        // The coordinator declares the topology; a worker only checks it is there, so its
        // broker user needs no right to declare, delete or purge (docs/security.md).
        wait_for_topology(&connection, &settings).await?;
        let redis = store::connect(
            &settings.redis,
            shared::topology::Names::new(&settings.namespace).key_prefix(),
        )
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis.safe_url()))?;
        let transport = transport
            .get_or_try_init(|| async {
                build_transport(
                    &settings,
                    &metrics,
                    &worker_id,
                    &redis,
                    &names,
                    transport_stop,
                )
            })
            .await?
            .clone();
        // Results get a confirm channel of their own, so their batches are not queued behind
        // forwarded tasks.
        let reporter = crate::report::Reporter::start(
            amqp::Publisher::new(&connection, &settings.amqp).await?,
            names.clone(),
            usize::from(settings.worker.concurrency).clamp(1, 500),
            std::time::Duration::from_millis(2),
        );
        let tasks_channel = connection.create_channel().await?;
        let control_channel = connection.create_channel().await?;
        let ctx = Arc::new(Context {
            worker_id,
            jobs: JobCache::new(settings.worker.job_cache()),
            settings: Arc::new(settings),
            names,
            redis: redis.clone(),
            publisher,
            reporter,
            transport,
            scripts: store::Scripts::new(),
            claims: crate::idempotency::Claims::start(redis.clone()),
            shutdown: CancellationToken::new(),
            metrics,
            active,
        });
        Ok(Self {
            ctx,
            connection,
            tasks_channel,
            control_channel,
        })
    }

    /// This worker's id.
    pub fn id(&self) -> &str {
        &self.ctx.worker_id
    }

    /// Runs until `shutdown` resolves (or the broker connection fails), then drains.
    ///
    /// # Errors
    /// The broker connection failed; in-flight tasks return to the queue.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Worker {
            ctx,
            connection,
            tasks_channel,
            control_channel,
        } = self;
        let tracker = TaskTracker::new();
        ctx.metrics
            .concurrency
            .set(i64::from(ctx.settings.worker.concurrency));
        ctx.metrics
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let control = tokio::spawn(listen_for_control(ctx.clone(), control_channel));
        let consuming = consume::run(ctx.clone(), tasks_channel.clone(), tracker.clone());
        let channels_lost = channels_closed(&ctx);
        tokio::pin!(consuming);
        tokio::pin!(shutdown);
        tokio::pin!(channels_lost);

        let result = tokio::select! {
            // The consumer ended on its own: the broker connection failed.
            r = &mut consuming => r.map_err(anyhow::Error::from),
            // The broker closed the results or forwarding channel alone: every task would be
            // handed back for ever. Rebuild the session (not ready meanwhile).
            why = &mut channels_lost => {
                tracing::warn!(%why, "rebuilding the broker session");
                ctx.shutdown.cancel();
                let _ = tasks_channel.close(200, "channel lost".into()).await;
                Err(anyhow::anyhow!("{why}"))
            }
            // SIGTERM or SIGINT: stop taking tasks, then drain. A requested stop is a clean
            // stop even if the broker connection breaks while the consumer is cancelled: the
            // broker returns whatever was not acked, and exit 0 is what an orchestrator
            // scaling in expects.
            _ = &mut shutdown => {
                tracing::info!(in_flight = tracker.len(), "shutting down: no new tasks");
                ctx.shutdown.cancel();
                if let Err(e) = consuming.await {
                    tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(&e), "the broker connection broke while stopping; unacked tasks return to the queue");
                }
                Ok(())
            }
        };
        ctx.shutdown.cancel();
        ctx.metrics
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        control.abort();

        tracker.close();
        let grace = ctx.settings.worker.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = tracker.len(),
                "grace period over; unfinished tasks return to the queue"
            );
        }
        let stop_call = crate::consume::STOP_CALL_TIMEOUT;
        let closed = tokio::time::timeout(stop_call, async {
            let _ = tasks_channel.close(200, "worker stopping".into()).await;
            let _ = connection.close(200, "worker stopping".into()).await;
        })
        .await;
        if closed.is_err() {
            tracing::warn!("the broker connection did not close in time; leaving it");
        }
        tracing::info!("worker stopped");
        result
    }
}

/// Resolves when the broker closed a channel the handlers need (results or forwarding)
/// while the connection lives on, naming it.
async fn channels_closed(ctx: &Context) -> &'static str {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        if !ctx.reporter.is_open() {
            return "the broker closed the results channel";
        }
        if !ctx.publisher.channel().status().connected() {
            return "the broker closed the forwarding channel";
        }
    }
}

/// Checks (passively) that the topology a coordinator declares is there, polling every
/// 250 ms for up to 15 s, so a worker started alongside a coordinator that has not declared
/// it yet starts consuming as soon as it has. A failed check closes its channel: each poll
/// uses a fresh one.
async fn wait_for_topology(
    connection: &lapin::Connection,
    settings: &Settings,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut logged = false;
    loop {
        let channel = connection.create_channel().await?;
        let checked = topology::check(&channel, settings).await;
        let close = channel.close(200, "topology checked".into());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
        match checked {
            Ok(()) => return Ok(()),
            Err(e)
                if tokio::time::Instant::now() >= deadline || !connection.status().connected() =>
            {
                return Err(anyhow::Error::from(e)
                    .context("checking the broker topology (a coordinator declares it)"));
            }
            Err(e) => {
                if !logged {
                    tracing::info!(error.message = %e, "waiting for a coordinator to declare the broker topology");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
}

/// The transport the settings choose.
fn build_transport(
    settings: &Settings,
    metrics: &crate::metrics::Metrics,
    worker_id: &str,
    redis: &RedisConn,
    names: &topology::Names,
    stop: CancellationToken,
) -> anyhow::Result<Transport> {
    use shared::config::TransportKind as Kind;
    Ok(match settings.worker.transport {
        Kind::Simulator => Transport::Simulator(Box::new(Simulator::new(
            settings.simulator.clone(),
            worker_id.to_owned(),
            redis.clone(),
            names.clone(),
        ))),
        Kind::Mqtt => {
            let m = &settings.worker.mqtt;
            tracing::info!(url = %m.url, version = ?m.version, protocol = ?m.protocol, "MQTT transport");
            Transport::Mqtt(
                MqttTransport::start(
                    settings,
                    worker_id,
                    redis.clone(),
                    names.clone(),
                    metrics.replies_refused.clone(),
                    stop,
                )
                .context("starting the MQTT transport")?,
            )
        }
        Kind::Http => Transport::Http(
            HttpTransport::new(&settings.worker.http).context("starting the HTTP transport")?,
        ),
    })
}

/// Listens on a private queue bound to the control exchange and applies what it hears.
async fn listen_for_control(ctx: Arc<Context>, channel: Channel) -> anyhow::Result<()> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            ctx.names.control_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            format!("{}-control", ctx.worker_id).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    while let Some(Ok(delivery)) = consumer.next().await {
        match messages::decode_control(&delivery.data) {
            Ok(messages::ControlMessage::JobCanceled { job_id }) => {
                tracing::info!(%job_id, "job canceled: no new deliveries");
                ctx.jobs.invalidate(job_id);
            }
            Ok(messages::ControlMessage::JobChanged { job_id }) => {
                tracing::info!(%job_id, "job state changed: reading it again");
                ctx.jobs.invalidate(job_id);
            }
            Err(e) => tracing::warn!(error.message = %e, "ignoring an undecodable control message"),
        }
    }
    Ok(())
}
