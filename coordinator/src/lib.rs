//! The fleetbatch coordinator: turns jobs into device tasks and device results into job
//! progress, and serves the HTTP API the `fleetbatch` CLI talks to. The service alone: the
//! operator CLI is the `cli` crate, local deployments for demos and tests the `harness`
//! crate, and it never talks to a device.
//!
//! # Layout
//! - [`startup`]: builds an [`startup::Application`] (connections, topology, HTTP listener),
//!   resumes unfinished jobs, and runs until a shutdown trigger fires.
//! - [`access`]: who may call the API: API tokens, roles, group scopes, the route policy.
//! - [`audit`]: the append-only audit log of state-changing calls and job state changes.
//! - [`app`]: what handlers and loops share ([`app::AppState`]): settings, Redis, metrics,
//!   webhooks and the current broker session.
//! - [`api`]: the HTTP API (axum), one module per resource: devices, jobs, events, dead
//!   letters, health.
//! - [`registry`]: the device registry in Redis: records, the one scan behind lists and
//!   counts, parsing imported records.
//! - [`import`]: streaming a CSV or NDJSON import into the registry.
//! - [`intake`]: accepts a job spec, validates it, stores it once, starts its planner.
//! - [`split`]: streams a job's targets from the registry in id order and decides per device:
//!   send a task, or skip it (incompatible, unknown). Never holds the fleet in memory.
//! - [`preview`]: the dry run of a spec: targets decided as the planner would, counted and
//!   broken down, with the publishing time; nothing stored.
//! - [`planner`]: the planner loop (plan, then publish): publishes tasks in confirmed batches, at the job's rate,
//!   checkpointing its cursor so a restarted coordinator resumes where it stopped; cancels
//!   what is not yet published when the job is canceled.
//! - [`waves`]: the planner of a job with waves: splits the targets into waves (a fixed
//!   shuffle), publishes a wave, waits at its gate (success rate, soak, approval).
//! - [`steer`]: pause, resume, approve, abort: the state transitions and the worker broadcast.
//! - [`aggregate`]: consumes results, records each device's first terminal outcome, finishes
//!   jobs.
//! - [`jobs`]: reading jobs for the API (state, counters, per-device status, reports) and
//!   cancelling them.
//! - [`readings`]: data-retrieval readings: the per-metric summary and CSV/NDJSON export.
//! - [`report`]: a job's report: failures grouped by error, and the readings summary.
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`notify`]: signed, retried webhooks for job state changes and device failures.
//! - [`outbound`]: where webhooks may go (an allowlist, else public addresses only).
//! - [`deadletters`]: listing and replaying the dead-letter queue.
//! - [`deadwatch`]: a dead-lettered task's device ends FAILED at once, with the reason.
//! - [`wake`]: parked tasks (windows, offline devices, paused jobs) published when due.
//! - [`reconcile`]: devices whose task was lost end with the reason, so every job finishes.
//! - [`retention`]: finished jobs' data deleted after the retention.
//! - [`memory`]: the Redis memory alarm, which pauses planning before Redis is full.
//! - [`recurring`]: recurring schedules fire one child job per occurrence.
//!
//! # Flow of one job
//! ```text
//! API ─▶ intake ─▶ split ─▶ planner ──tasks──▶ workers ──results──▶ aggregate ─▶ Redis
//! ```

pub mod access;
pub mod aggregate;
pub mod api;
pub mod app;
pub mod audit;
pub mod dashboard;
pub mod deadletters;
pub mod deadwatch;
pub mod import;
pub mod intake;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod planner;
pub mod preview;
pub mod readings;
pub mod reconcile;
pub mod recurring;
pub mod registry;
pub mod report;
pub mod retention;
pub mod split;
pub mod startup;
pub mod steer;
pub mod wake;
pub mod waves;
