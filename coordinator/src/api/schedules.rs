//! `/v1/schedules`: recurring jobs. Creating one (a job spec with `schedule.cron`, checked as
//! a job would be), listing, reading (with its child jobs), pausing, resuming and deleting.
//! The firing is [`crate::recurring`]'s.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::{MatchedPath, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{
    ApiError, ApiResult,
    guard::AuditDetail,
    jobs::{intake_error, new_job, spec_format},
    parse_id,
};
use crate::{
    access::Caller,
    app::AppState,
    recurring::{self, ScheduleView},
};

#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    summary = "Create a recurring job",
    request_body(content = String, content_type = "application/json", description = "a job spec in JSON (or TOML with content-type application/toml)"),
    responses((status = 201, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    let mut redis = app.redis.clone();
    let job = new_job(&app, &caller, &body, spec_format(&headers), None);
    let id = recurring::create(&mut redis, &app.names, &job, &caller.subject)
        .await
        .map_err(intake_error)?;
    let view = get_view(&app, id).await?;
    let mut response = (StatusCode::CREATED, Json(&view)).into_response();
    response.extensions_mut().insert(AuditDetail(
        json!({"schedule_id": id, "cron": view.cron, "action": view.spec.action.kind()}),
    ));
    Ok(response)
}

async fn get_view(app: &AppState, id: uuid::Uuid) -> ApiResult<ScheduleView> {
    let mut redis = app.redis.clone();
    recurring::get(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no schedule {id}")))
}

#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    summary = "Every schedule",
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(State(app): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let mut schedules = Vec::new();
    for id in recurring::list(&mut redis, &app.names)
        .await
        .map_err(ApiError::internal)?
    {
        if let Some(v) = recurring::get(&mut redis, &app.names, id)
            .await
            .map_err(ApiError::internal)?
        {
            schedules.push(v);
        }
    }
    Ok(Json(json!({ "schedules": schedules })))
}

#[utoipa::path(
    get,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    summary = "One schedule",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = crate::recurring::ScheduleView), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn get(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ScheduleView>> {
    Ok(Json(get_view(&app, parse_id(&id)?).await?))
}

/// A scoped operator may change only schedules whose targets stay inside its groups.
async fn for_change(app: &AppState, caller: &Caller, id: uuid::Uuid) -> ApiResult<ScheduleView> {
    let view = get_view(app, id).await?;
    let mut redis = app.redis.clone();
    if let Err(m) = recurring::check_scope(&mut redis, &app.names, &view, caller.groups.as_deref())
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("schedule {id}: {m}"),
        ));
    }
    Ok(view)
}

/// `POST /v1/schedules/{id}/pause|resume`.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/pause",
    tag = "schedules",
    summary = "Stop a schedule firing (resume is alike)",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn steer(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    route: MatchedPath,
    Path(id): Path<String>,
) -> ApiResult<Json<ScheduleView>> {
    let id = parse_id(&id)?;
    for_change(&app, &caller, id).await?;
    let active = route.as_str().ends_with("/resume");
    let mut redis = app.redis.clone();
    recurring::set_active(&mut redis, &app.names, id, active)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(get_view(&app, id).await?))
}

/// `DELETE /v1/schedules/{id}`: no further occurrence; the child jobs stay.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    summary = "Delete a schedule",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    for_change(&app, &caller, id).await?;
    let mut redis = app.redis.clone();
    recurring::delete(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"schedule_id": id, "deleted": true})))
}
