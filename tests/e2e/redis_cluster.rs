//! fleetbatch on a Redis Cluster of the test's own (3 masters, each with a replica): a job
//! is exact, and a job during which the master holding the deployment's keys is SIGKILLed
//! (its replica promoted) finishes exact; the test prints what the failover cost.
//!
//! Devices are fleet-sim devices over HTTP: what they received and applied is counted in
//! fleet-sim's memory, outside Redis, so a write the failover lost cannot hide a duplicate.
//! A last test plays the loss a failover can cause (an outcome written, not replicated) on
//! one node and checks the reconciliation sweep recovers it.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::state::ExecutionState;

use crate::{
    devices::{FLEET, extra_deliveries, firmware_over_fleet_sim, get_json, start_sim},
    helpers::{firmware_job, fleet_ids, spawn_app},
    services::RedisCluster,
};

/// Devices per job; the acceptance's size with `FLEETBATCH_TEST_REDIS_CLUSTER_DEVICES=100000`.
fn devices() -> u64 {
    std::env::var("FLEETBATCH_TEST_REDIS_CLUSTER_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[tokio::test]
async fn on_a_redis_cluster_jobs_are_exact_and_a_killed_masters_replica_takes_over() {
    let n = devices();
    let mut redis = RedisCluster::start(3).await;
    let port = harness::cluster::free_port().expect("port");
    let template = format!("http://127.0.0.1:{port}/devices/{{device_id}}/jobs");
    let urls = redis.urls();
    let mut env: Vec<(&str, &str)> = FLEET.to_vec();
    env.extend([
        ("FLEETBATCH_REDIS__CLUSTER_URLS", urls.as_str()),
        ("FLEETBATCH_WORKER__TRANSPORT", "http"),
        ("FLEETBATCH_WORKER__HTTP__URL_TEMPLATE", template.as_str()),
        // Replies are not timed out while Redis fails over (3-4 s).
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "5000"),
        // A device whose last write the failover lost is ended by the sweep after 20 s of
        // quiet (1 hour by default).
        ("FLEETBATCH_COORDINATOR__RECONCILE_SILENCE_SECS", "20"),
    ]);
    let mut app = spawn_app(3, &env).await;
    assert!(app.redis.is_cluster());
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let home = app.names.key_prefix().to_owned();
    let master = redis.master_of(&home, 0).await;

    // A job on the healthy cluster: every device in its expected state, nothing extra.
    firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;
    let stats_before = get_json(&app, &format!("{sim}/stats")).await;

    // A job during which the master holding the deployment's slot dies.
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 1_000}})))
        .await;
    let before = app
        .wait_for_terminal(id, n / 4, Duration::from_secs(120 + n / 500))
        .await;
    let killed = Instant::now();
    let killed_at = shared::now_ms();
    redis.kill(master).await;
    let (promoted, took) = redis.wait_failover(&home, master, killed).await;
    eprintln!("master {master} SIGKILLed; replica {promoted} serves the slot after {took:?}");

    let job = app
        .wait_for_job(id, Duration::from_secs(300 + n / 200))
        .await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert!(before["terminal"].as_u64() < Some(n), "{before}");
    assert!(job["finished_at_ms"].as_u64() > Some(killed_at), "{job}");

    // Every device in exactly one terminal state; the counters equal the statuses.
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let lost: Vec<&String> = statuses
        .iter()
        .filter(|(_, s)| s.error.as_deref().is_some_and(|e| e.starts_with("lost")))
        .map(|(d, _)| d)
        .collect();
    let succeeded = statuses
        .values()
        .filter(|s| s.state == ExecutionState::Succeeded)
        .count() as u64;

    // What the devices saw of this job, from their own memory.
    let stats = get_json(&app, &format!("{sim}/stats")).await;
    let delta = |k: &str| stats[k].as_u64().unwrap_or(0) - stats_before[k].as_u64().unwrap_or(0);
    let extra = extra_deliveries(&app, &sim, id, &statuses).await;
    eprintln!(
        "redis cluster, master killed: {n} devices, {succeeded} succeeded, {} applications, \
         {} duplicate applications, {extra} deliveries beyond the recorded attempts, {} devices \
         ended by the reconciliation sweep as lost: {:?}",
        delta("applications"),
        delta("duplicate_applications"),
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // No device applied the job twice: a write lost with the master would show here.
    assert_eq!(delta("duplicate_applications"), 0, "{stats}");
    // Every device that succeeded applied it. One that applied and is not SUCCEEDED is a
    // device whose every reply was lost on a loaded machine (it ends FAILED or TIMED_OUT
    // with the reason): never more of those than devices that ended so.
    let unanswered = statuses
        .values()
        .filter(|s| matches!(s.state, ExecutionState::Failed | ExecutionState::TimedOut))
        .count() as u64;
    assert!(
        delta("applications") >= succeeded && delta("applications") <= succeeded + unanswered,
        "{} applications for {succeeded} SUCCEEDED and {unanswered} FAILED or TIMED_OUT: {stats}",
        delta("applications")
    );
    app.teardown().await;
}

/// The write a Redis failover can lose (asynchronous replication) that matters most: a
/// device's recorded outcome, with the counters the same script changed, while the worker's
/// saved result (its idempotency record, written before the result was published) survived.
/// The test takes the outcomes of 20 devices back out of a finished job, as such a failover
/// leaves them; after `reconcile_resend_secs` of quiet the sweep sends their tasks again, the
/// workers publish the saved results, and the job completes again with the same outcomes,
/// exact counters and no new delivery.
#[tokio::test]
async fn outcomes_a_redis_failover_lost_are_recorded_again_from_the_workers_saved_results() {
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "2"),
            ("FLEETBATCH_COORDINATOR__RECONCILE_RESEND_SECS", "3"),
        ],
    )
    .await;
    let n = 500;
    app.import_fleet(n).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let before = app.statuses(id).await;
    let mut redis = app.redis.clone();
    let audit_before = harness::audit::audit(&mut redis, &app.names, id)
        .await
        .expect("audit");

    // What a failover leaves when it loses the last outcomes recorded: the whole recording
    // script is lost (it replicates as one unit), so the workers' saved results, which the
    // script removed, are back too.
    let names = &app.names;
    let taken: Vec<String> = before
        .iter()
        .filter(|(_, s)| s.state == ExecutionState::Succeeded)
        .map(|(d, _)| d.clone())
        .take(20)
        .collect();
    let mut pipe = redis::pipe();
    for d in &taken {
        let mut s = before[d].clone();
        s.state = ExecutionState::InProgress;
        pipe.hset(
            names.job_status(id),
            d,
            serde_json::to_string(&s).expect("json"),
        )
        .srem(names.job_state_set(id, ExecutionState::Succeeded), d)
        .hincr(
            names.job_counts(id),
            ExecutionState::Succeeded.counter(),
            -1,
        )
        .hincr(names.job_counts(id), "terminal", -1);
        let saved = shared::messages::TaskResult {
            version: shared::messages::WIRE_VERSION,
            job_id: id,
            execution_id: shared::state::execution_id(id, d),
            device_id: d.clone(),
            state: ExecutionState::Succeeded,
            attempts: before[d].attempts,
            error: None,
            worker: before[d].worker.clone().unwrap_or_default(),
            published_at_ms: before[d].published_at_ms.unwrap_or_default(),
            finished_at_ms: before[d].updated_at_ms,
            readings: None,
        };
        let mut record = b"d:".to_vec();
        record.extend(shared::messages::encode(&saved).expect("encode"));
        pipe.set_ex(
            names.idempotency(shared::state::execution_id(id, d)),
            record,
            3600,
        );
    }
    pipe.hset(names.job(id), "state", "IN_PROGRESS")
        .hdel(names.job(id), "finished_at_ms")
        .sadd(names.active_jobs(), id.to_string());
    let () = pipe
        .query_async(&mut redis)
        .await
        .expect("outcomes taken out");
    let reopened = app.job(id).await;
    assert_eq!(reopened["state"], "IN_PROGRESS", "{reopened}");
    assert_eq!(reopened["terminal"].as_u64(), Some(n - 20), "{reopened}");

    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let after = app.assert_exact(id, &fleet_ids(n)).await;
    for d in &taken {
        assert_eq!(
            after[d].state,
            ExecutionState::Succeeded,
            "{d}: {:?}",
            after[d]
        );
        assert_eq!(after[d].error, None, "{d}: {:?}", after[d]);
    }
    let audit = harness::audit::audit(&mut redis, &app.names, id)
        .await
        .expect("audit");
    assert!(audit.counters_exact, "{audit:?}");
    assert_eq!(audit.duplicate_applications, 0, "{audit:?}");
    assert_eq!(
        audit.deliveries, audit_before.deliveries,
        "no device was delivered the job again: {audit:?}"
    );
    app.teardown().await;
}
