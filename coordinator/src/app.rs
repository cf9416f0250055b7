//! What the HTTP handlers and the background loops of one coordinator share: settings, key
//! names, the Redis connection, metrics, webhooks, and the current broker session (absent
//! while RabbitMQ is unreachable).
//!
//! Owns swapping the broker session in and out and starting planners on it. It never
//! connects to anything itself ([`crate::startup`] does).

use shared::redis_conn::RedisConn;
use std::sync::{Arc, RwLock};

use lapin::Connection;
use shared::{amqp::Publisher, config::Settings, topology::Names};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{metrics::Metrics, notify::Notifier, planner};

/// The parts of the coordinator that exist while it is connected to RabbitMQ.
#[derive(Debug, Clone)]
pub struct Broker {
    /// The connection (dead-letter tools open short-lived channels on it).
    pub connection: Arc<Connection>,
    /// Confirmed publishing (control messages, dead-letter replays).
    pub publisher: Publisher,
    pub(crate) planners: Arc<planner::Planners>,
    pub(crate) tracker: TaskTracker,
}

/// What request handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Names.
    pub names: Names,
    /// Redis.
    pub redis: RedisConn,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Webhooks.
    pub notifier: Notifier,
    /// SHA-256 (hex) of the bootstrap admin token, when one is configured.
    pub bootstrap_sha256: Option<String>,
    /// Where a job's webhooks may go.
    pub outbound: crate::outbound::Policy,
    /// Signs job documents (absent: documents go out unsigned).
    pub signer: Option<shared::signing::Signer25519>,
    /// Verifies bearer JWTs from the identity provider (absent: OIDC is off).
    pub oidc: Option<Arc<crate::access::oidc::Oidc>>,
    pub(crate) broker: RwLock<Option<Broker>>,
}

impl AppState {
    /// The current broker session, if connected.
    pub fn broker(&self) -> Option<Broker> {
        self.broker
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_broker(&self, broker: Option<Broker>) {
        *self.broker.write().unwrap_or_else(|p| p.into_inner()) = broker;
    }

    /// Starts planning a job in the background. Without a broker session the job waits in
    /// the active set and is planned when the session starts.
    pub fn start_planner(&self, job_id: Uuid) {
        if let Some(broker) = self.broker() {
            spawn_planner(&broker, job_id);
        }
    }
}

pub(crate) fn spawn_planner(broker: &Broker, job_id: Uuid) {
    planner::start(&broker.planners, job_id);
}
