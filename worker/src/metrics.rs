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
    atomic::{AtomicBool, AtomicU64, Ordering},
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
    /// Device replies refused: not carrying the nonce of the attempt they claim to answer
    /// (forged by another client, or stale). A security event.
    pub replies_refused: IntCounter,
    /// Connected to the broker and Redis.
    pub ready: Arc<AtomicBool>,
    /// When a task last settled (acked, forwarded, dead-lettered or handed back), ms since
    /// the epoch: with every slot busy and nothing settling, the worker is stalled.
    pub last_settled_ms: Arc<AtomicU64>,
    /// How long a full, silent worker may go before `/readyz` says it is stalled.
    pub stall_ms: Arc<AtomicU64>,
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
        let replies_refused = IntCounter::new(
            "fleetbatch_worker_replies_refused_total",
            "Device replies refused for not carrying the nonce of the attempt they answer",
        )
        .expect("static metric definition");
        // The definitions are static and distinct, so registration cannot fail.
        for m in [
            Box::new(replies_refused.clone()) as Box<dyn prometheus::core::Collector>,
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
            replies_refused,
            ready: Arc::new(AtomicBool::new(false)),
            last_settled_ms: Arc::new(AtomicU64::new(shared::now_ms())),
            stall_ms: Arc::new(AtomicU64::new(120_000)),
        }
    }

    /// Why the worker is not ready, if it is not: not connected, or stalled (every slot
    /// busy and no task settled for longer than the stall time).
    pub fn unready(&self, now_ms: u64) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("not connected".into());
        }
        let (busy, slots) = (self.in_flight.get(), self.concurrency.get());
        let quiet = now_ms.saturating_sub(self.last_settled_ms.load(Ordering::Relaxed));
        (slots > 0 && busy >= slots && quiet > self.stall_ms.load(Ordering::Relaxed)).then(|| {
            format!(
                "stalled: {busy} of {slots} deliveries in flight and none settled for {} s",
                quiet / 1000
            )
        })
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
                match m.unready(shared::now_ms()) {
                    None => (StatusCode::OK, "ready".to_owned()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_worker_that_settles_nothing_for_the_stall_time_is_not_ready() {
        let m = Metrics::new();
        assert_eq!(m.unready(0).as_deref(), Some("not connected"));
        m.ready.store(true, Ordering::Relaxed);
        m.concurrency.set(4);
        m.stall_ms.store(1_000, Ordering::Relaxed);
        m.last_settled_ms.store(10_000, Ordering::Relaxed);
        m.in_flight.set(3);
        assert_eq!(m.unready(60_000), None, "a free slot: not stalled");
        m.in_flight.set(4);
        assert_eq!(m.unready(10_900), None, "full but settling recently");
        let why = m.unready(12_500).expect("stalled");
        assert!(why.starts_with("stalled: 4 of 4"), "{why}");
    }
}
