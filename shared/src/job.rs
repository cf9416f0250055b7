//! The job model: what a user asks for (a [`JobSpec`]): targets, action, compatibility,
//! retries, rollout and notifications. The states a job and its executions move through are
//! in [`crate::state`]; devices and the attribute filter in [`crate::device`].
//!
//! Owns parsing and validation of job files, so the API, the CLI and tests report the same
//! error for the same mistake, always naming the field. It never talks to Redis or RabbitMQ.

use serde::{Deserialize, Serialize};

use crate::device::{AttributeFilter, validate_id};
pub use crate::rollout::Rollout;

/// What a job does to each device, and to which devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A human name for lists and dashboards.
    #[serde(default)]
    pub name: Option<String>,
    /// Which devices the job targets.
    pub target: TargetSpec,
    /// What each device is asked to do.
    pub action: Action,
    /// Devices that cannot take the job are SKIPPED, with the reason, instead of being sent it.
    #[serde(default)]
    pub compatibility: Option<Compatibility>,
    /// Retries and timeouts.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Rate, ramp, waves and abort criteria.
    #[serde(default)]
    pub rollout: Rollout,
    /// Who to tell about this job.
    #[serde(default)]
    pub notify: Notify,
    /// When the job starts and ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Continuous: devices that come to match the target later (registered, added to a
    /// group, attributes changed) get the job too; the job runs until it is canceled or its
    /// `schedule.end_at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continuous: bool,
    /// When each device may be contacted (maintenance windows).
    #[serde(default, skip_serializing_if = "crate::window::Maintenance::is_empty")]
    pub maintenance: crate::window::Maintenance,
    /// Order among jobs waiting for the same device: higher first (0 to
    /// [`MAX_PRIORITY`]), then the earlier job. A device runs one job at a time.
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: u16,
    /// May run on a device alongside other jobs (no waiting for the device's turn, and no
    /// job waits for this one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concurrent: bool,
    /// Success means healthy: after the device reports SUCCEEDED it must report healthy
    /// within the window, or the execution ends UNHEALTHY (or ROLLED_BACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// What undoes the action (e.g. the previous firmware), for `fleetbatch job rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Action>,
}

/// The largest `priority` a job may have.
pub const MAX_PRIORITY: u16 = 1000;

/// A job's place in a device's queue of jobs (lower goes first): higher priority first, then
/// the earlier job. Exact in an `f64` (a Redis sorted-set score) for every priority and any
/// creation time before the year 2100.
pub fn lane_score(priority: u16, created_at_ms: u64) -> f64 {
    let rank = u64::from(MAX_PRIORITY.saturating_sub(priority.min(MAX_PRIORITY)));
    (rank * (1u64 << 42) + created_at_ms.min((1u64 << 42) - 1)) as f64
}

/// When a job starts and ends (RFC 3339 times, e.g. `2026-12-05T02:00:00+01:00`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Nothing is published before this time; until then the job is SCHEDULED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    /// Nothing is published after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_at: Option<String>,
    /// What the end does to devices not yet finished.
    #[serde(default)]
    pub end_behavior: EndBehavior,
    /// Recurring: a cron expression (5 fields, or 6 with seconds first); each occurrence
    /// creates a child job (created with `POST /v1/schedules`). `start_at` and `end_at` then
    /// bound the occurrences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone `cron` is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// What an occurrence missed while no coordinator ran becomes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub missed: crate::window::Missed,
    /// An occurrence not run within this many seconds of its time is missed (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_after_secs: Option<u64>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Schedule {
    /// The zone occurrences are read in.
    pub fn zone(&self) -> &str {
        self.time_zone.as_deref().unwrap_or("UTC")
    }

    /// How late an occurrence may run before it counts as missed, in ms.
    pub fn late_after_ms(&self) -> u64 {
        self.late_after_secs.unwrap_or(60).saturating_mul(1000)
    }
}

/// What `schedule.end_at` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndBehavior {
    /// Stop publishing: devices not yet sent the job end CANCELED, deliveries already under
    /// way (and their retries) finish; the job ends COMPLETED.
    #[default]
    Stop,
    /// Cancel the job: as `fleetbatch job cancel` at that time.
    Cancel,
}

/// Milliseconds since the epoch of an RFC 3339 time.
///
/// # Errors
/// What is wrong with it.
pub fn rfc3339_ms(text: &str) -> Result<u64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{text:?} is not an RFC 3339 time (e.g. 2026-12-05T02:00:00Z): {e}")
        })?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{text:?} is before 1970"))
}

impl Schedule {
    /// When the job starts (ms since the epoch), if it says.
    pub fn start_ms(&self) -> Option<u64> {
        self.start_at.as_deref().and_then(|t| rfc3339_ms(t).ok())
    }
    /// When the job ends (ms since the epoch), if it says.
    pub fn end_ms(&self) -> Option<u64> {
        self.end_at.as_deref().and_then(|t| rfc3339_ms(t).ok())
    }
}

/// A health confirmation after success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Seconds after the install succeeded within which the device must report healthy.
    pub window_secs: u64,
    /// Seconds between two asks for the device's health report.
    #[serde(default = "default_probe_secs")]
    pub probe_every_secs: u64,
}

fn default_probe_secs() -> u64 {
    5
}

/// Longest health window: an hour (the worker keeps the execution while it waits).
pub const MAX_HEALTH_WINDOW_SECS: u64 = 3_600;

/// Push notifications of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Notify {
    /// Endpoints POSTed on every state change of the job (signed, retried).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

/// One webhook endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// The URL to POST to.
    pub url: String,
    /// Also POST each device that ends FAILED, REJECTED or TIMED_OUT.
    #[serde(default)]
    pub device_failures: bool,
}

/// Target selection: the union of explicit `devices` and the members of `groups`, narrowed by
/// `filter`. With neither devices nor groups, the filter applies to the whole registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// Explicit device ids.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Device groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Attribute filter; every given attribute must match.
    #[serde(default)]
    pub filter: Option<AttributeFilter>,
    /// A device query ([`crate::query`]), e.g. `firmware_version < 2.1.0 and tags.site =
    /// berlin`; read when the job is planned. Alone it selects from the whole registry; with
    /// devices or groups it narrows them, as `filter` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// A saved query (`fleetbatch query save NAME QUERY`), read when the job is created: its
    /// text joins `query` (both must hold) in the stored spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_query: Option<String>,
    /// The devices of an earlier job that ended in the given states (a rerun), with no
    /// limit on their number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_job: Option<FromJob>,
}

/// An earlier job's devices, by the terminal state they ended in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FromJob {
    /// The earlier job.
    pub job_id: uuid::Uuid,
    /// The terminal states whose devices are targeted (e.g. FAILED, TIMED_OUT).
    pub states: Vec<crate::state::ExecutionState>,
}

/// Which devices can take the job; the others are SKIPPED.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Compatibility {
    /// Hardware revisions that can take it (empty: any).
    #[serde(default)]
    pub hardware_revisions: Vec<String>,
    /// Models that can take it (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
}

/// Retries and timeouts of each device execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delivery attempts per device before it is FAILED (transient errors only; permanent
    /// errors and rejections are final at once).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Timeout of one delivery attempt; the worker's default when unset.
    #[serde(default)]
    pub attempt_timeout_secs: Option<u64>,
    /// Devices not finished this long after the job was created end TIMED_OUT.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
}

fn default_max_attempts() -> u32 {
    5
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            attempt_timeout_secs: None,
            deadline_secs: None,
        }
    }
}

/// What a device is asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Download, verify and install a firmware image.
    FirmwareUpdate(FirmwareUpdate),
    /// Apply a configuration patch.
    Configuration(Configuration),
    /// Reboot.
    Reboot(Reboot),
    /// A named command with free-form arguments.
    Command(Command),
    /// Read metrics off the device; the readings come back with the results.
    DataRetrieval(DataRetrieval),
}

/// Parameters of a data retrieval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRetrieval {
    /// Names of the metrics to read (e.g. `temperature`).
    pub metrics: Vec<String>,
}

/// Most metrics one data-retrieval job may ask for.
pub const MAX_METRICS: usize = 64;

/// Parameters of a firmware update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareUpdate {
    /// Where the device downloads the image.
    pub url: String,
    /// The version being installed.
    pub version: String,
    /// SHA-256 of the image, 64 hex digits.
    pub sha256: String,
}

/// Parameters of a configuration change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Configuration {
    /// The patch document (JSON object).
    pub document: serde_json::Value,
}

/// Parameters of a reboot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reboot {
    /// Seconds to wait before rebooting.
    #[serde(default)]
    pub delay_secs: u64,
}

/// Parameters of a custom command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Command name.
    pub name: String,
    /// Arguments (any JSON value).
    #[serde(default)]
    pub args: serde_json::Value,
}

impl Action {
    /// Short name of the action kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::FirmwareUpdate(_) => "firmware_update",
            Action::Configuration(_) => "configuration",
            Action::Reboot(_) => "reboot",
            Action::Command(_) => "command",
            Action::DataRetrieval(_) => "data_retrieval",
        }
    }
}

/// The first key of `input` that `canonical` (the parsed spec written back) does not have,
/// as a dotted path. Free-form values (documents, arguments) come back whole, so their keys
/// are never reported.
fn unknown_field(
    input: &serde_json::Value,
    canonical: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (input, canonical) {
        (Value::Object(i), Value::Object(c)) => i.iter().find_map(|(k, v)| match c.get(k) {
            None => Some(join(k)),
            Some(cv) => unknown_field(v, cv, &join(k)),
        }),
        (Value::Array(i), Value::Array(c)) if i.len() == c.len() => i
            .iter()
            .zip(c)
            .enumerate()
            .find_map(|(n, (v, cv))| unknown_field(v, cv, &format!("{path}[{n}]"))),
        _ => None,
    }
}

/// Largest per-attempt timeout: an attempt must end well inside RabbitMQ's consumer timeout.
pub const MAX_ATTEMPT_TIMEOUT_SECS: u64 = 3_600;
/// Largest job deadline: a year.
pub const MAX_DEADLINE_SECS: u64 = 365 * 86_400;
/// Largest attempt count per device.
pub const MAX_ATTEMPTS: u32 = 100;
/// Largest publishing rate, devices per second.
pub const MAX_PER_SECOND: u32 = 1_000_000;
/// Longest job name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A job file or request body that cannot be accepted. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// Dotted path of the offending field (`.` for the document itself).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl SpecError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Limits that depend on the deployment.
#[derive(Debug, Clone, Copy)]
pub struct SpecLimits {
    /// Largest serialized job document.
    pub max_document_bytes: usize,
    /// Largest explicit device list.
    pub max_explicit_devices: usize,
}

/// Format of a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    /// JSON.
    Json,
    /// TOML.
    Toml,
}

/// Checks an action's values; errors name fields under `prefix` (`action`, `rollback`).
/// Checks the tag keys of the selector at `at` (`<at>.selector.tags.<key>`).
fn selector_tags(selector: Option<&AttributeFilter>, at: &str) -> Result<(), SpecError> {
    for k in selector.map(|s| s.tags.keys()).into_iter().flatten() {
        validate_id(k).map_err(|p| SpecError::new(format!("{at}.selector.tags.{k}"), p))?;
    }
    Ok(())
}

fn validate_action(action: &Action, prefix: &str) -> Result<(), SpecError> {
    match action {
        Action::FirmwareUpdate(FirmwareUpdate {
            url,
            version,
            sha256,
        }) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(SpecError::new(
                    format!("{prefix}.url"),
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
            if version.trim().is_empty() {
                return Err(SpecError::new(
                    format!("{prefix}.version"),
                    "must not be empty",
                ));
            }
            if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(SpecError::new(
                    format!("{prefix}.sha256"),
                    "must be 64 hexadecimal digits",
                ));
            }
        }
        Action::Configuration(Configuration { document }) => {
            if !document.is_object() {
                return Err(SpecError::new(
                    format!("{prefix}.document"),
                    "must be a JSON object",
                ));
            }
        }
        Action::Reboot(_) => {}
        Action::Command(Command { name, .. }) => {
            if name.trim().is_empty() {
                return Err(SpecError::new(
                    format!("{prefix}.name"),
                    "must not be empty",
                ));
            }
        }
        Action::DataRetrieval(DataRetrieval { metrics }) => {
            if metrics.is_empty() || metrics.len() > MAX_METRICS {
                return Err(SpecError::new(
                    format!("{prefix}.metrics"),
                    format!("must name between 1 and {MAX_METRICS} metrics"),
                ));
            }
            for (i, m) in metrics.iter().enumerate() {
                if m.is_empty()
                    || m.len() > 64
                    || !m
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                {
                    return Err(SpecError::new(
                        format!("{prefix}.metrics[{i}]"),
                        format!("{m:?} must be 1-64 ASCII letters, digits, '_', '.' or '-'"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A JSON or TOML document as a JSON value; a syntax error names its line.
///
/// # Errors
/// The document does not parse.
pub fn document_value(text: &str, format: SpecFormat) -> Result<serde_json::Value, SpecError> {
    Ok(match format {
        SpecFormat::Json => serde_json::from_str(text).map_err(|e| {
            SpecError::new(format!("line {}", e.line()), format!("not valid JSON: {e}"))
        })?,
        SpecFormat::Toml => {
            let table: toml::Table = toml::from_str(text).map_err(|e| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                    .unwrap_or(1);
                SpecError::new(
                    format!("line {line}"),
                    format!("not valid TOML: {}", e.message()),
                )
            })?;
            serde_json::to_value(table)
                .map_err(|e| SpecError::new(".", format!("not representable: {e}")))?
        }
    })
}

impl JobSpec {
    /// Parses and validates a job file.
    ///
    /// # Errors
    /// A [`SpecError`] naming the field: a syntax error, a missing or mistyped field, or a
    /// value that fails validation.
    pub fn parse(text: &str, format: SpecFormat, limits: SpecLimits) -> Result<Self, SpecError> {
        let value = document_value(text, format)?;
        let spec = Self::from_value(&value)?;
        // Strict at the edge (a typo in a rollout setting must not vanish silently), tolerant
        // in storage: the types accept unknown fields, so a spec stored by a newer version
        // still loads; here every key the spec did not take is refused by name.
        let canonical = serde_json::to_value(&spec)
            .map_err(|e| SpecError::new(".", format!("not representable: {e}")))?;
        if let Some(field) = unknown_field(&value, &canonical, "") {
            return Err(SpecError::new(field, "unknown field"));
        }
        spec.validate(limits)?;
        Ok(spec)
    }

    /// Deserializes a spec from a JSON value, naming the exact field on error. Serde buffers
    /// internally tagged enums, which hides the path inside `action`; on an error there, the
    /// action is decoded again as its own variant to find the field.
    fn from_value(value: &serde_json::Value) -> Result<Self, SpecError> {
        fn at<T: serde::de::DeserializeOwned>(
            prefix: &str,
            v: &serde_json::Value,
        ) -> Result<T, SpecError> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let field = match (prefix, path.as_str()) {
                    ("", p) => p.to_owned(),
                    (pre, ".") => pre.to_owned(),
                    (pre, p) => format!("{pre}.{p}"),
                };
                SpecError::new(field, e.into_inner().to_string())
            })
        }
        match at::<JobSpec>("", value) {
            Ok(spec) => Ok(spec),
            Err(err) if err.field == "action" => {
                let action = &value["action"];
                let deeper = match action.get("type").and_then(|t| t.as_str()) {
                    Some("firmware_update") => at::<FirmwareUpdate>("action", action).err(),
                    Some("configuration") => at::<Configuration>("action", action).err(),
                    Some("reboot") => at::<Reboot>("action", action).err(),
                    Some("command") => at::<Command>("action", action).err(),
                    _ => None,
                };
                Err(deeper.unwrap_or(err))
            }
            Err(err) => Err(err),
        }
    }

    /// Checks the values of a spec that parsed.
    ///
    /// # Errors
    /// The first problem found, naming its field.
    pub fn validate(&self, limits: SpecLimits) -> Result<(), SpecError> {
        if self.priority > MAX_PRIORITY {
            return Err(SpecError::new(
                "priority",
                format!("{}: at most {MAX_PRIORITY}", self.priority),
            ));
        }
        let t = &self.target;
        if t.devices.is_empty()
            && t.groups.is_empty()
            && t.filter.is_none()
            && t.query.is_none()
            && t.saved_query.is_none()
            && t.from_job.is_none()
        {
            return Err(SpecError::new(
                "target",
                "name at least one of devices, groups, filter, query, saved_query or from_job",
            ));
        }
        if let Some(q) = &t.query {
            crate::query::Query::parse(q).map_err(|p| SpecError::new("target.query", p))?;
        }
        if let Some(name) = &t.saved_query {
            validate_id(name).map_err(|p| SpecError::new("target.saved_query", p))?;
        }
        if let Some(from) = &t.from_job {
            if from.states.is_empty() {
                return Err(SpecError::new(
                    "target.from_job.states",
                    "name at least one terminal state",
                ));
            }
            if let Some((i, s)) = from
                .states
                .iter()
                .enumerate()
                .find(|(_, s)| !s.is_terminal())
            {
                return Err(SpecError::new(
                    format!("target.from_job.states[{i}]"),
                    format!("{} is not a terminal state", s.as_str()),
                ));
            }
        }
        if t.devices.len() > limits.max_explicit_devices {
            return Err(SpecError::new(
                "target.devices",
                format!(
                    "{} devices listed; at most {} (use groups or a filter)",
                    t.devices.len(),
                    limits.max_explicit_devices
                ),
            ));
        }
        for (i, d) in t.devices.iter().enumerate() {
            validate_id(d).map_err(|p| SpecError::new(format!("target.devices[{i}]"), p))?;
        }
        for (i, g) in t.groups.iter().enumerate() {
            validate_id(g).map_err(|p| SpecError::new(format!("target.groups[{i}]"), p))?;
        }
        validate_action(&self.action, "action")?;
        if let Some(rollback) = &self.rollback {
            validate_action(rollback, "rollback")?;
        }
        let between = |field: &str, v: u64, max: u64| {
            if (1..=max).contains(&v) {
                Ok(())
            } else {
                Err(SpecError::new(
                    field,
                    format!("{v} is not between 1 and {max}"),
                ))
            }
        };
        between(
            "retry.max_attempts",
            u64::from(self.retry.max_attempts),
            u64::from(MAX_ATTEMPTS),
        )?;
        if let Some(t) = self.retry.attempt_timeout_secs {
            between("retry.attempt_timeout_secs", t, MAX_ATTEMPT_TIMEOUT_SECS)?;
        }
        if let Some(d) = self.retry.deadline_secs {
            between("retry.deadline_secs", d, MAX_DEADLINE_SECS)?;
        }
        self.rollout.validate(MAX_PER_SECOND)?;
        if let Some(sc) = &self.schedule {
            let start = match &sc.start_at {
                Some(t) => Some(rfc3339_ms(t).map_err(|p| SpecError::new("schedule.start_at", p))?),
                None => None,
            };
            if let Some(c) = &sc.cron {
                crate::window::check_cron(c).map_err(|p| SpecError::new("schedule.cron", p))?;
            }
            if let Some(z) = &sc.time_zone {
                crate::window::check_zone(z)
                    .map_err(|p| SpecError::new("schedule.time_zone", p))?;
            }
            if let Some(l) = sc.late_after_secs {
                between("schedule.late_after_secs", l, MAX_DEADLINE_SECS)?;
            }
            if let Some(t) = &sc.end_at {
                let end = rfc3339_ms(t).map_err(|p| SpecError::new("schedule.end_at", p))?;
                if start.is_some_and(|s| end <= s) {
                    return Err(SpecError::new(
                        "schedule.end_at",
                        "must be after schedule.start_at",
                    ));
                }
            }
        }
        if self.continuous {
            if !self.rollout.waves.is_empty() {
                return Err(SpecError::new(
                    "rollout.waves",
                    "a continuous job has no waves (its devices arrive over time)",
                ));
            }
            if self.target.from_job.is_some() {
                return Err(SpecError::new(
                    "target.from_job",
                    "a continuous job selects by groups, filter or query",
                ));
            }
        }
        self.maintenance.validate()?;
        for (i, w) in self.maintenance.windows.iter().enumerate() {
            selector_tags(w.selector.as_ref(), &format!("maintenance.windows[{i}]"))?;
        }
        if let Some(h) = &self.health {
            between("health.window_secs", h.window_secs, MAX_HEALTH_WINDOW_SECS)?;
            between(
                "health.probe_every_secs",
                h.probe_every_secs,
                h.window_secs.max(1),
            )?;
        }
        if self.rollout.on_abort == crate::rollout::OnAbort::Rollback && self.rollback.is_none() {
            return Err(SpecError::new(
                "rollout.on_abort",
                "\"rollback\" needs the job's rollback action",
            ));
        }
        for (i, w) in self.rollout.waves.iter().enumerate() {
            selector_tags(w.selector.as_ref(), &format!("rollout.waves[{i}]"))?;
        }
        if self.name.as_ref().is_some_and(|n| n.len() > MAX_NAME_BYTES) {
            return Err(SpecError::new(
                "name",
                format!("at most {MAX_NAME_BYTES} bytes"),
            ));
        }
        for (i, w) in self.notify.webhooks.iter().enumerate() {
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                return Err(SpecError::new(
                    format!("notify.webhooks[{i}].url"),
                    format!("{:?} is not an http(s) URL", w.url),
                ));
            }
        }
        let size = serde_json::to_vec(self).map(|v| v.len()).unwrap_or(0);
        if size > limits.max_document_bytes {
            return Err(SpecError::new(
                ".",
                format!(
                    "job document is {size} bytes; at most {} are accepted",
                    limits.max_document_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SpecLimits = SpecLimits {
        max_document_bytes: 4096,
        max_explicit_devices: 10,
    };

    const GOOD_TOML: &str = r#"
name = "fw 2.1"
[target]
groups = ["eu"]
[action]
type = "firmware_update"
url = "https://fw.example.com/2.1.bin"
version = "2.1.0"
sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
[compatibility]
hardware_revisions = ["A", "B"]
"#;

    fn json_with(extra: &str) -> String {
        format!(r#"{{"target":{{"devices":["d1"]}},"action":{{"type":"reboot"}}{extra}}}"#)
    }

    #[test]
    fn every_number_of_a_spec_has_a_bound_named_in_the_error() {
        for (extra, field) in [
            (
                r#","retry":{"attempt_timeout_secs":18446744073709551615}"#,
                "retry.attempt_timeout_secs",
            ),
            (
                r#","retry":{"attempt_timeout_secs":3601}"#,
                "retry.attempt_timeout_secs",
            ),
            (
                r#","retry":{"deadline_secs":18446744073709551615}"#,
                "retry.deadline_secs",
            ),
            (r#","retry":{"max_attempts":101}"#, "retry.max_attempts"),
            (
                r#","rollout":{"max_per_second":4294967295}"#,
                "rollout.max_per_second",
            ),
        ] {
            let err = JobSpec::parse(&json_with(extra), SpecFormat::Json, LIMITS).expect_err(extra);
            assert_eq!(err.field, field, "{extra}: {err}");
            assert!(err.problem.contains("between"), "{err}");
        }
        let at_bounds = json_with(
            r#","retry":{"attempt_timeout_secs":3600,"deadline_secs":31536000,"max_attempts":100},"rollout":{"max_per_second":1000000}"#,
        );
        JobSpec::parse(&at_bounds, SpecFormat::Json, LIMITS)
            .expect("the bounds themselves are accepted");
    }

    #[test]
    fn unknown_fields_are_refused_naming_them_at_any_depth() {
        for (extra, field) in [
            (r#","rollout":{"max_per_sec":10}"#, "rollout.max_per_sec"),
            (
                r#","rollout":{"waves":[{"count":5,"sucess_threshold":99},{}]}"#,
                "rollout.waves[0].sucess_threshold",
            ),
            (
                r#","rollout":{"abort":[{"failure_type":"FAILED","threshold_percent":5,"min_exec":9}]}"#,
                "rollout.abort[0].min_exec",
            ),
            (r#","retries":{"max_attempts":3}"#, "retries"),
            (
                r#","retry":{"max_attempts":3,"backoff":"fast"}"#,
                "retry.backoff",
            ),
        ] {
            let err = JobSpec::parse(&json_with(extra), SpecFormat::Json, LIMITS).expect_err(extra);
            assert_eq!(err.field, field, "{extra}: {err}");
            assert!(err.problem.contains("unknown field"), "{err}");
        }
        let text = r#"{"target":{"devices":["d1"],"group":["x"]},"action":{"type":"reboot"}}"#;
        let err = JobSpec::parse(text, SpecFormat::Json, LIMITS).expect_err("typo");
        assert_eq!(err.field, "target.group");
        let text = r#"{"target":{"devices":["d1"]},"action":{"type":"reboot","dealy_secs":5}}"#;
        let err = JobSpec::parse(text, SpecFormat::Json, LIMITS).expect_err("typo");
        assert_eq!(err.field, "action.dealy_secs");
        // Free-form documents keep whatever keys they have.
        let text = r#"{"target":{"devices":["d1"]},"action":{"type":"configuration","document":{"any":{"key":1}}}}"#;
        JobSpec::parse(text, SpecFormat::Json, LIMITS).expect("free-form keys are data");
    }

    #[test]
    fn schedules_take_rfc3339_times_and_refuse_bad_ones_by_field() {
        let spec = JobSpec::parse(
            &json_with(r#","schedule":{"start_at":"2026-12-05T02:00:00+01:00","end_at":"2026-12-05T01:30:00Z","end_behavior":"cancel"}"#),
            SpecFormat::Json,
            LIMITS,
        )
        .expect("offsets and Z both parse");
        let s = spec.schedule.expect("schedule");
        assert_eq!(
            s.start_ms(),
            Some(1_796_432_400_000),
            "02:00 at +01:00 is 01:00 UTC"
        );
        assert_eq!(s.end_ms(), Some(1_796_434_200_000));
        assert_eq!(s.end_behavior, EndBehavior::Cancel);
        for (extra, field) in [
            (
                r#","schedule":{"start_at":"tomorrow"}"#,
                "schedule.start_at",
            ),
            (
                r#","schedule":{"start_at":"2026-12-05T02:00:00Z","end_at":"2026-12-05T01:00:00Z"}"#,
                "schedule.end_at",
            ),
            (
                r#","schedule":{"end_behaviour":"stop"}"#,
                "schedule.end_behaviour",
            ),
        ] {
            let err = JobSpec::parse(&json_with(extra), SpecFormat::Json, LIMITS).expect_err(extra);
            assert_eq!(err.field, field, "{extra}: {err}");
        }
    }

    #[test]
    fn a_toml_job_file_parses() {
        let spec = JobSpec::parse(GOOD_TOML, SpecFormat::Toml, LIMITS).expect("valid");
        assert_eq!(spec.target.groups, vec!["eu"]);
        assert_eq!(spec.action.kind(), "firmware_update");
        assert_eq!(spec.retry.max_attempts, 5);
    }

    #[test]
    fn a_bad_checksum_is_refused_naming_the_field() {
        let text = GOOD_TOML.replace(&"a".repeat(64), "xyz");
        let err = JobSpec::parse(&text, SpecFormat::Toml, LIMITS).expect_err("refused");
        assert_eq!(err.field, "action.sha256");
    }

    #[test]
    fn a_mistyped_json_field_is_refused_with_its_path() {
        let text =
            r#"{"target":{"devices":["d1"]},"action":{"type":"reboot","delay_secs":"soon"}}"#;
        let err = JobSpec::parse(text, SpecFormat::Json, LIMITS).expect_err("refused");
        assert_eq!(err.field, "action.delay_secs", "{err}");
    }

    #[test]
    fn an_unknown_action_type_is_refused() {
        let text = r#"{"target":{"devices":["d1"]},"action":{"type":"explode"}}"#;
        let err = JobSpec::parse(text, SpecFormat::Json, LIMITS).expect_err("refused");
        assert!(err.to_string().contains("explode"), "{err}");
    }

    #[test]
    fn a_target_from_an_earlier_job_names_terminal_states() {
        let limits = SpecLimits {
            max_document_bytes: 1 << 20,
            max_explicit_devices: 10,
        };
        let spec = |states: &str| {
            format!(
                "[target]\nfrom_job = {{ job_id = \"0193d3a2-6a4b-7c2d-9e1f-0a1b2c3d4e5f\", states = {states} }}\n[action]\ntype = \"reboot\"\n"
            )
        };
        let ok = JobSpec::parse(
            &spec(r#"["FAILED", "TIMED_OUT"]"#),
            SpecFormat::Toml,
            limits,
        )
        .expect("a rerun target");
        let from = ok.target.from_job.expect("from_job");
        assert_eq!(
            from.states,
            vec![
                crate::state::ExecutionState::Failed,
                crate::state::ExecutionState::TimedOut
            ]
        );
        let e =
            JobSpec::parse(&spec(r#"["QUEUED"]"#), SpecFormat::Toml, limits).expect_err("refused");
        assert_eq!(e.field, "target.from_job.states[0]");
        let e = JobSpec::parse(&spec("[]"), SpecFormat::Toml, limits).expect_err("refused");
        assert_eq!(e.field, "target.from_job.states");
    }

    #[test]
    fn a_job_without_targets_is_refused() {
        let text = r#"{"target":{},"action":{"type":"reboot"}}"#;
        let err = JobSpec::parse(text, SpecFormat::Json, LIMITS).expect_err("refused");
        assert_eq!(err.field, "target");
    }

    #[test]
    fn too_many_explicit_devices_are_refused() {
        let ids: Vec<String> = (0..11).map(|i| format!("\"d{i}\"")).collect();
        let text = format!(
            r#"{{"target":{{"devices":[{}]}},"action":{{"type":"reboot"}}}}"#,
            ids.join(",")
        );
        let err = JobSpec::parse(&text, SpecFormat::Json, LIMITS).expect_err("refused");
        assert_eq!(err.field, "target.devices");
    }

    /// The field a spec is refused for, or `None` when it is accepted.
    fn refused(spec: serde_json::Value) -> Option<String> {
        JobSpec::parse(&spec.to_string(), SpecFormat::Json, LIMITS)
            .err()
            .map(|e| e.field)
    }

    fn with(action: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({"target": {"groups": ["g"]}, "action": action});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        spec
    }

    fn firmware(url: &str, sha256: &str) -> serde_json::Value {
        serde_json::json!({"type": "firmware_update", "url": url, "version": "1", "sha256": sha256})
    }

    fn metrics(names: &[String]) -> serde_json::Value {
        serde_json::json!({"type": "data_retrieval", "metrics": names})
    }

    #[test]
    fn every_limit_accepts_its_boundary_and_refuses_one_past_it_naming_the_field() {
        let hex = "a".repeat(64);
        let none = serde_json::json!({});
        let reboot = serde_json::json!({"type": "reboot"});
        let ten: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
        let eleven: Vec<String> = (0..11).map(|i| format!("d{i}")).collect();
        let names = |n: usize| (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>();
        let cases: Vec<(serde_json::Value, Option<&str>)> = vec![
            (
                serde_json::json!({"target": {"devices": ten}, "action": reboot}),
                None,
            ),
            (
                serde_json::json!({"target": {"devices": eleven}, "action": reboot}),
                Some("target.devices"),
            ),
            (with(firmware("https://x/fw", &hex), none.clone()), None),
            (with(firmware("http://x/fw", &hex), none.clone()), None),
            (
                with(firmware("ftp://x/fw", &hex), none.clone()),
                Some("action.url"),
            ),
            (
                with(firmware("https://x/fw", &hex[1..]), none.clone()),
                Some("action.sha256"),
            ),
            (
                with(firmware("https://x/fw", &"g".repeat(64)), none.clone()),
                Some("action.sha256"),
            ),
            (
                with(
                    serde_json::json!({"type": "configuration", "document": {"a": 1}}),
                    none.clone(),
                ),
                None,
            ),
            (
                with(
                    serde_json::json!({"type": "configuration", "document": [1]}),
                    none.clone(),
                ),
                Some("action.document"),
            ),
            (with(metrics(&names(64)), none.clone()), None),
            (
                with(metrics(&names(65)), none.clone()),
                Some("action.metrics"),
            ),
            (with(metrics(&[]), none.clone()), Some("action.metrics")),
            (
                with(metrics(&["a_b.c-d".into(), "x".repeat(64)]), none.clone()),
                None,
            ),
            (
                with(metrics(&["x".repeat(65)]), none.clone()),
                Some("action.metrics[0]"),
            ),
            (
                with(metrics(&["ok".into(), "a b".into()]), none.clone()),
                Some("action.metrics[1]"),
            ),
            (
                with(metrics(&[String::new()]), none.clone()),
                Some("action.metrics[0]"),
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"retry": {"max_attempts": 1}}),
                ),
                None,
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"retry": {"max_attempts": 100}}),
                ),
                None,
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"retry": {"max_attempts": 0}}),
                ),
                Some("retry.max_attempts"),
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"retry": {"max_attempts": 101}}),
                ),
                Some("retry.max_attempts"),
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"notify": {"webhooks": [{"url": "https://h/x"}, {"url": "http://h/y"}]}}),
                ),
                None,
            ),
            (
                with(
                    reboot.clone(),
                    serde_json::json!({"notify": {"webhooks": [{"url": "https://h/x"}, {"url": "ftp://h/y"}]}}),
                ),
                Some("notify.webhooks[1].url"),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(refused(spec.clone()).as_deref(), want, "{spec}");
        }
    }

    #[test]
    fn a_mistyped_field_inside_an_action_is_named_with_its_path() {
        let hex = "a".repeat(64);
        for (action, field) in [
            (
                serde_json::json!({"type": "firmware_update", "url": "https://x", "version": 2, "sha256": hex}),
                "action.version",
            ),
            (
                serde_json::json!({"type": "command", "name": 7}),
                "action.name",
            ),
        ] {
            let spec = serde_json::json!({"target": {"groups": ["g"]}, "action": action});
            assert_eq!(refused(spec.clone()).as_deref(), Some(field), "{spec}");
        }
        // A configuration without its document names what is missing.
        let spec =
            serde_json::json!({"target": {"groups": ["g"]}, "action": {"type": "configuration"}});
        let err = JobSpec::parse(&spec.to_string(), SpecFormat::Json, LIMITS).expect_err("refused");
        assert_eq!(err.field, "action");
        assert!(err.problem.contains("document"), "{err}");
    }

    #[test]
    fn a_document_of_exactly_the_size_limit_is_accepted() {
        let spec = JobSpec::parse(GOOD_TOML, SpecFormat::Toml, LIMITS).expect("valid");
        let size = serde_json::to_vec(&spec).expect("json").len();
        let limits = |max_document_bytes| SpecLimits {
            max_document_bytes,
            max_explicit_devices: 10,
        };
        assert!(spec.validate(limits(size)).is_ok());
        assert_eq!(
            spec.validate(limits(size - 1)).expect_err("too big").field,
            "."
        );
    }

    #[test]
    fn an_oversized_document_is_refused() {
        let big = "x".repeat(5000);
        let text = format!(
            r#"{{"target":{{"devices":["d1"]}},"action":{{"type":"command","name":"c","args":"{big}"}}}}"#
        );
        let err = JobSpec::parse(&text, SpecFormat::Json, LIMITS).expect_err("refused");
        assert!(err.problem.contains("bytes"), "{err}");
    }
}
