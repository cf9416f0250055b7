//! `/v1/queries`: saved device queries (dynamic groups). A job names one as
//! `target.saved_query`; its text is read when the job is created.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult};
use crate::app::AppState;

/// A query to save.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SavedQuery {
    /// Its text (`firmware_version < 2.1.0 and tags.site = berlin`).
    query: String,
}

/// `PUT /v1/queries/{name}`: saves (or replaces) a query, checked first.
#[utoipa::path(
    put,
    path = "/v1/queries/{name}",
    tag = "devices",
    summary = "Save a device query",
    params(("name" = String, Path)),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn put(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    shared::device::validate_id(&name).map_err(|p| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("name: {p}")).with_field("name")
    })?;
    let q: SavedQuery = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    shared::query::Query::parse(&q.query).map_err(|p| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("query: {p}")).with_field("query")
    })?;
    let mut redis = app.redis.clone();
    let () = redis
        .hset(app.names.saved_queries(), &name, &q.query)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"name": name, "query": q.query})))
}

/// `GET /v1/queries`: every saved query, by name.
#[utoipa::path(
    get,
    path = "/v1/queries",
    tag = "devices",
    summary = "Saved device queries",
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(State(app): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let mut redis = app.redis.clone();
    let all: BTreeMap<String, String> = redis
        .hgetall(app.names.saved_queries())
        .await
        .map_err(ApiError::internal)?;
    let queries: Vec<Value> = all
        .into_iter()
        .map(|(name, query)| json!({"name": name, "query": query}))
        .collect();
    Ok(Json(json!({ "queries": queries })))
}

/// `DELETE /v1/queries/{name}` (jobs created with it keep its text).
#[utoipa::path(
    delete,
    path = "/v1/queries/{name}",
    tag = "devices",
    summary = "Delete a saved query",
    params(("name" = String, Path)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    super::delete_named(&app, &app.names.saved_queries(), &name, "saved query").await?;
    Ok(Json(json!({"name": name, "deleted": true})))
}
