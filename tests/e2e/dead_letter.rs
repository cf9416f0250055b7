use std::time::Duration;

use serde_json::json;

use crate::helpers::{firmware_job, fleet_ids, spawn_app};

#[tokio::test]
async fn corrupt_messages_are_dead_lettered_with_a_reason_and_the_job_still_completes() {
    // Arrange
    let app = spawn_app(1, &[]).await;
    app.import_fleet(1_000).await;

    // Act: garbage on the tasks queue and on the results queue, then a real job.
    for (exchange, key) in [
        (
            app.names.tasks_exchange(),
            shared::topology::TASK_ROUTING_KEY,
        ),
        (
            app.names.results_exchange(),
            shared::topology::RESULT_ROUTING_KEY,
        ),
    ] {
        app.publish_raw(exchange, key, b"\xc1 this is not msgpack")
            .await;
    }
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;

    // Assert: the job completed (not canceled) with every device succeeding (the default
    // simulated fleet never fails), it is exact, and both corrupt messages wait in the dead-letter queue with
    // the reason and their source queue.
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["succeeded"], 1_000, "{job}");
    app.assert_exact(id, &fleet_ids(1_000)).await;
    let dead = app.drain_dead_letters().await;
    assert_eq!(dead.len(), 2, "both corrupt messages dead-lettered");
    let mut sources = Vec::new();
    for m in &dead {
        let headers = m.delivery.properties.headers().as_ref();
        let reason = shared::amqp::header_str(headers, shared::topology::HEADER_DEAD_REASON)
            .expect("reason header");
        assert!(reason.contains("undecodable"), "{reason}");
        sources.push(
            shared::amqp::header_str(headers, shared::topology::HEADER_DEAD_SOURCE)
                .expect("source"),
        );
        assert_eq!(m.delivery.data, b"\xc1 this is not msgpack");
    }
    sources.sort();
    let mut expected = vec![app.names.results_queue(), app.names.tasks_queue()];
    expected.sort();
    assert_eq!(sources, expected);
    app.teardown().await;
}
