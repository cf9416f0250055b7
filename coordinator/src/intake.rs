//! Accepting jobs.
//!
//! Owns job creation: parse and validate the spec (the error names the field), check that
//! explicit devices and groups exist, assign a UUID v7, store the job document once in Redis
//! (tasks reference it by id), mark the job active and hand it to a planner. A create that
//! carries an idempotency key already used by the same caller returns the first job instead
//! of starting a second rollout; the check and the store are one atomic script. It never
//! publishes tasks itself.

use serde::Serialize;
use sha2::{Digest, Sha256};
use shared::redis_conn::RedisConn;
use shared::{
    job::{FromJob, JobSpec, SpecError, SpecFormat, SpecLimits},
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
    /// The idempotency key was used before, by the same caller, for another spec.
    #[error("Idempotency-Key was used for another job spec (job {0}); use a new key")]
    KeyReused(Uuid),
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
    /// The caller's idempotency key and who the caller is, if the create carries one.
    pub idempotency: Option<Idempotency<'a>>,
    /// Who creates the job (a token's subject, `schedule:{id}`, `job:{id}`), as the job
    /// shows it.
    pub created_by: &'a str,
}

/// An idempotency key as a caller sent it.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    /// The key (`Idempotency-Key`).
    pub key: &'a str,
    /// Who sent it: keys of different callers never collide.
    pub caller: &'a str,
}

/// How long a create's idempotency key is remembered.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

/// What a create did.
#[derive(Debug)]
pub enum Creation {
    /// A new job.
    New(Uuid, Box<JobSpec>),
    /// The job an earlier create with the same idempotency key made.
    Existing(Uuid),
}

/// A job made from an earlier one, for its devices that ended in some states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// The same action again.
    Rerun,
    /// The earlier job's `rollback` action.
    Rollback,
}

/// The spec of a follow-up of `earlier` for its devices that ended in `states` (default:
/// FAILED and TIMED_OUT for a rerun; SUCCEEDED and FAILED, the devices that may have
/// changed, for a rollback). A rerun keeps the earlier job's settings, rollout included, and
/// starts now (no schedule); a rollback sends the `rollback` action to every chosen device at
/// the earlier job's rate, without waves, abort criteria, a schedule or a rollback of its own.
///
/// # Errors
/// The earlier job has no rollback action (field `rollback`).
pub fn follow_up_spec(
    earlier: &shared::store::JobRecord,
    kind: FollowUp,
    states: Vec<shared::state::ExecutionState>,
    name: Option<String>,
) -> Result<JobSpec, SpecError> {
    use shared::state::ExecutionState;
    let (word, default_states) = match kind {
        FollowUp::Rerun => ("rerun", [ExecutionState::Failed, ExecutionState::TimedOut]),
        FollowUp::Rollback => (
            "rollback",
            [ExecutionState::Succeeded, ExecutionState::Failed],
        ),
    };
    let states = if states.is_empty() {
        default_states.to_vec()
    } else {
        states
    };
    let id = earlier.id;
    let mut spec = earlier.spec.clone();
    if kind == FollowUp::Rollback {
        spec.action = spec.rollback.take().ok_or_else(|| SpecError {
            field: "rollback".into(),
            problem: format!("job {id} has no rollback action"),
        })?;
        spec.rollout = shared::rollout::Rollout {
            max_per_second: spec.rollout.max_per_second,
            ramp: spec.rollout.ramp.take(),
            ..Default::default()
        };
    }
    // A follow-up starts now: the earlier job's start and end times are over or moot.
    spec.schedule = None;
    spec.name = Some(name.unwrap_or_else(|| {
        format!(
            "{word} of {}",
            spec.name.as_deref().unwrap_or(&id.to_string())
        )
    }));
    spec.target = shared::job::TargetSpec {
        from_job: Some(shared::job::FromJob { job_id: id, states }),
        ..Default::default()
    };
    Ok(spec)
}

/// The state a new job starts in: SCHEDULED until its `schedule.start_at`, else IN_PROGRESS.
pub fn initial_state(spec: &JobSpec, now_ms: u64) -> JobState {
    match spec
        .schedule
        .as_ref()
        .and_then(shared::job::Schedule::start_ms)
    {
        Some(start) if start > now_ms => JobState::Scheduled,
        _ => JobState::InProgress,
    }
}

/// Checks an `Idempotency-Key` value: 1 to 255 visible ASCII characters.
///
/// # Errors
/// The problem, for a 400 naming the header.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be 1 to 255 visible ASCII characters".into());
    }
    Ok(())
}

/// Stores a job (and its idempotency key) unless the key already names one: returns that
/// job's record (`id\nspec digest`) then, nothing written.
const STORE_JOB: &str = r"
if #KEYS == 4 then
  local prior = redis.call('GET', KEYS[4])
  if prior then return prior end
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
if #KEYS == 4 then redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[3]) end
return ''
";

/// Everything a create checks before it stores anything (a dry run stops here): the spec
/// parses and validates, its targets stay inside the caller's groups and exist, and its
/// webhooks can be signed and may be called.
///
/// # Errors
/// As [`create`].
pub async fn validate(
    redis: &mut RedisConn,
    names: &Names,
    job: &NewJob<'_>,
) -> Result<JobSpec, IntakeError> {
    let mut spec = JobSpec::parse(job.text, job.format, job.limits)?;
    if let Some(name) = &spec.target.saved_query {
        let saved: Option<String> =
            redis::AsyncCommands::hget(redis, names.saved_queries(), name).await?;
        let saved = saved.ok_or_else(|| SpecError {
            field: "target.saved_query".into(),
            problem: format!("no saved query {name:?} (fleetbatch query list)"),
        })?;
        spec.target.query = Some(match spec.target.query.take() {
            Some(own) => format!("{own} and {saved}"),
            None => saved,
        });
    }
    if let Err(m) = crate::access::scope::check(redis, names, &spec.target, job.scope).await? {
        return Err(IntakeError::OutOfScope(m));
    }
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
    Ok(spec)
}

/// Validates and stores a job. The caller starts its planner.
///
/// # Errors
/// An invalid spec (naming the field), targets outside `scope`, unknown devices or groups,
/// or Redis errors.
pub async fn create(
    redis: &mut RedisConn,
    names: &Names,
    job: NewJob<'_>,
) -> Result<Creation, IntakeError> {
    let digest = hex::encode(Sha256::digest(job.text.as_bytes()));
    let key = job.idempotency.map(|i| {
        names.create_key(&hex::encode(Sha256::digest(format!(
            "{}\n{}",
            i.caller, i.key
        ))))
    });
    // A repeated create answers with its first job at once, whatever changed since.
    if let Some(key) = &key {
        let prior: Option<String> = redis::AsyncCommands::get(redis, key).await?;
        if let Some(prior) = prior {
            return replayed(&prior, &digest);
        }
    }
    let spec = validate(redis, names, &job).await?;
    if spec.schedule.as_ref().is_some_and(|s| s.cron.is_some()) {
        return Err(SpecError {
            field: "schedule.cron".into(),
            problem: "a recurring job is created as a schedule: POST /v1/schedules \
                      (`fleetbatch schedule create`)"
                .into(),
        }
        .into());
    }
    let trace = job.trace;
    let id = Uuid::now_v7();
    if let Some(from) = &spec.target.from_job {
        snapshot_targets(redis, names, from, &names.job_targets(id)).await?;
    }
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
    let fields = [
        ("spec", spec_json),
        ("name", spec.name.clone().unwrap_or_default()),
        ("state", initial_state(&spec, now).as_str().to_owned()),
        ("created_at_ms", now.to_string()),
        ("created_by", job.created_by.to_owned()),
        ("updated_at_ms", now.to_string()),
        ("planned", "0".to_owned()),
        ("planning_done", "0".to_owned()),
        ("trace", trace.unwrap_or_default()),
        ("signed", signed),
        // A device that succeeds runs this version from then on (its registry record says
        // so: `firmware_version < 2.1.0` selects exactly the devices not yet updated).
        (
            "sets_firmware",
            match &spec.action {
                shared::job::Action::FirmwareUpdate(f) => f.version.clone(),
                _ => String::new(),
            },
        ),
    ];
    let script = redis::Script::new(STORE_JOB);
    let mut call = script.prepare_invoke();
    call.key(names.job(id))
        .key(names.jobs())
        .key(names.active_jobs());
    // The key's record: the job it made and a digest of the spec it was made from.
    if let Some(key) = &key {
        call.key(key);
    }
    call.arg(id.to_string())
        .arg(now)
        .arg(IDEMPOTENCY_TTL_SECS)
        .arg(format!("{id}\n{digest}"));
    for (k, v) in &fields {
        call.arg(*k).arg(v);
    }
    let stored: Result<String, redis::RedisError> = call.invoke_async(redis).await;
    let prior = match stored {
        Ok(prior) if prior.is_empty() => prior,
        // Another create with the same key won the race, or the store failed: this job's
        // snapshot of targets has no job.
        other => {
            if spec.target.from_job.is_some() {
                let _: Result<(), _> =
                    redis::AsyncCommands::del(redis, names.job_targets(id)).await;
            }
            other?
        }
    };
    if !prior.is_empty() {
        return replayed(&prior, &digest);
    }
    tracing::info!(job_id = %id, action = spec.action.kind(), "job created");
    Ok(Creation::New(id, Box::new(spec)))
}

/// The answer to a create whose idempotency key names `record` (`id\nspec digest`).
fn replayed(record: &str, digest: &str) -> Result<Creation, IntakeError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        key: "idempotency key".into(),
        problem,
    };
    let (first, first_digest) = record
        .split_once('\n')
        .ok_or_else(|| corrupt(format!("{record:?} is not id and digest")))?;
    let first = Uuid::parse_str(first).map_err(|e| corrupt(e.to_string()))?;
    if first_digest != digest {
        return Err(IntakeError::KeyReused(first));
    }
    tracing::info!(job_id = %first, "create repeated with its idempotency key: the first job stands");
    Ok(Creation::Existing(first))
}

/// Copies the devices of `from`'s job that ended in its states into the sorted set `into`
/// (read in id order by the planner), a batch at a time, whatever their number. Refuses
/// (naming the field) when there are none.
///
/// # Errors
/// No device of the earlier job is in those states, or Redis errors.
pub async fn snapshot_targets(
    redis: &mut RedisConn,
    names: &Names,
    from: &FromJob,
    into: &str,
) -> Result<u64, IntakeError> {
    let mut copied = 0u64;
    for state in &from.states {
        let set = names.job_state_set(from.job_id, *state);
        let mut cursor = 0u64;
        loop {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(&set)
                .arg(cursor)
                .arg("COUNT")
                .arg(SNAPSHOT_BATCH)
                .query_async(redis)
                .await?;
            if !ids.is_empty() {
                let members: Vec<(u8, &String)> = ids.iter().map(|d| (0, d)).collect();
                let added: u64 = redis::AsyncCommands::zadd_multiple(redis, into, &members).await?;
                copied += added;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    if copied == 0 {
        let states: Vec<&str> = from.states.iter().map(|s| s.as_str()).collect();
        return Err(SpecError {
            field: "target.from_job.states".into(),
            problem: format!(
                "no device of job {} ended {}",
                from.job_id,
                states.join(" or ")
            ),
        }
        .into());
    }
    Ok(copied)
}

/// Device ids copied per step of a snapshot.
const SNAPSHOT_BATCH: usize = 1000;

async fn check_targets_exist(
    redis: &mut RedisConn,
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
    if let Some(from) = &spec.target.from_job {
        let exists: bool = redis::AsyncCommands::exists(redis, names.job(from.job_id)).await?;
        if !exists {
            return Err(SpecError {
                field: "target.from_job.job_id".into(),
                problem: format!("no job {}", from.job_id),
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

#[cfg(test)]
mod tests {
    use super::*;
    use shared::state::ExecutionState;

    fn earlier(spec: serde_json::Value) -> shared::store::JobRecord {
        shared::store::JobRecord {
            id: Uuid::from_u128(7),
            spec: serde_json::from_value(spec).expect("spec"),
            state: JobState::Aborted,
            created_at_ms: 0,
            created_by: String::new(),
            finished_at_ms: None,
            planned: 0,
            planning_done: true,
            counts: Default::default(),
            signed: None,
            state_reason: None,
            rollout: Default::default(),
        }
    }

    #[test]
    fn follow_ups_start_now_and_a_rollback_drops_waves_criteria_and_its_own_rollback() {
        let job = earlier(serde_json::json!({
            "name": "fw",
            "target": {"groups": ["g"]},
            "action": {"type": "reboot"},
            "rollback": {"type": "command", "name": "undo"},
            "schedule": {"end_at": "2026-01-01T00:00:00Z"},
            "rollout": {
                "max_per_second": 50,
                "waves": [{"count": 5}, {}],
                "abort": [{"failure_type": "ANY", "threshold_percent": 5, "min_executed": 1}],
                "on_abort": "rollback"
            }
        }));
        let rerun = follow_up_spec(&job, FollowUp::Rerun, Vec::new(), None).expect("rerun");
        assert_eq!(rerun.schedule, None, "a rerun starts now");
        assert_eq!(rerun.rollout, job.spec.rollout, "a rerun keeps its rollout");
        assert_eq!(rerun.name.as_deref(), Some("rerun of fw"));
        let from = rerun.target.from_job.expect("from job");
        assert_eq!(from.job_id, job.id);
        assert_eq!(
            from.states,
            vec![ExecutionState::Failed, ExecutionState::TimedOut]
        );

        let back = follow_up_spec(&job, FollowUp::Rollback, Vec::new(), None).expect("rollback");
        assert_eq!(back.action, job.spec.rollback.clone().expect("rollback"));
        assert_eq!(back.rollback, None);
        assert_eq!(back.schedule, None);
        assert!(back.rollout.waves.is_empty() && back.rollout.abort.is_empty());
        assert_eq!(back.rollout.on_abort, shared::rollout::OnAbort::Nothing);
        assert_eq!(back.rollout.max_per_second, Some(50));
        // The rollback job's spec is valid on its own.
        back.validate(SpecLimits {
            max_document_bytes: 65_536,
            max_explicit_devices: 10,
        })
        .expect("valid");

        let none = earlier(serde_json::json!({
            "target": {"groups": ["g"]}, "action": {"type": "reboot"}
        }));
        let err = follow_up_spec(&none, FollowUp::Rollback, Vec::new(), None).expect_err("none");
        assert_eq!(err.field, "rollback");
    }
}
