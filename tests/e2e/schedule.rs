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
