//! The settings of the services and of the connections every process makes: RabbitMQ,
//! Redis, telemetry, the coordinator and the worker.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::devices::{HttpSettings, MqttSettings, TransportKind};

/// RabbitMQ settings.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`; the vhost `/` is written `%2f`.
    pub url: String,
    /// Further nodes of the same cluster, tried in order when `url` cannot be reached.
    pub fallback_urls: Vec<String>,
    /// The type of the durable queues this deployment declares: `classic` (one node), or
    /// `quorum` (replicated across a cluster; a task redelivered more than `delivery_limit`
    /// times is dead-lettered). Fixed when a namespace's queues are first declared.
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one task without an ack (its consumer crashed or handed
    /// it back) before the broker dead-letters it as poison.
    pub delivery_limit: u32,
    /// When set, every queue this deployment declares is deleted by the broker after being
    /// unused this long. Meant for tests and demos, never for production.
    pub queue_expires_ms: Option<u64>,
    /// Device tasks per broker message: the planner sends a job's devices in messages of
    /// this many tasks (each keeps its own execution, attempts and result), and a worker's
    /// prefetch is sized from it. 1 sends one message per device.
    pub tasks_per_message: u16,
    /// Seconds to wait for one publisher confirm before treating the publish as failed.
    pub confirm_timeout_secs: u64,
}

/// The type of the durable queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A queue on one node.
    Classic,
    /// A replicated queue (Raft) with a delivery limit.
    Quorum,
}

/// Redis settings.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`, or `rediss://user:password@host:port/db` for TLS with an ACL
    /// user.
    pub url: String,
    /// Redis Cluster: the addresses of some of its nodes (`redis://host:port`, any number,
    /// any role); the client learns the rest and follows MOVED/ASK and failovers. Non-empty
    /// means cluster mode, and `url` is then unused. Every key of a deployment carries its
    /// namespace as a hash tag, so one deployment's keys share one slot.
    pub cluster_urls: Vec<String>,
    /// CA certificate (PEM) that signed a `rediss://` server's certificate; unset: the
    /// system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for servers that ask for one (`tls-auth-clients yes`).
    pub client_cert_file: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    pub client_key_file: Option<std::path::PathBuf>,
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
    /// OTLP transport; when unset, the standard `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, else gRPC.
    pub otlp_protocol: Option<OtlpProtocol>,
}

/// Coordinator settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Address of the HTTP API.
    pub listen: String,
    /// HTTPS: the API's certificate and key. Without them the API speaks plain HTTP, which
    /// is refused on a non-loopback address unless `auth.insecure`.
    pub tls: ApiTlsSettings,
    /// Seconds a client may take to send a request's headers (slow or half-sent requests
    /// are dropped after it).
    pub header_timeout_secs: u64,
    /// Seconds a request body may stall between two chunks before the request fails.
    pub body_idle_timeout_secs: u64,
    /// Tasks published per batch before waiting for the broker's confirms and writing the
    /// planner's checkpoint. Larger batches go faster; a crash re-publishes at most one batch.
    pub publish_batch: usize,
    /// Backpressure: planners publish a batch only while the tasks queue holds fewer than
    /// this many messages, so a job of millions never floods the broker and a job created
    /// later waits behind at most this many tasks (0: no bound).
    pub max_queued_tasks: u32,
    /// Redis memory alarm: while Redis uses this percent of its `maxmemory` or more,
    /// planners publish nothing (results are still recorded) and the alarm gauge
    /// `fleetbatch_redis_memory_alarm` is 1. 0: off; no effect while Redis has no `maxmemory`.
    pub redis_memory_high_percent: u8,
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
    pub webhook_secret: Option<Secret>,
    /// Attempts per webhook POST (exponential backoff from 1 s between them).
    pub webhook_max_attempts: u32,
    /// Hosts a job's own webhooks may call (exact names); empty: any public host.
    pub webhook_allowed_hosts: Vec<String>,
    /// Let a job's webhooks call loopback, private and link-local addresses.
    pub webhook_allow_private: bool,
    /// Longest line (NDJSON record, CSV row) of a device import.
    pub import_max_line_bytes: usize,
    /// Largest device import body.
    pub import_max_bytes: u64,
    /// Device-supplied text (a result's error) is cut to this many bytes before it is stored.
    pub max_device_text_bytes: usize,
    /// Reconciliation: how long after a job's deadline a device still not finished, with no
    /// worker holding it and no parked task, is taken as lost and ends TIMED_OUT (its copy
    /// of the task vanished: a message lost by the broker, a queue deleted, a poison task).
    pub reconcile_grace_secs: u64,
    /// Reconciliation without a deadline: a job with no device finishing for this long has
    /// its unfinished devices that nothing holds ended FAILED as lost (0: never).
    pub reconcile_silence_secs: u64,
    /// Reconciliation of stranded retries: a job with no device finishing for this long has
    /// its devices waiting for a retry this long past their due time, that nothing holds,
    /// sent a copy of their task (0: never).
    pub reconcile_resend_secs: u64,
    /// A finished job's data (record, statuses, results, idempotency records, device-side
    /// memory) is deleted this long after it finished (0: kept for ever). Export results
    /// first (`fleetbatch job results`) to keep them.
    pub retention_secs: u64,
    /// Who may call the API.
    pub auth: AuthSettings,
    /// How job documents are signed.
    pub signing: SigningSettings,
    /// The audit log of state-changing calls.
    pub audit: AuditSettings,
}

/// API authentication. Every route but `/healthz` and `/readyz` (and `/metrics` while
/// `metrics_public`) needs a bearer token: an API token (`fleetbatch token create`) or the
/// bootstrap admin token below.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Require a token on the API. `false` turns authentication off (every caller is an
    /// anonymous admin): accepted only on a loopback address, or with `insecure`.
    pub required: bool,
    /// An admin token taken from settings (e.g. `FLEETBATCH_COORDINATOR__AUTH__BOOTSTRAP_TOKEN`),
    /// to create the first API tokens. At least 32 characters.
    pub bootstrap_token: Option<Secret>,
    /// The bootstrap admin token read from a file (a mounted secret) instead.
    pub bootstrap_token_file: Option<std::path::PathBuf>,
    /// Serve `/metrics` without a token (Prometheus scrapers usually carry none).
    pub metrics_public: bool,
    /// Allow listening on a non-loopback address without authentication and TLS (a warning
    /// is logged at start).
    pub insecure: bool,
    /// Bearer JWTs from an OpenID Connect identity provider.
    pub oidc: OidcSettings,
}

/// The API's TLS certificate. Both files or neither.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsSettings {
    /// Certificate chain (PEM), the server's certificate first.
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<std::path::PathBuf>,
}

impl ApiTlsSettings {
    /// Whether the API serves HTTPS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// OpenID Connect: a bearer JWT signed by the identity provider (a key of its JWKS), issued
/// by `issuer` for `audience`, unexpired, is a caller. Its role comes from `role_claim`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The `iss` every token must carry (unset: OIDC is off).
    pub issuer: Option<String>,
    /// The `aud` every token must carry (the API's client id at the provider).
    pub audience: Option<String>,
    /// The provider's key set (JWKS), read from a file...
    pub jwks_file: Option<std::path::PathBuf>,
    /// ...or fetched from a URL (e.g. the provider's `jwks_uri`).
    pub jwks_url: Option<String>,
    /// Seconds between two reloads of the key set (a token signed by a key not yet known
    /// also triggers one, at most every 30 s).
    pub jwks_refresh_secs: u64,
    /// The claim holding the caller's role or roles (a string or a list of strings).
    pub role_claim: String,
    /// `value=role` pairs mapping the claim's values to `viewer`, `operator` or `admin`
    /// (e.g. `fleet-admins=admin`); empty: the values are the roles' own names. The highest
    /// role a token's values map to wins; a token mapping to none is refused.
    pub role_map: Vec<String>,
    /// The claim listing the groups an operator or viewer is confined to; unset or absent
    /// from a token: the whole fleet.
    pub groups_claim: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Dashboard sign-in at the provider (authorization code with PKCE): its authorization
    /// endpoint. Unset: the dashboard takes pasted tokens only.
    #[serde(default)]
    pub authorization_url: Option<String>,
    /// The provider's token endpoint (with `authorization_url`).
    #[serde(default)]
    pub token_url: Option<String>,
    /// The dashboard's client id at the provider (default: `audience`, which the ID token's
    /// `aud` then carries).
    #[serde(default)]
    pub client_id: Option<String>,
    /// The client secret, for a confidential client (unset: a public client, PKCE only).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Where the provider sends the browser back: this coordinator's public address with
    /// `/ui/oidc/callback` (e.g. `https://fleet.example.com/ui/oidc/callback`); unset: the
    /// address the browser used (its `Host`), which the provider must have registered.
    #[serde(default)]
    pub redirect_url: Option<String>,
    /// Scopes asked for (`openid` is always asked).
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl OidcSettings {
    /// Whether bearer JWTs are accepted.
    pub fn enabled(&self) -> bool {
        self.issuer.is_some()
    }

    /// Whether the dashboard signs in at the provider.
    pub fn sign_in(&self) -> bool {
        self.enabled() && self.authorization_url.is_some()
    }
}

/// Signing of job documents (Ed25519). Without a key, documents go out unsigned.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SigningSettings {
    /// The signing key: a 32-byte Ed25519 seed as 64 hex digits (`fleetbatch keys generate`).
    pub key: Option<Secret>,
    /// The key read from a file (a mounted secret) instead.
    pub key_file: Option<std::path::PathBuf>,
    /// The id sent with every signature; devices look the public key up by it.
    pub key_id: String,
}

/// The audit log.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Entries older than this are trimmed from the log.
    pub retention_days: u32,
}

/// A secret setting (a token, a password): never shown by `Debug` or serialisation.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
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
    pub transport: TransportKind,
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
    /// `/readyz` answers 503 when every delivery slot has been busy this long without one
    /// task settling (a stalled worker).
    pub stall_secs: u64,
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

impl AmqpSettings {
    /// The URL with its password replaced by `***`, for logs.
    pub fn safe_url(&self) -> String {
        redact_url(&self.url)
    }
}

// Debug shows URLs with their passwords redacted.
impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &self.safe_url())
            .field(
                "fallback_urls",
                &self
                    .fallback_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("queue_expires_ms", &self.queue_expires_ms)
            .field("tasks_per_message", &self.tasks_per_message)
            .field("confirm_timeout_secs", &self.confirm_timeout_secs)
            .finish()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.safe_url())
            .field(
                "cluster_urls",
                &self
                    .cluster_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish()
    }
}

impl RedisSettings {
    /// The URL with its password replaced by `***`, for logs.
    pub fn safe_url(&self) -> String {
        redact_url(&self.url)
    }
    /// The Redis the test suites use: `FLEETBATCH_TEST_REDIS_URL`, else the local server.
    pub fn for_tests() -> Self {
        Self {
            url: test_redis_url(),
            cluster_urls: Vec::new(),
            response_timeout_ms: 10_000,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
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

/// Where the test suites find RabbitMQ: `FLEETBATCH_TEST_AMQP_URL`, else the local server.
pub fn test_amqp_url() -> String {
    std::env::var("FLEETBATCH_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Where the test suites find Redis: `FLEETBATCH_TEST_REDIS_URL`, else the local server.
pub fn test_redis_url() -> String {
    std::env::var("FLEETBATCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The URL with its password replaced by `***`; a URL that does not parse is shown as is
/// (it then holds no recognisable password either).
pub(crate) fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => match u.set_password(Some("***")) {
            Ok(()) => u.to_string(),
            Err(()) => raw.to_owned(),
        },
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_or_serialised_output() {
        let s = Secret::from("hunter2-hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2-hunter2");
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
