use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::helpers::{firmware_job, fleet_ids, spawn_app};

#[tokio::test]
async fn a_sigtermed_worker_exits_cleanly_and_the_job_completes_with_nothing_lost_or_repeated() {
    // Arrange: devices take 20 ms, two workers share the job.
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "20"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.05"),
            ("FLEETBATCH_WORKER__SHUTDOWN_GRACE_SECS", "20"),
        ],
    )
    .await;
    let n = 10_000;
    app.import_fleet(n).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    app.wait_for_terminal(id, 2_000, Duration::from_secs(120))
        .await;

    // Act: scale in one worker mid-job.
    app.cluster
        .signal_worker(0, Signal::SIGTERM)
        .expect("sigterm");
    let mut app = app;
    let status = app
        .cluster
        .wait_worker(0, Duration::from_secs(30))
        .await
        .expect("worker exits");
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;

    // Assert: a clean exit, and the job is exact with no device contacted after it applied.
    assert!(status.success(), "worker exit status {status}");
    assert_eq!(job["state"], "COMPLETED");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    assert!(
        statuses
            .values()
            .all(|s| s.state == shared::job::ExecutionState::Succeeded)
    );
    let totals = app.sim_totals(id).await;
    assert_eq!(totals["applications"], n);
    assert_eq!(
        totals.get("redundant_deliveries").copied().unwrap_or(0),
        0,
        "{totals:?}"
    );
    let log = std::fs::read_to_string(app.cluster.worker_log(0)).unwrap_or_default();
    assert!(
        log.contains("worker stopped"),
        "the worker drained and stopped: {log}"
    );
    app.teardown().await;
}
