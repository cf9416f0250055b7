//! The fleetbatch device protocol, device side: requests on `{prefix}/devices/+/jobs`,
//! answers on the request's reply topic (over MQTT), or as the response body (over HTTP).
//! Over MQTT, a cancel request on `{prefix}/devices/+/cancel` stops the job under way
//! (answered `CANCELED`), unless the device is one of those that refuse.
//!
//! Owns turning a simulated device's decision into a [`DeviceReply`]. It never keeps device
//! state itself ([`crate::fleet`] does).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use devices::{
    mqtt::{Link, Message},
    protocol::{self, CancelRequest, DeviceReply, DeviceRequest, ReplyStatus},
    simdevice::{self, Answer, SimOutcome},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Decision, Fleet};

/// The reply a device sends once its work (already waited for) is done; applies the job.
pub(crate) fn reply(
    fleet: &Fleet,
    req: &DeviceRequest,
    outcome: SimOutcome,
    decision: &Decision,
) -> DeviceReply {
    let (status, retryable, error, readings) = match outcome {
        SimOutcome::Applied | SimOutcome::AlreadyApplied => {
            fleet.apply(
                &req.device_id,
                &req.job_id.to_string(),
                &req.execution_id.to_string(),
                decision.readings.as_ref(),
            );
            (
                ReplyStatus::Succeeded,
                false,
                None,
                decision.readings.clone(),
            )
        }
        SimOutcome::Transient => (
            ReplyStatus::Failed,
            true,
            Some(simdevice::TRANSIENT_ERROR.to_owned()),
            None,
        ),
        SimOutcome::Failed => (
            ReplyStatus::Failed,
            false,
            Some(simdevice::PERMANENT_ERROR.to_owned()),
            None,
        ),
        SimOutcome::Rejected => (
            ReplyStatus::Rejected,
            false,
            Some(simdevice::REJECT_ERROR.to_owned()),
            None,
        ),
    };
    fleet.answered(&format!("{status:?}").to_uppercase());
    DeviceReply {
        execution_id: req.execution_id,
        status,
        retryable,
        error,
        readings,
        nonce: req.nonce.clone(),
        health: None,
    }
}

/// The REJECTED reply of a device that refuses the request's job document (unsigned,
/// forged, or signed by a key it does not trust), if it refuses it.
pub(crate) fn refusal(fleet: &Fleet, req: &DeviceRequest) -> Option<DeviceReply> {
    let reason = fleet.refuses(req)?;
    tracing::warn!(device_id = %req.device_id, job_id = %req.job_id, %reason, "job document refused");
    fleet.answered("REJECTED");
    Some(DeviceReply {
        execution_id: req.execution_id,
        status: ReplyStatus::Rejected,
        retryable: false,
        error: Some(reason),
        readings: None,
        nonce: req.nonce.clone(),
        health: None,
    })
}

/// The answer of a device that stopped a job when asked to.
fn stopped(fleet: &Fleet, req: &DeviceRequest) -> DeviceReply {
    fleet.answered("CANCELED");
    DeviceReply {
        execution_id: req.execution_id,
        status: ReplyStatus::Canceled,
        retryable: false,
        error: None,
        readings: None,
        nonce: req.nonce.clone(),
        health: None,
    }
}

/// Jobs under way, by the nonce of their attempt: a cancel request stops the one it names.
pub(crate) type Working = Arc<Mutex<HashMap<String, CancellationToken>>>;

/// A cancel request: the device stops the attempt it names, unless it refuses (then it
/// finishes), or the attempt is no longer under way.
fn cancel(fleet: &Fleet, working: &Working, device: &str, payload: &[u8]) {
    let Ok(c) = serde_json::from_slice::<CancelRequest>(payload) else {
        tracing::warn!(device_id = %device, "unreadable cancel request ignored");
        return;
    };
    if c.device_id != device {
        return;
    }
    let job = c.job_id.to_string();
    let under_way = working
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&c.nonce)
        .cloned();
    let what = match under_way {
        None => "finished",
        Some(_) if fleet.refuses_cancel(device) => "refused",
        Some(token) => {
            token.cancel();
            "stopped"
        }
    };
    fleet.cancel_seen(&job, device, what);
}

/// Serves requests arriving on `messages` until shutdown; `working` (the attempts under way,
/// for cancels) is shared by every connection of the fleet.
pub(crate) async fn serve(
    fleet: Arc<Fleet>,
    link: Link,
    mut messages: mpsc::Receiver<Message>,
    prefix: String,
    working: Working,
    shutdown: CancellationToken,
) {
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = messages.recv() => match m { Some(m) => m, None => return },
        };
        if let Some(device) = protocol::device_of_cancel_topic(&prefix, &m.topic) {
            cancel(&fleet, &working, device, &m.payload);
            continue;
        }
        let Some(device) = protocol::device_of_request_topic(&prefix, &m.topic) else {
            continue;
        };
        let req: DeviceRequest = match serde_json::from_slice(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic = %m.topic, error.message = %e, "unreadable request ignored");
                continue;
            }
        };
        if req.device_id != device {
            tracing::warn!(topic = %m.topic, device_id = %req.device_id, "request for another device ignored");
            continue;
        }
        let Some(reply_to) = m.response_topic.clone().or_else(|| req.reply_to.clone()) else {
            tracing::warn!(topic = %m.topic, "request without a reply topic ignored");
            continue;
        };
        let correlation = m
            .correlation
            .clone()
            .unwrap_or_else(|| Bytes::from(req.execution_id.to_string()));
        if let Some(refused) = refusal(&fleet, &req) {
            if let Ok(body) = serde_json::to_vec(&refused)
                && let Err(e) = link
                    .publish(&reply_to, body, Some((reply_to.clone(), correlation)))
                    .await
            {
                tracing::warn!(error.message = %e, "reply not sent");
            }
            continue;
        }
        if req.health_check {
            if let Some(answer) = fleet.health(&req)
                && let Ok(body) = serde_json::to_vec(&answer)
                && let Err(e) = link
                    .publish(&reply_to, body, Some((reply_to.clone(), correlation)))
                    .await
            {
                tracing::warn!(error.message = %e, "health report not sent");
            }
            continue;
        }
        let Some(decision) = fleet.receive_request(&req) else {
            continue;
        };
        let Answer::Reply { after, outcome } = decision.answer else {
            continue;
        };
        let (fleet, link, working) = (fleet.clone(), link.clone(), working.clone());
        let nonce = req.nonce.clone().unwrap_or_default();
        let stop = CancellationToken::new();
        working
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce.clone(), stop.clone());
        tokio::spawn(async move {
            let asked_to_stop = tokio::select! {
                _ = tokio::time::sleep(after) => false,
                _ = stop.cancelled() => true,
            };
            working
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&nonce);
            let reply = if asked_to_stop {
                stopped(&fleet, &req)
            } else {
                reply(&fleet, &req, outcome, &decision)
            };
            let Ok(body) = serde_json::to_vec(&reply) else {
                return;
            };
            if let Err(e) = link
                .publish(&reply_to, body, Some((reply_to.clone(), correlation)))
                .await
            {
                tracing::warn!(error.message = %e, "reply not sent");
            }
        });
    }
}
