//! The worker's Prometheus metrics and its small HTTP server (`/metrics`, `/healthz`,
//! `/readyz`).
//!
//! Owns metric names and their meaning. `fleetbatch_worker_tasks_in_flight` divided by
//! `fleetbatch_worker_concurrency` is the utilisation an autoscaler should target (together
//! with the tasks queue depth the coordinator exports). The server lives as long as the
//! process, across broker reconnects; `/readyz` answers 200 only while the worker is
//! connected to RabbitMQ and Redis.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of a worker.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Tasks being handled now.
    pub in_flight: IntGauge,
    /// Configured concurrency (prefetch).
    pub concurrency: IntGauge,
    /// Tasks finished by this worker, by outcome (SUCCEEDED, FAILED, ..., retry_scheduled,
    /// handed_back, already_done, dead_lettered).
    pub outcomes: IntCounterVec,
    /// Delivery attempts by result (ok, transient, permanent, rejected, timeout).
    pub attempts: IntCounterVec,
    /// Duration of one delivery attempt.
    pub attempt_seconds: Histogram,
    /// In-process retries (an attempt after a transient error).
    pub retries: IntCounter,
    /// Connected to the broker and Redis.
    pub ready: Arc<AtomicBool>,
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
        let in_flight = IntGauge::new(
            "fleetbatch_worker_tasks_in_flight",
            "Tasks being handled now",
        )
        .expect("static metric definition");
        let concurrency = IntGauge::new(
            "fleetbatch_worker_concurrency",
            "Tasks this worker handles at once (its prefetch)",
        )
        .expect("static metric definition");
        let outcomes = IntCounterVec::new(
            Opts::new(
                "fleetbatch_worker_tasks_total",
                "Tasks finished, by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let attempts = IntCounterVec::new(
            Opts::new(
                "fleetbatch_worker_delivery_attempts_total",
                "Delivery attempts, by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let attempt_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fleetbatch_worker_delivery_seconds",
                "Duration of one delivery attempt",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("static metric definition");
        let retries = IntCounter::new(
            "fleetbatch_worker_retries_total",
            "Delivery attempts made after a transient error",
        )
        .expect("static metric definition");
        // The definitions are static and distinct, so registration cannot fail.
        for m in [
            Box::new(in_flight.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(concurrency.clone()),
            Box::new(outcomes.clone()),
            Box::new(attempts.clone()),
            Box::new(attempt_seconds.clone()),
            Box::new(retries.clone()),
        ] {
            let _ = registry.register(m);
        }
        Self {
            registry,
            in_flight,
            concurrency,
            outcomes,
            attempts,
            attempt_seconds,
            retries,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not connected")
                }
            }),
        )
        .with_state(metrics)
}
