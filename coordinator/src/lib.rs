//! The fleetbatch coordinator: turns jobs into device tasks and device results into job
//! progress, and serves the HTTP API the `fleetbatch` CLI talks to.
//!
//! # Layout
//! - [`startup`]: builds an [`startup::Application`] (connections, topology, HTTP listener),
//!   resumes unfinished jobs, and runs until a shutdown trigger fires.
//! - [`api`]: the HTTP API (axum): devices, jobs, health.
//! - [`registry`]: the device registry in Redis: import, list, count.
//! - [`intake`]: accepts a job spec, validates it, stores it once, starts its planner.
//! - [`split`]: streams a job's targets from the registry in id order and decides per device:
//!   send a task, or skip it (incompatible, unknown). Never holds the fleet in memory.
//! - [`dispatch`]: the planner loop: publishes tasks in confirmed batches, at the job's rate,
//!   checkpointing its cursor so a restarted coordinator resumes where it stopped; cancels
//!   what is not yet published when the job is canceled.
//! - [`aggregate`]: consumes results, records each device's first terminal outcome, finishes
//!   jobs.
//! - [`jobs`]: reading jobs for the API (state, counters, per-device status, reports) and
//!   cancelling them.
//! - [`readings`]: data-retrieval readings: the per-metric summary and CSV/NDJSON export.
//! - [`audit`]: checks a job against the guarantees (chaos runs, tests).
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`notify`]: signed, retried webhooks for job state changes and device failures.
//! - [`deadletters`]: listing and replaying the dead-letter queue.
//! - [`local`] and [`fleet`]: a local deployment of child processes and a generated fleet,
//!   for the demo, the benchmark and the end-to-end tests.
//!
//! # Flow of one job
//! ```text
//! API ─▶ intake ─▶ split ─▶ dispatch ──tasks──▶ workers ──results──▶ aggregate ─▶ Redis
//! ```

pub mod aggregate;
pub mod api;
pub mod audit;
pub mod deadletters;
pub mod dispatch;
pub mod fleet;
pub mod intake;
pub mod jobs;
pub mod local;
pub mod metrics;
pub mod notify;
pub mod readings;
pub mod registry;
pub mod split;
pub mod startup;
