//! The fleetbatch device protocol, device side: requests on `{prefix}/devices/+/jobs`,
//! answers on the request's reply topic (over MQTT), or as the response body (over HTTP).
//!
//! Owns turning a simulated device's decision into a [`DeviceReply`]. It never keeps device
//! state itself ([`crate::fleet`] does).

use std::sync::Arc;

use bytes::Bytes;
use devices::{
    mqtt::{Link, Message},
    protocol::{self, DeviceReply, DeviceRequest, ReplyStatus},
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

/// Serves requests arriving on `messages` until shutdown.
pub(crate) async fn serve(
    fleet: Arc<Fleet>,
    link: Link,
    mut messages: mpsc::Receiver<Message>,
    prefix: String,
    shutdown: CancellationToken,
) {
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = messages.recv() => match m { Some(m) => m, None => return },
        };
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
        let (fleet, link) = (fleet.clone(), link.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let reply = reply(&fleet, &req, outcome, &decision);
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
