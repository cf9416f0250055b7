//! Types and plumbing shared by both sides of the broker: the coordinator and the workers.
//!
//! This crate holds no business logic. It owns what both processes must agree on
//! byte for byte: the wire format, the names of exchanges, queues and Redis keys, and how
//! settings, telemetry and shutdown are set up.
//!
//! # Layout
//! - [`config`]: the one [`config::Settings`] struct, loaded in layers (defaults, file, env).
//! - [`job`]: the job spec (targets, action, compatibility, retries, rollout) and its
//!   validation.
//! - [`rollout`]: rate, ramp, waves and gates, abort criteria: the spec and its arithmetic.
//! - [`state`]: the states of a job and of each device execution, and a device's status.
//! - [`device`]: the device record and the one attribute filter.
//! - [`messages`]: the MessagePack wire types (`DeviceTask`, `TaskResult`, `ControlMessage`).
//! - [`topology`]: exchange, queue, header and Redis key names, and `declare()`.
//! - [`device_keys`]: the device side's Redis keys (simulator memory, AWS IoT Jobs
//!   executions), named here so that a job's data can be deleted by name.
//! - [`amqp`]: connecting, confirmed publishing and the trace-context header carrier.
//! - [`store`]: Redis connection and the job records both sides read.
//! - [`telemetry`]: tracing subscriber and OTLP export, set up in one place.
//! - [`shutdown`]: the SIGTERM/SIGINT trigger.
//! - [`supervise`]: the reconnect loop that keeps a service up through outages.
//! - [`backoff`]: the pure exponential backoff policy used for device retries.
//! - [`coalesce`]: group commit, concurrent callers' single requests merged into one call.
//!
//! Talking to devices (protocols, MQTT, simulated behaviour) is the `devices` crate's, so the
//! coordinator, which never talks to a device, compiles no device client.
//!
//! # Flow of one job
//! ```text
//! coordinator: intake -> split -> planner ──tasks──▶ worker: consume -> handle -> deliver -> report
//!                                   aggregate ◀──results──────────────────────────────────┘
//! ```
#![warn(missing_docs)]

pub mod amqp;
pub mod backoff;
pub mod coalesce;
pub mod config;
pub mod device;
pub mod device_keys;
pub mod job;
pub mod messages;
pub mod parking;
pub mod query;
pub mod redis_conn;
pub mod rollout;
pub mod shutdown;
pub mod signing;
pub mod state;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod template;
pub mod topology;
pub mod window;

/// Milliseconds since the Unix epoch, the timestamp unit used on the wire and in Redis.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
