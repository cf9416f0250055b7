//! The HTTP face of the fleet: `POST /devices/{id}/jobs` plays the device, and `/stats`,
//! `/devices/{id}` and `/readings/{job}` report what the devices saw.
//!
//! Owns the HTTP routes. A silent device (offline, hung) holds the request open until the
//! caller gives up, as a real unreachable device behind a gateway would.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use devices::{
    protocol::DeviceRequest,
    simdevice::{Answer, SimOutcome},
};

use crate::fleet::Fleet;

/// The routes.
pub(crate) fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/devices/{id}/jobs", post(deliver))
        .route("/devices/{id}", get(device))
        .route("/stats", get(stats))
        .route("/readings/{job}", get(readings))
        .route("/deliveries/{job}", get(deliveries))
        .route("/contacts/{job}", get(contacts))
        .route("/presence", get(presence))
        .route("/cancels/{job}", get(cancels))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(fleet)
}

async fn deliver(
    State(fleet): State<Arc<Fleet>>,
    Path(id): Path<String>,
    Json(req): Json<DeviceRequest>,
) -> Response {
    if req.device_id != id {
        return (StatusCode::BAD_REQUEST, "deviceId does not match the URL").into_response();
    }
    if let Some(refused) = crate::plain::refusal(&fleet, &req) {
        return (StatusCode::OK, Json(refused)).into_response();
    }
    if req.health_check {
        return match fleet.health(&req) {
            Some(answer) => (StatusCode::OK, Json(answer)).into_response(),
            None => (StatusCode::NOT_FOUND, "no such device").into_response(),
        };
    }
    let Some(decision) = fleet.receive_request(&req) else {
        return (StatusCode::NOT_FOUND, "no such device").into_response();
    };
    let Answer::Reply { after, outcome } = decision.answer.clone() else {
        // Unreachable device: the caller's timeout ends this.
        std::future::pending::<()>().await;
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    };
    tokio::time::sleep(after).await;
    fleet.replied(&req.device_id, &req.job_id.to_string());
    let reply = crate::plain::reply(&fleet, &req, outcome, &decision);
    let code = if outcome == SimOutcome::Transient {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(reply)).into_response()
}

async fn stats(State(fleet): State<Arc<Fleet>>) -> Response {
    let t = fleet.totals().clone();
    Json(t).into_response()
}

async fn device(State(fleet): State<Arc<Fleet>>, Path(id): Path<String>) -> Response {
    match fleet.device(&id) {
        Some(v) => Json(v).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn readings(State(fleet): State<Arc<Fleet>>, Path(job): Path<String>) -> Response {
    Json(fleet.readings(&job)).into_response()
}

async fn contacts(State(fleet): State<Arc<Fleet>>, Path(job): Path<String>) -> Response {
    Json(fleet.contacts(&job)).into_response()
}

async fn deliveries(State(fleet): State<Arc<Fleet>>, Path(job): Path<String>) -> Response {
    Json(fleet.deliveries(&job)).into_response()
}

async fn cancels(State(fleet): State<Arc<Fleet>>, Path(job): Path<String>) -> Response {
    Json(fleet.cancels(&job)).into_response()
}

async fn presence(State(fleet): State<Arc<Fleet>>) -> Response {
    Json(fleet.online_times()).into_response()
}
