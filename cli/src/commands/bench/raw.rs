//! The raw broker pipeline: the strongest per-device pipeline we have measured on this
//! machine with the product's durability (persistent messages, publisher confirms, manual
//! acks, one Redis `SET NX` per device, a confirmed result per device acked only after its
//! confirm), without fleetbatch's own work:
//! - the publisher never waits for a batch: a sliding window of [`CONFIRMS_IN_FLIGHT`]
//!   confirms is outstanding (a window of 4,096 made RabbitMQ 3.10 slower, not faster:
//!   docs/performance.md);
//! - tasks are acked by a contiguous watermark with `multiple = true` about every
//!   [`ACK_EVERY`] deliveries (a task's ack follows its result's confirm), results likewise.
//!
//! fleetbatch's ratio is taken against it.

use std::{collections::BTreeSet, time::Duration, time::Instant};

use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use shared::config::Settings;

/// Publisher confirms outstanding at most.
const CONFIRMS_IN_FLIGHT: usize = 500;
/// Deliveries acknowledged together (`multiple = true`).
const ACK_EVERY: u64 = 100;

/// The raw pipeline: same messages and durability as the product, nothing else.
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
    // This run's idempotency keys, deleted at its end (a key per device).
    let keys: std::sync::Arc<str> = format!("{{bench-raw-{}}}", &tag[..8]).into();
    let redis = shared::store::connect(&settings.redis, &keys).await?;
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

    // Results consumer: one ack (`multiple`) per ACK_EVERY results, and one for the last.
    let results_ch = conn.create_channel().await?;
    results_ch
        .basic_qos(prefetch.max(1000), BasicQosOptions::default())
        .await?;
    let mut results = results_ch
        .basic_consume(
            results_q.as_str().into(),
            "raw-results".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let results_done = tokio::spawn(async move {
        let mut got = 0;
        while let Some(Ok(d)) = results.next().await {
            got += 1;
            if got % ACK_EVERY == 0 || got >= n {
                d.ack(BasicAckOptions { multiple: true }).await?;
            }
            if got >= n {
                break;
            }
        }
        Ok::<_, lapin::Error>(())
    });

    // Task consumer: SET NX in Redis, publish the result and await its confirm, then hand the
    // delivery tag to the acker, which acks the contiguous watermark.
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
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let acker = tokio::spawn(ack_watermark(tasks_ch.clone(), done_rx, n));
    let (rq, rp, rr, rk) = (
        results_q.clone(),
        props.clone(),
        redis.clone(),
        keys.clone(),
    );
    let handler = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(Ok(d)) = tasks.next().await {
            let (ch, q, p, mut redis, done, keys) = (
                reply_ch.clone(),
                rq.clone(),
                rp.clone(),
                rr.clone(),
                done_tx.clone(),
                rk.clone(),
            );
            tokio::spawn(async move {
                let task = shared::messages::decode_task(&d.data).ok()?;
                let _: Option<String> = redis::cmd("SET")
                    .arg(format!("{keys}:idem:{}", task.execution_id))
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
                let confirm = ch
                    .basic_publish(
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
                if confirm.is_ack() {
                    done.send(d.delivery_tag).ok()
                } else {
                    None
                }
            });
            seen += 1;
            if seen >= n {
                break;
            }
        }
    });

    // Publisher: pipelined confirms, at most CONFIRMS_IN_FLIGHT outstanding.
    let pub_ch = conn.create_channel().await?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = FuturesUnordered::new();
    for k in 0..n {
        let body = task_body(k)?;
        confirms.push(
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
        while confirms.len() >= CONFIRMS_IN_FLIGHT {
            confirmed(confirms.next().await)?;
        }
    }
    while !confirms.is_empty() {
        confirmed(confirms.next().await)?;
    }
    handler.await?;
    acker.await??;
    results_done.await??;
    let secs = started.elapsed().as_secs_f64();

    for q in [&tasks_q, &results_q] {
        let _ = setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let mut redis = redis;
    shared::store::delete_matching(&mut redis, &format!("{keys}:idem:*")).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok((n as f64 / secs, secs))
}

/// A task publish's confirm, which must be an ack.
fn confirmed(c: Option<lapin::Result<lapin::Confirmation>>) -> anyhow::Result<()> {
    match c {
        Some(Ok(c)) if c.is_ack() => Ok(()),
        Some(Ok(_)) => anyhow::bail!("the broker refused a task (nack)"),
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// Acks the tasks channel's deliveries by their contiguous watermark (`multiple = true`):
/// whenever it advanced by [`ACK_EVERY`], or no tag arrived for 2 ms, until all `n` are acked.
async fn ack_watermark(
    channel: lapin::Channel,
    mut done: tokio::sync::mpsc::UnboundedReceiver<u64>,
    n: u64,
) -> lapin::Result<()> {
    let mut finished = BTreeSet::new();
    let (mut watermark, mut acked) = (0u64, 0u64);
    while acked < n {
        let tag = match tokio::time::timeout(Duration::from_millis(2), done.recv()).await {
            Ok(Some(tag)) => Some(tag),
            Ok(None) => break,
            Err(_) => None,
        };
        if let Some(tag) = tag {
            finished.insert(tag);
            while finished.remove(&(watermark + 1)) {
                watermark += 1;
            }
        }
        if watermark > acked && (watermark - acked >= ACK_EVERY || tag.is_none()) {
            channel
                .basic_ack(watermark, BasicAckOptions { multiple: true })
                .await?;
            acked = watermark;
        }
    }
    Ok(())
}
