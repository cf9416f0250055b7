//! The HTTP face of the fleet: `POST /devices/{id}/jobs` plays the device, and `/stats`,
//! `/devices/{id}` and `/readings/{job}` report what the devices saw.
//!
//! Owns the HTTP server (HTTP/1.1 and HTTP/2 on one port) and its routes. A silent device
//! (offline, hung) holds the request open until the caller gives up, as a real unreachable
//! device behind a gateway would.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, Version},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use devices::{
    protocol::DeviceRequest,
    simdevice::{Answer, SimOutcome},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio_util::sync::CancellationToken;

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

/// Serves the [`router`] on `listener` until `shutdown`, HTTP/1.1 and HTTP/2 (without TLS, by
/// prior knowledge) on the same port, as a gateway in front of the whole fleet would: one
/// HTTP/2 connection carries up to [`STREAMS`] deliveries at once. Connections still open
/// at shutdown are dropped (a hung device's request never ends by itself).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
) {
    let router = router(fleet.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(STREAMS);
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait, as the connections in hand end.
                    tracing::warn!(error.message = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        fleet.totals().http_connections += 1;
        let _ = stream.set_nodelay(true);
        let (builder, service) = (builder.clone(), TowerToHyperService::new(router.clone()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

/// Deliveries one HTTP/2 connection may carry at once: the workers' concurrency, not a web
/// server's 200, since one connection stands for a whole fleet.
const STREAMS: u32 = 16_384;

async fn deliver(
    State(fleet): State<Arc<Fleet>>,
    Path(id): Path<String>,
    version: Version,
    Json(req): Json<DeviceRequest>,
) -> Response {
    *fleet
        .totals()
        .http_versions
        .entry(format!("{version:?}"))
        .or_default() += 1;
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
