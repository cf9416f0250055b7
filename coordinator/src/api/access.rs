//! `/v1/tokens`, `/v1/audit` and `/v1/whoami`: API tokens, the audit log, and who the caller
//! is.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{ApiError, ApiResult, guard::AuditDetail, parse_id};
use crate::{
    access::{Caller, tokens},
    app::AppState,
    audit,
};

/// Creates a token; the secret is in this response only.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "access",
    summary = "Create an API token (the secret is shown once)",
    request_body(content = Object, content_type = "application/json"),
    responses((status = 201, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<tokens::NewToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(new) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    tokens::validate(&new)
        .map_err(|(f, m)| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m).with_field(f))?;
    let mut redis = app.redis.clone();
    let (record, secret) = tokens::create(&mut redis, &app.names, &new, &caller.subject)
        .await
        .map_err(ApiError::internal)?;
    let public = record.public();
    let detail = json!({"token_id": public.id, "name": public.name, "role": public.role, "groups": public.groups});
    let mut response = (
        StatusCode::CREATED,
        Json(json!({"token": public, "secret": secret})),
    )
        .into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

/// Every token (never their secrets).
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "access",
    summary = "Every token, never their secrets",
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(State(app): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let list = tokens::list(&mut redis, &app.names)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"tokens": list})))
}

/// Revokes a token.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "access",
    summary = "Revoke a token",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn revoke(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_id(&id).map_err(|e| e.with_field("id"))?;
    let mut redis = app.redis.clone();
    match tokens::revoke(&mut redis, &app.names, id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(record) => {
            let mut response = Json(json!({"token": record})).into_response();
            response
                .extensions_mut()
                .insert(AuditDetail(json!({"token_id": id, "name": record.name})));
            Ok(response)
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token {id}"),
        )),
    }
}

/// A page of the audit log, newest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "access",
    summary = "The audit log, newest first",
    params(("actor" = Option<String>, Query), ("job_id" = Option<String>, Query), ("outcome" = Option<String>, Query), ("action" = Option<String>, Query), ("cursor" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = crate::audit::Page), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn audit_log(
    State(app): State<Arc<AppState>>,
    q: Result<Query<audit::Filter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<audit::Page>> {
    let Query(filter) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut redis = app.redis.clone();
    audit::page(&mut redis, &app.names, &filter)
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m).with_field("cursor"))
}

/// Who the caller is.
#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "access",
    summary = "The caller's identity, role and groups",
    responses((status = 200, description = "done", body = crate::access::Caller), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn whoami(Extension(caller): Extension<Caller>) -> Json<Caller> {
    Json(caller)
}
