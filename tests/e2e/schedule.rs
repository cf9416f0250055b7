//! Scheduled jobs on real processes with fleet-sim over HTTP: nothing is sent before
//! `schedule.start_at` (checked from the devices' own clocks), a SCHEDULED job canceled
//! before its start contacts no one, and `schedule.end_at` stops publishing.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use shared::state::ExecutionState;

use crate::{
    devices::{get_json, start_sim},
    helpers::{TestApp, firmware_job, fleet_ids},
    rollouts::http_fleet_with,
};

/// RFC 3339 for `ms` milliseconds from now.
fn in_ms(ms: u64) -> (String, u64) {
    let at = SystemTime::now() + Duration::from_millis(ms);
    let epoch_ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    (humantime::format_rfc3339_millis(at).to_string(), epoch_ms)
}

/// First contacts of `job` per device, from fleet-sim.
async fn first_contacts(app: &TestApp, sim: &str, job: uuid::Uuid) -> Vec<u64> {
    let v: Value = get_json(app, &format!("{sim}/contacts/{job}")).await;
    v.as_object()
        .expect("an object")
        .values()
        .map(|c| c["first_ms"].as_u64().expect("first"))
        .collect()
}

#[tokio::test]
async fn nothing_is_sent_before_start_at_and_a_canceled_scheduled_job_contacts_no_one() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(port, "0", "0", &[]).await;
    let n = 1_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;

    // A job 5 s ahead is SCHEDULED, then runs; no device hears of it before its start.
    let (start_at, start_ms) = in_ms(5_000);
    let id = app
        .create_job(&firmware_job(json!({"schedule": {"start_at": start_at}})))
        .await;
    assert_eq!(app.job(id).await["state"], "SCHEDULED");
    // Another, an hour ahead, is canceled before it starts.
    let (later, _) = in_ms(3_600_000);
    let never = app
        .create_job(&firmware_job(json!({"schedule": {"start_at": later}})))
        .await;
    let out = app.fleetbatch(&["job", "cancel", &never.to_string()]).await;
    assert!(out.contains("CANCELING"), "{out}");

    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(n)).await;
    let firsts = first_contacts(&app, &sim, id).await;
    assert_eq!(firsts.len() as u64, n);
    let earliest = firsts.iter().min().copied().unwrap_or(0);
    assert!(
        earliest >= start_ms,
        "a device was reached {} ms before start_at",
        start_ms - earliest
    );

    let canceled = app.wait_for_job(never, Duration::from_secs(60)).await;
    assert_eq!(canceled["state"], "CANCELED", "{canceled}");
    let statuses = app.assert_exact(never, &fleet_ids(n)).await;
    assert!(
        statuses
            .values()
            .all(|s| s.state == ExecutionState::Canceled)
    );
    assert!(
        first_contacts(&app, &sim, never).await.is_empty(),
        "a device was contacted"
    );
    app.teardown().await;
}

#[tokio::test]
async fn end_at_stops_publishing_and_the_rest_end_canceled_with_the_reason() {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(port, "0", "0", &[]).await;
    let n = 2_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    // 200 devices a second for 3 s: about 600 are sent the job.
    let (end_at, end_ms) = in_ms(3_000);
    let id = app
        .create_job(&firmware_job(json!({
            "schedule": {"end_at": end_at, "end_behavior": "stop"},
            "rollout": {"max_per_second": 200}
        })))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let succeeded = job["succeeded"].as_u64().unwrap_or(0);
    assert!((300..=900).contains(&succeeded), "{job}");
    assert_eq!(job["canceled"].as_u64(), Some(n - succeeded), "{job}");
    let canceled = statuses
        .values()
        .find(|s| s.state == ExecutionState::Canceled)
        .expect("a canceled device");
    assert!(
        canceled
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("end_at"),
        "{canceled:?}"
    );
    let latest = first_contacts(&app, &sim, id)
        .await
        .into_iter()
        .max()
        .unwrap_or(0);
    assert!(
        latest <= end_ms + 1_000,
        "a device was first reached {} ms after end_at",
        latest.saturating_sub(end_ms)
    );
    app.teardown().await;
}

/// A schedule's child jobs as its view lists them: (occurrence ms, job id), oldest first.
fn runs_of(view: &Value) -> Vec<(u64, uuid::Uuid)> {
    let mut runs: Vec<(u64, uuid::Uuid)> = view["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            (
                r["occurrence_ms"].as_u64().expect("occurrence"),
                r["job_id"].as_str().expect("job id").parse().expect("uuid"),
            )
        })
        .collect();
    runs.sort();
    runs
}

async fn schedule_view(app: &TestApp, id: &str) -> Value {
    serde_json::from_str(&app.fleetbatch(&["schedule", "show", id, "--json"]).await).expect("json")
}

#[tokio::test]
async fn a_recurring_job_fires_each_occurrence_once_across_a_coordinator_sigkill_and_runs_a_missed_one_late()
 {
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(port, "0", "0", &[]).await;
    let n = 300;
    start_sim(&mut app, Some(port), n, "none").await;

    // Data retrieval every 10 s; an occurrence more than 2 s late counts as missed and runs
    // once, late.
    let mut spec = firmware_job(json!({"schedule": {
        "cron": "*/10 * * * * *", "missed": "run_once", "late_after_secs": 2}}));
    spec["name"] = json!("meters");
    spec["action"] = json!({"type": "data_retrieval", "metrics": ["temperature"]});
    // A job create is not the way to make one: refused naming the field.
    let (status, body) = app.post_job(&spec.to_string(), "application/json").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "schedule.cron", "{body}");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("meters.json");
    std::fs::write(&file, spec.to_string()).expect("write");
    let created: Value = serde_json::from_str(
        &app.fleetbatch(&[
            "schedule",
            "create",
            "--file",
            file.to_str().expect("path"),
            "--json",
        ])
        .await,
    )
    .expect("json");
    let id = created["schedule_id"].as_str().expect("id").to_owned();
    assert_eq!(created["state"], "ACTIVE", "{created}");
    let listed = app.fleetbatch(&["schedule", "list"]).await;
    assert!(listed.contains(&id), "{listed}");

    // The first occurrence runs; then the coordinator dies and stays down past the next.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        let runs = runs_of(&schedule_view(&app, &id).await);
        if let Some(r) = runs.first() {
            break *r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no occurrence fired"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    app.wait_for_job(first.1, Duration::from_secs(60)).await;
    app.cluster
        .signal_coordinator(nix::sys::signal::Signal::SIGKILL)
        .expect("kill");
    app.cluster
        .wait_coordinator(Duration::from_secs(10))
        .await
        .expect("dead");
    let second_at = first.0 + 10_000;
    let now = shared::now_ms();
    tokio::time::sleep(Duration::from_millis(
        (second_at + 4_000).saturating_sub(now),
    ))
    .await;
    app.cluster.start_coordinator().await.expect("restart");

    // The missed occurrence runs once, late; the next on time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let runs = runs_of(&schedule_view(&app, &id).await);
        if runs.len() >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Paused, it fires nothing more; its runs are final.
    let paused: Value =
        serde_json::from_str(&app.fleetbatch(&["schedule", "pause", &id, "--json"]).await)
            .expect("json");
    assert_eq!(paused["state"], "PAUSED", "{paused}");
    let runs = runs_of(&schedule_view(&app, &id).await);
    let occurrences: Vec<u64> = runs.iter().map(|r| r.0).collect();
    assert_eq!(
        &occurrences[..3],
        &[first.0, first.0 + 10_000, first.0 + 20_000],
        "each occurrence once, none skipped (run_once)"
    );
    let late = app.job(runs[1].1).await["created_at_ms"]
        .as_u64()
        .expect("created");
    assert!(
        late > runs[1].0 + 2_000,
        "the missed occurrence ran late: created {} ms after its time",
        late - runs[1].0
    );
    for (at, job) in &runs {
        let view = app.wait_for_job(*job, Duration::from_secs(60)).await;
        assert_eq!(view["state"], "COMPLETED", "{view}");
        assert_eq!(view["succeeded"], n, "{view}");
        let statuses = app.assert_exact(*job, &fleet_ids(n)).await;
        assert!(
            statuses.values().all(|s| s.readings.is_some()),
            "occurrence {at}: every device reported its readings"
        );
    }
    // No occurrence made two jobs: every job named after the schedule is one of its runs.
    let page: Value = crate::devices::get_json(&app, &app.url("/v1/jobs?limit=100")).await;
    let children: Vec<&Value> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| {
            j["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("meters @"))
        })
        .collect();
    assert_eq!(children.len(), runs.len(), "{children:?}");
    let out = app.fleetbatch(&["schedule", "delete", &id]).await;
    assert!(out.contains("deleted"), "{out}");
    app.teardown().await;
}

#[tokio::test]
async fn two_jobs_for_the_same_devices_reach_each_device_one_at_a_time_higher_priority_first() {
    // Deliveries of 20 ms, so each job holds a device for a measurable span.
    let port = harness::cluster::free_port().expect("port");
    let mut app = http_fleet_with(
        port,
        "0",
        "0",
        &[("FLEETBATCH_SIMULATOR__LATENCY_MS", "20")],
    )
    .await;
    let n = 1_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;

    // Created together (the lower priority first), starting at the same moment.
    let (start_at, start_ms) = in_ms(4_000);
    let spec = |priority: u16, version: &str| {
        let mut spec = firmware_job(json!({"priority": priority,
            "schedule": {"start_at": start_at}}));
        spec["action"]["version"] = json!(version);
        spec
    };
    let low = app.create_job(&spec(1, "2.0.1")).await;
    let high = app.create_job(&spec(10, "2.0.2")).await;

    // Before the start, each device lists both jobs in the order it will get them.
    let device = harness::fleet::device_id(n - 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let listed = loop {
        let out = app
            .fleetbatch(&["devices", "jobs", &device, "--json"])
            .await;
        let v: Value = serde_json::from_str(&out).expect("json");
        let ids: Vec<String> = v["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| {
                format!(
                    "{} {}",
                    j["job_id"].as_str().unwrap_or_default(),
                    j["state"]
                )
            })
            .collect();
        if ids.len() == 2 || tokio::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        listed,
        vec![
            format!("{high} \"NOT_SENT\""),
            format!("{low} \"NOT_SENT\"")
        ],
        "{device}'s jobs before the start"
    );
    // A device nobody registered has no line to show.
    let (status, body) = app
        .get_text(&app.url("/v1/devices/no-such-device/jobs"))
        .await;
    assert_eq!(status, 404, "{body}");
    for id in [low, high] {
        let job = app.wait_for_job(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "COMPLETED", "{job}");
        assert_eq!(job["succeeded"], n, "{job}");
        // A device's next job goes as soon as the one before it ends there, not after the
        // minute a waiting task looks again on its own.
        let took = job["finished_at_ms"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(start_ms);
        assert!(took < 30_000, "job {id} took {took} ms after its start");
        app.assert_exact(id, &fleet_ids(n)).await;
    }

    // On every device, from its own clock: the higher priority job's delivery was answered
    // before the lower priority job's first delivery reached it.
    let spans = |v: Value| -> std::collections::HashMap<String, (u64, u64)> {
        v.as_object()
            .expect("an object")
            .iter()
            .map(|(d, c)| {
                let first = c["first_ms"].as_u64().expect("first");
                let replied = c["replied_ms"].as_u64().expect("replied");
                (d.clone(), (first, replied))
            })
            .collect()
    };
    let hi = spans(get_json(&app, &format!("{sim}/contacts/{high}")).await);
    let lo = spans(get_json(&app, &format!("{sim}/contacts/{low}")).await);
    assert_eq!((hi.len() as u64, lo.len() as u64), (n, n));
    let mut overlaps: Vec<String> = hi
        .iter()
        .filter(|(d, (_, hi_replied))| lo[*d].0 < *hi_replied)
        .map(|(d, (hi_first, hi_replied))| {
            format!(
                "{d}: priority 10 at {hi_first}..{hi_replied}, priority 1 at {}",
                lo[d].0
            )
        })
        .collect();
    overlaps.sort();
    assert!(
        overlaps.is_empty(),
        "{} devices reached out of turn: {:?}",
        overlaps.len(),
        &overlaps[..overlaps.len().min(5)]
    );
    app.teardown().await;
}
