//! Fault injection: processes killed, servers restarted, devices offline. Every test runs a
//! job of 20,000 simulated devices with latency, transient failures and offline devices,
//! and asserts the guarantees with the same audit the chaos command prints.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use shared::state::ExecutionState;
use uuid::Uuid;

use crate::{
    helpers::{TestApp, firmware_job, fleet_ids, spawn_app},
    services::{PrivateRabbit, PrivateRedis, RabbitCluster},
};

const DEVICES: u64 = 20_000;
const CONCURRENCY: u64 = 64;

/// Devices with latency, glitches and offline spells; short timeouts and leases so the
/// faults play out within seconds.
fn mixed_fleet_env() -> Vec<(&'static str, String)> {
    vec![
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "4".into()),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "4".into()),
        (
            "FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE",
            "0.03".into(),
        ),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0.01".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS", "2".into()),
        ("FLEETBATCH_WORKER__CONCURRENCY", CONCURRENCY.to_string()),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "300".into()),
        ("FLEETBATCH_WORKER__CLAIM_LEASE_MS", "2000".into()),
        ("FLEETBATCH_WORKER__BACKOFF__INITIAL_MS", "20".into()),
        ("FLEETBATCH_WORKER__BACKOFF__BUDGET_MS", "500".into()),
        ("FLEETBATCH_WORKER__RETRY_DELAYS_MS", "200,500,1000".into()),
    ]
}

async fn spawn_mixed(workers: usize, extra: &[(&'static str, String)]) -> TestApp {
    let mut env = mixed_fleet_env();
    env.extend(extra.iter().cloned());
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn_app(workers, &refs).await
}

/// Waits (up to 10 s) for the coordinator's `/readyz` to answer 503 naming `service`.
async fn assert_not_ready(app: &TestApp, service: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app.get_text(&app.url("/readyz")).await;
        if status == 503 && body.contains(service) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz answered {status} {body:?} with {service} down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The guarantees after a fault: nothing lost, counters exact, nothing applied twice, and at
/// most `max_extra` deliveries beyond the recorded attempts.
async fn assert_guarantees(app: &TestApp, id: Uuid, max_extra: u64) -> harness::audit::Audit {
    assert_guarantees_of(app, id, DEVICES, max_extra).await
}

/// [`assert_guarantees`] for a fleet of `n` devices.
async fn assert_guarantees_of(
    app: &TestApp,
    id: Uuid,
    n: u64,
    max_extra: u64,
) -> harness::audit::Audit {
    app.assert_exact(id, &fleet_ids(n)).await;
    let mut redis = app.redis.clone();
    let audit = harness::audit::audit(&mut redis, &app.names, id)
        .await
        .expect("audit");
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert!(audit.counters_exact, "{audit:?}");
    assert_eq!(audit.duplicate_applications, 0, "{audit:?}");
    assert!(
        audit.extra_deliveries <= max_extra,
        "extra deliveries {} > {max_extra}: {audit:?}",
        audit.extra_deliveries
    );
    audit
}

#[tokio::test]
async fn killing_workers_mid_delivery_loses_nothing_and_applies_nothing_twice() {
    // Arrange: the simulated devices log which worker sent each delivery, with which attempt.
    let mut app = spawn_mixed(
        3,
        &[("FLEETBATCH_SIMULATOR__RECORD_DELIVERIES", "true".into())],
    )
    .await;
    app.import_fleet(DEVICES).await;
    let id = app.create_job(&firmware_job(json!({}))).await;

    // Act: SIGKILL a worker three times mid-job, starting a replacement each time.
    let kills = 3;
    let mut killed = Vec::new();
    for k in 0..kills {
        app.wait_for_terminal(id, (k + 1) * 4_000, Duration::from_secs(300))
            .await;
        killed.push(app.cluster.worker_pid(k as usize).expect("pid"));
        app.cluster
            .signal_worker(k as usize, Signal::SIGKILL)
            .expect("kill");
        app.cluster
            .wait_worker(k as usize, Duration::from_secs(10))
            .await
            .expect("dead");
        app.cluster.start_worker().expect("replacement");
    }
    app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: re-sends only for what the killed workers had in flight.
    let audit = assert_guarantees(&app, id, kills * CONCURRENCY).await;
    eprintln!("worker kills: {audit:?}");
    // Every attempt number a device was sent twice was first sent by a worker that was then
    // killed (its outcome died with it), at most its in-flight limit per killed worker.
    let mut redis = app.redis.clone();
    let log: std::collections::HashMap<String, String> =
        redis::AsyncCommands::hgetall(&mut redis, app.names.sim_log(id))
            .await
            .expect("delivery log");
    let logged: usize = log.values().map(|e| e.matches(';').count()).sum();
    assert_eq!(
        logged as u64, audit.deliveries,
        "every delivery is in the log"
    );
    let mut resent_after: std::collections::BTreeMap<String, u64> = Default::default();
    for entries in log.values() {
        let sent: Vec<(&str, &str)> = entries
            .split(';')
            .filter(|e| !e.is_empty())
            .map(|e| e.rsplit_once('/').expect("worker/attempt"))
            .collect();
        for (i, (worker, attempt)) in sent.iter().enumerate() {
            if sent[i + 1..].iter().any(|(_, a)| a == attempt) {
                *resent_after.entry((*worker).to_owned()).or_default() += 1;
            }
        }
    }
    let resent: u64 = resent_after.values().sum();
    // The kills landed mid-delivery (with 64 deliveries in flight per worker, a kill that
    // interrupts nothing would mean the test killed idle workers).
    assert!(resent > 0, "no kill interrupted a delivery: {audit:?}");
    assert!(
        resent >= audit.extra_deliveries,
        "{resent} re-sent attempts < {} extra deliveries",
        audit.extra_deliveries
    );
    for (worker, n) in &resent_after {
        // Worker ids are `{host}-{pid}-{suffix}`.
        let pid: u32 = worker
            .rsplit('-')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid in worker id");
        assert!(
            killed.contains(&pid),
            "worker {worker} (not killed) had {n} attempts re-sent"
        );
        assert!(
            *n <= CONCURRENCY,
            "worker {worker}: {n} re-sent > in-flight limit"
        );
    }
    eprintln!("re-sent attempts per killed worker: {resent_after:?}");
    app.teardown().await;
}

#[tokio::test]
async fn killing_the_coordinator_while_publishing_and_while_aggregating_resumes_the_job() {
    // Arrange: a rate limit keeps the planner publishing for several seconds.
    let mut app = spawn_mixed(2, &[]).await;
    app.import_fleet(DEVICES).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 4000}})))
        .await;

    // Act 1: SIGKILL while tasks are still being published.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = app.job(id).await;
        if job["targeted"].as_u64().unwrap_or(0) >= 4_000 {
            assert_eq!(job["planning_done"], false, "still publishing when killed");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.crash_coordinator().await;

    // Act 2: SIGKILL again once planning is done but results are still coming in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let job = app.job(id).await;
        if job["planning_done"] == true {
            assert!(
                job["terminal"].as_u64() < job["targeted"].as_u64(),
                "still aggregating: {job}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.crash_coordinator().await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: nobody resubmitted anything; re-published tasks were absorbed.
    assert_eq!(job["state"], "COMPLETED");
    assert_guarantees(&app, id, 0).await;
    app.teardown().await;
}

/// How a server goes away mid-job.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// An orderly stop (`rabbitmqctl stop`, Redis `SHUTDOWN`), while results are being
    /// aggregated after planning finished.
    StopWhileAggregating,
    /// A crash (SIGKILL), while the planner is still publishing.
    CrashWhilePlanning,
}

/// Settings that make the phase last: few deliveries in flight, so results trail far behind
/// a planner that finished publishing.
fn phase_env(fault: Fault) -> Vec<(&'static str, String)> {
    match fault {
        Fault::StopWhileAggregating => vec![("FLEETBATCH_WORKER__CONCURRENCY", "8".into())],
        Fault::CrashWhilePlanning => vec![],
    }
}

/// The job of a fault test: publishing held to 2,000 devices/s when the fault must hit the
/// planner.
fn phase_job(fault: Fault) -> serde_json::Value {
    match fault {
        Fault::StopWhileAggregating => firmware_job(json!({})),
        Fault::CrashWhilePlanning => firmware_job(json!({"rollout": {"max_per_second": 2000}})),
    }
}

/// Waits for the phase the fault must hit and returns the job as it was then: planning done
/// with devices still pending, or still publishing with at least 4,000 published.
async fn wait_for_phase(app: &TestApp, id: Uuid, fault: Fault) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let job = app.job(id).await;
        let targeted = job["targeted"].as_u64().unwrap_or(0);
        let terminal = job["terminal"].as_u64().unwrap_or(0);
        let planned = job["planning_done"] == true;
        match fault {
            Fault::StopWhileAggregating if planned => {
                assert!(terminal < targeted, "still aggregating: {job}");
                return job;
            }
            Fault::CrashWhilePlanning if targeted >= 4_000 => {
                assert!(!planned, "still publishing: {job}");
                return job;
            }
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "{fault:?}: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proof after the job finished: the fault hit a running job (devices were still
/// pending) and the job finished after the fault began.
fn assert_fault_hit_running_job(before: &serde_json::Value, job: &serde_json::Value, at: u64) {
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert!(before["terminal"].as_u64() < Some(DEVICES), "{before}");
    assert!(job["finished_at_ms"].as_u64() > Some(at), "{job}");
}

async fn rabbitmq_outage_mid_job(fault: Fault) {
    // Arrange: a RabbitMQ node of this test's own; a rate limit keeps the planner publishing
    // for several seconds.
    let rabbit = PrivateRabbit::start().await;
    let mut env = vec![("FLEETBATCH_AMQP__URL", rabbit.url())];
    env.extend(phase_env(fault));
    let app = spawn_mixed(2, &env).await;
    app.import_fleet(DEVICES).await;
    let id = app.create_job(&phase_job(fault)).await;
    let before = wait_for_phase(&app, id, fault).await;

    // Act: the broker goes away, stays down for a moment, comes back.
    let stopped_at = shared::now_ms();
    match fault {
        Fault::StopWhileAggregating => rabbit.stop().await,
        Fault::CrashWhilePlanning => rabbit.kill().await,
    }
    // While the broker is down the coordinator says it is not ready (and still answers).
    assert_not_ready(&app, "RabbitMQ").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.start_again().await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: confirmed tasks and results survive the broker (durable queues, persistent
    // messages); whatever it redelivers is absorbed by the idempotency keys.
    assert_fault_hit_running_job(&before, &job, stopped_at);
    let audit = assert_guarantees(&app, id, 0).await;
    eprintln!("rabbitmq {fault:?}: {audit:?}");
    app.teardown().await;
}

#[tokio::test]
async fn a_rabbitmq_restart_while_aggregating_is_survived() {
    rabbitmq_outage_mid_job(Fault::StopWhileAggregating).await;
}

#[tokio::test]
async fn a_rabbitmq_crash_while_planning_is_survived() {
    rabbitmq_outage_mid_job(Fault::CrashWhilePlanning).await;
}

/// Quorum queues on a cluster of three RabbitMQ nodes of this test's own: the node leading
/// the tasks queue is SIGKILLed mid-job. Every process was given all three addresses; the
/// queues keep a majority, clients fail over, and the job is exact.
#[tokio::test]
async fn on_a_three_node_rabbitmq_cluster_a_sigkill_of_the_tasks_queue_leader_loses_nothing() {
    // The acceptance's 100,000 devices: FLEETBATCH_TEST_CLUSTER_DEVICES=100000.
    let n: u64 = std::env::var("FLEETBATCH_TEST_CLUSTER_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEVICES);
    let cluster = RabbitCluster::start(3).await;
    let others: Vec<String> = cluster.nodes[1..].iter().map(|n| n.url()).collect();
    let workers = 3;
    let app = spawn_mixed(
        workers,
        &[
            ("FLEETBATCH_AMQP__URL", cluster.nodes[0].url()),
            ("FLEETBATCH_AMQP__FALLBACK_URLS", others.join(",")),
            ("FLEETBATCH_AMQP__QUEUE_TYPE", "quorum".into()),
            ("FLEETBATCH_SIMULATOR__RECORD_DELIVERIES", "true".into()),
            // Retries the broker stops forwarding after the leader's death (seen with
            // RabbitMQ 3.10.8) are sent again after 10 s of quiet.
            ("FLEETBATCH_COORDINATOR__RECONCILE_RESEND_SECS", "10".into()),
        ],
    )
    .await;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 2_000}})))
        .await;
    let before = app
        .wait_for_terminal(id, n / 4, Duration::from_secs(120 + n / 1_000))
        .await;
    let leader = cluster.leader_of(&app.names.tasks_queue()).await;
    let killed_at = shared::now_ms();
    cluster.nodes[leader].kill().await;
    eprintln!(
        "killed node {leader} ({}), the tasks queue's leader",
        cluster.nodes[leader].node()
    );

    // Waits for the end; a job that stalls is shown with the broker's view of its queues.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300 + n / 500);
    let job = loop {
        let job = app.job(id).await;
        if job["state"] == "COMPLETED" {
            break job;
        }
        if tokio::time::Instant::now() > deadline {
            let stats = cluster.queue_stats(leader).await;
            panic!("the job did not finish: {job}\nqueues:\n{stats}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(before["terminal"].as_u64() < Some(n), "{before}");
    assert!(job["finished_at_ms"].as_u64() > Some(killed_at), "{job}");
    // A new leader took the queue over.
    let now = cluster
        .leader_of_among(&app.names.tasks_queue(), leader)
        .await;
    assert_ne!(now, leader);
    // Redelivered tasks are absorbed by the idempotency keys; at most the attempts under way
    // when the node died are repeated.
    let audit = assert_guarantees_of(&app, id, n, workers as u64 * CONCURRENCY).await;
    eprintln!("rabbitmq cluster, leader killed: {audit:?}");
    app.teardown().await;
    drop(cluster);
}

async fn redis_outage_mid_job(fault: Fault) {
    // Arrange: a Redis of this test's own, with its append-only file.
    let mut redis = PrivateRedis::start().await;
    // The default claim lease (30 s) outlasts the outage: no claim lapses while Redis is down,
    // so no execution is taken over by a second worker.
    let mut env = vec![
        ("FLEETBATCH_REDIS__URL", redis.url()),
        ("FLEETBATCH_WORKER__CLAIM_LEASE_MS", "30000".into()),
        // Which worker made each delivery, to explain any extra one.
        ("FLEETBATCH_SIMULATOR__RECORD_DELIVERIES", "true".into()),
    ];
    env.extend(phase_env(fault));
    let mut app = spawn_mixed(2, &env).await;
    app.import_fleet(DEVICES).await;
    let id = app.create_job(&phase_job(fault)).await;
    let before = wait_for_phase(&app, id, fault).await;

    // Act: Redis goes away mid-job (the phase is proved above).
    let stopped_at = shared::now_ms();
    match fault {
        Fault::StopWhileAggregating => redis.stop().await,
        // Every write Redis acknowledged was written to the append-only file before the
        // reply (fsync is what `everysec` defers), so a process crash loses none of them.
        Fault::CrashWhilePlanning => redis.kill().await,
    }
    assert_not_ready(&app, "Redis").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.start_again().await;
    app.reconnect_redis().await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: no worker died, so no device is sent anything beyond its recorded attempts, even
    // though the planner re-published its last batch when its checkpoint write failed.
    assert_fault_hit_running_job(&before, &job, stopped_at);
    let audit = assert_guarantees(&app, id, 0).await;
    eprintln!("redis {fault:?}: {audit:?}");
    app.teardown().await;
}

#[tokio::test]
async fn a_redis_restart_while_aggregating_is_survived() {
    redis_outage_mid_job(Fault::StopWhileAggregating).await;
}

#[tokio::test]
async fn a_redis_crash_while_planning_is_survived() {
    redis_outage_mid_job(Fault::CrashWhilePlanning).await;
}

#[tokio::test]
async fn a_nearly_full_redis_pauses_planning_with_an_alarm_and_the_job_goes_on_once_memory_is_freed()
 {
    let redis_server = PrivateRedis::start().await;
    let url = redis_server.url();
    let app = spawn_app(1, &[("FLEETBATCH_REDIS__URL", &url)]).await;
    let n = 1_000;
    app.import_fleet(n).await;

    // Redis at about 93 % of its maxmemory (noeviction, as deploy/ sets it): 56 strings of
    // just under 1 MiB (each fills its allocation class) under a limit 60 MiB above what
    // is used now.
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("private redis");
    let info: redis::InfoDict = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis)
        .await
        .expect("info");
    let used: u64 = info.get("used_memory").expect("used_memory");
    let mib = 1024 * 1024;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(used + 60 * mib)
        .query_async(&mut redis)
        .await
        .expect("config set");
    let junk = vec![b'x'; (mib - 64) as usize];
    for k in 0..56 {
        let () = redis::AsyncCommands::set(&mut redis, format!("junk:{k}"), &junk)
            .await
            .expect("fill");
    }
    let alarm = || async {
        let (_, text) = app.get_text(&app.url("/metrics")).await;
        crate::helpers::gauge(&text, "fleetbatch_redis_memory_alarm", &[])
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while alarm().await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no memory alarm at 93 % of maxmemory"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A job created now is accepted and held: nothing published, no device contacted.
    let id = app.create_job(&firmware_job(json!({}))).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, text) = app.get_text(&app.url("/metrics")).await;
    assert_eq!(
        crate::helpers::metric(&text, "fleetbatch_tasks_published_total", &[]),
        0.0,
        "tasks published while Redis was nearly full"
    );
    let job = app.job(id).await;
    assert_eq!(job["state"], "IN_PROGRESS", "{job}");
    assert_eq!(job["terminal"], 0, "{job}");

    // Memory freed: the alarm clears and the job finishes exact.
    for k in 0..56 {
        let () = redis::AsyncCommands::del(&mut redis, format!("junk:{k}"))
            .await
            .expect("free");
    }
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    assert_eq!(alarm().await, 0.0);
    app.teardown().await;
    drop(redis_server);
}

#[tokio::test]
async fn offline_devices_are_parked_and_retried_until_they_answer_run_out_of_attempts_or_time() {
    // Arrange: 5% of devices stay silent for their first 3 deliveries of each job.
    let app = spawn_mixed(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0.05".into()),
            ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS", "3".into()),
        ],
    )
    .await;
    app.import_fleet(DEVICES).await;
    let offline: Vec<String> = fleet_ids(DEVICES)
        .into_iter()
        .filter(|d| {
            worker::deliver::simulator::DeviceProfile::for_device(&app.settings.simulator, d)
                .offline_attempts
                > 0
        })
        .collect();
    assert!(offline.len() > 500);

    // Act 1: enough attempts; watch a parked device's status while it waits. An offline
    // device spends 3 attempts silent, then each later attempt fails transiently 3 % of the
    // time: with 8 attempts the chance that any of ~1,000 such devices fails all 5 remaining
    // is 2e-5 per run (with 6 it was 3 %, and a clean run once saw one).
    let id = app
        .create_job(&firmware_job(json!({"retry": {"max_attempts": 8}})))
        .await;
    let (mut saw_parked, mut saw_retrying) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !(saw_parked && saw_retrying) && tokio::time::Instant::now() < deadline {
        let statuses = app.statuses(id).await;
        saw_parked |= offline.iter().any(|d| {
            statuses.get(d).is_some_and(|s| {
                s.state == ExecutionState::RetryScheduled
                    && s.next_attempt_at_ms.is_some()
                    && s.attempts >= 2
            })
        });
        // Between in-process attempts: held by a worker, with the attempts so far, the last
        // error and the next attempt time.
        saw_retrying |= offline.iter().any(|d| {
            statuses.get(d).is_some_and(|s| {
                s.state == ExecutionState::InProgress
                    && s.attempts >= 1
                    && s.error.is_some()
                    && s.next_attempt_at_ms.is_some()
                    && s.worker.is_some()
            })
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert 1: parked devices were visible with their next attempt time, and every device
    // succeeded; the offline ones on their 4th attempt.
    assert!(
        saw_parked,
        "a parked device showed RETRY_SCHEDULED with its next attempt time"
    );
    assert!(
        saw_retrying,
        "a device retried in-process showed IN_PROGRESS with its attempts, error and next attempt time"
    );
    let statuses = assert_guarantees(&app, id, 0).await;
    assert_eq!(statuses.statuses.get("succeeded").copied(), Some(DEVICES));
    let all = app.statuses(id).await;
    for d in &offline {
        assert!(all[d].attempts >= 4, "{d}: {:?}", all[d]);
    }

    // Act 2 and assert: too few attempts -> FAILED; a deadline first -> TIMED_OUT.
    let region = harness::fleet::REGIONS[0];
    let in_region = |d: &String| {
        let i: u64 = d.trim_start_matches("dev-").parse().expect("id");
        harness::fleet::device(i).groups.iter().any(|g| g == region)
    };
    let few = app
        .create_job(&firmware_job(
            json!({"target": {"groups": [region]}, "retry": {"max_attempts": 2}}),
        ))
        .await;
    let job = app.wait_for_job(few, Duration::from_secs(120)).await;
    let region_ids: std::collections::HashSet<String> =
        fleet_ids(DEVICES).into_iter().filter(in_region).collect();
    // Every device of the region exactly once, counters equal to the per-device states.
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let s = app.assert_exact(few, &region_ids).await;
    for (d, st) in &s {
        if offline.contains(d) {
            assert_eq!(st.state, ExecutionState::Failed, "{d}: {st:?}");
            assert_eq!(st.attempts, 2);
        } else {
            // Without a deadline nothing times out; only transient failures can exhaust
            // two attempts.
            assert!(
                matches!(st.state, ExecutionState::Succeeded | ExecutionState::Failed),
                "{d}: {st:?}"
            );
        }
    }
    let succeeded = s
        .values()
        .filter(|x| x.state == ExecutionState::Succeeded)
        .count();
    assert!(
        succeeded > region_ids.len() / 2,
        "{succeeded} of {}",
        region_ids.len()
    );

    let late = app
        .create_job(&firmware_job(json!({
            "target": {"groups": [region]},
            "retry": {"max_attempts": 20, "deadline_secs": 1}
        })))
        .await;
    let job = app.wait_for_job(late, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let s = app.assert_exact(late, &region_ids).await;
    for (d, st) in &s {
        if offline.contains(d) {
            assert_eq!(st.state, ExecutionState::TimedOut, "{d}: {st:?}");
        } else {
            // With 20 attempts allowed only the deadline ends a device that did not succeed.
            assert!(
                matches!(
                    st.state,
                    ExecutionState::Succeeded | ExecutionState::TimedOut
                ),
                "{d}: {st:?}"
            );
        }
    }
    // The deadline ends only what had not finished: the devices reached in the first second
    // succeeded.
    let succeeded = s
        .values()
        .filter(|x| x.state == ExecutionState::Succeeded)
        .count();
    assert!(succeeded > 0, "no device succeeded before the deadline");
    app.teardown().await;
}

#[tokio::test]
async fn a_sigtermed_worker_under_load_drains_and_exits_cleanly_with_nothing_lost_or_repeated() {
    // Arrange
    let mut app = spawn_mixed(
        2,
        &[("FLEETBATCH_WORKER__SHUTDOWN_GRACE_SECS", "20".into())],
    )
    .await;
    app.import_fleet(DEVICES).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    app.wait_for_terminal(id, 5_000, Duration::from_secs(300))
        .await;

    // Act: scale in one worker mid-job, as an autoscaler would.
    app.cluster
        .signal_worker(0, Signal::SIGTERM)
        .expect("sigterm");
    let status = app
        .cluster
        .wait_worker(0, Duration::from_secs(30))
        .await
        .expect("worker exits");
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: exit 0 after draining; nothing lost, nothing re-sent.
    assert!(status.success(), "worker exit status {status}");
    assert_eq!(job["state"], "COMPLETED");
    assert_guarantees(&app, id, 0).await;
    let log = std::fs::read_to_string(app.cluster.worker_log(0)).unwrap_or_default();
    assert!(
        log.contains("worker stopped"),
        "the worker drained and stopped: {log}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_planner_that_loses_its_lease_stops_publishing_and_the_job_is_adopted_again() {
    // Arrange: a slow job (300 devices/s) on 3,000 devices.
    let app = spawn_app(2, &[]).await;
    let n = 3_000;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 300}})))
        .await;
    app.wait_for_terminal(id, 600, Duration::from_secs(60))
        .await;
    let mut redis = app.redis.clone();
    let published = |mut r: RedisConn| {
        let key = app.names.job(id);
        async move {
            let n: Option<u64> = redis::AsyncCommands::hget(&mut r, key, "published")
                .await
                .expect("published");
            n.unwrap_or(0)
        }
    };

    // Act: another owner takes the planner lease (as a coordinator would after ours lapsed).
    let lease = app.names.planner_lock(id);
    let () = redis::AsyncCommands::set_ex(&mut redis, &lease, "intruder", 60)
        .await
        .expect("steal");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_theft = published(redis.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = published(redis.clone()).await;

    // Assert: our planner stopped (at most the batch under way was checkpointed), and once
    // the lease is free again the job is adopted and finishes exact.
    assert!(at_theft < n, "the job was still being published");
    assert_eq!(
        later, at_theft,
        "the planner kept publishing without its lease"
    );
    let () = redis::AsyncCommands::del(&mut redis, &lease)
        .await
        .expect("free");
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_planning_coordinator_stalled_past_its_lease_is_replaced_and_publishes_at_most_one_batch_again()
 {
    // Arrange: two coordinators of one deployment; a job slow to publish (250 devices/s on
    // 6,000 devices: 24 s of planning) so the stall falls mid-plan.
    let mut app = spawn_app(2, &[]).await;
    let (second_pid, second_api) = app
        .cluster
        .start_another_coordinator()
        .await
        .expect("second coordinator");
    let n = 6_000;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 250}})))
        .await;
    app.wait_for_terminal(id, 300, Duration::from_secs(60))
        .await;
    let mut redis = app.redis.clone();
    let holder: String = redis::AsyncCommands::get(&mut redis, app.names.planner_lock(id))
        .await
        .expect("a coordinator holds the planner lease");
    let first_pid = app.cluster.coordinator_pid().expect("first coordinator");
    let stalled = if holder.contains(&format!("-{first_pid}-")) {
        first_pid
    } else {
        assert!(holder.contains(&format!("-{second_pid}-")), "{holder}");
        second_pid
    };
    // The checkpointed count, sampled every 100 ms for the whole test: it never moves back.
    let sampler = {
        let (mut r, key) = (redis.clone(), app.names.job(id));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let published: Option<u64> = redis::AsyncCommands::hget(&mut r, &key, "published")
                    .await
                    .expect("published");
                let state: Option<String> = redis::AsyncCommands::hget(&mut r, &key, "state")
                    .await
                    .expect("state");
                seen.push(published.unwrap_or(0));
                if state.as_deref() == Some("COMPLETED") {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Act: the planning coordinator is stopped for longer than its 15 s lease, then
    // continued while the other one plans.
    let pid = nix::unistd::Pid::from_raw(stalled as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    tokio::time::sleep(Duration::from_secs(19)).await;
    let taken: String = redis::AsyncCommands::get(&mut redis, app.names.planner_lock(id))
        .await
        .expect("the job's planning was taken over");
    assert!(
        !taken.contains(&format!("-{stalled}-")),
        "still held by the stalled coordinator: {taken}"
    );
    nix::sys::signal::kill(pid, Signal::SIGCONT).expect("SIGCONT");
    // The continued process first closes the idle HTTP connections it timed out meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Assert: the job is exact; the checkpoint never moved back; both coordinators together
    // published at most one batch (500) beyond the job's devices.
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), sampler)
        .await
        .expect("sampler ends")
        .expect("sampler");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the checkpoint moved back: {seen:?}"
    );
    let mut total = 0.0;
    for api in [app.cluster.api.clone(), second_api] {
        let (_, text) = app.get_text(&format!("{api}/metrics")).await;
        total += crate::helpers::metric(&text, "fleetbatch_tasks_published_total", &[]);
    }
    assert!(
        total <= (n + 500) as f64,
        "{total} tasks published for {n} devices"
    );
    app.teardown().await;
}

#[tokio::test]
async fn tasks_removed_from_the_broker_by_hand_end_timed_out_with_the_reason_and_the_job_completes()
{
    let mut app = spawn_app(0, &[("FLEETBATCH_COORDINATOR__RECONCILE_GRACE_SECS", "2")]).await;
    let n = 200;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"retry": {"deadline_secs": 8}})))
        .await;
    // Every task is published, then the queue is purged by hand: no copy of any task is
    // left anywhere.
    crate::rollouts::wait_until(&app, id, Duration::from_secs(30), |j| {
        j["planning_done"] == true
    })
    .await;
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-purge")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let purged = ch
        .queue_purge(
            app.names.tasks_queue().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .expect("purge");
    let _ = conn.close(200, "done".into()).await;
    let per_message = u32::from(app.settings.amqp.tasks_per_message);
    assert_eq!(
        purged,
        (n as u32).div_ceil(per_message),
        "every task was waiting in the queue, {per_message} to a message"
    );
    app.cluster.start_worker().expect("worker");

    // Past the deadline and its grace the sweep ends each device, saying why.
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["timed_out"], n, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    for (device, s) in &statuses {
        assert_eq!(s.state, ExecutionState::TimedOut, "{device}: {s:?}");
        let why = s.error.as_deref().unwrap_or_default();
        assert!(why.contains("lost"), "{device}: {why}");
    }
    app.teardown().await;
}

#[tokio::test]
async fn a_task_dead_lettered_as_poison_ends_its_device_failed_with_the_reason_at_once() {
    let mut app = spawn_app(0, &[]).await;
    let n = 200;
    app.import_fleet(n).await;
    // No deadline: without a watch on the dead letters the job would wait for the silence
    // sweep (an hour).
    let id = app.create_job(&firmware_job(json!({}))).await;
    crate::rollouts::wait_until(&app, id, Duration::from_secs(30), |j| {
        j["planning_done"] == true
    })
    .await;
    // One task taken off the queue and put back as poison: a copy a worker must refuse.
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-poison")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let taken = ch
        .basic_get(
            app.names.tasks_queue().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
        .expect("a task waits");
    let _ = conn.close(200, "done".into()).await;
    // A message carries several tasks: one of them is poisoned, the others go back as they
    // were, in the same message.
    let mut tasks = shared::messages::decode_tasks(&taken.delivery.data).expect("tasks");
    tasks[0].attempts = shared::job::MAX_ATTEMPTS + 1;
    let task = tasks[0].clone();
    let body = if tasks.len() == 1 {
        shared::messages::encode(&task)
    } else {
        shared::messages::encode(&shared::messages::TaskBatch {
            version: shared::messages::WIRE_VERSION,
            tasks,
        })
    };
    app.publish_raw(
        app.names.tasks_exchange(),
        shared::topology::TASK_ROUTING_KEY,
        &body.expect("encode"),
    )
    .await;
    app.cluster.start_worker().expect("worker");

    // The poisoned device ends FAILED with the dead-letter reason, every other device
    // SUCCEEDED, the job COMPLETED; the operators' queue still has the message to look at.
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["failed"], 1, "{job}");
    assert_eq!(job["succeeded"], n - 1, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let poisoned = &statuses[&task.device_id];
    assert_eq!(poisoned.state, ExecutionState::Failed, "{poisoned:?}");
    let why = poisoned.error.as_deref().unwrap_or_default();
    assert!(
        why.contains("dead-lettered from") && why.contains("attempts"),
        "{why}"
    );
    assert_eq!(app.drain_dead_letters().await.len(), 1);
    app.teardown().await;
}

/// Closes, from the broker's side, every AMQP connection of the worker process `pid`.
async fn close_worker_connections(pid: u32) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .await
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let marker = format!("-{pid}-");
    let mut closed = 0;
    for line in text
        .lines()
        .filter(|l| l.contains("fleetbatch-worker") && l.contains(&marker))
    {
        let Some(conn) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", conn, "e2e: connection cut"])
            .status()
            .await
            .expect("rabbitmqctl runs");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

#[tokio::test]
async fn a_worker_whose_broker_connection_is_cut_mid_attempt_never_delivers_an_execution_twice() {
    // 40-second attempts: longer than the 30 s a worker waits for in-flight work before it
    // builds a new broker session, so the old handlers still run when the redelivered tasks
    // reach the new one.
    let mut app = spawn_app(
        0,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "40000"),
            ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
            ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "90000"),
        ],
    )
    .await;
    let n = 10;
    app.import_fleet(n).await;
    app.cluster.start_worker().expect("worker");
    let id = app.create_job(&firmware_job(json!({}))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app
        .statuses(id)
        .await
        .values()
        .filter(|s| s.state == ExecutionState::InProgress)
        .count()
        < n as usize
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all in delivery"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = app.cluster.worker_pid(0).expect("worker pid");
    let closed = close_worker_connections(pid).await;
    assert!(closed >= 1, "no connection of worker {pid} found");

    let job = app.wait_for_job(id, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["succeeded"], n, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let attempts: u64 = statuses.values().map(|s| u64::from(s.attempts)).sum();
    let totals = app.sim_totals(id).await;
    assert_eq!(
        totals.get("deliveries").copied().unwrap_or(0),
        attempts,
        "deliveries beyond the attempts recorded: {totals:?}"
    );
    assert_eq!(
        totals.get("duplicate_applications").copied().unwrap_or(0),
        0,
        "{totals:?}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_results_channel_the_broker_closes_is_recovered_and_readiness_says_so_meanwhile() {
    let mut app = spawn_app(
        0,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "5"),
            ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0"),
        ],
    )
    .await;
    let observed = app.start_observed_worker();
    let n = 3_000;
    app.import_fleet(n).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    crate::rollouts::wait_until(&app, id, Duration::from_secs(60), |j| {
        j["terminal"].as_u64() > Some(300)
    })
    .await;
    // The results exchange disappears: the broker closes the channel of the next result
    // batch published to it (404), while the connection and the tasks consumer live on.
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-delete")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_delete(
        app.names.results_exchange().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .expect("exchange deleted");
    let _ = conn.close(200, "done".into()).await;
    let ready = format!("http://127.0.0.1:{observed}/readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = app.get_text(&ready).await;
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker kept saying ready with its results channel closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A coordinator start declares the topology again; the worker comes back and the job
    // finishes exact.
    app.crash_coordinator().await;
    let job = app.wait_for_job(id, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    let (status, _) = app.get_text(&ready).await;
    assert_eq!(status, 200, "ready again");
    app.teardown().await;
}

#[tokio::test]
async fn on_quorum_queues_jobs_are_exact_and_a_task_that_keeps_failing_its_consumers_is_dead_lettered_as_poison()
 {
    // Quorum queues (retry queues included) with a delivery limit of 2; the first broker
    // address every process is given is down, the second is the broker.
    let real = shared::config::test_amqp_url();
    let mut app = spawn_app(
        0,
        &[
            ("FLEETBATCH_AMQP__QUEUE_TYPE", "quorum"),
            ("FLEETBATCH_AMQP__DELIVERY_LIMIT", "2"),
            ("FLEETBATCH_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
            ("FLEETBATCH_AMQP__FALLBACK_URLS", &real),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.1"),
            ("FLEETBATCH_WORKER__BACKOFF__BUDGET_MS", "0"),
            ("FLEETBATCH_WORKER__RETRY_DELAYS_MS", "100,200,300"),
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ],
    )
    .await;
    let n = 500;
    app.import_fleet(n).await;
    let poisoned = harness::fleet::device_id(7);

    // A one-device job whose task is handed back by its consumer until the broker gives up.
    let first = app
        .create_job(&firmware_job(json!({"target": {"devices": [poisoned]}})))
        .await;
    crate::rollouts::wait_until(&app, first, Duration::from_secs(30), |j| {
        j["planning_done"] == true
    })
    .await;
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-crashing-consumer")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let mut deliveries = 0;
    while let Some(m) = ch
        .basic_get(
            app.names.tasks_queue().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic_get")
    {
        deliveries += 1;
        assert!(deliveries <= 5, "the broker never dead-lettered the task");
        m.delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(
        deliveries, 3,
        "delivered up to the limit of 2, then once more"
    );

    // A job for the whole fleet, with retries through the quorum retry queues.
    let second = app.create_job(&firmware_job(json!({}))).await;
    app.cluster.start_worker().expect("worker");
    app.cluster.start_worker().expect("worker");

    let job = app.wait_for_job(first, Duration::from_secs(60)).await;
    assert_eq!(job["failed"], 1, "{job}");
    let statuses = app.assert_exact(first, &[poisoned.clone()].into()).await;
    let why = statuses[&poisoned].error.as_deref().unwrap_or_default();
    assert!(why.contains("poison"), "{why}");
    let job = app.wait_for_job(second, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(second, &fleet_ids(n)).await;
    let others: Vec<_> = statuses
        .iter()
        .filter(|(_, s)| s.state != ExecutionState::Succeeded)
        .collect();
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(job["succeeded"], n, "{job}");
    assert_eq!(app.drain_dead_letters().await.len(), 1);
    app.teardown().await;
}

#[tokio::test]
async fn three_coordinators_and_four_workers_the_planning_coordinator_sigkilled_another_takes_the_job_over()
 {
    let mut app = spawn_app(4, &[]).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(
            app.cluster
                .start_another_coordinator()
                .await
                .expect("another coordinator"),
        );
    }
    // 30 s of publishing (200 devices/s on 6,000 devices), so the kill falls mid-plan.
    let n = 6_000;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 200}})))
        .await;
    app.wait_for_terminal(id, 400, Duration::from_secs(60))
        .await;
    let mut redis = app.redis.clone();
    let lease = app.names.planner_lock(id);
    let holder: String = redis::AsyncCommands::get(&mut redis, &lease)
        .await
        .expect("a coordinator plans the job");
    let first_pid = app.cluster.coordinator_pid().expect("first coordinator");
    let pid_of = |h: &str| {
        std::iter::once(first_pid)
            .chain(others.iter().map(|(p, _)| *p))
            .find(|p| h.contains(&format!("-{p}-")))
            .expect("the holder is one of the three")
    };
    let planning = pid_of(&holder);

    // Act: the planning coordinator dies without a word.
    let killed_at = tokio::time::Instant::now();
    if planning == first_pid {
        app.cluster
            .signal_coordinator(Signal::SIGKILL)
            .expect("kill");
    } else {
        app.cluster
            .kill_another_coordinator(planning)
            .expect("kill");
    }

    // Assert: another coordinator holds the job within the lease (15 s), its 250 ms poll and
    // a second of a loaded machine.
    let taken_by = loop {
        let now: Option<String> = redis::AsyncCommands::get(&mut redis, &lease)
            .await
            .expect("lease");
        if let Some(h) = now.filter(|h| *h != holder) {
            break h;
        }
        assert!(
            killed_at.elapsed() < Duration::from_millis(16_250),
            "no coordinator took the job over within the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = killed_at.elapsed();
    assert_ne!(pid_of(&taken_by), planning);
    eprintln!("taken over {} ms after the kill", took.as_millis());
    // The API of a live coordinator follows the job to its end, exact.
    let live = if planning == first_pid {
        others[0].1.clone()
    } else {
        app.cluster.api.clone()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, text) = app.get_text(&format!("{live}/v1/jobs/{id}")).await;
        let job: serde_json::Value = serde_json::from_str(&text).expect("job");
        if job["state"] == "COMPLETED" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if planning != first_pid {
        app.assert_exact(id, &fleet_ids(n)).await;
    } else {
        // The harness's client speaks to the first coordinator: start it again to audit.
        app.cluster.start_coordinator().await.expect("restart");
        app.assert_exact(id, &fleet_ids(n)).await;
    }
    app.teardown().await;
}

#[tokio::test]
async fn tasks_stranded_in_a_retry_queue_are_sent_again_and_no_device_is_lost() {
    // Tasks that fail wait 10 s in the retry queue; the queue is purged while they wait, as
    // a broker that stops forwarding a retry queue leaves them. After 3 s of quiet past
    // their due time the coordinator sends them again.
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.2"),
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "2"),
            ("FLEETBATCH_WORKER__BACKOFF__BUDGET_MS", "0"),
            ("FLEETBATCH_WORKER__RETRY_DELAYS_MS", "10000,10000"),
            ("FLEETBATCH_COORDINATOR__RECONCILE_RESEND_SECS", "3"),
        ],
    )
    .await;
    let n = 1_000;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"retry": {"max_attempts": 10}})))
        .await;
    // Every first attempt made: the devices that failed wait in the retry queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        let statuses = app.statuses(id).await;
        let retrying = statuses
            .values()
            .filter(|s| s.state == ExecutionState::RetryScheduled)
            .count();
        let done = statuses.values().filter(|s| s.state.is_terminal()).count();
        if statuses.len() == n as usize && retrying + done == n as usize && retrying > 0 {
            break retrying;
        }
        assert!(tokio::time::Instant::now() < deadline, "first attempts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-purge")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let purged = ch
        .queue_purge(
            app.names.retry_queue(0).into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .expect("purge");
    let _ = conn.close(200, "done".into()).await;
    eprintln!("{waiting} devices waiting for a retry, {purged} tasks purged from the retry queue");
    assert!(purged > 0, "nothing waited in the retry queue");

    // 10 s to their due time, 3 s of quiet past it, then their second attempts.
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let lost = statuses
        .values()
        .filter(|s| s.error.as_deref().is_some_and(|e| e.contains("lost")))
        .count();
    assert_eq!(lost, 0, "devices ended as lost");
    app.teardown().await;
}
