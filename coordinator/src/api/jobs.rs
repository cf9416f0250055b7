//! `/v1/jobs`: creating, reading, cancelling jobs, their per-device status, report and
//! results export.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::{MatchedPath, Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;
use shared::{
    job::{SpecFormat, SpecLimits},
    state::{ExecutionState, JobState},
};

use super::{ApiError, ApiResult, guard::AuditDetail, no_broker, parse_id};
use crate::{
    access::{Caller, scope},
    app::AppState,
    intake::{self, IntakeError},
    jobs::{self, CancelError},
    readings, report,
};

/// Header making a create safe to retry: the same key (from the same caller) returns the
/// first job.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header on the answer to a repeated create.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

#[derive(Debug, Deserialize)]
pub(super) struct CreateQuery {
    /// Validate and report what the job would do; create nothing.
    #[serde(default)]
    pub(super) dry_run: bool,
}

#[tracing::instrument(
    name = "POST /v1/jobs",
    skip_all,
    fields(otel.kind = "server", job_id = tracing::field::Empty)
)]
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "Create a job (or preview it with dry_run)",
    params(("dry_run" = Option<bool>, Query), ("idempotency-key" = Option<String>, Header)),
    request_body(content = String, content_type = "application/json", description = "a job spec in JSON (or TOML with content-type application/toml)"),
    responses((status = 201, description = "done", body = super::openapi::Created), (status = 200, description = "the dry run (a Preview), or the job an idempotency key made before", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<CreateQuery>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    submit(
        &app,
        &caller,
        &headers,
        &body,
        spec_format(&headers),
        q.dry_run,
    )
    .await
}

/// The format of a spec body, from its content type (TOML, else JSON).
pub(super) fn spec_format(headers: &HeaderMap) -> SpecFormat {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("toml") {
        SpecFormat::Toml
    } else {
        SpecFormat::Json
    }
}

/// A spec submitted by `caller`, with the deployment's limits and policies.
pub(super) fn new_job<'a>(
    app: &'a AppState,
    caller: &'a Caller,
    body: &'a str,
    format: SpecFormat,
    key: Option<&'a str>,
) -> intake::NewJob<'a> {
    intake::NewJob {
        text: body,
        format,
        limits: SpecLimits {
            max_document_bytes: app.settings.coordinator.max_document_bytes,
            max_explicit_devices: app.settings.coordinator.max_explicit_devices,
        },
        can_sign_webhooks: app.settings.coordinator.webhook_secret.is_some(),
        scope: caller.groups.as_deref(),
        trace: shared::amqp::current_traceparent(),
        outbound: &app.outbound,
        signer: app.signer.as_ref(),
        idempotency: key.map(|key| intake::Idempotency {
            key,
            caller: &caller.subject,
        }),
        created_by: &caller.subject,
    }
}

/// Creates (or, with `dry_run`, previews) the job `body` describes: the one path every
/// create takes, reruns included.
pub(super) async fn submit(
    app: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: &str,
    format: SpecFormat,
    dry_run: bool,
) -> ApiResult<Response> {
    if app.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "coordinator is shutting down",
        ));
    }
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
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| {
            let key = v.to_str().map_err(|_| "must be visible ASCII".to_owned())?;
            intake::check_key(key).map(|()| key)
        })
        .transpose()
        .map_err(|problem| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{IDEMPOTENCY_KEY}: {problem}"),
            )
            .with_field(IDEMPOTENCY_KEY)
        })?;
    let mut redis = app.redis.clone();
    let job = new_job(app, caller, body, format, key);
    if dry_run {
        let spec = intake::validate(&mut redis, &app.names, &job)
            .await
            .map_err(intake_error)?;
        let preview = crate::preview::preview(
            &mut redis,
            &app.names,
            &spec,
            app.settings.coordinator.default_max_per_second,
        )
        .await
        .map_err(ApiError::internal)?;
        let mut response = Json(preview).into_response();
        response.extensions_mut().insert(AuditDetail(
            json!({"dry_run": true, "action": spec.action.kind()}),
        ));
        return Ok(response);
    }
    match intake::create(&mut redis, &app.names, job).await {
        Ok(intake::Creation::New(id, spec)) => {
            tracing::Span::current().record("job_id", tracing::field::display(id));
            let state = intake::initial_state(&spec, shared::now_ms());
            app.notifier.job_state(id, state, json!({}));
            app.start_planner(id);
            let mut response = (StatusCode::CREATED, Json(json!({"job_id": id}))).into_response();
            response.extensions_mut().insert(AuditDetail(json!({
                "job_id": id,
                "action": spec.action.kind(),
                "target": {
                    "groups": spec.target.groups,
                    "devices": spec.target.devices.len(),
                    "filter": spec.target.filter,
                },
            })));
            Ok(response)
        }
        Ok(intake::Creation::Existing(id)) => {
            let mut response = (
                StatusCode::OK,
                [(IDEMPOTENT_REPLAYED, "true")],
                Json(json!({"job_id": id, "idempotent_replay": true})),
            )
                .into_response();
            response.extensions_mut().insert(AuditDetail(
                json!({"job_id": id, "idempotent_replay": true}),
            ));
            Ok(response)
        }
        Err(e) => Err(intake_error(e)),
    }
}

/// What a rerun or a rollback takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FollowUpRequest {
    /// The terminal states whose devices are targeted (rerun: FAILED and TIMED_OUT by
    /// default; rollback: SUCCEEDED and FAILED).
    #[serde(default)]
    states: Vec<ExecutionState>,
    /// The new job's name (default: "rerun of ..." or "rollback of ...").
    name: Option<String>,
}

/// `POST /v1/jobs/{id}/rerun`: a new job with the earlier job's action, settings and
/// compatibility for exactly its devices that ended in the given states, however many (the
/// target is the earlier job's state sets, not a list of ids).
/// `POST /v1/jobs/{id}/rollback`: the same with the earlier job's `rollback` action, for its
/// devices that ended SUCCEEDED or FAILED by default (those that may have changed).
/// Both are created like any job: the caller's scope, `Idempotency-Key` and `?dry_run=true`
/// apply.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/rerun",
    tag = "jobs",
    summary = "A new job for the devices that ended in the given states",
    params(("id" = String, Path), ("dry_run" = Option<bool>, Query), ("idempotency-key" = Option<String>, Header)),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 201, description = "done", body = super::openapi::Created), (status = 200, description = "the dry run, or a repeated create", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn follow_up_job(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    route: MatchedPath,
    Path(id): Path<String>,
    Query(q): Query<CreateQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let kind = if route.as_str().ends_with("/rollback") {
        intake::FollowUp::Rollback
    } else {
        intake::FollowUp::Rerun
    };
    follow_up(&app, &caller, &id, q.dry_run, &headers, &body, kind).await
}

async fn follow_up(
    app: &AppState,
    caller: &Caller,
    id: &str,
    dry_run: bool,
    headers: &HeaderMap,
    body: &[u8],
    kind: intake::FollowUp,
) -> ApiResult<Response> {
    let id = parse_id(id)?;
    let req: FollowUpRequest = if body.is_empty() {
        FollowUpRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
    };
    let mut redis = app.redis.clone();
    let earlier = shared::store::load_job(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    let spec = intake::follow_up_spec(&earlier, kind, req.states, req.name).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.problem.clone()).with_field(&e.field)
    })?;
    let text = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    submit(app, caller, headers, &text, SpecFormat::Json, dry_run).await
}

/// The answer to a create refused by intake.
pub(super) fn intake_error(e: IntakeError) -> ApiError {
    match e {
        IntakeError::KeyReused(first) => ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: IntakeError::KeyReused(first).to_string(),
            field: Some(IDEMPOTENCY_KEY.into()),
        },
        IntakeError::OutOfScope(message) => ApiError {
            status: StatusCode::FORBIDDEN,
            message,
            field: Some("target".into()),
        },
        IntakeError::Invalid(e) => ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
            field: Some(e.field),
        },
        e => ApiError::internal(e),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LimitQuery {
    pub(super) limit: Option<usize>,
}

/// A page of jobs, newest first: `limit` and `cursor`, as every listing.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "The newest jobs, a page at a time",
    params(("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, description = "done", body = crate::jobs::JobPage), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<jobs::JobPage>> {
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(parse_id(c).map_err(|e| e.with_field("cursor"))?),
    };
    let mut redis = app.redis.clone();
    let page = jobs::list(
        &mut redis,
        &app.names,
        cursor,
        q.limit.unwrap_or(50).clamp(1, 1000),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(page))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "A job: state, counters, waves",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = crate::jobs::JobView), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn get(
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

/// `DELETE /v1/jobs/{id}`: a finished job's data, now (409 for a job still running).
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "Delete a finished job's data",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    let job = job_for_change(&app, &caller, id).await?;
    if !job.state.is_finished() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} is {}: only a finished job is deleted (cancel it first)",
                job.state.as_str()
            ),
        ));
    }
    let mut redis = app.redis.clone();
    let keys = crate::retention::delete_job_data(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"job_id": id, "deleted": true, "keys": keys})))
}

/// Loads job `id` for a change by `caller`: a scoped operator may change only jobs that
/// stay inside its groups.
async fn job_for_change(
    app: &AppState,
    caller: &Caller,
    id: uuid::Uuid,
) -> ApiResult<shared::store::JobRecord> {
    let mut redis = app.redis.clone();
    let job = shared::store::load_job(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    if caller.groups.is_some()
        && let Err(m) = scope::check(
            &mut redis,
            &app.names,
            &job.spec.target,
            caller.groups.as_deref(),
        )
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("job {id}: {m}"),
        ));
    }
    Ok(job)
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    summary = "Cancel a job",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn cancel(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    job_for_change(&app, &caller, id).await?;
    let mut redis = app.redis.clone();
    let broker = app.broker().ok_or_else(no_broker)?;
    match jobs::cancel(&mut redis, &broker.publisher, &app.names, id).await {
        Ok(()) => {
            app.notifier.job_state(id, JobState::Canceling, json!({}));
            Ok(Json(json!({"job_id": id, "state": JobState::Canceling})))
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

/// The body of a pause (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SteerRequest {
    /// Why, for the record.
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/jobs/{id}/pause`, `/resume` and `/approve` (the route says which).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/pause",
    tag = "jobs",
    summary = "Pause a job (resume and approve are alike)",
    params(("id" = String, Path)),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn steer(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    route: MatchedPath,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    use crate::steer::{Steer, SteerError};
    let id = parse_id(&id)?;
    let req: SteerRequest = if body.is_empty() {
        SteerRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
    };
    let (change, word) = match route.as_str().rsplit('/').next() {
        Some("pause") => (Steer::Pause, "paused"),
        Some("resume") => (Steer::Resume, "resumed"),
        _ => (Steer::Approve, "approved"),
    };
    job_for_change(&app, &caller, id).await?;
    let reason = match req.reason.filter(|r| !r.trim().is_empty()) {
        Some(r) if r.len() > 1024 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reason: at most 1024 bytes",
            )
            .with_field("reason"));
        }
        Some(r) => format!("{word} by {}: {r}", caller.subject),
        None => format!("{word} by {}", caller.subject),
    };
    let mut redis = app.redis.clone();
    let broker = app.broker();
    match crate::steer::steer(
        &mut redis,
        broker.as_ref().map(|b| &b.publisher),
        &app.names,
        id,
        change,
        &reason,
    )
    .await
    {
        Ok(state) => {
            app.notifier
                .job_state_because(id, state, json!({}), Some(&reason));
            Ok(Json(
                json!({"job_id": id, "state": state, "reason": reason}),
            ))
        }
        Err(SteerError::NotFound(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))
        }
        Err(e @ SteerError::Refused { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct DevicesQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/devices",
    tag = "jobs",
    summary = "Per-device status, a page at a time",
    params(("id" = String, Path), ("status" = Option<String>, Query), ("cursor" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = crate::jobs::DevicePage), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn devices(
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
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<jobs::DeviceCursor>().map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("{c:?} is not a cursor"))
                .with_field("cursor")
        })?),
    };
    let mut redis = app.redis.clone();
    if shared::store::load_job_state(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    let page = jobs::devices(
        &mut redis,
        &app.names,
        id,
        state,
        cursor,
        q.limit.unwrap_or(1000),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(page))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/report",
    tag = "jobs",
    summary = "Failures grouped by error, and the readings summary",
    params(("id" = String, Path), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = crate::report::Report), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn report(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<report::Report>> {
    let id = parse_id(&id)?;
    let mut redis = app.redis.clone();
    match report::build(&mut redis, &app.names, id, q.limit.unwrap_or(1000))
        .await
        .map_err(ApiError::internal)?
    {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ResultsQuery {
    format: Option<readings::Format>,
}

/// Every device's result and readings, as CSV (default) or NDJSON.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results",
    tag = "jobs",
    summary = "Every device's result and readings",
    params(("id" = String, Path), ("format" = Option<String>, Query, description = "csv or ndjson")),
    responses((status = 200, description = "done", body = String, content_type = "text/csv"), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn results(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let format = q.format.unwrap_or(readings::Format::Csv);
    let chunks = readings::export(&app.redis, &app.names, id, format)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    let body = axum::body::Body::from_stream(chunks);
    let content_type = match format {
        readings::Format::Csv => "text/csv",
        readings::Format::Ndjson => "application/x-ndjson",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}
