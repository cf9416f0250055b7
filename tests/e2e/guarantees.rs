//! Guarantees checked one at a time against the real processes and services: the first
//! terminal outcome of a device wins, results naming an unknown job are dead-lettered, dead
//! letters can be listed and replayed, and target filters select exactly the devices they
//! name. (Claim contention is tested against the real Redis in `worker::idempotency`.)

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shared::{
    messages::{self, DeviceTask, TaskResult, WIRE_VERSION},
    state::{ExecutionState, execution_id},
};
use uuid::Uuid;

use crate::helpers::{TestApp, firmware_job, spawn_app};

fn result(job: Uuid, device: &str, state: ExecutionState, error: Option<&str>) -> TaskResult {
    TaskResult {
        version: WIRE_VERSION,
        job_id: job,
        execution_id: execution_id(job, device),
        device_id: device.to_owned(),
        state,
        attempts: 1,
        error: error.map(str::to_owned),
        worker: "e2e-impostor".into(),
        published_at_ms: 0,
        finished_at_ms: shared::now_ms(),
        readings: None,
    }
}

#[tokio::test]
async fn a_late_conflicting_result_never_changes_a_terminal_device_and_unknown_jobs_are_dead_lettered()
 {
    // Arrange: a finished job.
    let app = spawn_app(1, &[]).await;
    app.import_fleet(200).await;
    let id = app.create_job(&firmware_job(json!({}))).await;
    let before = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(before["succeeded"], 200, "{before}");
    let statuses = app.statuses(id).await;

    // Act: a FAILED result for a device that succeeded, and a result for a job that does not
    // exist, both as a worker would publish them.
    let device = harness::fleet::device_id(7);
    let late = result(id, &device, ExecutionState::Failed, Some("late and wrong"));
    let stranger = result(Uuid::now_v7(), "dev-x", ExecutionState::Succeeded, None);
    for r in [&late, &stranger] {
        app.publish_raw(
            app.names.results_exchange(),
            shared::topology::RESULT_ROUTING_KEY,
            &messages::encode(r).expect("encode"),
        )
        .await;
    }

    // Assert: the stranger reaches the dead-letter queue with its reason; by then the late
    // result (published first, same queue) was processed, and changed nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = app.drain_dead_letters().await;
        if !dead.is_empty() || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        dead.len(),
        1,
        "the result naming an unknown job is dead-lettered"
    );
    let reason = shared::amqp::header_str(
        dead[0].delivery.properties.headers().as_ref(),
        shared::topology::HEADER_DEAD_REASON,
    )
    .expect("reason");
    assert!(reason.contains("unknown job"), "{reason}");
    let after = app.job(id).await;
    for counter in ["succeeded", "failed", "terminal", "targeted"] {
        assert_eq!(after[counter], before[counter], "{counter}: {after}");
    }
    assert_eq!(app.statuses(id).await[&device], statuses[&device]);
    app.teardown().await;
}

#[tokio::test]
async fn dead_letters_are_listed_with_reasons_and_only_decodable_ones_replayed() {
    // Arrange: garbage and a well-formed task for a job nobody created reach the tasks queue;
    // the worker dead-letters both.
    let app = spawn_app(1, &[]).await;
    app.publish_raw(
        app.names.tasks_exchange(),
        shared::topology::TASK_ROUTING_KEY,
        b"\xc1 not msgpack",
    )
    .await;
    let orphan = Uuid::now_v7();
    let task = DeviceTask {
        version: WIRE_VERSION,
        job_id: orphan,
        execution_id: execution_id(orphan, "dev-1"),
        device_id: "dev-1".into(),
        attempts: 0,
        parked: 0,
        published_at_ms: 0,
    };
    app.publish_raw(
        app.names.tasks_exchange(),
        shared::topology::TASK_ROUTING_KEY,
        &messages::encode(&task).expect("encode"),
    )
    .await;
    let list = |app: &TestApp| {
        let url = app.url("/v1/dlq?limit=10");
        let http = app.http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .expect("dlq")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let v = list(&app).await;
        if v["messages"].as_array().map(Vec::len) == Some(2) {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Assert: both listed with their reasons, and listing removed nothing.
    let reasons: HashSet<String> = listed["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("undecodable")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown job")),
        "{reasons:?}"
    );
    assert_eq!(
        list(&app).await["messages"].as_array().map(Vec::len),
        Some(2)
    );

    // Act: replay only what decodes.
    let replayed: Value = app
        .http
        .post(app.url("/v1/dlq/replay"))
        .json(&json!({"only_decodable": true}))
        .send()
        .await
        .expect("replay")
        .json()
        .await
        .expect("json");

    // Assert: the task went back to its queue (and, its job still unknown, comes back to the
    // dead letters); the garbage stayed.
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    assert_eq!(replayed["kept"], 1, "{replayed}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = list(&app).await;
        if v["messages"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.teardown().await;
}

#[tokio::test]
async fn a_model_and_tag_filter_targets_exactly_the_matching_devices() {
    // Arrange
    let app = spawn_app(1, &[]).await;
    let n = 2_000;
    app.import_fleet(n).await;
    let sample = harness::fleet::device(3);
    let (tag, value) = sample
        .tags
        .iter()
        .next()
        .expect("generated devices have tags");
    let expected: HashSet<String> = (0..n)
        .map(harness::fleet::device)
        .filter(|d| d.model == sample.model && d.tags.get(tag) == Some(value))
        .map(|d| d.id)
        .collect();
    assert!(!expected.is_empty() && (expected.len() as u64) < n);

    // Act
    let id = app
        .create_job(&firmware_job(json!({
            "target": {"groups": ["fleet"], "filter": {"model": sample.model, "tags": {tag: value}}}
        })))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;

    // Assert: exactly the matching devices were targeted, and the registry count agrees.
    assert_eq!(job["state"], "COMPLETED");
    app.assert_exact(id, &expected).await;
    let count: Value = app
        .http
        .get(app.url(&format!(
            "/v1/devices/count?group=fleet&model={}&tag={tag}={value}",
            sample.model
        )))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(count["count"], expected.len());
    app.teardown().await;
}

#[tokio::test]
async fn the_tasks_queue_stays_under_its_bound_and_a_small_job_created_mid_way_finishes_in_seconds()
{
    // 20,000 devices here; the acceptance run takes 500,000 in a release build
    // (`FLEETBATCH_TEST_BIG_JOB=500000`, see docs/testing.md).
    let n: u64 = std::env::var("FLEETBATCH_TEST_BIG_JOB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let bound = 2_000u32;
    // Devices slower than the planner (a debug build beside other tests: 2 workers x 32
    // deliveries of 50 ms, 1,280 devices/s): without the bound the queue would fill.
    let (latency, concurrency) = if n > 100_000 {
        ("5", "64")
    } else {
        ("50", "32")
    };
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_COORDINATOR__MAX_QUEUED_TASKS", "2000"),
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", latency),
            ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0"),
            ("FLEETBATCH_WORKER__CONCURRENCY", concurrency),
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ],
    )
    .await;
    app.import_fleet(n).await;
    // The depth of the tasks queue, sampled every 100 ms while the test runs.
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (settings, queue, stop) = (
            app.settings.amqp.clone(),
            app.names.tasks_queue(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let conn = shared::amqp::connect(&settings, "e2e-depth")
                .await
                .expect("amqp");
            let ch = conn.create_channel().await.expect("channel");
            let mut max = 0u32;
            while !stop.is_cancelled() {
                let q = ch
                    .queue_declare(
                        queue.clone().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .expect("depth");
                max = max.max(q.message_count());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = conn.close(200, "done".into()).await;
            max
        })
    };
    let big = app.create_job(&firmware_job(json!({}))).await;
    crate::rollouts::wait_until(&app, big, Duration::from_secs(120), |j| {
        j["terminal"].as_u64() > Some(5_000)
    })
    .await;
    // A small job behind at most `bound` tasks: done within seconds, long before the big one.
    // (It may run beside the big job on its devices: otherwise each of them would take it
    // only after the big job, created first, finished there.)
    let devices: Vec<String> = (0..10)
        .map(|i| harness::fleet::device_id(n - 1 - i))
        .collect();
    let started = tokio::time::Instant::now();
    let small = app
        .create_job(&json!({"target": {"devices": devices},
            "action": {"type": "reboot"}, "concurrent": true}))
        .await;
    let done = app.wait_for_job(small, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(done["succeeded"], 10, "{done}");
    let big_now = app.job(big).await;
    assert_eq!(
        big_now["state"], "IN_PROGRESS",
        "the small job did not wait for the big one"
    );
    let big_done = app
        .wait_for_job(big, Duration::from_secs(300.max(n / 1_000)))
        .await;
    stop.cancel();
    let max = sampler.await.expect("sampler");
    eprintln!(
        "small job: {} ms; deepest tasks queue: {max} messages",
        took.as_millis()
    );
    assert_eq!(big_done["succeeded"], n, "{big_done}");
    // The queue counts messages of up to `tasks_per_message` tasks. A planner publishes n
    // tasks only while (messages queued) x per_message + n <= bound, so the queue holds at
    // most bound / per_message messages, and one more that is not full.
    let per_message = u32::from(app.settings.amqp.tasks_per_message);
    assert!(
        max <= bound / per_message + 1,
        "the tasks queue held {max} messages of up to {per_message} tasks: above {bound} tasks"
    );
    assert!(
        max * per_message > bound / 2,
        "the planner outpaced the workers: {max} messages"
    );
    app.teardown().await;
}
