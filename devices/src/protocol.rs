//! The fleetbatch device protocol: the JSON a device receives and answers, over MQTT or HTTP.
//!
//! Owns the documents described in `docs/device-protocol.md` and the topic names of the MQTT
//! binding. Field names are camelCase JSON so firmware can parse them with any JSON library.
//! It never decides what a reply means for a task (that is the worker's attempt loop).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use shared::{job::Action, state::Readings};

/// A delivery: "run this execution".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRequest {
    /// Stable id of this job on this device: the same in every attempt. A device that has
    /// applied it answers SUCCEEDED again without re-applying.
    pub execution_id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The device addressed.
    pub device_id: String,
    /// 1-based attempt number (informational).
    pub attempt: u32,
    /// What to do: the job's action, tagged by `type`.
    pub action: Action,
    /// MQTT: where to publish the reply (also the MQTT 5 response topic). Absent over HTTP,
    /// where the reply is the response body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// When the worker sent it (ms since the epoch).
    pub sent_at: u64,
    /// MQTT: a random value new with every attempt; the reply must carry it back, so only
    /// the device that received the request can answer it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The job document as signed by the coordinator (its exact bytes, the Ed25519
    /// signature and the key id), when the deployment signs documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<shared::signing::SignedDocument>,
    /// A health probe, not a delivery: the device has already reported SUCCEEDED for this
    /// execution and now answers with its `health` (without applying anything).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
}

/// How a device is after applying an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    /// Still checking itself (rebooting, self-test under way): ask again later.
    Pending,
    /// Runs the new version and passes its checks.
    Healthy,
    /// Fails its checks (`reason` says which).
    Unhealthy,
    /// Fell back to the previous version (A/B partition, watchdog).
    RolledBack,
}

/// A device's health report, in the reply to a health probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// Its health.
    pub status: HealthStatus,
    /// The version it runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// With UNHEALTHY or ROLLED_BACK: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A device's status report for an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplyStatus {
    /// Working on it (progress; the final status follows).
    InProgress,
    /// Done.
    Succeeded,
    /// It failed; see `retryable`.
    Failed,
    /// The device refuses the job (e.g. incompatible).
    Rejected,
    /// The device stopped the job when asked to ([`CancelRequest`]) and left itself as it
    /// was before it.
    Canceled,
}

impl ReplyStatus {
    /// Whether the execution ends with this status.
    pub fn is_final(self) -> bool {
        !matches!(self, ReplyStatus::InProgress)
    }
}

/// A device's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReply {
    /// The execution answered (copied from the request).
    pub execution_id: Uuid,
    /// Its status.
    pub status: ReplyStatus,
    /// With FAILED: whether trying again may help (a busy or low-battery device, say).
    #[serde(default)]
    pub retryable: bool,
    /// With FAILED or REJECTED: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With SUCCEEDED of a data-retrieval job: metric name to value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readings: Option<Readings>,
    /// The request's `nonce`, copied (MQTT: a reply without the right one is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The answer to a health probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
}

/// Whether a reply document answers the attempt whose request carried `nonce`: the same
/// execution id and the same nonce. Checked on the raw document, so a forged reply is refused
/// before its content is interpreted.
pub fn answers(reply: &serde_json::Value, execution_id: Uuid, nonce: &str) -> bool {
    reply.get("executionId").and_then(|v| v.as_str()) == Some(execution_id.to_string().as_str())
        && reply.get("nonce").and_then(|v| v.as_str()) == Some(nonce)
}

/// Topic a worker publishes requests for `device` on.
pub fn request_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/devices/{device}/jobs")
}

/// Filter matching every device's request topic (a gateway, or `fleet-sim`, subscribes to it).
pub fn request_filter(prefix: &str) -> String {
    format!("{prefix}/devices/+/jobs")
}

/// The device id in a request topic, if `topic` is one.
pub fn device_of_request_topic<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix("/devices/")?
        .strip_suffix("/jobs")
}

/// Topic on which a device is asked to stop a job it is running, because the job was
/// canceled or aborted ([`CancelRequest`]).
pub fn cancel_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/devices/{device}/cancel")
}

/// Filter matching every device's cancel topic.
pub fn cancel_filter(prefix: &str) -> String {
    format!("{prefix}/devices/+/cancel")
}

/// The device id in a cancel topic, if `topic` is one.
pub fn device_of_cancel_topic<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix("/devices/")?
        .strip_suffix("/cancel")
}

/// A request to stop a job the device is running. The device may stop (it answers the
/// attempt with `CANCELED`, on the attempt's reply topic and with its nonce) or refuse and
/// carry on (its final status is recorded as usual). A device that does not know cancel
/// requests just carries on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The execution to stop.
    pub execution_id: Uuid,
    /// Its job.
    pub job_id: Uuid,
    /// The device.
    pub device_id: String,
    /// The nonce of the attempt under way; the `CANCELED` answer carries it back.
    pub nonce: String,
    /// Why (e.g. "the job was canceled").
    pub reason: String,
}

/// Topic a device announces its presence on: retained, `{"online":true}` once connected and
/// `{"online":false}` as its last will (the broker publishes it when the device drops).
pub fn presence_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/devices/{device}/presence")
}

/// Filter matching every device's presence topic (workers subscribe to it).
pub fn presence_filter(prefix: &str) -> String {
    format!("{prefix}/devices/+/presence")
}

/// The device id in a presence topic, if `topic` is one.
pub fn device_of_presence_topic<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix("/devices/")?
        .strip_suffix("/presence")
}

/// A device's presence announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Whether the device is connected.
    pub online: bool,
}

/// Topic a worker receives replies on.
pub fn reply_topic(prefix: &str, worker: &str) -> String {
    format!("{prefix}/workers/{worker}/replies")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_use_the_documented_json_names() {
        let req = DeviceRequest {
            execution_id: Uuid::nil(),
            job_id: Uuid::nil(),
            device_id: "dev-1".into(),
            attempt: 2,
            action: serde_json::from_value(serde_json::json!({"type": "reboot"})).expect("action"),
            reply_to: Some("fleetbatch/workers/w1/replies".into()),
            sent_at: 5,
            nonce: Some("n1".into()),
            signed: None,
            health_check: false,
        };
        let v = serde_json::to_value(&req).expect("json");
        assert!(
            v.get("healthCheck").is_none(),
            "a delivery carries no probe flag"
        );
        let probe = serde_json::to_value(DeviceRequest {
            health_check: true,
            ..req.clone()
        })
        .expect("json");
        assert_eq!(probe["healthCheck"], true);
        let reply: DeviceReply = serde_json::from_value(serde_json::json!({
            "executionId": Uuid::nil(), "status": "SUCCEEDED",
            "health": {"status": "ROLLED_BACK", "version": "1.0", "reason": "watchdog"}
        }))
        .expect("a health report");
        assert_eq!(
            reply.health.map(|h| h.status),
            Some(HealthStatus::RolledBack)
        );
        assert_eq!(v["executionId"], Uuid::nil().to_string());
        assert_eq!(v["replyTo"], "fleetbatch/workers/w1/replies");
        assert_eq!(v["action"]["type"], "reboot");
        let reply: DeviceReply = serde_json::from_str(
            r#"{"executionId":"00000000-0000-0000-0000-000000000000","status":"FAILED","retryable":true,"error":"battery low"}"#,
        )
        .expect("reply");
        assert_eq!(reply.status, ReplyStatus::Failed);
        assert!(reply.retryable);
    }

    #[test]
    fn a_reply_answers_an_attempt_only_with_its_execution_id_and_nonce() {
        let x = Uuid::new_v4();
        let good = serde_json::json!({"executionId": x.to_string(), "status": "SUCCEEDED", "nonce": "abc"});
        assert!(answers(&good, x, "abc"));
        assert!(!answers(&good, x, "abd"), "another attempt's nonce");
        assert!(!answers(&good, Uuid::new_v4(), "abc"), "another execution");
        let bare = serde_json::json!({"executionId": x.to_string(), "status": "SUCCEEDED"});
        assert!(!answers(&bare, x, "abc"), "no nonce");
    }

    #[test]
    fn request_topics_name_their_device() {
        let t = request_topic("fleetbatch", "dev-7");
        assert_eq!(device_of_request_topic("fleetbatch", &t), Some("dev-7"));
        let p = presence_topic("fleetbatch", "dev-7");
        assert_eq!(device_of_presence_topic("fleetbatch", &p), Some("dev-7"));
        assert_eq!(device_of_presence_topic("fleetbatch", &t), None);
        assert_eq!(
            serde_json::to_string(&Presence { online: false }).expect("json"),
            r#"{"online":false}"#
        );
        assert_eq!(
            device_of_request_topic("fleetbatch", "fleetbatch/workers/w/replies"),
            None
        );
    }
}
