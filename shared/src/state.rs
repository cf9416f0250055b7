//! The states a job and each of its device executions move through, and what is known about
//! one execution (a [`DeviceStatus`]).
//!
//! Owns the state names as stored in Redis and served by the API, so every reader compares
//! enums, never strings. It never talks to Redis or RabbitMQ.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Readings a device reported for a data-retrieval job: metric name -> value.
pub type Readings = BTreeMap<String, f64>;

/// The execution id of a job on a device: UUID v5 of the device id in the job's namespace.
/// Every delivery of the job to the device carries it, so the device can ignore repeats, and
/// re-planning the job yields the same id.
pub fn execution_id(job_id: Uuid, device_id: &str) -> Uuid {
    Uuid::new_v5(&job_id, device_id.as_bytes())
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Tasks are being published or executed.
    InProgress,
    /// Canceled by a user; queued executions are being canceled.
    Canceling,
    /// Every device reached a terminal state.
    Completed,
    /// Canceled, and every device reached a terminal state.
    Canceled,
    /// Held by an operator or a failed wave gate: nothing new is published and parked
    /// retries wait; `resume` continues from the checkpoint.
    Paused,
    /// An abort criterion tripped (or a gate said abort): queued devices are being canceled.
    Aborting,
    /// Aborted, and every device reached a terminal state.
    Aborted,
    /// Waiting for its `schedule.start_at`: nothing is published yet.
    Scheduled,
}

impl JobState {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InProgress => "IN_PROGRESS",
            JobState::Canceling => "CANCELING",
            JobState::Completed => "COMPLETED",
            JobState::Canceled => "CANCELED",
            JobState::Paused => "PAUSED",
            JobState::Aborting => "ABORTING",
            JobState::Aborted => "ABORTED",
            JobState::Scheduled => "SCHEDULED",
        }
    }
    /// Parses the storage name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "IN_PROGRESS" => JobState::InProgress,
            "CANCELING" => JobState::Canceling,
            "COMPLETED" => JobState::Completed,
            "CANCELED" => JobState::Canceled,
            "PAUSED" => JobState::Paused,
            "ABORTING" => JobState::Aborting,
            "ABORTED" => JobState::Aborted,
            "SCHEDULED" => JobState::Scheduled,
            _ => return None,
        })
    }
    /// Whether new deliveries may start.
    pub fn is_live(self) -> bool {
        self == JobState::InProgress
    }
    /// Whether the job is over.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Canceled | JobState::Aborted
        )
    }
    /// Whether the job is winding down: nothing new starts, queued devices end CANCELED.
    pub fn is_stopping(self) -> bool {
        matches!(self, JobState::Canceling | JobState::Aborting)
    }
    /// Every state, for metrics.
    pub const ALL: [JobState; 8] = [
        JobState::Scheduled,
        JobState::InProgress,
        JobState::Paused,
        JobState::Canceling,
        JobState::Aborting,
        JobState::Completed,
        JobState::Canceled,
        JobState::Aborted,
    ];
}

/// State of one device's execution of one job.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionState {
    /// Published, waiting for a worker.
    Queued,
    /// A worker holds it: delivering, or waiting in-process before its next attempt.
    InProgress,
    /// Parked on a delayed-retry queue after transient failures.
    RetryScheduled,
    /// Outside its maintenance window: waits, without an attempt, until the window opens.
    WaitingForWindow,
    /// Its device announced itself offline: waits, without an attempt, until it comes online
    /// (or the job's deadline passes).
    WaitingForDevice,
    /// The device did it.
    Succeeded,
    /// The device failed permanently, or every attempt failed.
    Failed,
    /// The device refused it (e.g. incompatible hardware).
    Rejected,
    /// The job's deadline passed first.
    TimedOut,
    /// The job was canceled first.
    Canceled,
    /// The device cannot take the job (compatibility constraint); never sent.
    Skipped,
    /// Installed; waiting for the device's health report (jobs with `health`).
    Verifying,
    /// Installed, but the device reported itself unhealthy, or sent no health report within
    /// the job's health window.
    Unhealthy,
    /// Installed, but the device rolled itself back (an A/B fallback).
    RolledBack,
}

impl ExecutionState {
    /// Every terminal state, in report order.
    pub const TERMINAL: [ExecutionState; 8] = [
        ExecutionState::Succeeded,
        ExecutionState::Failed,
        ExecutionState::Rejected,
        ExecutionState::TimedOut,
        ExecutionState::Unhealthy,
        ExecutionState::RolledBack,
        ExecutionState::Canceled,
        ExecutionState::Skipped,
    ];

    /// Storage and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionState::Queued => "QUEUED",
            ExecutionState::InProgress => "IN_PROGRESS",
            ExecutionState::RetryScheduled => "RETRY_SCHEDULED",
            ExecutionState::WaitingForWindow => "WAITING_FOR_WINDOW",
            ExecutionState::WaitingForDevice => "WAITING_FOR_DEVICE",
            ExecutionState::Succeeded => "SUCCEEDED",
            ExecutionState::Failed => "FAILED",
            ExecutionState::Rejected => "REJECTED",
            ExecutionState::TimedOut => "TIMED_OUT",
            ExecutionState::Canceled => "CANCELED",
            ExecutionState::Skipped => "SKIPPED",
            ExecutionState::Verifying => "VERIFYING",
            ExecutionState::Unhealthy => "UNHEALTHY",
            ExecutionState::RolledBack => "ROLLED_BACK",
        }
    }

    /// Every state.
    pub const ALL: [ExecutionState; 14] = [
        ExecutionState::Queued,
        ExecutionState::InProgress,
        ExecutionState::RetryScheduled,
        ExecutionState::WaitingForWindow,
        ExecutionState::WaitingForDevice,
        ExecutionState::Succeeded,
        ExecutionState::Failed,
        ExecutionState::Rejected,
        ExecutionState::TimedOut,
        ExecutionState::Canceled,
        ExecutionState::Skipped,
        ExecutionState::Verifying,
        ExecutionState::Unhealthy,
        ExecutionState::RolledBack,
    ];

    /// Parses the storage name, case-insensitively (`failed`, `timed_out`, `TIMED_OUT`).
    pub fn parse(s: &str) -> Option<Self> {
        let up = s.to_ascii_uppercase().replace('-', "_");
        Self::ALL.into_iter().find(|st| st.as_str() == up)
    }

    /// Whether no further change can happen.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            ExecutionState::Queued
                | ExecutionState::InProgress
                | ExecutionState::RetryScheduled
                | ExecutionState::WaitingForWindow
                | ExecutionState::WaitingForDevice
                | ExecutionState::Verifying
        )
    }

    /// The counter field of this state in the job's counters (`succeeded`, `timed_out`...).
    pub fn counter(self) -> &'static str {
        match self {
            ExecutionState::Queued => "queued",
            ExecutionState::InProgress => "in_progress",
            ExecutionState::RetryScheduled => "retry_scheduled",
            ExecutionState::WaitingForWindow => "waiting_for_window",
            ExecutionState::WaitingForDevice => "waiting_for_device",
            ExecutionState::Succeeded => "succeeded",
            ExecutionState::Failed => "failed",
            ExecutionState::Rejected => "rejected",
            ExecutionState::TimedOut => "timed_out",
            ExecutionState::Canceled => "canceled",
            ExecutionState::Skipped => "skipped",
            ExecutionState::Verifying => "verifying",
            ExecutionState::Unhealthy => "unhealthy",
            ExecutionState::RolledBack => "rolled_back",
        }
    }
}

/// What is known about one device's execution, as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceStatus {
    /// Current state.
    pub state: ExecutionState,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// The last error, for failed, rejected and retried executions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the state was last set (ms since epoch).
    pub updated_at_ms: u64,
    /// When a parked execution is due again (ms since epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_ms: Option<u64>,
    /// The worker that produced the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When the task was first published (ms since epoch); with `updated_at_ms` of a
    /// terminal status, the device's end-to-end latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at_ms: Option<u64>,
    /// Readings the device reported (data-retrieval jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readings: Option<Readings>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_ids_are_stable_per_job_and_device() {
        let job = Uuid::now_v7();
        assert_eq!(execution_id(job, "d1"), execution_id(job, "d1"));
        assert_ne!(execution_id(job, "d1"), execution_id(job, "d2"));
        assert_ne!(execution_id(job, "d1"), execution_id(Uuid::now_v7(), "d1"));
    }

    #[test]
    fn execution_states_parse_loosely_and_print_strictly() {
        assert_eq!(
            ExecutionState::parse("timed-out"),
            Some(ExecutionState::TimedOut)
        );
        assert_eq!(
            ExecutionState::parse("failed"),
            Some(ExecutionState::Failed)
        );
        assert_eq!(ExecutionState::parse("nope"), None);
        assert!(ExecutionState::TERMINAL.iter().all(|s| s.is_terminal()));
    }
}
