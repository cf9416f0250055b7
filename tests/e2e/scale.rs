//! The scale run, by hand (not in CI): a job of 1,000,000 devices on a 3-node RabbitMQ
//! cluster with quorum queues, a Redis Cluster of 3 masters with a replica each, 3
//! coordinators and 8 workers, all on this machine. Prints the rate, every process's CPU
//! and peak memory, Redis memory per device, and the audit (exact or not). The command and
//! its figures are in docs/capacity.md:
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo test --release -p fleetbatch-tests --test e2e -- --ignored --nocapture scale::
//! ```
//!
//! `FLEETBATCH_TEST_SCALE_DEVICES`, `FLEETBATCH_TEST_SCALE_WORKERS` and `FLEETBATCH_TEST_SCALE_COORDINATORS`
//! change its size.

use std::time::{Duration, Instant};

use harness::procs::{cpu_seconds, peak_rss_mb, pids_named};
use serde_json::json;

use crate::{
    helpers::{firmware_job, spawn_app},
    services::{RabbitCluster, RedisCluster},
};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
#[ignore = "a scale run of minutes: run by hand (docs/capacity.md)"]
async fn a_million_devices_on_a_rabbitmq_cluster_a_redis_cluster_three_coordinators_and_eight_workers()
 {
    let n = knob("FLEETBATCH_TEST_SCALE_DEVICES", 1_000_000);
    let workers = knob("FLEETBATCH_TEST_SCALE_WORKERS", 8) as usize;
    let coordinators = knob("FLEETBATCH_TEST_SCALE_COORDINATORS", 3);
    let rabbit = RabbitCluster::start(3).await;
    let redis = RedisCluster::start(3).await;
    let others: Vec<String> = rabbit.nodes[1..].iter().map(|n| n.url()).collect();
    let urls = redis.urls();
    let env = [
        ("FLEETBATCH_AMQP__URL", rabbit.nodes[0].url()),
        ("FLEETBATCH_AMQP__FALLBACK_URLS", others.join(",")),
        ("FLEETBATCH_AMQP__QUEUE_TYPE", "quorum".into()),
        ("FLEETBATCH_REDIS__CLUSTER_URLS", urls),
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "0".into()),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "0".into()),
        ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0".into()),
        ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0".into()),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0".into()),
        ("TEST_LOG", "warn".into()),
    ];
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut app = spawn_app(workers, &refs).await;
    for _ in 1..coordinators {
        app.cluster
            .start_another_coordinator()
            .await
            .expect("another coordinator");
    }
    let imported = Instant::now();
    app.import_fleet(n).await;
    eprintln!(
        "imported {n} devices in {:.1} s",
        imported.elapsed().as_secs_f64()
    );

    let mut pids: Vec<(String, u32)> = Vec::new();
    pids.extend(
        app.cluster
            .coordinator_pids()
            .into_iter()
            .map(|p| ("coordinator".to_owned(), p)),
    );
    pids.extend(
        app.cluster
            .worker_pids()
            .into_iter()
            .map(|p| ("worker".to_owned(), p)),
    );
    pids.extend(
        pids_named("beam.smp")
            .into_iter()
            .map(|p| ("rabbitmq".to_owned(), p)),
    );
    pids.extend(redis.pids().into_iter().map(|p| ("redis".to_owned(), p)));
    let cpu_before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let memory_before = redis.used_memory().await;
    let commands_before = redis.master_commands().await;

    let started = Instant::now();
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app
        .wait_for_job(id, Duration::from_secs(600 + n / 200))
        .await;
    let secs = started.elapsed().as_secs_f64();
    let memory_during = redis.used_memory().await;
    let commands = redis.master_commands().await - commands_before;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    eprintln!(
        "{n} devices in {secs:.1} s: {:.0} devices/s",
        n as f64 / secs
    );
    // Per kind: CPU of all its processes, of the busiest one, and the largest peak memory.
    let mut by_kind: std::collections::BTreeMap<&str, (f64, f64, f64)> = Default::default();
    for ((kind, pid), before) in pids.iter().zip(cpu_before) {
        let e = by_kind.entry(kind.as_str()).or_default();
        let used = cpu_seconds(*pid) - before;
        e.0 += used;
        e.1 = e.1.max(used);
        e.2 = e.2.max(peak_rss_mb(*pid));
    }
    let us = |cpu: f64| cpu * 1e6 / n as f64;
    for (kind, (cpu, busiest, peak)) in &by_kind {
        eprintln!(
            "{kind}: {cpu:.1} CPU s ({:.1} µs per device; the busiest process {:.1}), \
             peak RSS of one process {peak:.1} MB",
            us(*cpu),
            us(*busiest)
        );
    }
    eprintln!(
        "redis (all nodes, replicas included): {:.0} bytes per device while the job is kept",
        memory_during.saturating_sub(memory_before) as f64 / n as f64
    );
    eprintln!(
        "redis masters: {:.1} commands per device (a script counts once)",
        commands as f64 / n as f64
    );
    let mut conn = app.redis.clone();
    let audit = harness::audit::audit(&mut conn, &app.names, id)
        .await
        .expect("audit");
    eprintln!("audit: {audit:?}");
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert!(audit.counters_exact, "{audit:?}");
    assert_eq!(audit.duplicate_applications, 0, "{audit:?}");
    app.teardown().await;
    drop(rabbit);
}
