//! What one delivery is: the request, the device's reply and why an attempt failed; shared by
//! every transport and the attempt loop.

use std::sync::Arc;

use shared::{
    job::{Action, JobSpec},
    state::Readings,
};
use uuid::Uuid;

/// One delivery of a job to a device.
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    /// The job.
    pub job_id: Uuid,
    /// Stable id of the job on this device; devices ignore repeats of it.
    pub execution_id: Uuid,
    /// The device.
    pub device_id: String,
    /// What to do.
    pub spec: Arc<JobSpec>,
    /// 1-based number of this attempt across the task's whole life.
    pub attempt: u32,
    /// The signed job document, when the deployment signs.
    pub signed: Option<Arc<shared::signing::SignedDocument>>,
    /// A health probe after success, not a delivery (jobs with `health`).
    pub health_check: bool,
}

impl DeliveryRequest {
    /// The fleetbatch device protocol's request document for this attempt.
    pub fn to_device_request(&self, reply_to: Option<String>) -> devices::protocol::DeviceRequest {
        devices::protocol::DeviceRequest {
            execution_id: self.execution_id,
            job_id: self.job_id,
            device_id: self.device_id.clone(),
            attempt: self.attempt,
            action: self.spec.action.clone(),
            reply_to,
            sent_at: shared::now_ms(),
            nonce: None,
            signed: self.signed.as_deref().cloned(),
            health_check: self.health_check,
        }
    }
}

/// What a fleetbatch-protocol reply means for the attempt; `None` for progress
/// (`IN_PROGRESS`), after which the final status is still to come.
pub fn reply_outcome(
    spec: &JobSpec,
    reply: devices::protocol::DeviceReply,
) -> Option<Result<Reply, DeliverError>> {
    use devices::protocol::ReplyStatus;
    let error = reply.error.unwrap_or_else(|| "no reason given".to_owned());
    Some(match reply.status {
        ReplyStatus::InProgress => return None,
        ReplyStatus::Succeeded => Ok(Reply {
            health: reply.health,
            ..Reply::with_readings(spec, reply.readings)
        }),
        ReplyStatus::Failed if reply.retryable => Err(DeliverError::Transient(error)),
        ReplyStatus::Failed => Err(DeliverError::Permanent(error)),
        ReplyStatus::Rejected => Err(DeliverError::Rejected(error)),
        ReplyStatus::Canceled => Err(DeliverError::Withdrawn(
            "the device stopped the job when asked to (the job was canceled)".into(),
        )),
    })
}

/// Why an attempt did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// Worth retrying: the device was unreachable, busy or too slow.
    #[error("transient device error: {0}")]
    Transient(String),
    /// The device tried and failed; retrying will not help.
    #[error("device failed: {0}")]
    Permanent(String),
    /// The device refused the job (e.g. incompatible hardware).
    #[error("device rejected the job: {0}")]
    Rejected(String),
    /// The device's own step timer ran out (AWS IoT Jobs `stepTimeoutInMinutes`).
    #[error("device step timed out: {0}")]
    TimedOut(String),
    /// The device-side execution was withdrawn because the job was canceled (AWS IoT Jobs:
    /// its execution ended CANCELED before the device finished it).
    #[error("execution withdrawn: {0}")]
    Withdrawn(String),
    /// The way to devices is down (MQTT broker unreachable): not the device's fault, and not
    /// counted as an attempt; the task is handed back.
    #[error("device transport unavailable: {0}")]
    Unavailable(String),
    /// The device has not finished, and its execution waits in storage for it (AWS IoT Jobs:
    /// QUEUED until the device asks for it, IN_PROGRESS until it reports its end or its step
    /// timer runs out). Not an attempt: the task is parked without a worker slot and woken
    /// when the device changes the execution, or at `until_ms`.
    #[error("waiting for the device: {}", wait.why)]
    Waiting {
        /// What the task waits for.
        wait: DeviceWait,
    },
}

/// What a task whose device works at its own pace waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceWait {
    /// When to look again even if the device says nothing (its step timer ends); `None`:
    /// only the job's deadline.
    pub until_ms: Option<u64>,
    /// The device started the execution (IN_PROGRESS), rather than not asked for it yet.
    pub started: bool,
    /// The execution's version when the worker last read it: a change after the park wakes
    /// the task at once.
    pub version: u64,
    /// Why, for the device's status.
    pub why: String,
}

/// What a device answered with its success.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Readings (data-retrieval jobs): only the metrics the job asked for.
    pub readings: Option<Readings>,
    /// The answer to a health probe.
    pub health: Option<devices::protocol::HealthReport>,
}

impl Reply {
    /// A reply keeping those of `readings` that `spec` asked for, with finite values.
    pub fn with_readings(spec: &JobSpec, readings: Option<Readings>) -> Self {
        let Action::DataRetrieval(d) = &spec.action else {
            return Self::default();
        };
        let kept: Readings = readings
            .into_iter()
            .flatten()
            .filter(|(k, v)| v.is_finite() && d.metrics.contains(k))
            .collect();
        Self {
            readings: (!kept.is_empty()).then_some(kept),
            health: None,
        }
    }
}
