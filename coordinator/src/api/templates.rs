//! `/v1/templates`: job templates (a spec with `{{parameter}}` placeholders), and jobs made
//! from them. A job from a template is rendered ([`shared::template`]) and then created
//! exactly as a hand-written spec would be (same checks, scope, idempotency key, dry run).

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{job::SpecFormat, template::Template};

use super::{
    ApiError, ApiResult,
    guard::AuditDetail,
    jobs::{CreateQuery, spec_format, submit},
};
use crate::{access::Caller, app::AppState};

fn invalid(e: shared::job::SpecError) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).with_field(&e.field)
}

async fn load(app: &AppState, name: &str) -> ApiResult<Template> {
    let mut redis = app.redis.clone();
    let raw: Option<String> = redis
        .hget(app.names.templates(), name)
        .await
        .map_err(ApiError::internal)?;
    let raw =
        raw.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no template {name:?}")))?;
    serde_json::from_str(&raw).map_err(ApiError::internal)
}

/// `POST /v1/templates`: stores a template (JSON or TOML); a name already taken is refused.
#[utoipa::path(
    post,
    path = "/v1/templates",
    tag = "templates",
    summary = "Store a job template",
    request_body(content = String, content_type = "application/json", description = "a job spec in JSON (or TOML with content-type application/toml)"),
    responses((status = 201, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    if body.len() > app.settings.coordinator.max_document_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("template is {} bytes; too large", body.len()),
        ));
    }
    let t = Template::parse(&body, spec_format(&headers)).map_err(invalid)?;
    let mut redis = app.redis.clone();
    let doc = serde_json::to_string(&t).map_err(ApiError::internal)?;
    let stored: bool = redis
        .hset_nx(app.names.templates(), &t.name, doc)
        .await
        .map_err(ApiError::internal)?;
    if !stored {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("template {:?} exists; delete it first", t.name),
        )
        .with_field("name"));
    }
    let mut response = (StatusCode::CREATED, Json(&t)).into_response();
    response
        .extensions_mut()
        .insert(AuditDetail(json!({"template": t.name})));
    Ok(response)
}

/// `GET /v1/templates`: every template, by name.
#[utoipa::path(
    get,
    path = "/v1/templates",
    tag = "templates",
    summary = "Every template",
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(State(app): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let mut redis = app.redis.clone();
    let all: BTreeMap<String, String> = redis
        .hgetall(app.names.templates())
        .await
        .map_err(ApiError::internal)?;
    let templates: Vec<Template> = all
        .values()
        .filter_map(|raw| serde_json::from_str(raw).ok())
        .collect();
    Ok(Json(json!({ "templates": templates })))
}

/// `GET /v1/templates/{name}`.
#[utoipa::path(
    get,
    path = "/v1/templates/{name}",
    tag = "templates",
    summary = "One template",
    params(("name" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn get(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Template>> {
    Ok(Json(load(&app, &name).await?))
}

/// `DELETE /v1/templates/{name}` (jobs made from it stay).
#[utoipa::path(
    delete,
    path = "/v1/templates/{name}",
    tag = "templates",
    summary = "Delete a template",
    params(("name" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    super::delete_named(&app, &app.names.templates(), &name, "template").await?;
    Ok(Json(json!({"template": name, "deleted": true})))
}

/// What a job from a template gives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FromTemplate {
    /// Parameter values by name.
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

/// `POST /v1/templates/{name}/jobs`: a job from the template with these parameters, created
/// as `POST /v1/jobs` would create the rendered spec (`Idempotency-Key`, `?dry_run=true`).
#[utoipa::path(
    post,
    path = "/v1/templates/{name}/jobs",
    tag = "templates",
    summary = "A job from a template",
    params(("name" = String, Path), ("dry_run" = Option<bool>, Query), ("idempotency-key" = Option<String>, Header)),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 201, description = "done", body = super::openapi::Created), (status = 200, description = "the dry run, or a repeated create", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn create_job(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<CreateQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: FromTemplate = if body.is_empty() {
        FromTemplate::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
    };
    let t = load(&app, &name).await?;
    let spec = t.render(&req.parameters).map_err(invalid)?;
    let text = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    submit(&app, &caller, &headers, &text, SpecFormat::Json, q.dry_run).await
}
