//! Devices that may not be contacted now, on real processes with fleet-sim: maintenance
//! windows to the second in two time zones (every contact inside its device's window, from
//! fleet-sim's own clocks; attempts equal real deliveries), and devices offline over MQTT
//! (no attempt and no worker slot while offline, success within seconds of coming online).

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};
use shared::state::ExecutionState;
use uuid::Uuid;

use crate::{
    devices::{get_json, mqtt_env},
    helpers::{TestApp, firmware_job, fleet_ids, gauge, spawn_app},
    rollouts::http_fleet_with,
};

/// Registers devices `0..n`: even ones in Berlin (`site=berlin`, `tz=Europe/Berlin`), odd
/// ones in New York.
async fn import_two_sites(app: &TestApp, n: u64) {
    let mut body = Vec::new();
    for i in 0..n {
        let (site, tz) = if i.is_multiple_of(2) {
            ("berlin", "Europe/Berlin")
        } else {
            ("newyork", "America/New_York")
        };
        let d = json!({"id": harness::fleet::device_id(i), "groups": ["fleet"],
            "tags": {"site": site, "tz": tz}});
        body.extend(serde_json::to_vec(&d).expect("json"));
        body.push(b'\n');
    }
    let report = app.import_ndjson(body).await;
    assert_eq!(report["imported"], n, "{report}");
}

/// The local hour now and the next one in `zone`, as a cron hour list (a window built from
/// it stays open across an hour boundary during the test).
fn hours_in(zone: chrono_tz::Tz) -> String {
    use chrono::Timelike;
    let h = chrono::Utc::now().with_timezone(&zone).hour();
    format!("{h},{}", (h + 1) % 24)
}

/// Whether `ms` falls in the window opening every 20 s at second `start` (mod 20) for 5 s,
/// with `late` ms of grace for an attempt started just before it closed.
fn inside(ms: u64, start: u64, late: u64) -> bool {
    let into = (ms % 20_000 + 20_000 - start * 1000) % 20_000;
    into < 5_000 + late
}

/// While `n` devices of job `id` are away: the worker whose metrics are on port `observed`
/// holds nothing in flight, and exactly `n` devices are WAITING_FOR_DEVICE with no attempt
/// spent.
async fn assert_waiting_without_a_worker(app: &TestApp, id: Uuid, observed: u16, n: u64) {
    // Handlers whose outcome the job already shows may still be returning (a result's
    // publisher confirm, a parked task's last look); a slot held for a device that is away
    // would stay held for the whole time it is away.
    let mut in_flight = f64::MAX;
    for _ in 0..50 {
        let (_, text) = app
            .get_text(&format!("http://127.0.0.1:{observed}/metrics"))
            .await;
        in_flight = gauge(&text, "fleetbatch_worker_tasks_in_flight", &[]);
        if in_flight == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight, 0.0, "worker slots held while devices are away");
    let statuses = app.statuses(id).await;
    let waiting: Vec<_> = statuses
        .values()
        .filter(|s| s.state == ExecutionState::WaitingForDevice)
        .collect();
    assert_eq!(waiting.len() as u64, n, "visible as WAITING_FOR_DEVICE");
    assert!(waiting.iter().all(|s| s.attempts == 0), "no attempt spent");
}

#[tokio::test]
async fn windows_to_the_second_in_two_time_zones_hold_every_contact_inside_its_window() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(port, "0", "0", &[]).await;
    let n = 5_000;
    let sim = app
        .cluster
        .start_fleet_sim(port, &["--devices", &n.to_string(), "--mqtt", "none"])
        .await
        .expect("fleet-sim");
    import_two_sites(&app, n).await;
    // Berlin devices: open 5 s from second 0, 20 and 40 of the current Berlin hours; New York
    // devices: from second 10, 30 and 50 of the current New York hours. Read in UTC (a zone
    // not taken from the tag), a window's hours would never match and its devices never be
    // contacted.
    let berlin = hours_in(chrono_tz::Europe::Berlin);
    let new_york = hours_in(chrono_tz::America::New_York);
    let spec = firmware_job(json!({
        "maintenance": {
            "time_zone_tag": "tz",
            "windows": [
                {"name": "berlin-night", "cron": format!("0-59/20 * {berlin} * * *"),
                 "duration_secs": 5, "selector": {"tags": {"site": "berlin"}}},
                {"name": "newyork-night", "cron": format!("10-59/20 * {new_york} * * *"),
                 "duration_secs": 5, "selector": {"tags": {"site": "newyork"}}}
            ]
        }
    }));
    let id = app.create_job(&spec).await;
    // Within a closed window the devices wait, visibly, without a worker.
    let mut saw_waiting = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let job = loop {
        let job = app.job(id).await;
        saw_waiting = saw_waiting.max(job["waiting"].as_u64().unwrap_or(0));
        if job["state"] == "COMPLETED" {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "not done: {job}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(job["succeeded"], n, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;

    let contacts: Value = get_json(&app, &format!("{sim}/contacts/{id}")).await;
    let deliveries: Value = get_json(&app, &format!("{sim}/deliveries/{id}")).await;
    let mut outside = Vec::new();
    let mut attempts_off = Vec::new();
    for (device, s) in &statuses {
        assert_eq!(s.state, ExecutionState::Succeeded, "{device}: {s:?}");
        let i: u64 = device[4..].parse().expect("index");
        let start = if i.is_multiple_of(2) { 0 } else { 10 };
        let c = &contacts[device.as_str()];
        for at in [c["first_ms"].as_u64(), c["last_ms"].as_u64()] {
            let at = at.expect("contacted");
            // The worker looks at the window right before each attempt; what it allows past the
            // close is the request's trip to fleet-sim (seen up to 441 ms in the loaded suite
            // when the check was made before the claim instead).
            if !inside(at, start, 500) {
                outside.push(format!(
                    "{device} at {} ms into the 20 s cycle",
                    at % 20_000
                ));
            }
        }
        let got = deliveries[device.as_str()].as_u64().unwrap_or(0);
        if got != u64::from(s.attempts) {
            attempts_off.push(format!(
                "{device}: {got} deliveries, {} attempts",
                s.attempts
            ));
        }
    }
    assert!(
        outside.is_empty(),
        "{} contacts outside their window: {:?}",
        outside.len(),
        &outside[..outside.len().min(10)]
    );
    assert!(
        attempts_off.is_empty(),
        "attempts differ from deliveries: {:?}",
        &attempts_off[..attempts_off.len().min(10)]
    );
    let stats = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    assert!(saw_waiting > 0, "no device was seen waiting for its window");
    app.teardown().await;
}

/// How long the offline tests keep devices away: `default` in the suite, or
/// `FLEETBATCH_TEST_AWAY_SECS` (the acceptance's 3 minutes: 180; see docs/testing.md).
fn away_secs(default: u64) -> u64 {
    std::env::var("FLEETBATCH_TEST_AWAY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts fleet-sim with `n` devices over MQTT in `mode`, the first `away` of them away
/// (offline, or not connected) for `secs`; returns its base URL.
async fn start_sim_with_away(
    app: &mut TestApp,
    n: u64,
    mode: &str,
    away: u64,
    secs: u64,
) -> String {
    let port = harness::cluster::free_port().expect("port");
    app.cluster
        .start_fleet_sim(
            port,
            &[
                "--devices",
                &n.to_string(),
                "--mqtt",
                mode,
                "--offline",
                &away.to_string(),
                "--offline-secs",
                &secs.to_string(),
            ],
        )
        .await
        .expect("fleet-sim")
}

/// How soon after announcing itself online an offline device must have succeeded. The
/// product's target is 5 s (1.2 s seen on a quiet machine); the suite runs many tests at once
/// on two cores, where up to 5.3 s was seen, so the suite allows 10 s.
const ONLINE_WITHIN_MS: u64 = 10_000;

#[tokio::test]
async fn offline_devices_spend_no_attempt_hold_no_worker_and_succeed_soon_after_coming_online() {
    let prefix = format!("fbt{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut env = mqtt_env("5", &prefix);
    env.extend([
        ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
    ]);
    let mut app = spawn_app(2, &env).await;
    let observed = app.start_observed_worker();
    let n = 10_000u64;
    let offline = 2_000u64;
    let offline_secs = away_secs(45);
    let sim = start_sim_with_away(&mut app, n, "fleetbatch", offline, offline_secs).await;
    app.import_fleet(n).await;
    // The devices' offline announcements have reached the workers before the job starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut redis = app.redis.clone();
        let states: Vec<String> = redis::AsyncCommands::hvals(&mut redis, app.names.presence())
            .await
            .expect("presence");
        if states.iter().filter(|s| *s == "offline").count() as u64 == offline {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {offline} offline announcements recorded",
            states.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two attempts of 1.5 s: without waiting, an offline device would be FAILED in seconds.
    let id = app
        .create_job(&firmware_job(json!({"retry": {"max_attempts": 2}})))
        .await;

    // While they are offline: the others finish, the offline ones wait in storage, and the
    // observed worker holds nothing in flight.
    let job = crate::rollouts::wait_until(&app, id, Duration::from_secs(offline_secs), |j| {
        j["succeeded"].as_u64() == Some(n - offline) && j["waiting"].as_u64() == Some(offline)
    })
    .await;
    assert_eq!(job["state"], "IN_PROGRESS", "{job}");
    assert_waiting_without_a_worker(&app, id, observed, offline).await;

    let job = app
        .wait_for_job(id, Duration::from_secs(offline_secs + 120))
        .await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["succeeded"], n, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let stats = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(
        stats["offline_deliveries"], 0,
        "sent to offline devices: {stats}"
    );
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    assert!(stats["came_online_at_ms"].as_u64().is_some(), "{stats}");
    // When each device announced itself online (fleet-sim announces 2,000 one by one).
    let online: Value = get_json(&app, &format!("{sim}/presence")).await;
    let deliveries: Value = get_json(&app, &format!("{sim}/deliveries/{id}")).await;
    let mut slow = Vec::new();
    let mut extra = 0;
    let late: HashMap<&String, u64> = statuses
        .iter()
        .filter(|(d, _)| d[4..].parse::<u64>().expect("index") < offline)
        .map(|(d, s)| {
            let at = online[d.as_str()].as_u64().expect("announced online");
            (d, s.updated_at_ms.saturating_sub(at))
        })
        .collect();
    for (device, s) in &statuses {
        let got = deliveries[device.as_str()].as_u64().unwrap_or(0);
        extra += got.saturating_sub(u64::from(s.attempts));
        if let Some(after) = late.get(device)
            && *after > ONLINE_WITHIN_MS
        {
            slow.push(format!("{device}: {after} ms after coming online"));
        }
    }
    assert_eq!(late.len() as u64, offline);
    assert_eq!(extra, 0, "deliveries beyond the attempts recorded");
    assert!(
        slow.is_empty(),
        "{} devices took longer than {ONLINE_WITHIN_MS} ms: {:?}",
        slow.len(),
        &slow[..slow.len().min(10)]
    );
    eprintln!(
        "offline devices: slowest success {} ms after coming online",
        late.values().max().copied().unwrap_or(0)
    );
    clear_presence(&app, &prefix, offline).await;
    app.teardown().await;
}

/// AWS IoT Jobs devices that connect late: their executions wait QUEUED in Redis, not in a
/// worker, and each device that connects and asks for its next job (`start-next`, as an AWS
/// IoT Device SDK agent does) gets it and is recorded SUCCEEDED within seconds of its own
/// update; attempts count only real deliveries.
#[tokio::test]
async fn aws_iot_jobs_devices_that_connect_late_wait_queued_without_a_worker_and_succeed_on_connecting()
 {
    let _topics = crate::devices::AWS_TOPICS.lock().await;
    let mut env = crate::devices::aws_env();
    env.extend([
        ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "3000"),
    ]);
    let mut app = spawn_app(2, &env).await;
    let observed = app.start_observed_worker();
    let n = 2_000u64;
    let late = 500u64;
    let late_secs = away_secs(40);
    let sim = start_sim_with_away(&mut app, n, "aws-iot-jobs", late, late_secs).await;
    let started = tokio::time::Instant::now();
    app.import_fleet(n).await;
    // Two attempts: a device that is not connected would spend them in seconds if waiting
    // for it were an attempt.
    let id = app
        .create_job(&firmware_job(json!({"retry": {"max_attempts": 2}})))
        .await;

    // While they are away: the others finish, the late ones wait QUEUED in storage, and the
    // observed worker holds nothing in flight.
    let job = crate::rollouts::wait_until(&app, id, Duration::from_secs(late_secs - 5), |j| {
        j["succeeded"].as_u64() == Some(n - late) && j["waiting"].as_u64() == Some(late)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(late_secs),
        "the late devices connected before the check: {job}"
    );
    assert_waiting_without_a_worker(&app, id, observed, late).await;

    let job = app
        .wait_for_job(id, Duration::from_secs(late_secs + 120))
        .await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["succeeded"], n, "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let stats = get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(stats["offline_deliveries"], 0, "{stats}");
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    // When each late device connected (fleet-sim connects the 500 one by one).
    let online: Value = get_json(&app, &format!("{sim}/presence")).await;
    let deliveries: Value = get_json(&app, &format!("{sim}/deliveries/{id}")).await;
    let mut slow = Vec::new();
    let mut off = Vec::new();
    let mut slowest = 0;
    for (device, s) in &statuses {
        let got = deliveries[device.as_str()].as_u64().unwrap_or(0);
        if got != u64::from(s.attempts) || got != 1 {
            off.push(format!(
                "{device}: {got} deliveries, {} attempts",
                s.attempts
            ));
        }
        if device[4..].parse::<u64>().expect("index") < late {
            let at = online[device.as_str()].as_u64().expect("connected");
            let after = s.updated_at_ms.saturating_sub(at);
            slowest = slowest.max(after);
            if after > ONLINE_WITHIN_MS {
                slow.push(format!("{device}: {after} ms after connecting"));
            }
        }
    }
    assert!(
        off.is_empty(),
        "attempts are not real deliveries: {:?}",
        &off[..off.len().min(10)]
    );
    assert!(
        slow.is_empty(),
        "{} devices took longer than {ONLINE_WITHIN_MS} ms: {:?}",
        slow.len(),
        &slow[..slow.len().min(10)]
    );
    eprintln!("late AWS IoT Jobs devices: slowest success {slowest} ms after connecting");
    app.teardown().await;
}

/// Clears the retained presence announcements of devices `0..n` under `prefix`, so the
/// shared broker keeps none of this test's messages.
async fn clear_presence(app: &TestApp, prefix: &str, n: u64) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (link, _) = devices::mqtt::connect(
        &app.settings.worker.mqtt,
        &format!("{prefix}-cleaner"),
        vec![],
        stop.clone(),
    )
    .expect("MQTT connects");
    for _ in 0..100 {
        if link.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..n {
        let topic = devices::protocol::presence_topic(prefix, &harness::fleet::device_id(i));
        let _ = link.publish_retained(&topic, Vec::new()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
}
