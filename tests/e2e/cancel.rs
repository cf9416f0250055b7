use std::time::Duration;

use serde_json::json;
use shared::state::ExecutionState;

use crate::helpers::{firmware_job, fleet_ids, spawn_app};

#[tokio::test]
async fn cancelling_mid_job_leaves_every_device_succeeded_or_canceled() {
    // Arrange: slow enough that the job is mid-way when cancelled.
    let app = spawn_app(2, &[("FLEETBATCH_SIMULATOR__LATENCY_MS", "20")]).await;
    let n = 10_000;
    app.import_fleet(n).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 2000}})))
        .await;
    app.wait_for_terminal(id, 1_000, Duration::from_secs(120))
        .await;

    // Act
    let r = app.cancel(id).await;
    assert_eq!(r, 200);
    // Deliveries stop within a second: what devices receive after that is nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered_after_1s = app.sim_totals(id).await["deliveries"];
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered_at_end = app.sim_totals(id).await["deliveries"];
    assert_eq!(
        delivered_at_end, delivered_after_1s,
        "devices were contacted more than a second after the cancel"
    );

    // Assert: CANCELED, every device terminal and either done or canceled, counts exact.
    assert_eq!(job["state"], "CANCELED");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    assert!(statuses.values().all(|s| matches!(
        s.state,
        ExecutionState::Succeeded | ExecutionState::Canceled
    )));
    let succeeded = job["succeeded"].as_u64().unwrap_or(0);
    let canceled = job["canceled"].as_u64().unwrap_or(0);
    assert!(succeeded >= 1_000 && canceled > 0, "{job}");
    // Nothing canceled was applied.
    let totals = app.sim_totals(id).await;
    assert_eq!(totals["applications"], succeeded);
    // A second cancel is refused: the job is over.
    let again = app.cancel(id).await;
    assert_eq!(again, 409);
    app.teardown().await;
}
