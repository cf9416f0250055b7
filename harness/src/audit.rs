//! Checking a job against the guarantees, from what Redis holds.
//!
//! Owns the arithmetic the chaos command and the tests judge a run by: one terminal status per
//! targeted device, counters equal to those statuses and summing to the target count, no
//! duplicate applications, and how many deliveries were extra (made by attempts whose record
//! was lost, i.e. by a worker that died mid-delivery). Reads only; streams the status hash
//! with HSCAN, so it works for a million devices.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;
use serde::Serialize;
use shared::{
    state::{DeviceStatus, ExecutionState},
    store::{self, StoreError},
    topology::Names,
};
use uuid::Uuid;

/// The verdict on one job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Devices the job targeted.
    pub targeted: u64,
    /// Devices with a status.
    pub with_status: u64,
    /// Devices whose status is not terminal.
    pub not_terminal: u64,
    /// Targeted devices without a terminal status: lost.
    pub lost: u64,
    /// The job's counters.
    pub counters: BTreeMap<String, u64>,
    /// Counts of the per-device terminal states.
    pub statuses: BTreeMap<String, u64>,
    /// Counters equal the per-device states and sum to the target count.
    pub counters_exact: bool,
    /// Delivery attempts recorded in the statuses.
    pub recorded_attempts: u64,
    /// Deliveries the simulated devices saw.
    pub deliveries: u64,
    /// Applications the simulated devices made.
    pub applications: u64,
    /// Devices that applied the job more than once.
    pub duplicate_applications: u64,
    /// Deliveries to a device that had already applied the execution.
    pub redundant_deliveries: u64,
    /// Deliveries beyond the recorded attempts, summed per execution: deliveries made by
    /// attempts whose record was lost (a worker that died mid-delivery). Retries after a
    /// timeout are recorded attempts and do not count here, even when the device had
    /// already applied the job and only its answer was lost.
    pub extra_deliveries: u64,
    /// Up to 20 executions with extra deliveries: device, recorded attempts, and the
    /// simulator's delivery log (`worker/attempt;...`, with `simulator.record_deliveries`).
    pub extra_examples: Vec<(String, u64, String)>,
}

/// Audits a job.
///
/// # Errors
/// Redis errors, or no such job.
pub async fn audit(
    redis: &mut RedisConn,
    names: &Names,
    job_id: Uuid,
) -> Result<Audit, StoreError> {
    audit_against(redis, names, job_id, None).await
}

/// [`audit`] with the deliveries each device received as the devices themselves counted
/// them (`received`, by device id: fleet-sim's `/deliveries/{job}`) instead of the built-in
/// simulator's record.
///
/// # Errors
/// Redis errors, or no such job.
pub async fn audit_against(
    redis: &mut RedisConn,
    names: &Names,
    job_id: Uuid,
    received: Option<&HashMap<String, u64>>,
) -> Result<Audit, StoreError> {
    let Some(job) = store::load_job(redis, names, job_id).await? else {
        return Err(StoreError::Corrupt {
            key: names.job(job_id),
            problem: "no such job".into(),
        });
    };
    let mut a = Audit {
        targeted: job.planned,
        ..Audit::default()
    };
    let mut cursor: u64 = 0;
    loop {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(names.job_status(job_id))
            .arg(cursor)
            .arg("COUNT")
            .arg(2000)
            .query_async(redis)
            .await?;
        let mut devices = Vec::with_capacity(flat.len() / 2);
        let mut executions = Vec::with_capacity(flat.len() / 2);
        let mut attempts = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            let Ok(status) = serde_json::from_str::<DeviceStatus>(&pair[1]) else {
                continue;
            };
            executions.push(shared::state::execution_id(job_id, &pair[0]).to_string());
            devices.push(pair[0].clone());
            attempts.push(u64::from(status.attempts));
            a.with_status += 1;
            a.recorded_attempts += u64::from(status.attempts);
            if status.state.is_terminal() {
                *a.statuses
                    .entry(status.state.counter().to_owned())
                    .or_default() += 1;
            } else {
                a.not_terminal += 1;
            }
        }
        if !executions.is_empty() {
            let seen: Vec<Option<u64>> = match received {
                Some(r) => devices.iter().map(|d| r.get(d).copied()).collect(),
                None => {
                    redis::cmd("HMGET")
                        .arg(names.sim_deliveries(job_id))
                        .arg(&executions)
                        .query_async(redis)
                        .await?
                }
            };
            for (i, (seen, recorded)) in seen.iter().zip(&attempts).enumerate() {
                let extra = seen.unwrap_or(0).saturating_sub(*recorded);
                a.extra_deliveries += extra;
                if extra > 0 && a.extra_examples.len() < 20 {
                    let log: Option<String> =
                        redis.hget(names.sim_log(job_id), &executions[i]).await?;
                    a.extra_examples
                        .push((devices[i].clone(), *recorded, log.unwrap_or_default()));
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    for state in ExecutionState::TERMINAL {
        a.counters
            .insert(state.counter().to_owned(), job.count(state));
    }
    let terminal_statuses: u64 = a.statuses.values().sum();
    a.lost = a.targeted.saturating_sub(terminal_statuses);
    let counter_sum: u64 = a.counters.values().sum();
    a.counters_exact = counter_sum == a.targeted
        && terminal_statuses == a.targeted
        && a.with_status == a.targeted
        && ExecutionState::TERMINAL.iter().all(|s| {
            a.counters.get(s.counter()).copied().unwrap_or(0)
                == a.statuses.get(s.counter()).copied().unwrap_or(0)
        });
    let totals: std::collections::HashMap<String, u64> =
        redis.hgetall(names.sim_totals(job_id)).await?;
    let t = |k: &str| totals.get(k).copied().unwrap_or(0);
    a.deliveries = t("deliveries");
    a.applications = t("applications");
    a.duplicate_applications = t("duplicate_applications");
    a.redundant_deliveries = t("redundant_deliveries");
    Ok(a)
}

/// The audit's arithmetic against a real Redis (`FLEETBATCH_TEST_REDIS_URL`, default the local
/// one): the fault tests and `chaos` judge runs by it, so it is checked on jobs built by hand.
#[cfg(test)]
mod tests {
    use devices::keys::DeviceKeys;
    use shared::state::{DeviceStatus, execution_id};

    use super::*;

    struct Job {
        redis: RedisConn,
        names: Names,
        id: Uuid,
    }

    impl Job {
        /// A job of `planned` devices whose statuses and counters are `states` (device id,
        /// state, attempts), with `counters` as stored.
        async fn new(
            planned: u64,
            states: &[(&str, ExecutionState, u32)],
            counters: &[(&str, u64)],
        ) -> Self {
            let mut redis = store::connect(&shared::config::RedisSettings::for_tests(), "")
                .await
                .expect("redis");
            let names = Names::new(&format!("u{}", Uuid::new_v4().simple()));
            let id = Uuid::now_v7();
            let spec =
                serde_json::json!({"target": {"groups": ["g"]}, "action": {"type": "reboot"}});
            let mut pipe = redis::pipe();
            pipe.hset_multiple(
                names.job(id),
                &[
                    ("spec", spec.to_string()),
                    ("state", "COMPLETED".to_owned()),
                    ("planned", planned.to_string()),
                    ("planning_done", "1".to_owned()),
                ],
            )
            .ignore();
            for (device, state, attempts) in states {
                let status = DeviceStatus {
                    state: *state,
                    attempts: *attempts,
                    error: None,
                    updated_at_ms: 1,
                    next_attempt_at_ms: None,
                    worker: None,
                    published_at_ms: None,
                    readings: None,
                };
                pipe.hset(
                    names.job_status(id),
                    *device,
                    serde_json::to_string(&status).expect("json"),
                )
                .ignore();
            }
            for (counter, n) in counters {
                pipe.hset(names.job_counts(id), *counter, *n).ignore();
            }
            let _: () = pipe.query_async(&mut redis).await.expect("job");
            Self { redis, names, id }
        }

        async fn delivered(&mut self, device: &str, n: u64) {
            let _: () = self
                .redis
                .hset(
                    self.names.sim_deliveries(self.id),
                    execution_id(self.id, device).to_string(),
                    n,
                )
                .await
                .expect("deliveries");
        }

        async fn audit(&mut self) -> Audit {
            audit(&mut self.redis, &self.names, self.id)
                .await
                .expect("audit")
        }

        async fn done(mut self) {
            store::delete_matching(&mut self.redis, &self.names.key_pattern())
                .await
                .expect("cleanup");
        }
    }

    const OK: ExecutionState = ExecutionState::Succeeded;
    const FAILED: ExecutionState = ExecutionState::Failed;

    #[tokio::test]
    async fn an_exact_job_passes_and_deliveries_beyond_attempts_are_extra() {
        let mut job = Job::new(
            3,
            &[("d1", OK, 1), ("d2", OK, 2), ("d3", FAILED, 3)],
            &[("succeeded", 2), ("failed", 1), ("terminal", 3)],
        )
        .await;
        job.delivered("d1", 1).await;
        job.delivered("d2", 4).await;
        job.delivered("d3", 3).await;
        let a = job.audit().await;
        assert_eq!(
            (a.targeted, a.with_status, a.lost, a.not_terminal),
            (3, 3, 0, 0)
        );
        assert!(a.counters_exact, "{a:?}");
        assert_eq!(a.recorded_attempts, 6);
        assert_eq!(a.extra_deliveries, 2, "d2: 4 deliveries for 2 attempts");
        assert_eq!(a.extra_examples.len(), 1);
        assert_eq!(a.extra_examples[0].0, "d2");
        job.done().await;
    }

    #[tokio::test]
    async fn a_missing_or_unfinished_device_is_lost_and_counters_are_not_exact() {
        let mut job = Job::new(
            3,
            &[("d1", OK, 1), ("d2", ExecutionState::RetryScheduled, 2)],
            &[("succeeded", 1), ("terminal", 1)],
        )
        .await;
        let a = job.audit().await;
        assert_eq!((a.with_status, a.not_terminal, a.lost), (2, 1, 2));
        assert!(!a.counters_exact);
        job.done().await;
    }

    #[tokio::test]
    async fn counters_that_disagree_with_the_statuses_are_caught() {
        // Every device terminal, but one counted in the wrong state.
        let mut job = Job::new(
            2,
            &[("d1", OK, 1), ("d2", FAILED, 1)],
            &[("succeeded", 2), ("terminal", 2)],
        )
        .await;
        let a = job.audit().await;
        assert_eq!(a.lost, 0);
        assert!(!a.counters_exact, "{a:?}");
        job.done().await;
        // Counters summing past the target.
        let mut job = Job::new(
            1,
            &[("d1", OK, 1)],
            &[("succeeded", 1), ("failed", 1), ("terminal", 2)],
        )
        .await;
        assert!(!job.audit().await.counters_exact);
        job.done().await;
    }
}
