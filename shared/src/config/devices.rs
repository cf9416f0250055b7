//! The device-side settings: how workers reach devices (`worker.transport`, `worker.mqtt`,
//! `worker.http`) and how simulated devices behave (`simulator`). Plain data: the code that
//! uses them is the `devices` crate's and the worker's; they are here because every process
//! reads and validates the one settings file.

use serde::{Deserialize, Serialize};

/// Which transport workers use to reach devices.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The built-in fleet simulator, with device state in Redis.
    Simulator,
    /// An MQTT broker ([`MqttSettings`]).
    Mqtt,
    /// HTTP POSTs to the device or its gateway ([`HttpSettings`]).
    Http,
}

/// MQTT protocol version: "3.1.1" or "5" (also read from the number 5, as environment
/// variables arrive).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

impl<'de> Deserialize<'de> for MqttVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Number(5) => Ok(MqttVersion::V5),
            Raw::Text(t) if t == "5" || t == "5.0" => Ok(MqttVersion::V5),
            Raw::Text(t) if t == "3.1.1" => Ok(MqttVersion::V311),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "MQTT version {t:?} is not \"3.1.1\" or \"5\""
            ))),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "MQTT version {n} is not \"3.1.1\" or \"5\""
            ))),
        }
    }
}

/// What devices speak over MQTT.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceProtocol {
    /// The fleetbatch device protocol (`docs/device-protocol.md`).
    Fleetbatch,
    /// The AWS IoT Jobs device API on `$aws/things/{thing}/jobs/...`.
    AwsIotJobs,
}

/// How workers reach an MQTT broker, and which device protocol they speak there.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// "3.1.1" or "5".
    pub version: MqttVersion,
    /// `fleetbatch` or `aws-iot-jobs`.
    pub protocol: DeviceProtocol,
    /// First topic level of the fleetbatch protocol's topics.
    pub topic_prefix: String,
    /// User name, if the broker asks for one.
    pub username: Option<String>,
    /// Password (with `username`); never shown by `Debug` or serialisation.
    pub password: Option<super::services::Secret>,
    /// PEM file of the CA that signed the broker's certificate (TLS); the system's roots
    /// otherwise.
    pub ca_file: Option<String>,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    pub client_cert_file: Option<String>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<String>,
    /// Keep-alive interval.
    pub keep_alive_secs: u64,
    /// Largest device message accepted; larger ones are refused with an error.
    pub max_payload_bytes: usize,
    /// AWS IoT Jobs: receive device requests through an MQTT 5 shared subscription (each
    /// request reaches one worker). Off: every worker receives every request and the first
    /// to claim it in Redis answers, which works on brokers that do not deliver `$aws` topics
    /// to shared subscriptions (Mosquitto 2.0).
    pub shared_subscriptions: bool,
    /// With `shared_subscriptions` off: how long workers remember the requests they claimed
    /// (each copy of a request is answered by one worker; a device repeating a request is
    /// answered again).
    pub request_dedupe_ms: u64,
    /// AWS IoT Jobs: how long a delivery waits for the device to finish before its task is
    /// parked (no worker slot) until the device changes the execution; at most half the
    /// attempt timeout.
    pub aws_hold_ms: u64,
    /// AWS IoT Jobs: how long an execution waits QUEUED (the device has not asked for it)
    /// before the device is sent `notify-next` again, and again after each such wait; 0: only
    /// when the execution is new (as AWS IoT Jobs does). A notification lost on the way (a
    /// broker drops QoS 1 messages for a client that falls behind) otherwise leaves the
    /// device never asking for its job.
    pub aws_renotify_ms: u64,
}

/// Which HTTP version workers speak to devices or their gateway.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HttpVersion {
    /// HTTP/2 where TLS negotiates it (ALPN), HTTP/1.1 otherwise.
    Auto,
    /// HTTP/1.1 only: one connection for each delivery in flight.
    Http1,
    /// HTTP/2 only, without TLS too (prior knowledge, "h2c"): the deliveries to one host
    /// share a connection, as many in flight as the server allows.
    Http2,
}

/// How workers reach devices over HTTP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// URL POSTed for each delivery; `{device_id}` is replaced by the (URL-encoded) device id.
    pub url_template: String,
    /// HTTP version spoken.
    pub version: HttpVersion,
    /// PEM file of an extra CA to trust for `https` URLs.
    pub ca_file: Option<String>,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Value of the `Authorization` header, if the devices or gateway want one.
    pub authorization: Option<String>,
}

/// The built-in simulator's fleet. Every probability is drawn per device (seeded by the
/// device id), so a run is reproducible and tests can compute which devices should fail.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Seed mixed into every per-device draw.
    pub seed: u64,
    /// Public keys (`key_id=hex`) the simulated devices accept job documents from; with any
    /// given, an unsigned, forged or unknown-key document is answered REJECTED.
    pub trusted_keys: Vec<String>,
    /// Mean latency of one delivery.
    pub latency_ms: u64,
    /// Latency varies uniformly by up to this much either side of the mean.
    pub latency_jitter_ms: u64,
    /// Probability that one delivery attempt fails transiently.
    pub transient_failure_rate: f64,
    /// Fraction of devices that fail every job with a permanent error.
    pub permanent_failure_rate: f64,
    /// Fraction of devices that reject jobs (incompatible hardware revision).
    pub reject_rate: f64,
    /// Fraction of devices that are offline at first.
    pub offline_rate: f64,
    /// An offline device answers nothing to its first this-many deliveries of an execution.
    pub offline_attempts: u32,
    /// Fraction of devices that hang: they never answer.
    pub hang_rate: f64,
    /// Fraction of devices that report themselves unhealthy after installing (jobs with a
    /// health confirmation).
    pub unhealthy_rate: f64,
    /// Fraction of devices that roll themselves back after installing.
    pub rollback_rate: f64,
    /// Extra time a reboot takes (reboot jobs only).
    pub reboot_ms: u64,
    /// Log which worker made each delivery, with its attempt number, per execution (for
    /// finding the source of extra deliveries; costs Redis memory).
    pub record_deliveries: bool,
}
