//! Everything about talking to a device, for the workers that reach devices and for
//! `fleet-sim`, which plays them.
//!
//! The coordinator never depends on this crate: it plans and aggregates, it never speaks to a
//! device, so it never compiles an MQTT client.
//!
//! # Layout
//! - [`protocol`]: the fleetbatch device protocol's JSON documents and MQTT topics.
//! - [`aws`]: the AWS IoT Jobs device API's topics, built and parsed in one place for both
//!   sides.
//! - [`keys`]: the Redis keys and MQTT names of the device side (simulator memory, AWS IoT
//!   Jobs executions, the shared-subscription group), named in `shared` so that the
//!   coordinator can delete a job's keys by name.
//! - [`mqtt`]: one MQTT 3.1.1/5 connection (TLS, credentials, resubscription, reconnects).
//! - [`simdevice`]: how a simulated device behaves (the workers' built-in simulator and
//!   `fleet-sim`).
//!
//! The device-side settings (`worker.mqtt`, `worker.http`, `simulator`) are plain data in
//! `shared::config`, beside every other key of the one settings file.
#![warn(missing_docs)]

pub mod aws;
pub use shared::device_keys as keys;
pub mod mqtt;
pub mod protocol;
pub mod simdevice;
