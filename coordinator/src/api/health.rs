//! Liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode};

use crate::app::AppState;

/// `/readyz`: 200 when connected to RabbitMQ and Redis, 503 naming the one that is not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Connected to RabbitMQ and Redis",
    responses((status = 200, description = "done", body = String, content_type = "text/plain"), (status = 503, description = "not ready", body = String, content_type = "text/plain"), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    let mut redis = app.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let broker_ok = app
        .broker()
        .is_some_and(|b| b.connection.status().connected());
    match (broker_ok, redis_ok) {
        (true, true) => (StatusCode::OK, "ready"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not connected to RabbitMQ"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "Redis unreachable"),
    }
}

/// `/metrics`: every metric, with the state gauges refreshed.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "done", body = String, content_type = "text/plain"), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn metrics(State(app): State<Arc<AppState>>) -> String {
    let broker = app.broker();
    app.metrics
        .render(
            broker.as_ref().map(|b| b.connection.as_ref()),
            &app.redis,
            &app.names,
            app.settings.worker.retry_delays_ms.len(),
        )
        .await
}
