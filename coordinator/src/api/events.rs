//! `/v1/jobs/{id}/events`: a job's progress as Server-Sent Events.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use serde_json::json;
use shared::state::JobState;
use uuid::Uuid;

use super::{ApiError, ApiResult, parse_id};
use crate::{app::AppState, jobs};

/// Server-Sent Events for one job: a `state` event (with the reason) whenever its state
/// changes, a `wave` event whenever a rollout with waves moves to another phase or wave, a
/// `progress`
/// event with the counters every second (and at once when they change after a quiet
/// second), and a final `finished` event, after which the stream ends.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    summary = "A job's progress as Server-Sent Events",
    params(("id" = String, Path)),
    responses((status = 200, description = "done", body = String, content_type = "text/event-stream"), (status = "4XX", description = "refused: the error names the field", body = super::openapi::ErrorBody))
)]
pub(super) async fn stream(
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
        last_state: Option<JobState>,
        last_phase: Option<(String, Option<u64>)>,
        pending: std::collections::VecDeque<Event>,
        done: bool,
        first: bool,
    }
    let watch = Watch {
        app,
        id,
        last_state: None,
        last_phase: None,
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
            if w.last_state != Some(job.state) {
                w.last_state = Some(job.state);
                w.pending.push_back(
                    Event::default().event("state").data(
                        json!({"job_id": w.id, "state": job.state, "reason": job.state_reason})
                            .to_string(),
                    ),
                );
            }
            if let Some(r) = &job.rollout {
                let phase = (r.phase.phase.clone(), r.phase.wave);
                if w.last_phase.as_ref() != Some(&phase) {
                    w.pending.push_back(Event::default().event("wave").data(
                        json!({"job_id": w.id, "phase": phase.0, "wave": phase.1, "waves": r.waves})
                            .to_string(),
                    ));
                    w.last_phase = Some(phase);
                }
            }
            w.pending
                .push_back(Event::default().event("progress").data(data.clone()));
            if job.state.is_finished() {
                w.pending
                    .push_back(Event::default().event("finished").data(data));
                w.done = true;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
