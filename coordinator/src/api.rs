//! The HTTP API (JSON), served with axum.
//!
//! Owns routes, request parsing and the mapping of errors to status codes; every error body
//! is `{"error": "...", "field": "..."}` with the field when one is at fault. Handlers call
//! into [`crate::registry`], [`crate::intake`] and [`crate::jobs`]; none holds business
//! logic of its own.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /healthz | process alive |
//! | GET | /readyz | connected to RabbitMQ and Redis |
//! | GET | /metrics | Prometheus metrics |
//! | POST | /v1/devices/import?format=csv\|ndjson | import devices (streamed body) |
//! | GET | /v1/devices?group=&model=&hardware_revision=&firmware_version=&after=&limit= | list |
//! | GET | /v1/devices/count?group= | count |
//! | GET | /v1/groups | groups with member counts |
//! | POST | /v1/jobs | create (JSON, or TOML with `content-type: application/toml`) |
//! | GET | /v1/jobs?limit= | newest jobs |
//! | GET | /v1/jobs/{id} | state and counters |
//! | POST | /v1/jobs/{id}/cancel | cancel |
//! | GET | /v1/jobs/{id}/devices?status=&cursor=&limit= | per-device status |
//! | GET | /v1/jobs/{id}/report?limit= | failures with their last error |
//! | GET | /v1/jobs/{id}/events | Server-Sent Events: `state`, `progress` (every second), `finished` |
//! | GET | /v1/dlq?limit= | dead-lettered messages with their reasons (not removed) |
//! | POST | /v1/dlq/replay | put dead letters back on their source queues |

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::TryStreamExt;
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::json;
use shared::job::{ExecutionState, SpecFormat, SpecLimits};
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

use crate::{
    intake::{self, IntakeError},
    jobs::{self, CancelError},
    registry::{self, ImportFormat, ImportReport, LineError},
    startup::AppState,
};

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/devices/import", post(import_devices))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/count", get(count_devices))
        .route("/v1/groups", get(list_groups))
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/devices", get(job_devices))
        .route("/v1/jobs/{id}/report", get(job_report))
        .route("/v1/jobs/{id}/results", get(job_results))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/dlq", get(list_dead_letters))
        .route("/v1/dlq/replay", post(replay_dead_letters))
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
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
    fn internal(e: impl Into<anyhow::Error>) -> Self {
        let e = e.into();
        tracing::error!(error.message = %e, error.cause_chain = ?e, "request failed");
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

type ApiResult<T> = Result<T, ApiError>;

async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    let mut redis = app.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    match (app.broker().is_some(), redis_ok) {
        (true, true) => (StatusCode::OK, "ready"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not connected to RabbitMQ"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "Redis unreachable"),
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> String {
    app.metrics.render(&app).await
}

fn no_broker() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not connected to RabbitMQ at the moment; try again shortly",
    )
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{id:?} is not a job id")))
}

#[derive(Debug, Deserialize)]
struct ImportQuery {
    format: Option<ImportFormat>,
}

async fn import_devices(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<ImportReport>> {
    let format = q.format.unwrap_or_else(|| {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.contains("csv") {
            ImportFormat::Csv
        } else {
            ImportFormat::Ndjson
        }
    });
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut redis = app.redis.clone();
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(1000);
    let mut columns: Option<Vec<usize>> = None;
    let mut line_no = 0u64;
    let fail = |report: &mut ImportReport, line: u64, error: String| {
        report.failed += 1;
        if report.errors.len() < registry::MAX_REPORTED_ERRORS {
            report.errors.push(LineError { line, error });
        }
    };
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
    {
        line_no += 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = match (format, &columns) {
            (ImportFormat::Ndjson, _) => registry::parse_ndjson_line(line),
            (ImportFormat::Csv, None) => {
                columns = Some(registry::parse_csv_header(line).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("line {line_no}: {e}"))
                })?);
                continue;
            }
            (ImportFormat::Csv, Some(cols)) => registry::parse_csv_line(line, cols),
        };
        match parsed {
            Ok(d) => batch.push(d),
            Err(e) => fail(&mut report, line_no, e),
        }
        if batch.len() >= 1000 {
            registry::write_batch(&mut redis, &app.names, &batch)
                .await
                .map_err(ApiError::internal)?;
            report.imported += batch.len() as u64;
            batch.clear();
        }
    }
    registry::write_batch(&mut redis, &app.names, &batch)
        .await
        .map_err(ApiError::internal)?;
    report.imported += batch.len() as u64;
    tracing::info!(
        imported = report.imported,
        failed = report.failed,
        "devices imported"
    );
    Ok(Json(report))
}

#[derive(Debug, Deserialize)]
struct DeviceQuery {
    group: Option<String>,
    model: Option<String>,
    hardware_revision: Option<String>,
    firmware_version: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

impl DeviceQuery {
    fn matches(&self, d: &registry::Device) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.model, &d.model)
            && eq(&self.hardware_revision, &d.hardware_revision)
            && eq(&self.firmware_version, &d.firmware_version)
    }
    fn key(&self, app: &AppState) -> String {
        match &self.group {
            Some(g) => app.names.group(g),
            None => app.names.devices(),
        }
    }
    fn has_attribute_filter(&self) -> bool {
        self.model.is_some() || self.hardware_revision.is_some() || self.firmware_version.is_some()
    }
}

async fn list_devices(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let mut redis = app.redis.clone();
    let key = q.key(&app);
    let mut after = q.after.clone();
    let mut out = Vec::new();
    // Scan in id order until the page is full or the set ends.
    loop {
        let ids = registry::range_after(&mut redis, &key, after.as_deref(), 1000)
            .await
            .map_err(ApiError::internal)?;
        let Some(last) = ids.last().cloned() else {
            after = None;
            break;
        };
        let devices = registry::read_batch(&mut redis, &app.names, &ids)
            .await
            .map_err(ApiError::internal)?;
        let mut full = false;
        for d in devices.into_iter().flatten() {
            if q.matches(&d) {
                after = Some(d.id.clone());
                out.push(d);
                if out.len() >= limit {
                    full = true;
                    break;
                }
            }
        }
        if full {
            break;
        }
        after = Some(last);
        if ids.len() < 1000 {
            after = None;
            break;
        }
    }
    Ok(Json(json!({"devices": out, "next_after": after})))
}

async fn count_devices(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let key = q.key(&app);
    if !q.has_attribute_filter() {
        let n: u64 = redis.zcard(&key).await.map_err(ApiError::internal)?;
        return Ok(Json(json!({"count": n})));
    }
    let mut after: Option<String> = None;
    let mut n = 0u64;
    loop {
        let ids = registry::range_after(&mut redis, &key, after.as_deref(), 1000)
            .await
            .map_err(ApiError::internal)?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        let devices = registry::read_batch(&mut redis, &app.names, &ids)
            .await
            .map_err(ApiError::internal)?;
        n += devices.iter().flatten().filter(|d| q.matches(d)).count() as u64;
        after = Some(last);
    }
    Ok(Json(json!({"count": n})))
}

async fn list_groups(State(app): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let mut groups: Vec<String> = redis
        .smembers(app.names.groups())
        .await
        .map_err(ApiError::internal)?;
    groups.sort();
    let mut pipe = redis::pipe();
    for g in &groups {
        pipe.zcard(app.names.group(g));
    }
    let counts: Vec<u64> = pipe
        .query_async(&mut redis)
        .await
        .map_err(ApiError::internal)?;
    let list: Vec<_> = groups
        .into_iter()
        .zip(counts)
        .map(|(g, n)| json!({"group": g, "devices": n}))
        .collect();
    Ok(Json(json!({"groups": list})))
}

#[tracing::instrument(
    name = "POST /v1/jobs",
    skip_all,
    fields(otel.kind = "server", job_id = tracing::field::Empty)
)]
async fn create_job(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if app.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "coordinator is shutting down",
        ));
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let format = if ct.contains("toml") {
        SpecFormat::Toml
    } else {
        SpecFormat::Json
    };
    let limits = SpecLimits {
        max_document_bytes: app.settings.coordinator.max_document_bytes,
        max_explicit_devices: app.settings.coordinator.max_explicit_devices,
    };
    if body.len() > limits.max_document_bytes + 64 * limits.max_explicit_devices {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("job file is {} bytes; too large", body.len()),
            field: Some(".".into()),
        });
    }
    let mut redis = app.redis.clone();
    match intake::create(
        &mut redis,
        &app.names,
        &body,
        format,
        limits,
        app.settings.coordinator.webhook_secret.is_some(),
        shared::amqp::current_traceparent(),
    )
    .await
    {
        Ok((id, _)) => {
            tracing::Span::current().record("job_id", tracing::field::display(id));
            app.notifier.job_state(id, "IN_PROGRESS", json!({}));
            app.start_planner(id);
            Ok((StatusCode::CREATED, Json(json!({"job_id": id}))))
        }
        Err(IntakeError::Invalid(e)) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
            field: Some(e.field),
        }),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn list_jobs(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let jobs = jobs::list(&mut redis, &app.names, q.limit.unwrap_or(50).clamp(1, 1000))
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"jobs": jobs})))
}

async fn get_job(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<jobs::JobView>> {
    let id = parse_id(&id)?;
    let mut redis = app.redis.clone();
    match jobs::get(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

async fn cancel_job(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    let mut redis = app.redis.clone();
    let broker = app.broker().ok_or_else(no_broker)?;
    match jobs::cancel(&mut redis, &broker.publisher, &app.names, id).await {
        Ok(()) => {
            app.notifier.job_state(id, "CANCELING", json!({}));
            Ok(Json(json!({"job_id": id, "state": "CANCELING"})))
        }
        Err(CancelError::NotFound(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))
        }
        Err(e @ CancelError::NotCancelable { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Deserialize)]
struct DevicesQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn job_devices(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<DevicesQuery>,
) -> ApiResult<Json<jobs::DevicePage>> {
    let id = parse_id(&id)?;
    let state = match q.status.as_deref() {
        None | Some("") | Some("all") => None,
        Some(s) => Some(ExecutionState::parse(s).ok_or_else(|| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("unknown status {s:?}"),
            field: Some("status".into()),
        })?),
    };
    let mut redis = app.redis.clone();
    let page = jobs::devices(
        &mut redis,
        &app.names,
        id,
        state,
        q.cursor.as_deref(),
        q.limit.unwrap_or(1000),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(page))
}

async fn job_report(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<jobs::Report>> {
    let id = parse_id(&id)?;
    let mut redis = app.redis.clone();
    match jobs::report(&mut redis, &app.names, id, q.limit.unwrap_or(1000))
        .await
        .map_err(ApiError::internal)?
    {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct ResultsQuery {
    format: Option<crate::readings::Format>,
}

/// Every device's result and readings, as CSV (default) or NDJSON.
async fn job_results(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let format = q.format.unwrap_or(crate::readings::Format::Csv);
    let mut redis = app.redis.clone();
    let body = crate::readings::export(&mut redis, &app.names, id, format)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    let content_type = match format {
        crate::readings::Format::Csv => "text/csv",
        crate::readings::Format::Ndjson => "application/x-ndjson",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn list_dead_letters(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let broker = app.broker().ok_or_else(no_broker)?;
    let list = crate::deadletters::list(
        &broker.connection,
        &app.names,
        q.limit.unwrap_or(100).clamp(1, 10_000),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(json!({"messages": list})))
}

async fn replay_dead_letters(
    State(app): State<Arc<AppState>>,
    body: Option<Json<crate::deadletters::ReplayRequest>>,
) -> ApiResult<Json<crate::deadletters::ReplayReport>> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let broker = app.broker().ok_or_else(no_broker)?;
    let report =
        crate::deadletters::replay(&broker.connection, &broker.publisher, &app.names, &request)
            .await
            .map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// Server-Sent Events for one job: a `state` event whenever its state changes, a `progress`
/// event with the counters every second (and at once when they change after a quiet
/// second), and a final `finished` event, after which the stream ends.
async fn job_events(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<
    axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let id = parse_id(&id)?;
    let mut redis = app.redis.clone();
    if jobs::get(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    struct Watch {
        app: Arc<AppState>,
        id: Uuid,
        last_state: Option<String>,
        pending: std::collections::VecDeque<Event>,
        done: bool,
        first: bool,
    }
    let watch = Watch {
        app,
        id,
        last_state: None,
        pending: Default::default(),
        done: false,
        first: true,
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        loop {
            if let Some(e) = w.pending.pop_front() {
                return Some((Ok(e), w));
            }
            if w.done {
                return None;
            }
            if !w.first {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            w.first = false;
            let mut redis = w.app.redis.clone();
            let job = match jobs::get(&mut redis, &w.app.names, w.id).await {
                Ok(Some(job)) => job,
                // Redis hiccup: try again at the next tick; a vanished job ends the stream.
                Ok(None) => return None,
                Err(_) => continue,
            };
            let data = serde_json::to_string(&job).unwrap_or_default();
            if w.last_state.as_deref() != Some(job.state.as_str()) {
                w.last_state = Some(job.state.clone());
                w.pending.push_back(
                    Event::default()
                        .event("state")
                        .data(json!({"job_id": w.id, "state": job.state}).to_string()),
                );
            }
            w.pending
                .push_back(Event::default().event("progress").data(data.clone()));
            if matches!(job.state.as_str(), "COMPLETED" | "CANCELED") {
                w.pending
                    .push_back(Event::default().event("finished").data(data));
                w.done = true;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
