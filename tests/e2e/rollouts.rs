//! Safe rollouts end to end, on real processes and fleet-sim over HTTP: waves contacted in
//! order behind their gates (checked from the devices' own delivery timestamps), a failing
//! canary that pauses the job, a coordinator SIGKILL at the gate, resume and approve, abort
//! criteria, pause mid-job, and the ramp.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use redis::AsyncCommands;
use serde_json::{Value, json};
use shared::state::ExecutionState;
use uuid::Uuid;

use crate::{
    devices::{extra_deliveries, get_json, start_sim},
    helpers::{TestApp, firmware_job, fleet_ids, spawn_app},
};

/// Workers speaking HTTP to fleet-sim on `port`, devices failing permanently at `fail_rate`.
async fn http_fleet(port: u16, fail_rate: &str) -> TestApp {
    http_fleet_retrying(port, fail_rate, "0").await
}

/// As [`http_fleet`], with transient failures at `transient_rate` (retried after 20 ms).
async fn http_fleet_retrying(port: u16, fail_rate: &str, transient_rate: &str) -> TestApp {
    http_fleet_with(port, fail_rate, transient_rate, &[]).await
}

/// As [`http_fleet_retrying`], with `extra` settings.
pub(crate) async fn http_fleet_with(
    port: u16,
    fail_rate: &str,
    transient_rate: &str,
    extra: &[(&str, &str)],
) -> TestApp {
    let template = format!("http://127.0.0.1:{port}/devices/{{device_id}}/jobs");
    let mut env = vec![
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "2"),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "2"),
        (
            "FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE",
            transient_rate,
        ),
        ("FLEETBATCH_WORKER__BACKOFF__INITIAL_MS", "20"),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", fail_rate),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ("FLEETBATCH_WORKER__TRANSPORT", "http"),
        ("FLEETBATCH_WORKER__HTTP__URL_TEMPLATE", template.as_str()),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "2000"),
    ];
    env.extend_from_slice(extra);
    spawn_app(2, &env).await
}

/// Creates a job (with `extra`) whose first wave is a canary of 50 devices gated at
/// `threshold` % success, then the rest; waits until the canary's failed gate pauses it and
/// checks the reason. Returns the job and its view.
async fn paused_canary(app: &TestApp, threshold: u32, extra: Value) -> (Uuid, Value) {
    let mut spec = firmware_job(extra);
    spec["rollout"] = json!({"waves": [
        {"name": "canary", "count": 50, "success_threshold": threshold},
        {}
    ]});
    let id = app.create_job(&spec).await;
    let job = wait_until(app, id, Duration::from_secs(120), |j| {
        j["state"] == "PAUSED"
    })
    .await;
    let reason = job["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("gate of canary failed"), "{job}");
    (id, job)
}

/// A webhook endpoint on loopback that answers 200 and keeps every JSON body.
async fn webhook_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::{Router, extract::State, routing::post};
    use std::future::IntoFuture as _;
    type Bodies = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;
    let bodies: Bodies = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State(b): State<Bodies>, body: axum::body::Bytes| async move {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        b.lock().expect("lock").push(v);
                    }
                    "ok"
                },
            ),
        )
        .with_state(bodies.clone());
    tokio::spawn(axum::serve(listener, app).into_future());
    (url, bodies)
}

/// The job's event stream read until it contains every one of `needles` (or 20 s pass);
/// the text read.
async fn sse_until(app: &TestApp, id: Uuid, needles: &[&str]) -> String {
    let mut resp = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .expect("events");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !needles.iter().all(|n| text.contains(n)) {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => panic!("the event stream never said {needles:?}: {text}"),
        }
    }
    text
}

/// When each device was first and last reached by `job`, from fleet-sim.
async fn contacts(app: &TestApp, sim: &str, job: Uuid) -> HashMap<String, (u64, u64)> {
    let v: Value = get_json(app, &format!("{sim}/contacts/{job}")).await;
    v.as_object()
        .expect("an object")
        .iter()
        .map(|(d, c)| {
            (
                d.clone(),
                (
                    c["first_ms"].as_u64().expect("first"),
                    c["last_ms"].as_u64().expect("last"),
                ),
            )
        })
        .collect()
}

/// Every device of wave k+1 was first reached after the last delivery to any device of wave
/// k, for each of `waves` waves (a gate that waits for every device of its wave allows no
/// overlap).
fn assert_waves_in_order(
    seen: &HashMap<String, (u64, u64)>,
    wave_of: &HashMap<String, usize>,
    waves: usize,
) {
    for k in 0..waves - 1 {
        let last_of_k = seen
            .iter()
            .filter(|(d, _)| wave_of[*d] == k)
            .map(|(_, c)| c.1)
            .max()
            .expect("wave k reached");
        let first_of_next = seen
            .iter()
            .filter(|(d, _)| wave_of[*d] == k + 1)
            .map(|(_, c)| c.0)
            .min()
            .expect("wave k+1 reached");
        assert!(
            first_of_next >= last_of_k,
            "wave {} was reached at {first_of_next}, before wave {k}'s last delivery at {last_of_k}",
            k + 1
        );
    }
}

/// The wave of every device of `job`, as the planner assigned them.
async fn waves_of(app: &TestApp, job: Uuid) -> HashMap<String, usize> {
    let mut redis = app.redis.clone();
    let raw: HashMap<String, usize> = redis
        .hgetall(app.names.job_wave_of(job))
        .await
        .expect("wave of");
    raw
}

/// Polls job `id` until `pred` holds (or fails after `timeout`).
pub(crate) async fn wait_until(
    app: &TestApp,
    id: Uuid,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = app.job(id).await;
        if pred(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_waves_reach_no_device_before_the_previous_gate_passed() {
    let port = harness::cluster::free_port().expect("port");
    // Transient failures keep some devices of each wave busy with retries while most of the
    // wave is done: a next wave started early would overlap them.
    let mut app = http_fleet_retrying(port, "0.02", "0.05").await;
    let n = 20_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"waves": [
            {"name": "canary", "count": 50, "success_threshold": 90},
            {"percent": 10, "success_threshold": 90},
            {}
        ]}})))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;

    // The split: 50, 10 % and the rest, each device in one wave.
    let sizes: Vec<u64> = job["rollout"]["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["size"].as_u64().expect("size"))
        .collect();
    assert_eq!(sizes, vec![50, 2_000, 17_950], "{job}");
    let wave_of = waves_of(&app, id).await;
    assert_eq!(wave_of.len() as u64, n);
    // Per-wave counters add up to the job's.
    let succeeded: u64 = job["rollout"]["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["counts"]["succeeded"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(Some(succeeded), job["succeeded"].as_u64(), "{job}");

    // Order, from the devices' clocks: every device of wave k+1 was first reached after the
    // last delivery to any device of wave k (the gate needs every device of wave k finished).
    let seen = contacts(&app, &sim, id).await;
    assert_eq!(seen.len() as u64, n, "every device was reached");
    assert_waves_in_order(&seen, &wave_of, 3);
    // Failures were real: about 2 % of devices, in every wave.
    let failed = statuses
        .values()
        .filter(|s| s.state == ExecutionState::Failed)
        .count();
    assert!((200..=800).contains(&failed), "{failed} failed");
    app.teardown().await;
}

#[tokio::test]
async fn a_failing_canary_pauses_the_job_and_survives_a_coordinator_sigkill_until_resumed() {
    let port = harness::cluster::free_port().expect("port");
    let (hook, received) = webhook_receiver().await;
    let mut app = http_fleet_with(
        port,
        "0.3",
        "0",
        &[
            ("FLEETBATCH_COORDINATOR__WEBHOOK_SECRET", "s3cret-for-tests"),
            ("FLEETBATCH_COORDINATOR__WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    )
    .await;
    let n = 2_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    // The canary fails its gate: PAUSED, with the reason.
    let (id, _) = paused_canary(&app, 95, json!({"notify": {"webhooks": [{"url": hook}]}})).await;
    // Listeners heard it: a job.wave "failed" webhook for the canary and a job.state PAUSED
    // one with the reason; the event stream's state event carries the reason too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().expect("lock").clone();
        let wave_failed = got
            .iter()
            .any(|v| v["event"] == "job.wave" && v["what"] == "failed" && v["wave"] == 0);
        let paused = got.iter().any(|v| {
            v["event"] == "job.state"
                && v["state"] == "PAUSED"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("gate of canary failed"))
        });
        if wave_failed && paused {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "webhooks: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The state event carries the reason; a wave event follows the rollout's phase.
    sse_until(&app, id, &["gate of canary failed", "event: wave"]).await;
    let wave_of = waves_of(&app, id).await;
    let canary: HashSet<&String> = wave_of
        .iter()
        .filter(|(_, w)| **w == 0)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(canary.len(), 50);

    // A coordinator SIGKILL while paused at the gate changes nothing.
    app.crash_coordinator().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.job(id).await["state"], "PAUSED");
    let seen = contacts(&app, &sim, id).await;
    let outside: Vec<&String> = seen.keys().filter(|d| !canary.contains(d)).collect();
    assert!(
        outside.is_empty(),
        "devices outside the canary reached: {outside:?}"
    );
    assert_eq!(seen.len(), 50, "every canary device was reached");

    // Resume: the gate is released and the rest of the fleet gets the job, exact.
    let out = app
        .fleetbatch(&["job", "resume", &id.to_string(), "--json"])
        .await;
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["state"], "IN_PROGRESS", "{v}");
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    assert_eq!(contacts(&app, &sim, id).await.len() as u64, n);
    let stats: Value = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    // A finished job can no longer be paused.
    let r = app
        .http
        .post(app.url(&format!("/v1/jobs/{id}/pause")))
        .send()
        .await
        .expect("pause");
    assert_eq!(r.status().as_u16(), 409);
    app.teardown().await;
}

#[tokio::test]
async fn a_tripped_abort_criterion_aborts_the_job_and_cancels_what_was_not_sent() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet(port, "0.25").await;
    let n = 20_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {
            "max_per_second": 500,
            "abort": [{"failure_type": "FAILED", "threshold_percent": 10, "min_executed": 500}]
        }})))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "ABORTED", "{job}");
    let reason = job["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("FAILED >= 10 %"), "{job}");

    // Every device terminal and counted once; the ones never reached are CANCELED.
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let seen = contacts(&app, &sim, id).await;
    let canceled = job["canceled"].as_u64().unwrap_or(0);
    assert!(
        canceled > 1_000,
        "most of the fleet was never sent the job: {job}"
    );
    for (device, s) in &statuses {
        if !seen.contains_key(device) {
            assert_eq!(s.state, ExecutionState::Canceled, "{device}: {s:?}");
        }
    }
    // Nothing reached a device more than a second after the abort.
    let mut redis = app.redis.clone();
    let aborted_at: u64 = redis
        .hget(app.names.job(id), "aborted_at_ms")
        .await
        .expect("aborted at");
    let last = seen.values().map(|c| c.1).max().unwrap_or(0);
    assert!(
        last <= aborted_at + 1_000,
        "a device was reached {} ms after the abort",
        last - aborted_at
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_paused_job_reaches_no_device_until_resumed_and_the_ramp_speeds_up() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet(port, "0").await;
    let n = 600;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    // 20/s for the first 40 devices, then 40/s, 80/s, capped at 160/s.
    let id = app
        .create_job(&firmware_job(json!({"rollout": {
            "max_per_second": 160,
            "ramp": {"base_per_second": 20, "increment_factor": 2.0, "increase_after": {"notified": 40}}
        }})))
        .await;
    wait_until(&app, id, Duration::from_secs(60), |j| {
        j["terminal"].as_u64() >= Some(150)
    })
    .await;
    let out = app
        .fleetbatch(&["job", "pause", &id.to_string(), "--reason", "night"])
        .await;
    assert!(out.contains("PAUSED"), "{out}");
    // Deliveries under way finish; after a second nothing more reaches a device.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = contacts(&app, &sim, id).await.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = app.job(id).await;
    assert_eq!(job["state"], "PAUSED");
    assert!(
        job["state_reason"]
            .as_str()
            .unwrap_or_default()
            .ends_with("night"),
        "{job}"
    );
    assert_eq!(
        contacts(&app, &sim, id).await.len(),
        before,
        "reached while paused"
    );
    assert!((before as u64) < n);

    app.fleetbatch(&["job", "resume", &id.to_string()]).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;

    // The ramp, from the devices' clocks: the first 40 devices took about 2 s (20/s), the
    // next 40 about 1 s (40/s); the tail ran near the cap.
    let mut firsts: Vec<u64> = contacts(&app, &sim, id)
        .await
        .values()
        .map(|c| c.0)
        .collect();
    firsts.sort_unstable();
    let span = |a: usize, b: usize| (firsts[b] - firsts[a]) as f64 / 1000.0;
    let step1 = span(0, 39);
    let step2 = span(40, 79);
    assert!(
        (1.4..=3.0).contains(&step1),
        "first 40 in {step1} s (want about 2)"
    );
    assert!(
        (0.6..=1.6).contains(&step2),
        "next 40 in {step2} s (want about 1)"
    );
    assert!(step2 < step1, "the rate went up: {step1} s then {step2} s");
    app.teardown().await;
}

#[tokio::test]
async fn max_in_flight_per_site_is_never_exceeded() {
    // Devices answer after 40 ms; 1,000 devices over 50 sites, at most 2 per site at once,
    // while two workers could take 512 at once.
    let port = harness::cluster::free_port().expect("port");
    let template = format!("http://127.0.0.1:{port}/devices/{{device_id}}/jobs");
    let env = [
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "40"),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0"),
        ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ("FLEETBATCH_WORKER__TRANSPORT", "http"),
        ("FLEETBATCH_WORKER__HTTP__URL_TEMPLATE", template.as_str()),
        ("FLEETBATCH_WORKER__RETRY_DELAYS_MS", "200,1000"),
    ];
    let mut app = spawn_app(2, &env).await;
    let n = 1_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {
            "max_in_flight": {"tag": "site", "max": 2}
        }})))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;

    // From the devices' clocks: how many devices of one site were busy at once.
    let seen = contacts(&app, &sim, id).await;
    let replied = replies(&app, &sim, id).await;
    let mut by_site: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for i in 0..n {
        let d = harness::fleet::device(i);
        let busy = (seen[&d.id].1, replied[&d.id]);
        by_site
            .entry(d.tags["site"].clone())
            .or_default()
            .push(busy);
    }
    let mut most = 0;
    for (site, spans) in &by_site {
        // Events: +1 at a start, -1 at an end (ends first at equal times).
        let mut events: Vec<(u64, i32)> = spans
            .iter()
            .flat_map(|(a, b)| [(*a, 1), (*b, -1)])
            .collect();
        events.sort_by_key(|(t, d)| (*t, *d));
        let (mut now, mut peak) = (0, 0);
        for (_, d) in events {
            now += d;
            peak = peak.max(now);
        }
        assert!(peak <= 2, "{peak} devices of {site} busy at once");
        most = most.max(peak);
    }
    assert_eq!(most, 2, "the limit was reached somewhere");
    app.teardown().await;
}

/// When each device last answered `job`, from fleet-sim (HTTP devices).
async fn replies(app: &TestApp, sim: &str, job: Uuid) -> HashMap<String, u64> {
    let v: Value = get_json(app, &format!("{sim}/contacts/{job}")).await;
    v.as_object()
        .expect("an object")
        .iter()
        .map(|(d, c)| (d.clone(), c["replied_ms"].as_u64().expect("replied")))
        .collect()
}

#[tokio::test]
async fn coordinator_sigkills_at_a_gate_mid_wave_and_while_paused_change_no_outcome() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet(port, "0.01").await;
    let n = 5_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {
            "max_per_second": 1000,
            "waves": [
                {"name": "canary", "count": 200, "soak_secs": 3},
                {"percent": 20, "soak_secs": 1},
                {}
            ]
        }})))
        .await;
    let phase = |j: &Value| {
        (
            j["rollout"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            j["rollout"]["wave"].as_u64().unwrap_or(0),
        )
    };

    // 1. While the canary soaks after its gate passed.
    wait_until(&app, id, Duration::from_secs(60), |j| {
        phase(j) == ("soak".to_owned(), 0)
    })
    .await;
    app.crash_coordinator().await;
    // 2. Mid-wave: the second wave is being published.
    wait_until(&app, id, Duration::from_secs(60), |j| {
        phase(j) == ("publishing".to_owned(), 1) && j["terminal"].as_u64() > Some(400)
    })
    .await;
    app.crash_coordinator().await;
    // 3. While paused in the last wave.
    wait_until(&app, id, Duration::from_secs(60), |j| {
        phase(j) == ("publishing".to_owned(), 2) && j["terminal"].as_u64() > Some(1_500)
    })
    .await;
    app.fleetbatch(&["job", "pause", &id.to_string()]).await;
    app.crash_coordinator().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = app.job(id).await;
    assert_eq!(job["state"], "PAUSED", "{job}");
    app.fleetbatch(&["job", "resume", &id.to_string()]).await;

    // The job ends as if nothing happened: exact, in wave order, nothing applied twice and
    // no device reached more often than its recorded attempts.
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let wave_of = waves_of(&app, id).await;
    let seen = contacts(&app, &sim, id).await;
    assert_waves_in_order(&seen, &wave_of, 3);
    let extra = extra_deliveries(&app, &sim, id, &statuses).await;
    assert_eq!(extra, 0, "deliveries beyond the recorded attempts");
    let stats: Value = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    app.teardown().await;
}

#[tokio::test]
async fn an_aborted_job_with_on_abort_rollback_rolls_back_exactly_its_changed_devices() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet(port, "0.25").await;
    let n = 2_000;
    start_sim(&mut app, Some(port), n, "none").await;
    let rollback = json!({
        "type": "firmware_update",
        "url": "https://fw.example.com/1.9.bin",
        "version": "1.9.0",
        "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    });
    let id = app
        .create_job(&firmware_job(json!({
            "rollback": rollback,
            "rollout": {
                "max_per_second": 400,
                "abort": [{"failure_type": "FAILED", "threshold_percent": 10, "min_executed": 200}],
                "on_abort": "rollback"
            }
        })))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "ABORTED", "{job}");
    let changed: HashSet<String> = app
        .statuses(id)
        .await
        .into_iter()
        .filter(|(_, s)| matches!(s.state, ExecutionState::Succeeded | ExecutionState::Failed))
        .map(|(d, _)| d)
        .collect();

    // The rollback job appears by itself, with the rollback action, for exactly those.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rollback_id = loop {
        let list: Value = app
            .http
            .get(app.url("/v1/jobs"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        let found = list["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["job_id"] != json!(id))
            .and_then(|j| j["job_id"].as_str().map(str::to_owned));
        if let Some(found) = found {
            break Uuid::parse_str(&found).expect("uuid");
        }
        assert!(tokio::time::Instant::now() < deadline, "no rollback job");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let done = app
        .wait_for_job(rollback_id, Duration::from_secs(120))
        .await;
    assert_eq!(done["state"], "COMPLETED", "{done}");
    assert_eq!(done["spec"]["action"], rollback, "{done}");
    assert_eq!(done["spec"]["target"]["from_job"]["job_id"], json!(id));
    assert_eq!(done["spec"]["rollout"]["abort"], json!([]), "{done}");
    app.assert_exact(rollback_id, &changed).await;
    // Exactly one rollback job.
    let list: Value = app
        .http
        .get(app.url("/v1/jobs"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(2), "{list}");
    app.teardown().await;
}

#[tokio::test]
async fn a_canary_whose_installs_succeed_but_devices_turn_unhealthy_fails_its_gate() {
    // About 30 % of devices install fine and then report unhealthy or roll themselves back.
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(
        port,
        "0",
        "0",
        &[
            ("FLEETBATCH_SIMULATOR__UNHEALTHY_RATE", "0.2"),
            ("FLEETBATCH_SIMULATOR__ROLLBACK_RATE", "0.1"),
        ],
    )
    .await;
    let n = 1_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let (id, job) = paused_canary(
        &app,
        90,
        json!({"health": {"window_secs": 10, "probe_every_secs": 1}}),
    )
    .await;

    // Every canary install succeeded on the device, none FAILED; the device's health says
    // which ones count.
    let stats: Value = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(stats["applications"], 50, "{stats}");
    assert_eq!(job["failed"], 0, "{job}");
    let statuses = app.statuses(id).await;
    let wave_of = waves_of(&app, id).await;
    let mut seen = HashMap::new();
    for (device, wave) in &wave_of {
        if *wave != 0 {
            assert!(
                !statuses.contains_key(device),
                "{device} outside the canary was sent the job"
            );
            continue;
        }
        let profile =
            devices::simdevice::DeviceProfile::for_device(&app.settings.simulator, device);
        let want = if profile.rolls_back {
            ExecutionState::RolledBack
        } else if profile.unhealthy {
            ExecutionState::Unhealthy
        } else {
            ExecutionState::Succeeded
        };
        let got = &statuses[device];
        assert_eq!(got.state, want, "{device}: {got:?}");
        *seen.entry(want).or_insert(0) += 1;
    }
    assert!(seen.get(&ExecutionState::RolledBack) > Some(&0), "{seen:?}");
    assert!(seen.get(&ExecutionState::Unhealthy) > Some(&0), "{seen:?}");
    assert_eq!(
        job["unhealthy"].as_u64().unwrap_or(0) + job["rolled_back"].as_u64().unwrap_or(0),
        (seen.get(&ExecutionState::RolledBack).copied().unwrap_or(0)
            + seen.get(&ExecutionState::Unhealthy).copied().unwrap_or(0)) as u64,
        "{job}"
    );
    let rolled = statuses
        .values()
        .find(|s| s.state == ExecutionState::RolledBack)
        .expect("a rolled-back device");
    assert!(
        rolled
            .error
            .as_deref()
            .unwrap_or_default()
            .contains(devices::simdevice::PREVIOUS_VERSION),
        "{rolled:?}"
    );
    // Canceling the paused job ends it: the rest never reached.
    let r = app.cancel(id).await;
    assert_eq!(r, 200);
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "CANCELED", "{job}");
    assert_eq!(job["canceled"], n - 50, "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_spread_wave_starts_its_devices_evenly_over_its_spread() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet(port, "0").await;
    let n = 420;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"waves": [
            {"count": 20},
            {"spread_secs": 4}
        ]}})))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    let wave_of = waves_of(&app, id).await;
    let mut firsts: Vec<u64> = contacts(&app, &sim, id)
        .await
        .into_iter()
        .filter(|(d, _)| wave_of[d] == 1)
        .map(|(_, c)| c.0)
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts.len(), 400);
    let at = |i: usize| (firsts[i] - firsts[0]) as f64 / 1000.0;
    // 400 devices over 4 s: 100 a second, the middle one at about 2 s.
    assert!((3.2..=5.5).contains(&at(399)), "spread over {} s", at(399));
    assert!(
        (1.4..=2.8).contains(&at(200)),
        "the 200th started at {} s",
        at(200)
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_job_whose_targets_are_all_skipped_sends_its_finished_webhook_once() {
    let port = harness::cluster::free_port().expect("port");
    let (hook, received) = webhook_receiver().await;
    let mut app = http_fleet_with(
        port,
        "0",
        "0",
        &[
            ("FLEETBATCH_COORDINATOR__WEBHOOK_SECRET", "s3cret-for-tests"),
            ("FLEETBATCH_COORDINATOR__WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    )
    .await;
    let n = 300;
    start_sim(&mut app, Some(port), n, "none").await;
    // No device has hardware revision Z: every target is SKIPPED by the planner itself.
    let id = app
        .create_job(&firmware_job(json!({
            "compatibility": {"hardware_revisions": ["Z"]},
            "notify": {"webhooks": [{"url": hook}]}
        })))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["skipped"], n, "{job}");
    let finished = |bodies: &[Value]| {
        bodies
            .iter()
            .filter(|v| v["event"] == "job.state" && v["state"] == "COMPLETED")
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while finished(&received.lock().expect("lock")) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job.state COMPLETED webhook: {:?}",
            received.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bodies = received.lock().expect("lock").clone();
    assert_eq!(finished(&bodies), 1, "sent once: {bodies:?}");
    app.teardown().await;
}
