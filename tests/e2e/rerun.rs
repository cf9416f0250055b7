//! Rerun and rollback: a new job for exactly the devices of a finished job that ended in the chosen
//! states (by default FAILED and TIMED_OUT), targeted through the earlier job's state sets,
//! not a list of ids, so there is no cap on their number. Linked to the earlier job, created
//! like any job (scope, dry run, idempotency key).

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shared::state::ExecutionState;
use uuid::Uuid;

use crate::helpers::{TestApp, firmware_job, spawn_app};

async fn rerun(app: &TestApp, client: &reqwest::Client, path: &str, body: Value) -> (u16, Value) {
    let r = client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .expect("rerun");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn devices_in(
    statuses: &std::collections::HashMap<String, shared::state::DeviceStatus>,
    states: &[ExecutionState],
) -> HashSet<String> {
    statuses
        .iter()
        .filter(|(_, s)| states.contains(&s.state))
        .map(|(d, _)| d.clone())
        .collect()
}

#[tokio::test]
async fn a_rerun_targets_exactly_the_devices_that_ended_in_the_chosen_states() {
    // Arrange: a finished job over a fleet where many devices fail or reject.
    let env = [
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.42"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0.05"),
    ];
    let app = spawn_app(2, &env).await;
    // 50,000 devices, about 20,000 of which fail.
    let (first, before) = app.run_fleet_job(50_000, json!({})).await;
    let done = app.job(first).await;
    let failed = devices_in(&before, &[ExecutionState::Failed, ExecutionState::TimedOut]);
    let rejected = devices_in(&before, &[ExecutionState::Rejected]);
    assert!(failed.len() > 18_000 && !rejected.is_empty(), "{done}");

    // Act + assert: a dry run of the rerun counts the failed devices and creates nothing.
    let path = format!("/v1/jobs/{first}/rerun");
    let (status, preview) =
        rerun(&app, &app.http, &format!("{path}?dry_run=true"), json!({})).await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["targeted"], failed.len() as u64, "{preview}");
    let text = app
        .fleetbatch(&["job", "rerun", &first.to_string(), "--dry-run"])
        .await;
    assert!(text.starts_with("dry run: nothing created"), "{text}");
    assert_eq!(
        app.job_if_any().await.expect("a job")["job_id"],
        first.to_string()
    );

    // The rerun (default states): exactly the failed devices, linked to the first job.
    let (status, body) = rerun(&app, &app.http, &path, json!({})).await;
    assert_eq!(status, 201, "{body}");
    let second: Uuid = body["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let job = app.wait_for_job(second, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(second, &failed).await;
    assert_eq!(
        job["spec"]["target"]["from_job"]["job_id"],
        first.to_string(),
        "{job}"
    );
    assert_eq!(job["spec"]["action"], done["spec"]["action"]);

    // Chosen states through the CLI: exactly the rejected devices.
    let out = app
        .fleetbatch(&[
            "job",
            "rerun",
            &first.to_string(),
            "--states",
            "rejected",
            "--json",
        ])
        .await;
    let third: Uuid = serde_json::from_str::<Value>(&out).expect("json")["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    app.wait_for_job(third, Duration::from_secs(120)).await;
    app.assert_exact(third, &rejected).await;

    // Refused, each naming the problem: states no device ended in, a state that is not
    // terminal, a job that does not exist.
    let (status, body) = rerun(&app, &app.http, &path, json!({"states": ["CANCELED"]})).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("target.from_job.states")),
        "{body}"
    );
    let (status, body) = rerun(&app, &app.http, &path, json!({"states": ["QUEUED"]})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "target.from_job.states[0]", "{body}");
    let missing = format!("/v1/jobs/{}/rerun", Uuid::now_v7());
    assert_eq!(rerun(&app, &app.http, &missing, json!({})).await.0, 404);

    // An operator scoped to one region may rerun a job of that region, not the fleet-wide
    // one.
    let region = harness::fleet::REGIONS[0];
    let regional = app
        .create_job(&firmware_job(json!({"target": {"groups": [region]}})))
        .await;
    app.wait_for_job(regional, Duration::from_secs(120)).await;
    let scoped = app
        .client_as(json!({"name": "regional-ops", "role": "operator", "groups": [region]}))
        .await;
    let (status, body) = rerun(&app, &scoped, &path, json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains(&first.to_string()),
        "{body}"
    );
    let (status, body) = rerun(
        &app,
        &scoped,
        &format!("/v1/jobs/{regional}/rerun"),
        json!({}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let fourth: Uuid = body["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    app.wait_for_job(fourth, Duration::from_secs(120)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_rollback_sends_the_jobs_rollback_action_to_the_devices_that_may_have_changed() {
    // Arrange: a firmware job that names its way back (the previous firmware).
    let env = [
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.2"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0.1"),
    ];
    let app = spawn_app(2, &env).await;
    let n = 2_000;
    let back = json!({
        "type": "firmware_update",
        "url": "https://fw.example.com/1.9.bin",
        "version": "1.9.0",
        "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    });
    let (first, before) = app.run_fleet_job(n, json!({"rollback": back})).await;
    let changed = devices_in(
        &before,
        &[ExecutionState::Succeeded, ExecutionState::Failed],
    );
    // Rejected devices never took the job: they are not rolled back.
    assert!(
        changed.len() < n as usize && !changed.is_empty(),
        "{}",
        changed.len()
    );

    // Act: the rollback, through the CLI (default states: SUCCEEDED and FAILED).
    let out = app
        .fleetbatch(&["job", "rollback", &first.to_string(), "--json"])
        .await;
    let second: Uuid = serde_json::from_str::<Value>(&out).expect("json")["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let job = app.wait_for_job(second, Duration::from_secs(120)).await;

    // Assert: exactly those devices, with the rollback action, each once.
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["spec"]["action"], back, "{job}");
    app.assert_exact(second, &changed).await;

    // A job without a rollback action cannot be rolled back; a bad one is refused at create.
    let plain = app.create_job(&firmware_job(json!({}))).await;
    let (status, body) = rerun(
        &app,
        &app.http,
        &format!("/v1/jobs/{plain}/rollback"),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("rollback")),
        "{body}"
    );
    let mut bad = back.clone();
    bad["sha256"] = json!("nope");
    let (status, body) = app
        .post_job(
            &firmware_job(json!({"rollback": bad})).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("rollback.sha256")),
        "{body}"
    );
    app.wait_for_job(plain, Duration::from_secs(120)).await;
    app.teardown().await;
}
