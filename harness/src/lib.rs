//! What the operator's `demo`, `chaos` and `bench` commands and the end-to-end tests share to
//! run fleetbatch locally and judge the result. Never part of a deployment.
//!
//! # Layout
//! - [`cluster`]: a coordinator, workers and `fleet-sim` processes as children (find the
//!   binaries, start them with settings as environment variables, log each to a file,
//!   SIGTERM or SIGKILL them).
//! - [`fleet`]: reproducible generated fleets (models, hardware revisions, regions, tags).
//! - [`audit`]: checks a finished job against the guarantees from what Redis holds: one
//!   terminal state per device, exact counters, nothing applied twice, extra deliveries.

pub mod audit;
pub mod cluster;
pub mod fleet;
pub mod procs;
