use std::time::Duration;

use serde_json::json;
use shared::state::ExecutionState;
use worker::deliver::simulator::{DeviceProfile, PERMANENT_ERROR};

use crate::helpers::{firmware_job, fleet_ids, spawn_app};

#[tokio::test]
async fn a_10000_device_job_completes_with_exact_counts_and_no_duplicate_applications() {
    // Arrange: two workers, devices with latency and transient glitches.
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "2"),
            ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "2"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.05"),
            ("FLEETBATCH_WORKER__BACKOFF__INITIAL_MS", "5"),
        ],
    )
    .await;
    app.import_fleet(10_000).await;

    // Act
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: every device succeeded exactly once, and each has its status.
    assert_eq!(job["state"], "COMPLETED");
    let statuses = app.assert_exact(id, &fleet_ids(10_000)).await;
    assert!(
        statuses
            .values()
            .all(|s| s.state == ExecutionState::Succeeded)
    );
    let totals = app.sim_totals(id).await;
    assert_eq!(totals["applications"], 10_000);
    assert!(
        totals["deliveries"] > 10_000,
        "transient failures were retried: {totals:?}"
    );
    assert!(
        statuses.values().any(|s| s.attempts > 1),
        "some devices needed more than one attempt"
    );
    app.teardown().await;
}

#[tokio::test]
async fn devices_that_fail_permanently_are_reported_failed_with_their_error() {
    // Arrange: 10% of devices fail permanently; which ones is a pure function of the seed.
    let app = spawn_app(
        2,
        &[("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.1")],
    )
    .await;
    let n = 10_000;
    app.import_fleet(n).await;
    let expected_failed: std::collections::HashSet<String> = fleet_ids(n)
        .into_iter()
        .filter(|d| DeviceProfile::for_device(&app.settings.simulator, d).fails_permanently)
        .collect();
    assert!(
        (800..1200).contains(&expected_failed.len()),
        "{}",
        expected_failed.len()
    );

    // Act
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: exactly those devices FAILED, each with the device's error, one attempt each
    // (permanent errors are not retried); the report lists them.
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let failed: std::collections::HashSet<String> = statuses
        .iter()
        .filter(|(_, s)| s.state == ExecutionState::Failed)
        .map(|(d, _)| d.clone())
        .collect();
    assert_eq!(failed, expected_failed);
    assert_eq!(job["failed"].as_u64(), Some(expected_failed.len() as u64));
    for d in &failed {
        let s = &statuses[d];
        assert_eq!(s.error.as_deref(), Some(PERMANENT_ERROR), "{d}");
        assert_eq!(s.attempts, 1, "{d}");
    }
    let report: serde_json::Value = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/report?limit=100000")))
        .send()
        .await
        .expect("report")
        .json()
        .await
        .expect("report json");
    assert_eq!(
        report["failures"].as_array().map(Vec::len),
        Some(expected_failed.len())
    );
    assert_eq!(
        report["errors"][PERMANENT_ERROR].as_u64(),
        Some(expected_failed.len() as u64)
    );
    let page: serde_json::Value = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/devices?status=failed&limit=10000")))
        .send()
        .await
        .expect("devices")
        .json()
        .await
        .expect("devices json");
    // Exactly the devices expected to fail, each listed once as FAILED, on one page.
    let listed: Vec<&serde_json::Value> =
        page["devices"].as_array().into_iter().flatten().collect();
    assert!(listed.iter().all(|d| d["state"] == "FAILED"), "{page}");
    let listed_ids: std::collections::HashSet<String> = listed
        .iter()
        .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed.len(), listed_ids.len(), "each device listed once");
    assert_eq!(listed_ids, expected_failed);
    assert_eq!(page["next_cursor"], serde_json::Value::Null);
    app.teardown().await;
}

#[tokio::test]
async fn incompatible_devices_are_skipped_and_rejections_are_recorded() {
    // Arrange: the generated fleet has ~2% on hardware revision D; 3% of devices reject.
    let app = spawn_app(1, &[("FLEETBATCH_SIMULATOR__REJECT_RATE", "0.03")]).await;
    let n = 3_000;
    app.import_fleet(n).await;

    // Act: a job only for revisions A-C.
    let id = app
        .create_job(&firmware_job(
            json!({"compatibility": {"hardware_revisions": ["A", "B", "C"]}}),
        ))
        .await;
    app.wait_for_job(id, Duration::from_secs(120)).await;

    // Assert
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    for (d, s) in &statuses {
        let i: u64 = d.trim_start_matches("dev-").parse().expect("id");
        let hw = harness::fleet::device(i).hardware_revision;
        let rejects = DeviceProfile::for_device(&app.settings.simulator, d).rejects;
        let expected = if hw == "D" {
            ExecutionState::Skipped
        } else if rejects {
            ExecutionState::Rejected
        } else {
            ExecutionState::Succeeded
        };
        assert_eq!(s.state, expected, "{d} (hw {hw})");
        if expected == ExecutionState::Skipped {
            assert!(s.error.as_deref().unwrap_or("").contains("\"D\""), "{s:?}");
        }
    }
    assert!(
        statuses
            .values()
            .any(|s| s.state == ExecutionState::Skipped)
    );
    assert!(
        statuses
            .values()
            .any(|s| s.state == ExecutionState::Rejected)
    );
    let totals = app.sim_totals(id).await;
    let skipped = statuses
        .values()
        .filter(|s| s.state == ExecutionState::Skipped)
        .count() as u64;
    assert_eq!(
        totals["deliveries"],
        n - skipped,
        "skipped devices are never contacted"
    );
    app.teardown().await;
}

/// Keys of the test's namespace that name `job` or one of its executions.
async fn keys_of_job(app: &crate::helpers::TestApp, job: uuid::Uuid, n: u64) -> Vec<String> {
    let mut redis = app.redis.clone();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*{job}*", app.names.key_prefix()))
        .query_async(&mut redis)
        .await
        .expect("keys");
    for i in 0..n {
        let key = app.names.idempotency(shared::state::execution_id(
            job,
            &harness::fleet::device_id(i),
        ));
        let exists: bool = redis::AsyncCommands::exists(&mut redis, &key)
            .await
            .expect("exists");
        if exists {
            keys.push(key);
        }
    }
    keys
}

#[tokio::test]
async fn a_finished_jobs_data_goes_after_its_retention_and_delete_refuses_a_running_job() {
    let app = spawn_app(1, &[("FLEETBATCH_COORDINATOR__RETENTION_SECS", "3")]).await;
    let n = 100;
    app.import_fleet(n).await;
    // In two waves, so that its keys include the waves'.
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"waves": [
            {"count": 40, "success_threshold": 0}, {}]}})))
        .await;
    app.wait_for_job(id, Duration::from_secs(60)).await;
    let kept = keys_of_job(&app, id, n).await;
    assert!(
        kept.iter().any(|k| k.contains(":wave:")),
        "the job has data, its waves' too: {kept:?}"
    );
    // A job that has not finished is not deleted.
    let later = app
        .create_job(&firmware_job(json!({
            "schedule": {"start_at": "2099-01-01T00:00:00Z"}})))
        .await;
    let r = app
        .http
        .delete(app.url(&format!("/v1/jobs/{later}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 409);
    // Retention: within a few seconds of its end, no key of the finished job is left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = keys_of_job(&app, id, n).await;
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} keys left, e.g. {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    // Canceled, the scheduled one is deleted at once with the CLI.
    app.fleetbatch(&["job", "cancel", &later.to_string()]).await;
    app.wait_for_job(later, Duration::from_secs(30)).await;
    let out = app.fleetbatch(&["job", "delete", &later.to_string()]).await;
    assert!(out.contains("deleted"), "{out}");
    assert!(keys_of_job(&app, later, n).await.is_empty());
    app.teardown().await;
}
