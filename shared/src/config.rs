//! Settings, loaded in layers with the `config` crate.
//!
//! Owns the shape of every setting and the order in which sources override each other:
//! 1. built-in defaults: `deploy/config/fleetbatch.yaml`, compiled into the binaries, which is
//!    also the one documented example of every setting;
//! 2. a file named by `--config` or `FLEETBATCH_CONFIG` (YAML, TOML or JSON by extension);
//! 3. `FLEETBATCH_*` environment variables, `__` between levels:
//!    `FLEETBATCH_WORKER__CONCURRENCY=512` sets `worker.concurrency`.
//!
//! It never reads the current directory: test binaries and services run from anywhere.
//! Unknown keys are errors (`deny_unknown_fields`), so a typo does not silently fall back to
//! a default.

use std::{collections::HashMap, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

/// The built-in defaults, documented key by key.
pub const DEFAULTS_YAML: &str = include_str!("../../deploy/config/fleetbatch.yaml");

/// Environment variable naming a settings file (the `--config` flag wins over it).
pub const CONFIG_FILE_ENV: &str = "FLEETBATCH_CONFIG";

/// Errors while loading settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type or an unknown key.
    #[error("invalid configuration")]
    Invalid(#[from] config::ConfigError),
    /// A value parsed but makes no sense (e.g. a rate above 1).
    #[error("invalid configuration: {field}: {problem}")]
    Value {
        /// The dotted path of the setting.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Every setting of every fleetbatch process. Each process reads the sections it needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Prefix of every exchange, queue and Redis key, so several deployments (or tests) can
    /// share one RabbitMQ and one Redis without seeing each other.
    pub namespace: String,
    /// RabbitMQ connection and queue options.
    pub amqp: AmqpSettings,
    /// Redis connection.
    pub redis: RedisSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// The coordinator service.
    pub coordinator: CoordinatorSettings,
    /// The worker service.
    pub worker: WorkerSettings,
    /// The built-in device simulator (the `simulator` transport).
    pub simulator: SimulatorSettings,
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`; the vhost `/` is written `%2f`.
    pub url: String,
    /// When set, every queue this deployment declares is deleted by the broker after being
    /// unused this long. Meant for tests and demos, never for production.
    pub queue_expires_ms: Option<u64>,
    /// Seconds to wait for one publisher confirm before treating the publish as failed.
    pub confirm_timeout_secs: u64,
}

/// Redis settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// How long one command (or pipeline) may take before it counts as failed. Pipelines of a
    /// thousand scripts take a while on a busy machine: keep this in seconds, not
    /// milliseconds.
    pub response_timeout_ms: u64,
}

/// How log lines are printed.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, multi-line.
    Pretty,
    /// One line per event, human-readable.
    Compact,
    /// One JSON object per line, for log shippers.
    Json,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    Http,
}

/// Logs and traces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `EnvFilter` directives, used when `RUST_LOG` is unset.
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP endpoint; when empty, `OTEL_EXPORTER_OTLP_ENDPOINT` is used; when both are
    /// unset no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// OTLP transport.
    pub otlp_protocol: OtlpProtocol,
}

/// Coordinator settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Address of the HTTP API.
    pub listen: String,
    /// Tasks published per batch before waiting for the broker's confirms and writing the
    /// planner's checkpoint. Larger batches go faster; a crash re-publishes at most one batch.
    pub publish_batch: usize,
    /// Prefetch of the results consumer; results are recorded in Redis in batches of up to
    /// this many.
    pub results_prefetch: u16,
    /// Largest job document accepted, in bytes.
    pub max_document_bytes: usize,
    /// Largest number of explicit device ids in one job (use groups or filters beyond that).
    pub max_explicit_devices: usize,
    /// Default publishing rate limit in devices per second when a job sets none (0: none).
    pub default_max_per_second: u32,
    /// Endpoints POSTed on every job's state changes.
    pub webhooks: Vec<String>,
    /// Key of the HMAC-SHA256 signature on every webhook POST. Jobs naming webhooks are
    /// refused while it is unset.
    pub webhook_secret: Option<String>,
    /// Attempts per webhook POST (exponential backoff from 1 s between them).
    pub webhook_max_attempts: u32,
}

/// Which transport workers use to reach devices.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
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
    /// Password (with `username`).
    pub password: Option<String>,
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
}

/// How workers reach devices over HTTP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// URL POSTed for each delivery; `{device_id}` is replaced by the (URL-encoded) device id.
    pub url_template: String,
    /// PEM file of an extra CA to trust for `https` URLs.
    pub ca_file: Option<String>,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Value of the `Authorization` header, if the devices or gateway want one.
    pub authorization: Option<String>,
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Address of the worker's `/metrics`, `/healthz` and `/readyz` (port 0: any free port,
    /// logged at start).
    pub listen: String,
    /// Deliveries in flight per worker. Also the AMQP prefetch: the broker never hands a
    /// worker more tasks than it can work on, so a dying worker strands at most this many.
    pub concurrency: u16,
    /// How devices are reached.
    pub transport: Transport,
    /// Default timeout of one delivery attempt, when the job sets none.
    pub attempt_timeout_ms: u64,
    /// In-process retries of transient device errors.
    pub backoff: BackoffSettings,
    /// Delays of the broker-side retry queues (TTL + dead-letter back to the tasks queue),
    /// used once the in-process budget is spent. The n-th parking uses the n-th delay; the last
    /// one repeats.
    pub retry_delays_ms: Vec<u64>,
    /// How long an idempotency claim lives. A worker that dies mid-delivery blocks its task
    /// at most this long before another worker takes it over.
    pub claim_lease_ms: u64,
    /// How long a finished task's idempotency record is kept.
    pub done_retention_secs: u64,
    /// On SIGTERM, how long in-flight deliveries may take before the worker exits anyway
    /// (their tasks then return to the queue).
    pub shutdown_grace_secs: u64,
    /// How long a worker trusts its cached copy of a job's state before reading it again.
    pub job_cache_ms: u64,
    /// The MQTT transport (with `transport: mqtt`).
    pub mqtt: MqttSettings,
    /// The HTTP transport (with `transport: http`).
    pub http: HttpSettings,
}

/// Exponential backoff for transient device errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSettings {
    /// First delay.
    pub initial_ms: u64,
    /// Largest delay.
    pub max_ms: u64,
    /// Growth factor between delays.
    pub multiplier: f64,
    /// Jitter: each delay is drawn from `delay * (1 ± randomization)`.
    pub randomization: f64,
    /// Total time spent retrying in-process before the task is parked on a retry queue.
    /// Kept far below RabbitMQ's consumer timeout.
    pub budget_ms: u64,
}

/// The built-in simulator's fleet. Every probability is drawn per device (seeded by the
/// device id), so a run is reproducible and tests can compute which devices should fail.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Seed mixed into every per-device draw.
    pub seed: u64,
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
    /// Extra time a reboot takes (reboot jobs only).
    pub reboot_ms: u64,
    /// Log which worker made each delivery, with its attempt number, per execution (for
    /// finding the source of extra deliveries; costs Redis memory).
    pub record_deliveries: bool,
}

impl AmqpSettings {
    /// The URL with its password replaced by `***`, for logs.
    pub fn safe_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl RedisSettings {
    /// The URL with its password replaced by `***`, for logs.
    pub fn safe_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl WorkerSettings {
    /// Default per-attempt timeout.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }
    /// Idempotency claim lease.
    pub fn claim_lease(&self) -> Duration {
        Duration::from_millis(self.claim_lease_ms)
    }
    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    /// Job state cache lifetime.
    pub fn job_cache(&self) -> Duration {
        Duration::from_millis(self.job_cache_ms)
    }
}

fn redact_url(url: &str) -> String {
    // scheme://user:password@host -> scheme://user:***@host
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

impl Settings {
    /// Loads settings: defaults, then `file` (or `$FLEETBATCH_CONFIG`), then `FLEETBATCH_*`
    /// environment variables.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, an unknown key, a value of the wrong type, or a
    /// value out of range; the message names the key.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// [`Settings::load`] with an explicit environment, for tests (which must never mutate
    /// their own process environment).
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_from(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULTS_YAML,
            config::FileFormat::Yaml,
        ));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(Into::into));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        // FLEETBATCH_CONFIG names the file and FLEETBATCH_TEST_* belong to the test suite;
        // neither is a setting.
        let vars: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.as_str() != CONFIG_FILE_ENV && !k.starts_with("FLEETBATCH_TEST_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("FLEETBATCH")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("worker.retry_delays_ms")
                .with_list_parse_key("coordinator.webhooks")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let rate = |field: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Value {
                    field,
                    problem: format!("{v} is not a probability between 0 and 1"),
                })
            }
        };
        let s = &self.simulator;
        rate("simulator.transient_failure_rate", s.transient_failure_rate)?;
        rate("simulator.permanent_failure_rate", s.permanent_failure_rate)?;
        rate("simulator.reject_rate", s.reject_rate)?;
        rate("simulator.offline_rate", s.offline_rate)?;
        rate("simulator.hang_rate", s.hang_rate)?;
        let m = &self.worker.mqtt;
        if !(m.url.starts_with("mqtt://") || m.url.starts_with("mqtts://")) {
            return Err(ConfigError::Value {
                field: "worker.mqtt.url",
                problem: format!("{:?} must start with mqtt:// or mqtts://", m.url),
            });
        }
        if m.client_cert_file.is_some() != m.client_key_file.is_some() {
            return Err(ConfigError::Value {
                field: "worker.mqtt.client_key_file",
                problem: "client_cert_file and client_key_file go together".into(),
            });
        }
        if self.worker.transport == Transport::Http
            && !self.worker.http.url_template.contains("{device_id}")
        {
            return Err(ConfigError::Value {
                field: "worker.http.url_template",
                problem: format!(
                    "{:?} must contain {{device_id}}",
                    self.worker.http.url_template
                ),
            });
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Value {
                field: "namespace",
                problem: format!(
                    "{:?} must be non-empty ASCII letters, digits, '-' or '_'",
                    self.namespace
                ),
            });
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Value {
                field: "worker.concurrency",
                problem: "must be at least 1".into(),
            });
        }
        if self.worker.retry_delays_ms.is_empty() {
            return Err(ConfigError::Value {
                field: "worker.retry_delays_ms",
                problem: "needs at least one delay".into(),
            });
        }
        if self.worker.claim_lease_ms <= self.worker.backoff.budget_ms {
            return Err(ConfigError::Value {
                field: "worker.claim_lease_ms",
                problem: format!(
                    "{} ms must exceed worker.backoff.budget_ms ({} ms): a claim must outlive the retries made under it",
                    self.worker.claim_lease_ms, self.worker.backoff.budget_ms
                ),
            });
        }
        if self.coordinator.publish_batch == 0 {
            return Err(ConfigError::Value {
                field: "coordinator.publish_batch",
                problem: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_defaults_load_and_validate() {
        let s = Settings::load_from(None, &HashMap::new()).expect("defaults load");
        assert_eq!(s.namespace, "fleetbatch");
        assert!(s.worker.concurrency > 0);
    }

    #[test]
    fn environment_variables_override_nested_settings() {
        let env = HashMap::from([
            ("FLEETBATCH_WORKER__CONCURRENCY".to_owned(), "7".to_owned()),
            ("FLEETBATCH_NAMESPACE".to_owned(), "t1".to_owned()),
            (
                "FLEETBATCH_WORKER__RETRY_DELAYS_MS".to_owned(),
                "10,20".to_owned(),
            ),
            ("FLEETBATCH_CONFIG".to_owned(), String::new()),
            ("FLEETBATCH_TEST_AMQP_URL".to_owned(), "x".to_owned()),
        ]);
        let env: HashMap<_, _> = env.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let s = Settings::load_from(None, &env).expect("load");
        assert_eq!(s.worker.concurrency, 7);
        assert_eq!(s.namespace, "t1");
        assert_eq!(s.worker.retry_delays_ms, vec![10, 20]);
    }

    #[test]
    fn an_unknown_key_in_a_file_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("fb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("bad.yaml");
        std::fs::write(&file, "worker:\n  concurency: 3\n").expect("write");
        let err = Settings::load_from(Some(&file), &HashMap::new()).expect_err("typo refused");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("concurency"), "{chain}");
    }

    #[test]
    fn the_production_settings_file_loads() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config/production.yaml");
        let s = Settings::load_from(Some(&file), &HashMap::new()).expect("production.yaml loads");
        assert_eq!(s.telemetry.log_format, LogFormat::Json);
        assert_eq!(s.coordinator.listen, "0.0.0.0:8080");
    }

    #[test]
    fn an_out_of_range_probability_is_refused() {
        let env = HashMap::from([(
            "FLEETBATCH_SIMULATOR__REJECT_RATE".to_owned(),
            "1.5".to_owned(),
        )]);
        let err = Settings::load_from(None, &env).expect_err("refused");
        assert!(err.to_string().contains("simulator.reject_rate"));
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
    }
}
