//! Accepting jobs.
//!
//! Owns job creation: parse and validate the spec (the error names the field), check that
//! explicit devices and groups exist, assign a UUID v7, store the job document once in Redis
//! (tasks reference it by id), mark the job active and hand it to a planner. It never
//! publishes tasks itself.

use redis::aio::ConnectionManager;
use serde::Serialize;
use shared::{
    job::{JobSpec, SpecError, SpecFormat, SpecLimits},
    now_ms,
    state::JobState,
    store::StoreError,
    topology::Names,
};
use uuid::Uuid;

/// Why a job was not created.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The spec is invalid.
    #[error("invalid job: {0}")]
    Invalid(#[from] SpecError),
    /// The targets leave the caller's group scope (the message names what is outside).
    #[error("{0}")]
    OutOfScope(String),
    /// Redis failed.
    #[error("cannot store the job")]
    Store(#[from] StoreError),
}

impl From<redis::RedisError> for IntakeError {
    fn from(e: redis::RedisError) -> Self {
        IntakeError::Store(StoreError::Redis(e))
    }
}

/// A created job.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// Its id.
    pub job_id: Uuid,
}

/// A job as submitted.
#[derive(Debug)]
pub struct NewJob<'a> {
    /// The spec's text.
    pub text: &'a str,
    /// Its format.
    pub format: SpecFormat,
    /// Size limits.
    pub limits: SpecLimits,
    /// Whether this deployment can sign webhooks (jobs naming webhooks need it).
    pub can_sign_webhooks: bool,
    /// The groups the caller is confined to, if any.
    pub scope: Option<&'a [String]>,
    /// The W3C traceparent of the request, so planning joins its trace.
    pub trace: Option<String>,
    /// Where the job's webhooks may go.
    pub outbound: &'a crate::outbound::Policy,
    /// Signs the job's document, when the deployment signs documents.
    pub signer: Option<&'a shared::signing::Signer25519>,
}

/// Validates and stores a job. The caller starts its planner.
///
/// # Errors
/// An invalid spec (naming the field), targets outside `scope`, unknown devices or groups,
/// or Redis errors.
pub async fn create(
    redis: &mut ConnectionManager,
    names: &Names,
    job: NewJob<'_>,
) -> Result<(Uuid, JobSpec), IntakeError> {
    let spec = JobSpec::parse(job.text, job.format, job.limits)?;
    if let Err(m) = crate::access::scope::check(redis, names, &spec.target, job.scope).await? {
        return Err(IntakeError::OutOfScope(m));
    }
    let trace = job.trace;
    if !spec.notify.webhooks.is_empty() && !job.can_sign_webhooks {
        return Err(SpecError {
            field: "notify.webhooks".into(),
            problem: "this deployment has no coordinator.webhook_secret to sign webhooks with"
                .into(),
        }
        .into());
    }
    for (i, w) in spec.notify.webhooks.iter().enumerate() {
        job.outbound
            .check(&w.url)
            .await
            .map_err(|problem| SpecError {
                field: format!("notify.webhooks[{i}].url"),
                problem,
            })?;
    }
    check_targets_exist(redis, names, &spec).await?;
    let id = Uuid::now_v7();
    let now = now_ms();
    let spec_json = serde_json::to_string(&spec).map_err(|e| SpecError {
        field: ".".into(),
        problem: e.to_string(),
    })?;
    // Signed once, here: every request to a device carries these bytes and this signature.
    let signed = job
        .signer
        .map(|k| serde_json::to_string(&k.sign(id, &spec.action)).unwrap_or_default())
        .unwrap_or_default();
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset_multiple(
            names.job(id),
            &[
                ("spec", spec_json),
                ("name", spec.name.clone().unwrap_or_default()),
                ("state", JobState::InProgress.as_str().to_owned()),
                ("created_at_ms", now.to_string()),
                ("updated_at_ms", now.to_string()),
                ("planned", "0".to_owned()),
                ("planning_done", "0".to_owned()),
                ("trace", trace.unwrap_or_default()),
                ("signed", signed),
            ],
        )
        .ignore()
        .zadd(names.jobs(), id.to_string(), now)
        .ignore()
        .sadd(names.active_jobs(), id.to_string())
        .ignore();
    let () = pipe.query_async(redis).await?;
    tracing::info!(job_id = %id, action = spec.action.kind(), "job created");
    Ok((id, spec))
}

async fn check_targets_exist(
    redis: &mut ConnectionManager,
    names: &Names,
    spec: &JobSpec,
) -> Result<(), IntakeError> {
    if !spec.target.devices.is_empty() {
        let mut pipe = redis::pipe();
        for d in &spec.target.devices {
            pipe.exists(names.device(d));
        }
        let exists: Vec<bool> = pipe.query_async(redis).await?;
        let unknown: Vec<&str> = spec
            .target
            .devices
            .iter()
            .zip(exists)
            .filter(|(_, e)| !e)
            .map(|(d, _)| d.as_str())
            .collect();
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().take(10).copied().collect();
            return Err(SpecError {
                field: "target.devices".into(),
                problem: format!(
                    "{} unknown device(s): {}{}",
                    unknown.len(),
                    shown.join(", "),
                    if unknown.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            }
            .into());
        }
    }
    if !spec.target.groups.is_empty() {
        let mut pipe = redis::pipe();
        for g in &spec.target.groups {
            pipe.exists(names.group(g));
        }
        let exists: Vec<bool> = pipe.query_async(redis).await?;
        if let Some((i, g)) = spec
            .target
            .groups
            .iter()
            .enumerate()
            .zip(exists)
            .find(|(_, e)| !e)
            .map(|(x, _)| x)
        {
            return Err(SpecError {
                field: format!("target.groups[{i}]"),
                problem: format!("no device is in group {g:?}"),
            }
            .into());
        }
    }
    Ok(())
}
