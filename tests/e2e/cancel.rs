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

/// A job canceled while devices work on it, over MQTT: each device running it is asked once
/// to stop. Those that stop end CANCELED without applying it, those that refuse finish and
/// end SUCCEEDED, those not yet sent it end CANCELED; none is left in between.
#[tokio::test]
async fn devices_running_a_canceled_job_are_asked_to_stop_and_each_answer_is_recorded() {
    let prefix = format!("fbt{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut env = crate::devices::mqtt_env("5", &prefix);
    env.extend([
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "6000"),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0"),
        ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "20000"),
        ("FLEETBATCH_WORKER__CONCURRENCY", "40"),
    ]);
    let mut app = spawn_app(2, &env).await;
    let n = 200u64;
    let port = harness::cluster::free_port().expect("port");
    let sim = app
        .cluster
        .start_fleet_sim(port, &["--devices", &n.to_string(), "--mqtt", "fleetbatch"])
        .await
        .expect("fleet-sim");
    app.import_fleet(n).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    // The first devices work on it (6 s each, 80 at a time): cancel while they do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let contacted: serde_json::Value =
            crate::devices::get_json(&app, &format!("{sim}/contacts/{id}")).await;
        if contacted.as_object().map_or(0, |m| m.len()) >= 40 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "devices not reached"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let canceled_at = tokio::time::Instant::now();
    assert_eq!(app.cancel(id).await, 200);
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "CANCELED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;

    let answers: std::collections::BTreeMap<String, String> = serde_json::from_value(
        crate::devices::get_json(&app, &format!("{sim}/cancels/{id}")).await,
    )
    .expect("cancels");
    let contacts: serde_json::Value =
        crate::devices::get_json(&app, &format!("{sim}/contacts/{id}")).await;
    let (mut stopped, mut refused) = (0, 0);
    let mut wrong = Vec::new();
    for (device, s) in &statuses {
        let refuses = devices::simdevice::refuses_cancel(&app.settings.simulator, device);
        let want = match (
            answers.get(device).map(String::as_str),
            contacts.get(device),
        ) {
            (Some("stopped"), _) => {
                stopped += 1;
                ExecutionState::Canceled
            }
            (Some("refused"), _) => {
                refused += 1;
                ExecutionState::Succeeded
            }
            // Finished before the request reached it.
            (Some(_), _) => ExecutionState::Succeeded,
            // Never sent the job.
            (None, None) => ExecutionState::Canceled,
            // Sent it, not asked: finished before the worker looked.
            (None, Some(_)) => ExecutionState::Succeeded,
        };
        let said = answers.get(device).map(String::as_str);
        if s.state != want
            || (said == Some("stopped") && refuses)
            || (said == Some("refused") && !refuses)
        {
            wrong.push(format!(
                "{device}: {:?} after {said:?} (want {want:?})",
                s.state
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} devices: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(
        stopped > 0 && refused > 0,
        "stopped {stopped}, refused {refused}"
    );
    let totals = crate::devices::get_json(&app, &format!("{sim}/stats")).await;
    assert_eq!(totals["applications"], job["succeeded"], "{totals}");
    assert_eq!(totals["duplicate_applications"], 0, "{totals}");
    eprintln!(
        "cancel: {stopped} devices stopped, {refused} refused, job over {} ms after the cancel",
        canceled_at.elapsed().as_millis()
    );
    app.teardown().await;
}
