//! The raw broker pipeline: the physical limit of the machine with the product's message
//! sizes and settings, without fleetbatch's own work.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use shared::config::Settings;

/// The raw pipeline: same messages, durability and acks as the product, nothing else.
/// Returns (devices/s, seconds).
pub(super) async fn raw_pipeline(
    settings: &Settings,
    n: u64,
    prefetch: u16,
) -> anyhow::Result<(f64, f64)> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let tasks_q = format!("bench-raw-{}.tasks", &tag[..8]);
    let results_q = format!("bench-raw-{}.results", &tag[..8]);
    let conn = shared::amqp::connect(&settings.amqp, "fleetbatch-bench-raw").await?;
    let setup = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongLongInt(600_000),
    );
    for q in [&tasks_q, &results_q] {
        setup
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args.clone(),
            )
            .await?;
    }
    let redis = shared::store::connect(&settings.redis).await?;
    let job_id = uuid::Uuid::now_v7();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(shared::messages::CONTENT_TYPE.into());
    let task_body = |i: u64| {
        let device = harness::fleet::device_id(i);
        shared::messages::encode(&shared::messages::DeviceTask {
            version: shared::messages::WIRE_VERSION,
            job_id,
            execution_id: shared::state::execution_id(job_id, &device),
            device_id: device,
            attempts: 0,
            parked: 0,
            published_at_ms: shared::now_ms(),
        })
    };

    let started = Instant::now();
    let received = Arc::new(AtomicU64::new(0));

    // Results consumer: ack each result.
    let results_ch = conn.create_channel().await?;
    results_ch
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut results = results_ch
        .basic_consume(
            results_q.as_str().into(),
            "raw-results".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let got = received.clone();
    let results_done = tokio::spawn(async move {
        while let Some(Ok(d)) = results.next().await {
            d.ack(BasicAckOptions::default()).await?;
            if got.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                break;
            }
        }
        Ok::<_, lapin::Error>(())
    });

    // Task consumer: SET NX in Redis, publish the result (confirmed), then ack the task.
    let tasks_ch = conn.create_channel().await?;
    tasks_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let reply_ch = conn.create_channel().await?;
    reply_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut tasks = tasks_ch
        .basic_consume(
            tasks_q.as_str().into(),
            "raw-tasks".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (rq, rp, rr) = (results_q.clone(), props.clone(), redis.clone());
    let handler = tokio::spawn(async move {
        let tracker = tokio_util::task::TaskTracker::new();
        let mut seen = 0;
        while let Some(Ok(d)) = tasks.next().await {
            let (ch, q, p, mut redis) = (reply_ch.clone(), rq.clone(), rp.clone(), rr.clone());
            tracker.spawn(async move {
                let task = shared::messages::decode_task(&d.data).ok()?;
                let _: Option<String> = redis::cmd("SET")
                    .arg(format!("bench-raw:idem:{}", task.execution_id))
                    .arg("c")
                    .arg("NX")
                    .arg("PX")
                    .arg(600_000)
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                let result = shared::messages::encode(&shared::messages::TaskResult {
                    version: shared::messages::WIRE_VERSION,
                    job_id: task.job_id,
                    execution_id: task.execution_id,
                    device_id: task.device_id,
                    state: shared::state::ExecutionState::Succeeded,
                    attempts: 1,
                    error: None,
                    worker: "raw".into(),
                    published_at_ms: task.published_at_ms,
                    finished_at_ms: shared::now_ms(),
                    readings: None,
                })
                .ok()?;
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &result,
                    p,
                )
                .await
                .ok()?
                .await
                .ok()?;
                d.ack(BasicAckOptions::default()).await.ok()
            });
            seen += 1;
            if seen >= n {
                break;
            }
        }
        tracker.close();
        tracker.wait().await;
    });

    // Publisher: confirmed batches of 500, like the planner.
    let pub_ch = conn.create_channel().await?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        let mut pending = Vec::with_capacity(500);
        for k in i..end {
            let body = task_body(k)?;
            pending.push(
                pub_ch
                    .basic_publish(
                        "".into(),
                        tasks_q.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props.clone(),
                    )
                    .await?,
            );
        }
        for c in pending {
            c.await?;
        }
        i = end;
    }
    handler.await?;
    results_done.await??;
    let secs = started.elapsed().as_secs_f64();

    for q in [&tasks_q, &results_q] {
        let _ = setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let mut redis = redis;
    shared::store::delete_matching(&mut redis, "bench-raw:idem:*").await?;
    let _ = conn.close(200, "done".into()).await;
    Ok((n as f64 / secs, secs))
}
