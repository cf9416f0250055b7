//! Reaching devices: the transports, and the attempt loop around them (`attempts`).
//!
//! Owns what a delivery is (request, reply, errors) and which transport carries it; the
//! attempt loop owns how one execution is attempted: each attempt runs under a timeout; transient errors
//! are retried in-process with exponential backoff and jitter ([`shared::backoff`]) until the
//! in-process budget or the job's attempt limit is spent; the backoff sleeps race the shutdown
//! token so a stopping worker hands tasks back instead of sleeping on them. It never talks to
//! RabbitMQ and never records outcomes.

mod attempts;
pub mod aws;
pub mod http;
pub mod mqtt;
mod request;
pub mod simulator;
mod transport;

pub use attempts::{AttemptPolicy, Claim, Delivered, Progress, run};
pub use request::{DeliverError, DeliveryRequest, DeviceWait, Reply, reply_outcome};
pub use transport::Transport;
