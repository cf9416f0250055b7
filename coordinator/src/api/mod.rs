//! The HTTP API (JSON), served with axum: one module per resource.
//!
//! Owns the route table, request parsing and the mapping of errors to status codes; every error body
//! is `{"error": "...", "field": "..."}` with the field when one is at fault. Handlers call
//! into [`crate::registry`], [`crate::intake`] and [`crate::jobs`]; none holds business
//! logic of its own.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /healthz | process alive |
//! | GET | /readyz | connected to RabbitMQ and Redis |
//! | GET | /metrics | Prometheus metrics |
//! | GET | /openapi.json, /docs | this table as an OpenAPI 3.1 description, and as a page |
//! | POST | /v1/devices/import?format=csv\|ndjson | import devices (streamed body) |
//! | GET | /v1/devices?group=&model=&hardware_revision=&firmware_version=&tag=&cursor=&limit= | list (pages carry `next_cursor`) |
//! | GET | /v1/devices/count?group=&query= | count |
//! | GET, PATCH, DELETE | /v1/devices/{id} | one device; change its attributes, groups or tags (fields given replace the stored ones); remove it from the registry |
//! | GET | /v1/devices/{id}/jobs?history= | the unfinished jobs in the device's line, and its history across the newest jobs |
//! | GET | /v1/groups | groups with member counts |
//! | GET | /v1/queries | saved device queries |
//! | PUT, DELETE | /v1/queries/{name} | save (`{"query": "..."}`, checked) or delete a query; jobs name it as `target.saved_query` |
//! | POST | /v1/jobs | create (JSON, or TOML with `content-type: application/toml`; `Idempotency-Key` makes it safe to retry; `?dry_run=true` reports what it would do and creates nothing) |
//! | GET | /v1/jobs?limit=&cursor= | newest jobs (pages carry `next_cursor`) |
//! | GET | /v1/jobs/{id} | state and counters |
//! | DELETE | /v1/jobs/{id} | delete a finished job's data now (409 while it runs) |
//! | POST | /v1/jobs/{id}/cancel | cancel |
//! | POST | /v1/jobs/{id}/rerun | a new job for the devices that ended in `states` (default FAILED, TIMED_OUT) |
//! | POST | /v1/jobs/{id}/rollback | the job's `rollback` action for the devices that ended in `states` (default SUCCEEDED, FAILED) |
//! | GET | /v1/jobs/{id}/devices?status=&cursor=&limit= | per-device status |
//! | GET | /v1/jobs/{id}/report?limit= | failures with their last error |
//! | GET | /v1/jobs/{id}/events | Server-Sent Events: `state`, `progress` (every second), `finished` |
//! | POST | /v1/schedules | create a recurring job (a job spec with `schedule.cron`; JSON or TOML) |
//! | GET | /v1/schedules | every schedule with its next occurrence and newest child jobs |
//! | GET, DELETE | /v1/schedules/{id} | one schedule; delete it (its child jobs stay) |
//! | POST | /v1/schedules/{id}/pause, /resume | stop or restart firing (a resumed schedule goes on from now) |
//! | POST, GET | /v1/templates | store a job template (JSON or TOML); list them |
//! | GET, DELETE | /v1/templates/{name} | one template; delete it |
//! | POST | /v1/templates/{name}/jobs | a job from the template: `{"parameters": {...}}` (as POST /v1/jobs: `Idempotency-Key`, `?dry_run=true`) |
//! | GET | /v1/dlq?limit= | dead-lettered messages with their reasons (not removed) |
//! | POST | /v1/dlq/replay | put dead letters back on their source queues |
//! | GET, POST | /v1/tokens | API tokens: list, create (the secret is shown once) |
//! | DELETE | /v1/tokens/{id} | revoke a token |
//! | GET | /v1/audit?actor=&job_id=&outcome=&action=&cursor=&limit= | the audit log, newest first |
//! | GET | /v1/whoami | the caller's identity, role and groups |
//!
//! Every route passes [`guard`]: authentication, the role the route needs
//! ([`crate::access::policy`]), and an audit entry for every state-changing call.

use std::sync::Arc;

use axum::{
    Json, Router,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use uuid::Uuid;

use crate::app::AppState;

mod access;
pub mod devices;
mod dlq;
mod events;
pub mod guard;
mod health;
mod jobs;
pub mod openapi;
mod queries;
mod schedules;
mod templates;

/// Deletes `name` from the hash `key` of named documents (templates, saved queries); 404
/// naming `what` if there was none.
async fn delete_named(app: &AppState, key: &str, name: &str, what: &str) -> ApiResult<()> {
    let mut redis = app.redis.clone();
    let n: u64 = redis::AsyncCommands::hdel(&mut redis, key, name)
        .await
        .map_err(ApiError::internal)?;
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {what} {name:?}"),
        ));
    }
    Ok(())
}

pub use devices::{HISTORY_JOBS, device_history, device_jobs};

/// The answer to a page whose data could not be read (Redis unavailable): the API's 503.
pub fn unavailable(e: impl Into<anyhow::Error>) -> Response {
    ApiError::internal(e).into_response()
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(crate::dashboard::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/docs", get(openapi::docs))
        .route("/v1/devices/import", post(devices::import))
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/count", get(devices::count))
        .route(
            "/v1/devices/{id}",
            get(devices::get_one)
                .patch(devices::update)
                .delete(devices::delete),
        )
        .route("/v1/devices/{id}/jobs", get(devices::jobs))
        .route("/v1/groups", get(devices::groups))
        .route("/v1/queries", get(queries::list))
        .route(
            "/v1/queries/{name}",
            axum::routing::put(queries::put).delete(queries::delete),
        )
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::delete))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/pause", post(jobs::steer))
        .route("/v1/jobs/{id}/resume", post(jobs::steer))
        .route("/v1/jobs/{id}/approve", post(jobs::steer))
        .route("/v1/jobs/{id}/rerun", post(jobs::follow_up_job))
        .route("/v1/jobs/{id}/rollback", post(jobs::follow_up_job))
        .route("/v1/jobs/{id}/devices", get(jobs::devices))
        .route("/v1/jobs/{id}/report", get(jobs::report))
        .route("/v1/jobs/{id}/results", get(jobs::results))
        .route("/v1/jobs/{id}/events", get(events::stream))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::get).delete(schedules::delete),
        )
        .route("/v1/schedules/{id}/pause", post(schedules::steer))
        .route("/v1/schedules/{id}/resume", post(schedules::steer))
        .route(
            "/v1/templates",
            post(templates::create).get(templates::list),
        )
        .route(
            "/v1/templates/{name}",
            get(templates::get).delete(templates::delete),
        )
        .route("/v1/templates/{name}/jobs", post(templates::create_job))
        .route("/v1/dlq", get(dlq::list))
        .route("/v1/dlq/replay", post(dlq::replay))
        .route("/v1/tokens", get(access::list).post(access::create))
        .route("/v1/tokens/{id}", axum::routing::delete(access::revoke))
        .route("/v1/audit", get(access::audit_log))
        .route("/v1/whoami", get(access::whoami))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        // Extractors' own refusals (a body that is not UTF-8, a query that does not parse)
        // answer in the API's error format too.
        .layer(axum::middleware::map_response(plain_refusals_as_json))
        // A body that stalls this long between two chunks ends its request.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(
                state.settings.coordinator.body_idle_timeout_secs.max(1),
            ),
        ))
        .with_state(state)
}

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub(super) fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
    pub(super) fn internal(e: impl Into<anyhow::Error>) -> Self {
        let e = e.into();
        tracing::error!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "request failed");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(f) => json!({"error": self.message, "field": f}),
            None => json!({"error": self.message}),
        };
        (self.status, Json(body)).into_response()
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Largest plain-text refusal turned into a JSON error (extractors' messages are short).
const MAX_PLAIN_REFUSAL: usize = 4096;

/// A 4xx answered in plain text (axum's extractor rejections) becomes `{"error": text}`.
async fn plain_refusals_as_json(response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/plain"));
    if !status.is_client_error() || !plain {
        return response;
    }
    let (_, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_REFUSAL)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        text
    };
    ApiError::new(status, text).into_response()
}

pub(super) fn no_broker() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not connected to RabbitMQ at the moment; try again shortly",
    )
}

pub(super) fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{id:?} is not a job id")))
}
