//! The fleetbatch worker: takes device tasks off RabbitMQ and delivers them to devices,
//! exactly once in effect.
//!
//! # Layout
//! - [`startup`]: builds a [`startup::Worker`] from settings (connections, topology,
//!   transport) and runs it until a shutdown trigger fires.
//! - [`consume`]: owns the tasks channel and the consumer; spawns one handler per delivery and
//!   settles it (ack, forward, dead-letter). Only this module touches the acker.
//! - [`handle`]: one task, start to finish (the I/O); returns an [`handle::Outcome`].
//! - [`decide`]: the handler's decisions as pure functions: deliver or not, and what an
//!   attempt loop's result means (record, park, hand back).
//! - [`idempotency`]: the claim / done record per execution in Redis.
//! - [`jobs`]: a short-lived cache of job documents and states, invalidated by control
//!   messages when a job is canceled, paused, resumed or aborted.
//! - [`limits`]: per-tag concurrency slots (`rollout.max_in_flight`) shared by every worker.
//! - [`deliver`]: the device transports (simulator, MQTT, AWS IoT Jobs, HTTP) and the retry loop
//!   with per-attempt timeout and exponential backoff.
//! - [`report`]: publishes results to the results exchange, confirmed.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.
//!
//! # Flow of one task
//! ```text
//! consume ─▶ handle: decode ─▶ claim (idempotency) ─▶ job live? ─▶ deliver (retry, backoff)
//!        ◀── outcome ◀── report (result confirmed) ◀── mark done ◀──┘
//!   ack / forward to a retry queue / dead-letter
//! ```

pub mod consume;
pub mod decide;
pub mod deliver;
pub mod handle;
pub mod idempotency;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod report;
pub mod startup;
