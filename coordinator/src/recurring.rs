//! Recurring jobs: schedules whose every occurrence creates a child job.
//!
//! Owns the schedule records in Redis ([`Names::schedule`], [`Names::schedules`],
//! [`Names::schedule_runs`]), their API operations, and the loop that fires occurrences.
//! Every coordinator runs the loop. An occurrence is fired exactly once across coordinators
//! and restarts because its child job is created with an idempotency key of the schedule
//! and the occurrence (two coordinators firing it get the same job), and only then is the
//! schedule advanced past it (compare-and-set): a coordinator that dies in between leaves
//! the occurrence to the next one, which finds the same job. Occurrences missed while no
//! coordinator ran follow the schedule's `missed` policy ([`shared::window::occurrence`]).
//! It never plans a job: child jobs are ordinary jobs, planned like any other.

use shared::redis_conn::RedisConn;
use std::sync::Arc;

use redis::{AsyncCommands, Script};
use serde::Serialize;
use shared::{
    job::{JobSpec, SpecError, SpecFormat, SpecLimits},
    now_ms,
    store::StoreError,
    topology::Names,
    window::{self, Occurrence},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    app::{AppState, Broker},
    intake::{self, IntakeError, NewJob},
};

/// How often the loop looks at every schedule.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);
/// Child jobs a schedule remembers (the jobs themselves stay as long as jobs do).
const RUNS_KEPT: isize = 1_000;

/// A schedule as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    /// Id.
    pub schedule_id: Uuid,
    /// Name (the spec's).
    pub name: Option<String>,
    /// `ACTIVE` or `PAUSED`.
    pub state: String,
    /// Cron expression.
    pub cron: String,
    /// Zone it is read in.
    pub time_zone: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time (ms).
    pub created_at_ms: u64,
    /// The last occurrence handled (fired or skipped), ms.
    pub last_occurrence_ms: u64,
    /// When the next occurrence is due (ms), while active.
    pub next_occurrence_ms: Option<u64>,
    /// Child jobs, newest first (at most 100 here).
    pub runs: Vec<Run>,
    /// The spec each occurrence runs.
    #[schema(value_type = Object)]
    pub spec: JobSpec,
}

/// One child job.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Run {
    /// The child job.
    pub job_id: Uuid,
    /// The occurrence it was created for (ms).
    pub occurrence_ms: u64,
}

/// A schedule as stored.
#[derive(Debug, Clone)]
struct Record {
    spec: JobSpec,
    active: bool,
    created_by: String,
    created_at_ms: u64,
    done_ms: u64,
    scope: Option<Vec<String>>,
}

impl Record {
    fn schedule(&self) -> &shared::job::Schedule {
        // Only specs with a schedule are stored (create checks it).
        self.spec
            .schedule
            .as_ref()
            .expect("a stored schedule has its schedule part")
    }
    fn cron(&self) -> &str {
        self.schedule().cron.as_deref().unwrap_or_default()
    }
}

/// Creates a schedule from a job spec with `schedule.cron`, validated as a job would be (the
/// caller's scope applies to every occurrence). Occurrences at or before now (or before
/// `schedule.start_at`) do not run.
///
/// # Errors
/// As [`intake::create`]; a spec without `schedule.cron` is refused naming it.
pub async fn create(
    redis: &mut RedisConn,
    names: &Names,
    job: &NewJob<'_>,
    created_by: &str,
) -> Result<Uuid, IntakeError> {
    let spec = intake::validate(redis, names, job).await?;
    let Some(sched) = spec.schedule.as_ref().filter(|s| s.cron.is_some()) else {
        return Err(SpecError {
            field: "schedule.cron".into(),
            problem: "a schedule needs a cron expression (e.g. \"0 2 * * *\")".into(),
        }
        .into());
    };
    let now = now_ms();
    let start = sched.start_ms().unwrap_or(0).saturating_sub(1);
    let id = Uuid::now_v7();
    let spec_json = serde_json::to_string(&spec).map_err(|e| SpecError {
        field: ".".into(),
        problem: e.to_string(),
    })?;
    let scope = job
        .scope
        .map(|g| serde_json::to_string(g).unwrap_or_default())
        .unwrap_or_default();
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset_multiple(
            names.schedule(id),
            &[
                ("spec", spec_json),
                ("state", "ACTIVE".to_owned()),
                ("created_by", created_by.to_owned()),
                ("created_at_ms", now.to_string()),
                ("done_ms", now.max(start).to_string()),
                ("scope", scope),
            ],
        )
        .ignore()
        .zadd(names.schedules(), id.to_string(), now)
        .ignore();
    let () = pipe.query_async(redis).await?;
    tracing::info!(schedule_id = %id, cron = sched.cron.as_deref().unwrap_or_default(), "schedule created");
    Ok(id)
}

async fn load(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<Record>, StoreError> {
    let key = names.schedule(id);
    let f: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&key)
        .arg(&[
            "spec",
            "state",
            "created_by",
            "created_at_ms",
            "done_ms",
            "scope",
        ])
        .query_async(redis)
        .await?;
    let Some(spec) = f[0].as_deref() else {
        return Ok(None);
    };
    let spec: JobSpec = serde_json::from_str(spec).map_err(|e| StoreError::Corrupt {
        key: key.clone(),
        problem: e.to_string(),
    })?;
    if spec
        .schedule
        .as_ref()
        .and_then(|s| s.cron.as_ref())
        .is_none()
    {
        return Err(StoreError::Corrupt {
            key,
            problem: "spec without schedule.cron".into(),
        });
    }
    let num = |i: usize| f[i].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Some(Record {
        spec,
        active: f[1].as_deref() != Some("PAUSED"),
        created_by: f[2].clone().unwrap_or_default(),
        created_at_ms: num(3),
        done_ms: num(4),
        scope: f[5]
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| serde_json::from_str(s).ok()),
    }))
}

/// One schedule with its newest runs.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn get(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<ScheduleView>, StoreError> {
    let Some(r) = load(redis, names, id).await? else {
        return Ok(None);
    };
    let runs: Vec<(String, f64)> = redis
        .zrevrange_withscores(names.schedule_runs(id), 0, 99)
        .await?;
    let sched = r.schedule();
    let next = r
        .active
        .then(|| window::next_occurrence(r.cron(), sched.zone(), r.done_ms.max(now_ms())))
        .flatten()
        .filter(|n| sched.end_ms().is_none_or(|end| *n <= end));
    Ok(Some(ScheduleView {
        schedule_id: id,
        name: r.spec.name.clone(),
        state: if r.active { "ACTIVE" } else { "PAUSED" }.into(),
        cron: r.cron().to_owned(),
        time_zone: sched.zone().to_owned(),
        created_by: r.created_by.clone(),
        created_at_ms: r.created_at_ms,
        last_occurrence_ms: r.done_ms,
        next_occurrence_ms: next,
        runs: runs
            .into_iter()
            .filter_map(|(j, at)| {
                Some(Run {
                    job_id: j.parse().ok()?,
                    occurrence_ms: at as u64,
                })
            })
            .collect(),
        spec: r.spec,
    }))
}

/// Every schedule, oldest first.
///
/// # Errors
/// Redis errors.
pub async fn list(redis: &mut RedisConn, names: &Names) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<String> = redis.zrange(names.schedules(), 0, -1).await?;
    Ok(ids.iter().filter_map(|i| i.parse().ok()).collect())
}

/// Pauses (no occurrence fires) or resumes a schedule; a resumed schedule goes on from now
/// (occurrences during the pause do not run). Returns `false` if there is no such schedule.
///
/// # Errors
/// Redis errors.
pub async fn set_active(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
    active: bool,
) -> Result<bool, StoreError> {
    let key = names.schedule(id);
    if !redis.exists::<_, bool>(&key).await? {
        return Ok(false);
    }
    let mut pipe = redis::pipe();
    pipe.hset(&key, "state", if active { "ACTIVE" } else { "PAUSED" })
        .ignore();
    if active {
        // Nothing missed during the pause runs.
        pipe.hset(&key, "done_ms", now_ms()).ignore();
    }
    let () = pipe.query_async(redis).await?;
    Ok(true)
}

/// Deletes a schedule (its child jobs stay). Returns `false` if there was none.
///
/// # Errors
/// Redis errors.
pub async fn delete(redis: &mut RedisConn, names: &Names, id: Uuid) -> Result<bool, StoreError> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .del(names.schedule(id))
        .zrem(names.schedules(), id.to_string())
        .del(names.schedule_runs(id));
    let (deleted, _, _): (u64, u64, u64) = pipe.query_async(redis).await?;
    Ok(deleted > 0)
}

/// The spec's scope check for a caller: `Err(message)` if the schedule's targets leave it.
///
/// # Errors
/// Redis errors.
pub async fn check_scope(
    redis: &mut RedisConn,
    names: &Names,
    view: &ScheduleView,
    scope: Option<&[String]>,
) -> Result<Result<(), String>, StoreError> {
    crate::access::scope::check(redis, names, &view.spec.target, scope).await
}

/// Moves `done_ms` from `from` to `to`, unless another coordinator moved it first.
const ADVANCE: &str = r"
if redis.call('HGET', KEYS[1], 'done_ms') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'done_ms', ARGV[2])
return 1
";

/// Fires due occurrences until `stop` fires.
pub async fn run(app: Arc<AppState>, broker: Broker, stop: CancellationToken) {
    loop {
        let mut redis = app.redis.clone();
        match list(&mut redis, &app.names).await {
            Ok(ids) => {
                for id in ids {
                    if stop.is_cancelled() {
                        return;
                    }
                    if let Err(e) = tick(&app, &broker, &mut redis, id).await {
                        tracing::warn!(schedule_id = %id, error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "schedule not looked at");
                    }
                }
            }
            Err(e) => tracing::warn!(error.message = %e, "schedules not listed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn tick(
    app: &AppState,
    broker: &Broker,
    redis: &mut RedisConn,
    id: Uuid,
) -> anyhow::Result<()> {
    let Some(r) = load(redis, &app.names, id).await? else {
        return Ok(());
    };
    if !r.active {
        return Ok(());
    }
    let sched = r.schedule();
    let now = now_ms();
    let step = window::occurrence(
        r.cron(),
        sched.zone(),
        r.done_ms,
        now,
        sched.late_after_ms(),
        sched.missed,
    );
    let at = match step {
        None | Some(Occurrence::Wait) => return Ok(()),
        Some(Occurrence::Skip(at)) => {
            tracing::warn!(schedule_id = %id, occurrence_ms = at, "occurrence missed while no coordinator ran; skipped (schedule.missed = skip)");
            at
        }
        Some(Occurrence::Fire(at)) if sched.end_ms().is_some_and(|end| at > end) => {
            tracing::debug!(schedule_id = %id, occurrence_ms = at, "occurrence after schedule.end_at; not run");
            at
        }
        Some(Occurrence::Fire(at)) => {
            fire_occurrence(app, broker, redis, id, &r, at).await?;
            at
        }
    };
    let _: i64 = Script::new(ADVANCE)
        .key(app.names.schedule(id))
        .arg(r.done_ms)
        .arg(at)
        .invoke_async(redis)
        .await?;
    Ok(())
}

/// Creates the child job of occurrence `at` (or finds the one an earlier attempt created).
async fn fire_occurrence(
    app: &AppState,
    broker: &Broker,
    redis: &mut RedisConn,
    id: Uuid,
    r: &Record,
    at: u64,
) -> anyhow::Result<()> {
    let mut spec = r.spec.clone();
    spec.schedule = None;
    let when = window::rfc3339(at);
    spec.name = Some(format!(
        "{} @ {when}",
        r.spec.name.as_deref().unwrap_or("schedule")
    ));
    let text = serde_json::to_string(&spec)?;
    let key = format!("occurrence-{at}");
    let caller = format!("schedule:{id}");
    let c = &app.settings.coordinator;
    let created = intake::create(
        redis,
        &app.names,
        NewJob {
            text: &text,
            format: SpecFormat::Json,
            limits: SpecLimits {
                max_document_bytes: c.max_document_bytes,
                max_explicit_devices: c.max_explicit_devices,
            },
            can_sign_webhooks: c.webhook_secret.is_some(),
            scope: r.scope.as_deref(),
            trace: None,
            outbound: &app.outbound,
            signer: app.signer.as_ref(),
            idempotency: Some(intake::Idempotency {
                key: &key,
                caller: &caller,
            }),
            created_by: &caller,
        },
    )
    .await;
    let job_id = match created {
        Ok(intake::Creation::New(job_id, spec)) => {
            let state = intake::initial_state(&spec, now_ms());
            app.notifier
                .job_state(job_id, state, serde_json::json!({"schedule_id": id}));
            crate::app::spawn_planner(broker, job_id);
            tracing::info!(schedule_id = %id, %job_id, occurrence_ms = at, late_ms = now_ms().saturating_sub(at), "occurrence fired");
            job_id
        }
        Ok(intake::Creation::Existing(job_id)) => job_id,
        Err(IntakeError::Store(e)) => return Err(e.into()),
        Err(e) => {
            // The devices or groups are gone, or the scope no longer allows them: this
            // occurrence cannot run; the next ones are tried again.
            tracing::error!(schedule_id = %id, occurrence_ms = at, error.message = %e, "occurrence not run");
            return Ok(());
        }
    };
    let mut pipe = redis::pipe();
    pipe.zadd(app.names.schedule_runs(id), job_id.to_string(), at)
        .ignore()
        .zremrangebyrank(app.names.schedule_runs(id), 0, -(RUNS_KEPT + 1))
        .ignore();
    let () = pipe.query_async(redis).await?;
    Ok(())
}
