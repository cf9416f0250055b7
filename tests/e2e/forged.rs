//! Queue messages are checked, not trusted (guarantee 6), and no input stalls a worker: while
//! a job runs, forged but well-formed tasks and results are published straight to the
//! queues; each is dead-lettered with its reason, never counted, and the job ends exact.
//! Specs with out-of-bound numbers or unknown fields are refused at the API by field.

use std::{collections::HashSet, time::Duration};

use serde_json::json;
use shared::{
    messages::{DeviceTask, TaskResult, WIRE_VERSION},
    state::{ExecutionState, execution_id},
};
use uuid::Uuid;

use crate::helpers::{TestApp, firmware_job, fleet_ids, spawn_app};

const DEVICES: u64 = 10_000;

/// Publishes a forgery to the tasks (or results) exchange.
async fn publish(app: &TestApp, to_tasks: bool, payload: &[u8]) {
    if to_tasks {
        let key = shared::topology::TASK_ROUTING_KEY;
        app.publish_raw(app.names.tasks_exchange(), key, payload)
            .await;
    } else {
        let key = shared::topology::RESULT_ROUTING_KEY;
        app.publish_raw(app.names.results_exchange(), key, payload)
            .await;
    }
}

#[tokio::test]
async fn forged_tasks_and_results_are_dead_lettered_with_their_reason_and_never_counted() {
    // Arrange: a job for one region, slow enough to be running while the forgeries arrive.
    let app = spawn_app(2, &[]).await;
    app.import_fleet(DEVICES).await;
    let region = harness::fleet::REGIONS[0];
    let (inside, outside): (Vec<String>, Vec<String>) = (0..DEVICES)
        .map(harness::fleet::device)
        .map(|d| (d.groups.iter().any(|g| g == region), d.id))
        .fold((Vec::new(), Vec::new()), |(mut i, mut o), (is_in, id)| {
            if is_in {
                i.push(id)
            } else {
                o.push(id)
            }
            (i, o)
        });

    let id = app
        .create_job(&firmware_job(
            json!({"target": {"groups": [region]}, "rollout": {"max_per_second": 1000}}),
        ))
        .await;

    // Act: forgeries of every kind, while the job runs.
    let task = |device: &str| DeviceTask {
        version: WIRE_VERSION,
        job_id: id,
        execution_id: execution_id(id, device),
        device_id: device.to_owned(),
        attempts: 0,
        parked: 0,
        published_at_ms: shared::now_ms(),
    };
    let (a, b, stranger) = (&inside[0], &inside[1], &outside[0]);
    let tasks = [
        (
            DeviceTask {
                attempts: u32::MAX,
                ..task(a)
            },
            "attempts 4294967295",
        ),
        (
            DeviceTask {
                parked: u32::MAX,
                ..task(a)
            },
            "parked 4294967295",
        ),
        (
            DeviceTask {
                execution_id: Uuid::new_v4(),
                ..task(a)
            },
            "execution id",
        ),
        (task(stranger), "not a target"),
        (
            DeviceTask {
                device_id: "a/+/#".into(),
                ..task(a)
            },
            "device id",
        ),
    ];
    let result = |device: &str, state: ExecutionState| TaskResult {
        version: WIRE_VERSION,
        job_id: id,
        execution_id: execution_id(id, device),
        device_id: device.to_owned(),
        state,
        attempts: 1,
        error: None,
        worker: "forger".into(),
        published_at_ms: 0,
        finished_at_ms: shared::now_ms(),
        readings: None,
    };
    let results = [
        (result(stranger, ExecutionState::Succeeded), "not a target"),
        (
            TaskResult {
                execution_id: Uuid::new_v4(),
                ..result(b, ExecutionState::Succeeded)
            },
            "execution id",
        ),
        (result(b, ExecutionState::InProgress), "non-terminal"),
        (
            TaskResult {
                device_id: "$SYS".into(),
                ..result(b, ExecutionState::Succeeded)
            },
            "device id",
        ),
    ];
    for (t, _) in &tasks {
        publish(&app, true, &shared::messages::encode(t).expect("encode")).await;
    }
    for (r, _) in &results {
        publish(&app, false, &shared::messages::encode(r).expect("encode")).await;
    }
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;

    // Assert: the job is exact over its own targets (the stranger has no status), and every
    // forgery waits in the dead-letter queue with its reason.
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let targets: HashSet<String> = inside.iter().cloned().collect();
    app.assert_exact(id, &targets).await;
    assert!(
        job["terminal"].as_u64() <= job["targeted"].as_u64(),
        "{job}"
    );
    let dead = app.drain_dead_letters().await;
    let reasons: Vec<String> = dead
        .iter()
        .filter_map(|m| {
            shared::amqp::header_str(
                m.delivery.properties.headers().as_ref(),
                shared::topology::HEADER_DEAD_REASON,
            )
        })
        .collect();
    assert_eq!(reasons.len(), tasks.len() + results.len(), "{reasons:#?}");
    for why in tasks
        .iter()
        .map(|(_, w)| *w)
        .chain(results.iter().map(|(_, w)| *w))
    {
        let n = reasons.iter().filter(|r| r.contains(why)).count();
        let want = tasks.iter().filter(|(_, w)| *w == why).count()
            + results.iter().filter(|(_, w)| *w == why).count();
        assert_eq!(n, want, "{why}: {reasons:#?}");
    }

    // And the workers kept their capacity: a normal 10,000-device job completes exactly.
    let all = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(all, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(all, &fleet_ids(DEVICES)).await;
    app.teardown().await;
}

#[tokio::test]
async fn specs_with_out_of_bound_numbers_unknown_fields_or_internal_webhooks_are_refused_naming_the_field()
 {
    let app = spawn_app(0, &[("FLEETBATCH_COORDINATOR__WEBHOOK_SECRET", "k")]).await;
    app.import_fleet(10).await;
    for (extra, field) in [
        // Webhooks cannot be aimed at internal services.
        (
            json!({"notify": {"webhooks": [{"url": "http://127.0.0.1:6379/"}]}}),
            "notify.webhooks[0].url",
        ),
        (
            json!({"notify": {"webhooks": [{"url": "http://169.254.169.254/latest/meta-data"}]}}),
            "notify.webhooks[0].url",
        ),
        (
            json!({"retry": {"attempt_timeout_secs": 18_446_744_073_709_551_615_u64}}),
            "retry.attempt_timeout_secs",
        ),
        (
            json!({"retry": {"deadline_secs": 0}}),
            "retry.deadline_secs",
        ),
        (
            json!({"rollout": {"max_per_second": 4_294_967_295_u64}}),
            "rollout.max_per_second",
        ),
        (
            json!({"rollout": {"max_per_sec": 10}}),
            "rollout.max_per_sec",
        ),
        (json!({"retries": {"max_attempts": 2}}), "retries"),
    ] {
        let (status, body) = app
            .post_job(&firmware_job(extra.clone()).to_string(), "application/json")
            .await;
        assert_eq!(status, 422, "{extra}: {body}");
        assert_eq!(body["field"], field, "{extra}: {body}");
    }
    app.teardown().await;
}
