//! `/v1/devices` and `/v1/groups`: importing, listing and counting registered devices.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
};
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::json;
use shared::device::AttributeFilter;

use super::{ApiError, ApiResult};
use crate::{
    app::AppState,
    import::{self, ImportError},
    registry::{self, ImportFormat, ImportReport},
};

#[derive(Debug, Deserialize)]
pub(super) struct ImportQuery {
    format: Option<ImportFormat>,
}

/// Streams an import: CSV (header row) or NDJSON; invalid records are reported by line.
#[utoipa::path(
    post,
    path = "/v1/devices/import",
    tag = "devices",
    summary = "Import devices (CSV with a header row, or NDJSON), streamed",
    params(("format" = Option<String>, Query, description = "csv or ndjson")),
    request_body(content = String, content_type = "text/csv"),
    responses((status = 200, description = "done", body = crate::registry::ImportReport), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn import(
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
    let mut redis = app.redis.clone();
    let body = Box::pin(import::limited(
        import::io_stream(body.into_data_stream()),
        app.settings.coordinator.import_max_line_bytes,
        app.settings.coordinator.import_max_bytes,
    ));
    let report = match import::run(&mut redis, &app.names, format, body).await {
        Ok(report) => report,
        Err(ImportError::Input(e)) => return Err(ApiError::new(StatusCode::BAD_REQUEST, e)),
        Err(e) => return Err(ApiError::internal(e)),
    };
    tracing::info!(
        imported = report.imported,
        failed = report.failed,
        "devices imported"
    );
    Ok(Json(report))
}

/// Which devices a listing or count covers, and the page. `after` is the older name of
/// `cursor`, still accepted.
#[derive(Debug, Deserialize)]
pub(super) struct DeviceQuery {
    group: Option<String>,
    model: Option<String>,
    hardware_revision: Option<String>,
    firmware_version: Option<String>,
    /// `tag=key=value`, repeatable in spirit: one tag per query (`key=value`).
    tag: Option<String>,
    /// A device query (`firmware_version < 2.1.0 and tags.site = berlin`).
    query: Option<String>,
    #[serde(alias = "after")]
    cursor: Option<String>,
    limit: Option<usize>,
}

impl DeviceQuery {
    /// The filter and the query together, as one predicate over devices.
    fn matcher(&self) -> ApiResult<impl Fn(&shared::device::Device) -> bool + use<>> {
        let filter = self.filter()?;
        let query = self
            .query
            .as_deref()
            .map(shared::query::Query::parse)
            .transpose()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e).with_field("query"))?;
        Ok(move |d: &shared::device::Device| {
            filter.matches(d) && query.as_ref().is_none_or(|q| q.matches(d))
        })
    }

    /// Whether anything narrows the listing.
    fn narrows(&self) -> ApiResult<bool> {
        Ok(!self.filter()?.is_empty() || self.query.is_some())
    }

    fn filter(&self) -> ApiResult<AttributeFilter> {
        let mut tags = std::collections::BTreeMap::new();
        if let Some(t) = &self.tag {
            let (k, v) = t.split_once('=').ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("{t:?} is not key=value"))
                    .with_field("tag")
            })?;
            tags.insert(k.to_owned(), v.to_owned());
        }
        Ok(AttributeFilter {
            model: self.model.clone(),
            hardware_revision: self.hardware_revision.clone(),
            firmware_version: self.firmware_version.clone(),
            tags,
        })
    }
    /// The registry key the query reads: the group's, or every device's. A group name
    /// outside the id character set is refused (it could name another key).
    fn key(&self, app: &AppState) -> ApiResult<String> {
        match &self.group {
            Some(g) => {
                shared::device::validate_id(g)
                    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e).with_field("group"))?;
                Ok(app.names.group(g))
            }
            None => Ok(app.names.devices()),
        }
    }

    /// The cursor: a device id a previous page ended at.
    fn cursor(&self) -> ApiResult<Option<&str>> {
        match self.cursor.as_deref() {
            None | Some("") => Ok(None),
            Some(c) => shared::device::validate_id(c)
                .map(|()| Some(c))
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("not a cursor: {e}"))
                        .with_field("cursor")
                }),
        }
    }
}

/// One page of devices in id order; `next_cursor` continues it.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    summary = "Devices in id order, a page at a time",
    params(("group" = Option<String>, Query), ("model" = Option<String>, Query), ("hardware_revision" = Option<String>, Query), ("firmware_version" = Option<String>, Query), ("tag" = Option<String>, Query, description = "key=value"), ("query" = Option<String>, Query, description = "a device query"), ("cursor" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = super::openapi::DeviceList), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let matcher = q.matcher()?;
    let mut redis = app.redis.clone();
    let page = registry::scan(
        &mut redis,
        &app.names,
        &q.key(&app)?,
        matcher,
        q.cursor()?,
        Some(limit),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(
        json!({"devices": page.devices, "next_cursor": page.next_cursor}),
    ))
}

/// How many devices match.
#[utoipa::path(
    get,
    path = "/v1/devices/count",
    tag = "devices",
    summary = "How many devices match",
    params(("group" = Option<String>, Query), ("model" = Option<String>, Query), ("hardware_revision" = Option<String>, Query), ("firmware_version" = Option<String>, Query), ("tag" = Option<String>, Query, description = "key=value"), ("query" = Option<String>, Query, description = "a device query")),
    responses((status = 200, description = "done", body = super::openapi::Count), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn count(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let key = q.key(&app)?;
    if !q.narrows()? {
        let n: u64 = redis.zcard(&key).await.map_err(ApiError::internal)?;
        return Ok(Json(json!({"count": n})));
    }
    let page = registry::scan(&mut redis, &app.names, &key, q.matcher()?, None, None)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"count": page.matched})))
}

/// Every group with its size (an empty registry has none).
#[utoipa::path(
    get,
    path = "/v1/groups",
    tag = "devices",
    summary = "Groups with their member counts",
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn groups(State(app): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let mut groups: Vec<String> = redis
        .smembers(app.names.groups())
        .await
        .map_err(ApiError::internal)?;
    groups.sort();
    if groups.is_empty() {
        return Ok(Json(json!({"groups": []})));
    }
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

/// `GET /v1/devices/{id}`.
#[utoipa::path(
    get,
    path = "/v1/devices/{id}",
    tag = "devices",
    summary = "One device",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = shared::device::Device), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn get_one(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Json<shared::device::Device>> {
    let mut redis = app.redis.clone();
    registry::get(&mut redis, &app.names, &id)
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no device {id:?}")))
}

/// `GET /v1/devices/{id}/jobs?history=`: `jobs`, the unfinished jobs that wait for the device
/// or run on it, in the order the device gets them (priority, then creation), each with the
/// device's state in it (`NOT_SENT` before the job's planner reached the device; jobs that
/// run alongside others, `concurrent`, are not in a device's line); and `history`, the
/// device's status (state, attempts, last error, readings) in each of the newest `history`
/// jobs (default 100, at most 1,000) that reached it, finished or not, newest first.
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/jobs",
    tag = "devices",
    summary = "A device's line of unfinished jobs and its history across jobs",
    params(("id" = String, Path), ("history" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = super::openapi::DeviceJobs), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn jobs(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let jobs = device_jobs(&app, &id).await?;
    let history = device_history(&app, &id, q.history.unwrap_or(HISTORY_JOBS)).await?;
    Ok(Json(
        json!({"device_id": id, "jobs": jobs, "history": history}),
    ))
}

/// Jobs a device's history looks through by default.
pub const HISTORY_JOBS: usize = 100;

#[derive(serde::Deserialize)]
pub(super) struct HistoryQuery {
    history: Option<usize>,
}

/// Device `id`'s status in each of the newest `jobs` jobs (at most 1,000) that reached it.
pub async fn device_history(
    app: &AppState,
    id: &str,
    jobs: usize,
) -> ApiResult<Vec<crate::jobs::DeviceHistoryEntry>> {
    let mut redis = app.redis.clone();
    crate::jobs::device_history(&mut redis, &app.names, id, jobs.clamp(1, 1000))
        .await
        .map_err(ApiError::internal)
}

/// The unfinished jobs in device `id`'s line (see [`jobs`]); 404 for a device neither
/// registered nor in any line.
pub async fn device_jobs(app: &AppState, id: &str) -> ApiResult<Vec<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let ids: Vec<String> = redis
        .zrange(app.names.device_lane(id), 0, LANE_LIST_MAX - 1)
        .await
        .map_err(ApiError::internal)?;
    // A device deleted from the registry may still be in jobs' lines: only a device that is
    // neither registered nor in any line is unknown.
    if ids.is_empty()
        && registry::get(&mut redis, &app.names, id)
            .await
            .map_err(ApiError::internal)?
            .is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id:?}"),
        ));
    }
    let mut jobs = Vec::new();
    for job_id in ids.iter().filter_map(|j| j.parse::<uuid::Uuid>().ok()) {
        let Some(job) = shared::store::load_job(&mut redis, &app.names, job_id)
            .await
            .map_err(ApiError::internal)?
        else {
            continue;
        };
        if job.state.is_finished() {
            continue;
        }
        let raw: Option<String> = redis
            .hget(app.names.job_status(job_id), id)
            .await
            .map_err(ApiError::internal)?;
        let status = raw.and_then(|r| serde_json::from_str::<shared::state::DeviceStatus>(&r).ok());
        if status.as_ref().is_some_and(|s| s.state.is_terminal()) {
            continue;
        }
        jobs.push(json!({
            "job_id": job_id,
            "name": job.spec.name,
            "job_state": job.state,
            "priority": job.spec.priority,
            "created_at_ms": job.created_at_ms,
            "state": status.as_ref().map_or("NOT_SENT", |s| s.state.as_str()),
            "attempts": status.as_ref().map_or(0, |s| s.attempts),
            "error": status.and_then(|s| s.error),
        }));
    }
    Ok(jobs)
}

/// The most jobs listed for one device.
const LANE_LIST_MAX: isize = 100;

/// `PATCH /v1/devices/{id}`: the fields given replace the stored ones.
#[utoipa::path(
    patch,
    path = "/v1/devices/{id}",
    tag = "devices",
    summary = "Change a device's attributes, groups or tags",
    params(("id" = String, Path)),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "done", body = shared::device::Device), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn update(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<shared::device::Device>> {
    let patch: registry::DevicePatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut redis = app.redis.clone();
    match registry::update(&mut redis, &app.names, &id, patch).await {
        Ok(Some(d)) => Ok(Json(d)),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id:?}"),
        )),
        Err(Ok(problem)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, problem)),
        Err(Err(e)) => Err(ApiError::internal(e)),
    }
}

/// `DELETE /v1/devices/{id}`: out of the registry and its groups (jobs keep their records).
#[utoipa::path(
    delete,
    path = "/v1/devices/{id}",
    tag = "devices",
    summary = "Remove a device from the registry",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    if registry::delete(&mut redis, &app.names, &id)
        .await
        .map_err(ApiError::internal)?
    {
        Ok(Json(json!({"device_id": id, "deleted": true})))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id:?}"),
        ))
    }
}
