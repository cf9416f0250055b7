//! `/v1/dlq`: listing and replaying dead-lettered messages.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Query, State},
};
use serde_json::json;

use super::{ApiError, ApiResult, jobs::LimitQuery, no_broker};
use crate::{app::AppState, deadletters};

#[utoipa::path(
    get,
    path = "/v1/dlq",
    tag = "operations",
    summary = "Dead-lettered messages with their reasons",
    params(("limit" = Option<usize>, Query)),
    responses((status = 200, description = "done", body = Object), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let broker = app.broker().ok_or_else(no_broker)?;
    let list = deadletters::list(
        &broker.connection,
        &app.names,
        q.limit.unwrap_or(100).clamp(1, 10_000),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(json!({"messages": list})))
}

#[utoipa::path(
    post,
    path = "/v1/dlq/replay",
    tag = "operations",
    summary = "Put dead letters back on their queues",
    request_body(content = crate::deadletters::ReplayRequest, content_type = "application/json"),
    responses((status = 200, description = "done", body = crate::deadletters::ReplayReport), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn replay(
    State(app): State<Arc<AppState>>,
    body: Option<Json<deadletters::ReplayRequest>>,
) -> ApiResult<Json<deadletters::ReplayReport>> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let broker = app.broker().ok_or_else(no_broker)?;
    let report = deadletters::replay(&broker.connection, &broker.publisher, &app.names, &request)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(report))
}
