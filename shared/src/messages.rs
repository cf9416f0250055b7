//! Wire types, encoded as MessagePack maps (rmp-serde, named fields).
//!
//! Owns the bytes that cross the broker. Readers are tolerant: unknown fields are ignored and
//! every field added after version 1 must be optional, so old and new processes can share a
//! queue during a rolling upgrade. Field names are one or two letters because a task message
//! must stay under 300 bytes whatever the job: the job document is stored once in Redis and
//! referenced by `job_id`, never copied into tasks.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::{ExecutionState, Readings};

/// Version written into every message.
pub const WIRE_VERSION: u16 = 1;

/// AMQP `content_type` of every fleetbatch message.
pub const CONTENT_TYPE: &str = "application/msgpack";
/// AMQP `type` of a [`DeviceTask`].
pub const TASK_TYPE: &str = "fleetbatch.device_task.v1";
/// AMQP `type` of a [`TaskBatch`].
pub const TASK_BATCH_TYPE: &str = "fleetbatch.device_tasks.v1";
/// AMQP `type` of a [`TaskResult`].
pub const RESULT_TYPE: &str = "fleetbatch.task_result.v1";
/// AMQP `type` of a [`ResultBatch`].
pub const RESULT_BATCH_TYPE: &str = "fleetbatch.task_results.v1";
/// AMQP `type` of a [`ControlMessage`].
pub const CONTROL_TYPE: &str = "fleetbatch.control.v1";

/// One device's share of a job: "run job `job_id` on device `device_id`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTask {
    /// Wire version.
    #[serde(rename = "v")]
    pub version: u16,
    /// The job; its document is read from Redis.
    #[serde(rename = "j")]
    pub job_id: Uuid,
    /// Stable id of this job on this device (see [`crate::state::execution_id`]).
    #[serde(rename = "x")]
    pub execution_id: Uuid,
    /// Target device.
    #[serde(rename = "d")]
    pub device_id: String,
    /// Delivery attempts already made (0 on first publication).
    #[serde(rename = "a", default)]
    pub attempts: u32,
    /// How many times the task was parked on a delayed-retry queue.
    #[serde(rename = "p", default)]
    pub parked: u32,
    /// When the planner first published the task (ms since epoch), for end-to-end latency.
    #[serde(rename = "t", default)]
    pub published_at_ms: u64,
}

/// The outcome of one device task, sent by a worker to the results exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Wire version.
    #[serde(rename = "v")]
    pub version: u16,
    /// The job.
    #[serde(rename = "j")]
    pub job_id: Uuid,
    /// The execution.
    #[serde(rename = "x")]
    pub execution_id: Uuid,
    /// The device.
    #[serde(rename = "d")]
    pub device_id: String,
    /// Terminal state reached.
    #[serde(rename = "s")]
    pub state: ExecutionState,
    /// Delivery attempts made in total.
    #[serde(rename = "a", default)]
    pub attempts: u32,
    /// Last error, for failures and rejections.
    #[serde(rename = "e", default)]
    pub error: Option<String>,
    /// The worker that produced this result.
    #[serde(rename = "w", default)]
    pub worker: String,
    /// When the task was first published (copied from the task).
    #[serde(rename = "t", default)]
    pub published_at_ms: u64,
    /// When the outcome was reached.
    #[serde(rename = "f", default)]
    pub finished_at_ms: u64,
    /// Readings the device reported (data-retrieval jobs).
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub readings: Option<Readings>,
}

/// Several device tasks in one message: the planner sends a job's devices in messages of
/// `coordinator.tasks_per_message`, so the broker stores, delivers and confirms one message
/// for dozens of devices. Each task keeps its own execution id, attempts, retries, parking,
/// dead-lettering and result: a worker handles them one by one and settles the message when
/// every one of them is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskBatch {
    /// Wire version.
    #[serde(rename = "v")]
    pub version: u16,
    /// The tasks.
    #[serde(rename = "ts")]
    pub tasks: Vec<DeviceTask>,
}

/// Several results in one message: a worker batches the results its handlers finish within
/// a few milliseconds, so the broker stores and confirms one message instead of dozens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultBatch {
    /// Wire version.
    #[serde(rename = "v")]
    pub version: u16,
    /// The results.
    #[serde(rename = "r")]
    pub results: Vec<TaskResult>,
}

/// Broadcast from the coordinator to every worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum ControlMessage {
    /// A job was canceled: drop cached state and stop starting its deliveries.
    JobCanceled {
        /// The job.
        #[serde(rename = "j")]
        job_id: Uuid,
    },
    /// A job was paused, resumed or aborted: read its state again before the next delivery.
    JobChanged {
        /// The job.
        #[serde(rename = "j")]
        job_id: Uuid,
    },
}

/// A message that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not MessagePack, or not this type.
    #[error("undecodable message")]
    Decode(#[from] rmp_serde::decode::Error),
    /// Serialization failed (does not happen for these types, but is not unwrapped).
    #[error("unencodable message")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A version this process does not understand.
    #[error("unsupported wire version {0}")]
    Version(u16),
    /// A batch with nothing in it.
    #[error("a tasks message holds no task")]
    Empty,
}

/// Encodes a message as a MessagePack map.
///
/// # Errors
/// Only if serde fails, which the types here never make it do.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    Ok(rmp_serde::to_vec_named(message)?)
}

/// Decodes a task, checking its version.
///
/// # Errors
/// Malformed bytes or an unsupported version.
pub fn decode_task(bytes: &[u8]) -> Result<DeviceTask, WireError> {
    let task: DeviceTask = rmp_serde::from_slice(bytes)?;
    if task.version == 0 || task.version > WIRE_VERSION {
        return Err(WireError::Version(task.version));
    }
    Ok(task)
}

/// Decodes a tasks message: a [`TaskBatch`] or a single [`DeviceTask`].
///
/// # Errors
/// Malformed bytes, an unsupported version or an empty batch.
pub fn decode_tasks(bytes: &[u8]) -> Result<Vec<DeviceTask>, WireError> {
    if let Ok(batch) = rmp_serde::from_slice::<TaskBatch>(bytes) {
        if batch.version == 0 || batch.version > WIRE_VERSION {
            return Err(WireError::Version(batch.version));
        }
        if batch.tasks.is_empty() {
            return Err(WireError::Empty);
        }
        for t in &batch.tasks {
            if t.version == 0 || t.version > WIRE_VERSION {
                return Err(WireError::Version(t.version));
            }
        }
        return Ok(batch.tasks);
    }
    decode_task(bytes).map(|t| vec![t])
}

/// Decodes a result, checking its version.
///
/// # Errors
/// Malformed bytes or an unsupported version.
pub fn decode_result(bytes: &[u8]) -> Result<TaskResult, WireError> {
    let result: TaskResult = rmp_serde::from_slice(bytes)?;
    if result.version == 0 || result.version > WIRE_VERSION {
        return Err(WireError::Version(result.version));
    }
    Ok(result)
}

/// Decodes a results message: a [`ResultBatch`] or a single [`TaskResult`].
///
/// # Errors
/// Malformed bytes or an unsupported version.
pub fn decode_results(bytes: &[u8]) -> Result<Vec<TaskResult>, WireError> {
    if let Ok(batch) = rmp_serde::from_slice::<ResultBatch>(bytes) {
        if batch.version == 0 || batch.version > WIRE_VERSION {
            return Err(WireError::Version(batch.version));
        }
        for r in &batch.results {
            if r.version == 0 || r.version > WIRE_VERSION {
                return Err(WireError::Version(r.version));
            }
        }
        return Ok(batch.results);
    }
    decode_result(bytes).map(|r| vec![r])
}

/// Decodes a control message.
///
/// # Errors
/// Malformed bytes.
pub fn decode_control(bytes: &[u8]) -> Result<ControlMessage, WireError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(device: &str) -> DeviceTask {
        let job_id = Uuid::now_v7();
        DeviceTask {
            version: WIRE_VERSION,
            job_id,
            execution_id: crate::state::execution_id(job_id, device),
            device_id: device.into(),
            attempts: 3,
            parked: 2,
            published_at_ms: crate::now_ms(),
        }
    }

    #[test]
    fn a_task_round_trips() {
        let t = task("dev-1");
        let bytes = encode(&t).expect("encode");
        assert_eq!(decode_task(&bytes).expect("decode"), t);
    }

    #[test]
    fn a_task_for_the_longest_device_id_stays_under_300_bytes() {
        let t = task(&"d".repeat(128));
        let bytes = encode(&t).expect("encode");
        assert!(bytes.len() < 300, "{} bytes", bytes.len());
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_optional_ones_default() {
        #[derive(Serialize)]
        struct Future<'a> {
            v: u16,
            j: Uuid,
            x: Uuid,
            d: &'a str,
            zz_new_field: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            v: 1,
            j: Uuid::nil(),
            x: Uuid::nil(),
            d: "d1",
            zz_new_field: "hello",
        })
        .expect("encode");
        let t = decode_task(&bytes).expect("tolerant");
        assert_eq!(t.attempts, 0);
        assert_eq!(t.device_id, "d1");
    }

    #[test]
    fn garbage_and_future_versions_are_errors() {
        assert!(decode_task(b"\xc1not msgpack").is_err());
        let mut t = task("d");
        t.version = 99;
        let bytes = encode(&t).expect("encode");
        assert!(matches!(decode_task(&bytes), Err(WireError::Version(99))));
    }

    #[test]
    fn tasks_decode_from_batches_and_from_single_messages() {
        let (a, b) = (task("dev-a"), task("dev-b"));
        let batch = TaskBatch {
            version: WIRE_VERSION,
            tasks: vec![a.clone(), b.clone()],
        };
        assert_eq!(
            decode_tasks(&encode(&batch).expect("e")).expect("d"),
            vec![a.clone(), b]
        );
        assert_eq!(decode_tasks(&encode(&a).expect("e")).expect("d"), vec![a]);
        let empty = TaskBatch {
            version: WIRE_VERSION,
            tasks: vec![],
        };
        assert!(matches!(
            decode_tasks(&encode(&empty).expect("e")),
            Err(WireError::Empty)
        ));
        let mut future = task("dev-c");
        future.version = 99;
        let bad = TaskBatch {
            version: WIRE_VERSION,
            tasks: vec![future],
        };
        assert!(matches!(
            decode_tasks(&encode(&bad).expect("e")),
            Err(WireError::Version(99))
        ));
        assert!(decode_tasks(b"\xc1").is_err());
    }

    #[test]
    fn a_batch_of_64_tasks_costs_under_90_bytes_a_task() {
        let batch = TaskBatch {
            version: WIRE_VERSION,
            tasks: (0..64).map(|i| task(&format!("device-{i:06}"))).collect(),
        };
        let bytes = encode(&batch).expect("encode");
        assert!(bytes.len() < 64 * 90, "{} bytes", bytes.len());
    }

    #[test]
    fn a_result_round_trips() {
        let r = TaskResult {
            version: WIRE_VERSION,
            job_id: Uuid::now_v7(),
            execution_id: Uuid::now_v7(),
            device_id: "d".into(),
            state: ExecutionState::Failed,
            attempts: 2,
            error: Some("boom".into()),
            worker: "w1".into(),
            published_at_ms: 1,
            finished_at_ms: 2,
            readings: None,
        };
        let bytes = encode(&r).expect("encode");
        assert_eq!(decode_result(&bytes).expect("decode"), r);
    }

    #[test]
    fn results_decode_from_batches_and_from_single_messages() {
        let r = TaskResult {
            version: WIRE_VERSION,
            job_id: Uuid::now_v7(),
            execution_id: Uuid::now_v7(),
            device_id: "d".into(),
            state: ExecutionState::Succeeded,
            attempts: 1,
            error: None,
            worker: "w".into(),
            published_at_ms: 1,
            finished_at_ms: 2,
            readings: None,
        };
        let batch = ResultBatch {
            version: WIRE_VERSION,
            results: vec![r.clone(), r.clone()],
        };
        assert_eq!(
            decode_results(&encode(&batch).expect("e"))
                .expect("d")
                .len(),
            2
        );
        assert_eq!(decode_results(&encode(&r).expect("e")).expect("d"), vec![r]);
        assert!(decode_results(b"\xc1").is_err());
    }

    #[test]
    fn a_control_message_round_trips() {
        let m = ControlMessage::JobCanceled {
            job_id: Uuid::now_v7(),
        };
        assert_eq!(decode_control(&encode(&m).expect("e")).expect("d"), m);
    }
}
