//! Settings, loaded in layers with the `config` crate.
//!
//! Owns the shape of every setting and the order in which sources override each other:
//! 1. built-in defaults: `deploy/config/fleetbatch.yaml`, compiled into the binaries, which is
//!    also the one documented example of every setting;
//! 2. a file named by `--config` or `FLEETBATCH_CONFIG` (YAML, TOML or JSON, by the file's
//!    extension: `.yaml`/`.yml`, `.toml`, `.json`);
//! 3. `FLEETBATCH_*` environment variables, `__` between levels:
//!    `FLEETBATCH_WORKER__CONCURRENCY=512` sets `worker.concurrency`.
//!
//! It never reads the current directory: test binaries and services run from anywhere.
//! Unknown keys are errors (`deny_unknown_fields`), so a typo does not silently fall back to
//! a default; the CLI's variables ([`CLIENT_ENV`]) are not settings and are ignored.
//!
//! The section types live in `services` (connections, coordinator, worker) and `devices`
//! (transports and simulated devices), re-exported here; one file holds every process's
//! settings, so each process validates all of it.

use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};

mod devices;
mod services;

pub use devices::{
    DeviceProtocol, HttpSettings, HttpVersion, MqttSettings, MqttVersion, SimulatorSettings,
    TransportKind,
};
pub(crate) use services::redact_url;
pub use services::{
    AmqpSettings, ApiTlsSettings, BackoffSettings, CoordinatorSettings, LogFormat, OidcSettings,
    OtlpProtocol, QueueType, RedisSettings, Secret, TelemetrySettings, WorkerSettings,
    test_amqp_url, test_redis_url,
};

/// The built-in defaults, documented key by key.
pub const DEFAULTS_YAML: &str = include_str!("../../../deploy/config/fleetbatch.yaml");

/// Environment variable naming a settings file (the `--config` flag wins over it).
pub const CONFIG_FILE_ENV: &str = "FLEETBATCH_CONFIG";

/// The `fleetbatch` CLI's own variables: they configure the client, not a service, so the
/// services ignore them (one shell can export them and still start a coordinator).
pub const CLIENT_ENV: [&str; 3] = ["FLEETBATCH_API", "FLEETBATCH_TOKEN", "FLEETBATCH_CA_FILE"];

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
        // FLEETBATCH_CONFIG names the file, FLEETBATCH_TEST_* belong to the test suite and
        // the client's variables to the CLI: none is a setting.
        let vars: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| {
                k.as_str() != CONFIG_FILE_ENV
                    && !k.starts_with("FLEETBATCH_TEST_")
                    && !CLIENT_ENV.contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("FLEETBATCH")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("worker.retry_delays_ms")
                .with_list_parse_key("amqp.fallback_urls")
                .with_list_parse_key("redis.cluster_urls")
                .with_list_parse_key("coordinator.webhooks")
                .with_list_parse_key("coordinator.webhook_allowed_hosts")
                .with_list_parse_key("simulator.trusted_keys")
                .with_list_parse_key("coordinator.auth.oidc.role_map")
                .with_list_parse_key("coordinator.auth.oidc.scopes")
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
        rate("simulator.unhealthy_rate", s.unhealthy_rate)?;
        rate("simulator.rollback_rate", s.rollback_rate)?;
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
        if self.worker.transport == TransportKind::Http
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
        if let Some(t) = &self.coordinator.auth.bootstrap_token
            && t.expose().len() < 32
        {
            return Err(ConfigError::Value {
                field: "coordinator.auth.bootstrap_token",
                problem: "must be at least 32 characters".into(),
            });
        }
        if self.amqp.tasks_per_message == 0 {
            return Err(ConfigError::Value {
                field: "amqp.tasks_per_message",
                problem: "must be at least 1".into(),
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
    fn no_secret_setting_shows_in_the_settings_debug_output() {
        let env: HashMap<String, String> = [
            (
                "FLEETBATCH_AMQP__URL",
                "amqp://fb:amqp-pass-1@rabbit:5672/%2f",
            ),
            (
                "FLEETBATCH_REDIS__URL",
                "rediss://fb:redis-pass-2@redis:6380/",
            ),
            ("FLEETBATCH_WORKER__MQTT__USERNAME", "fb"),
            ("FLEETBATCH_WORKER__MQTT__PASSWORD", "mqtt-pass-3"),
            ("FLEETBATCH_COORDINATOR__WEBHOOK_SECRET", "hook-secret-4"),
            (
                "FLEETBATCH_COORDINATOR__AUTH__BOOTSTRAP_TOKEN",
                "bootstrap-token-5-0123456789abcdef",
            ),
            (
                "FLEETBATCH_COORDINATOR__SIGNING__KEY",
                "6666666666666666666666666666666666666666666666666666666666666666",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let settings = Settings::load_from(None, &env).expect("settings");
        let shown = format!("{settings:?}");
        for secret in [
            "amqp-pass-1",
            "redis-pass-2",
            "mqtt-pass-3",
            "hook-secret-4",
            "bootstrap-token-5",
            "6666666666",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        // They are still there for the code that uses them.
        assert_eq!(
            settings.worker.mqtt.password.as_ref().map(Secret::expose),
            Some("mqtt-pass-3")
        );
    }

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

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fb-cfg-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join(name);
        std::fs::write(&file, text).expect("write");
        file
    }

    #[test]
    fn toml_settings_files_load() {
        let file = write(
            "s.toml",
            "namespace = \"from-toml\"\n[worker]\nconcurrency = 9\nretry_delays_ms = [5, 6]\n",
        );
        let s = Settings::load_from(Some(&file), &HashMap::new()).expect("toml loads");
        assert_eq!(s.namespace, "from-toml");
        assert_eq!(s.worker.concurrency, 9);
        assert_eq!(s.worker.retry_delays_ms, vec![5, 6]);
    }

    #[test]
    fn json_settings_files_load() {
        let file = write(
            "s.json",
            r#"{"namespace": "from-json", "worker": {"concurrency": 11}, "simulator": {"reject_rate": 0.5}}"#,
        );
        let s = Settings::load_from(Some(&file), &HashMap::new()).expect("json loads");
        assert_eq!(s.namespace, "from-json");
        assert_eq!(s.worker.concurrency, 11);
        assert_eq!(s.simulator.reject_rate, 0.5);
    }

    #[test]
    fn a_typo_in_a_toml_or_json_file_is_refused_naming_it() {
        for (name, text) in [
            ("bad.toml", "[worker]\nconcurency = 3\n"),
            ("bad.json", r#"{"worker": {"concurency": 3}}"#),
        ] {
            let err = Settings::load_from(Some(&write(name, text)), &HashMap::new())
                .expect_err("typo refused");
            let chain = format!("{:#}", anyhow::Error::from(err));
            assert!(chain.contains("concurency"), "{name}: {chain}");
        }
    }

    #[test]
    fn the_clients_variables_are_not_settings_but_typos_still_are() {
        let env = HashMap::from([
            ("FLEETBATCH_API".to_owned(), "http://127.0.0.1:1".to_owned()),
            ("FLEETBATCH_TOKEN".to_owned(), "secret".to_owned()),
        ]);
        Settings::load_from(None, &env).expect("client variables ignored");
        let env = HashMap::from([("FLEETBATCH_WORKER__CONCURENCY".to_owned(), "3".to_owned())]);
        let err = Settings::load_from(None, &env).expect_err("typo refused");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("concurency"), "{chain}");
        let env = HashMap::from([("FLEETBATCH_APII".to_owned(), "x".to_owned())]);
        assert!(
            Settings::load_from(None, &env).is_err(),
            "a near miss is a typo"
        );
    }

    #[test]
    fn the_http_version_loads_and_an_unknown_one_is_refused_naming_the_field() {
        let env = |v: &str| {
            HashMap::from([("FLEETBATCH_WORKER__HTTP__VERSION".to_owned(), v.to_owned())])
        };
        let s = Settings::load_from(None, &HashMap::new()).expect("defaults");
        assert_eq!(s.worker.http.version, HttpVersion::Auto);
        let s = Settings::load_from(None, &env("http2")).expect("http2");
        assert_eq!(s.worker.http.version, HttpVersion::Http2);
        let err = Settings::load_from(None, &env("http3")).expect_err("refused");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(
            chain.contains("worker.http.version") && chain.contains("http3"),
            "{chain}"
        );
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
}
