//! Building and running the coordinator.
//!
//! Owns the coordinator's lifetime: connections, topology, the HTTP listener, the results
//! consumer, the planners (including those resumed at start for jobs that were running when
//! a previous coordinator stopped), and the shutdown sequence: stop accepting jobs, let
//! planners finish their current batch (their confirms awaited), stop the results consumer
//! after its current batch is recorded and acked, close the connection.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use lapin::Connection;
use redis::{AsyncCommands, aio::ConnectionManager};
use shared::{
    amqp::{self, Publisher},
    config::Settings,
    store::{self, Scripts},
    topology::{self, Names},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{aggregate, api, dispatch};

/// What request handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Names.
    pub names: Names,
    /// Redis.
    pub redis: ConnectionManager,
    /// Confirmed publishing (control messages).
    pub publisher: Publisher,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
    /// The broker connection (dead-letter tools open short-lived channels on it).
    pub connection: Arc<Connection>,
    planners: Arc<dispatch::Planners>,
    tracker: TaskTracker,
}

impl AppState {
    /// Starts planning a job in the background.
    pub fn start_planner(&self, job_id: Uuid) {
        let planners = self.planners.clone();
        self.tracker.spawn(async move {
            if let Err(e) = dispatch::run(planners, job_id).await {
                tracing::error!(%job_id, error.message = %e, error.cause_chain = ?e, "planner failed; it resumes at the next coordinator start");
            }
        });
    }
}

/// A coordinator, connected and listening.
#[derive(Debug)]
pub struct Application {
    state: Arc<AppState>,
    listener: TcpListener,
    connection: Arc<Connection>,
    aggregator: Arc<aggregate::Aggregator>,
    instance: String,
}

impl Application {
    /// Connects, declares the topology and binds the HTTP listener.
    ///
    /// # Errors
    /// Unreachable services, a topology conflict, or an address in use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let instance = format!(
            "coordinator-{}-{}",
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let names = Names::new(&settings.namespace);
        let connection = Arc::new(
            amqp::connect(&settings.amqp, &format!("fleetbatch-{instance}"))
                .await
                .with_context(|| format!("connecting to RabbitMQ at {}", settings.amqp.safe_url()))?,
        );
        let publisher = Publisher::new(&connection, &settings.amqp).await?;
        topology::declare(publisher.channel(), &settings)
            .await
            .context("declaring the broker topology")?;
        let redis = store::connect(&settings.redis)
            .await
            .with_context(|| format!("connecting to Redis at {}", settings.redis.safe_url()))?;
        let listener = TcpListener::bind(&settings.coordinator.listen)
            .await
            .with_context(|| format!("binding the API to {}", settings.coordinator.listen))?;
        let shutdown = CancellationToken::new();
        let scripts = Scripts::new();
        let settings = Arc::new(settings);
        let planner_publisher = Publisher::new(&connection, &settings.amqp).await?;
        let planners = Arc::new(dispatch::Planners {
            settings: settings.clone(),
            names: names.clone(),
            redis: redis.clone(),
            publisher: planner_publisher,
            scripts: scripts.clone(),
            instance: instance.clone(),
            shutdown: shutdown.clone(),
        });
        let aggregator = Arc::new(aggregate::Aggregator {
            names: names.clone(),
            redis: redis.clone(),
            publisher: publisher.clone(),
            scripts,
            prefetch: settings.coordinator.results_prefetch,
            shutdown: shutdown.clone(),
        });
        let state = Arc::new(AppState {
            settings,
            names,
            redis,
            publisher,
            shutdown,
            connection: connection.clone(),
            planners,
            tracker: TaskTracker::new(),
        });
        Ok(Self {
            state,
            listener,
            connection,
            aggregator,
            instance,
        })
    }

    /// The address the API listens on.
    ///
    /// # Errors
    /// Only if the socket has no local address.
    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves or a component fails, then shuts down in order.
    ///
    /// # Errors
    /// The broker connection or the HTTP server failed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Application {
            state,
            listener,
            connection,
            aggregator,
            instance,
        } = self;
        tracing::info!(address = %listener.local_addr()?, namespace = %state.names.namespace(), "coordinator listening");

        // Resume jobs that were running when a coordinator last stopped.
        let mut redis = state.redis.clone();
        let active: Vec<String> = redis.smembers(state.names.active_jobs()).await?;
        for id in active.iter().filter_map(|s| Uuid::parse_str(s).ok()) {
            tracing::info!(job_id = %id, "resuming job");
            state.start_planner(id);
        }

        let results_channel = connection.create_channel().await?;
        let mut aggregating = tokio::spawn(aggregate::run(
            aggregator,
            results_channel.clone(),
            format!("{instance}-results"),
        ));
        let http_shutdown = state.shutdown.clone();
        let mut serving = tokio::spawn(
            axum::serve(listener, api::router(state.clone()))
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .into_future(),
        );
        tokio::pin!(shutdown);

        let result: anyhow::Result<()> = tokio::select! {
            // SIGTERM or SIGINT.
            _ = &mut shutdown => Ok(()),
            // The results consumer ended: the broker connection failed.
            r = &mut aggregating => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.context("results consumer failed")),
                Err(e) => Err(anyhow::Error::from(e).context("results consumer panicked")),
            },
            // The HTTP server ended on its own.
            r = &mut serving => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("HTTP server failed")),
                Err(e) => Err(anyhow::Error::from(e).context("HTTP server panicked")),
            },
        };
        tracing::info!("coordinator stopping");
        state.shutdown.cancel();
        state.tracker.close();
        let grace = std::time::Duration::from_secs(30);
        let _ = tokio::time::timeout(grace, state.tracker.wait()).await;
        let _ = tokio::time::timeout(grace, &mut aggregating).await;
        let _ = tokio::time::timeout(grace, &mut serving).await;
        let _ = results_channel
            .close(200, "coordinator stopping".into())
            .await;
        let _ = connection.close(200, "coordinator stopping".into()).await;
        tracing::info!("coordinator stopped");
        result
    }
}
