//! `fleetbatch bench`: throughput, latency and memory, measured against the local RabbitMQ
//! and Redis.
//!
//! First the **raw broker pipeline**, the strongest per-device pipeline with the product's
//! durability ([`raw`]): with lapin and the product's message sizes (persistent messages,
//! pipelined publisher confirms, acks in bulk, prefetch equal to the workers' concurrency, one
//! Redis `SET NX` per task) it publishes N tasks, consumes them, publishes a result per task
//! (confirmed before the task is acked) and consumes the results; for devices reached over
//! MQTT, the path's bare MQTT exchange through the same broker instead ([`raw_mqtt`]). Then
//! **fleetbatch itself** on the same N: a coordinator and K workers as real processes with
//! the built-in simulator (or `fleet-sim`), from job creation to COMPLETED.
//! Each case runs several times; medians are reported, and one JSON line per latency case.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use redis::AsyncCommands;
use serde_json::{Value, json};
use shared::{config::Settings, state::DeviceStatus};

use harness::procs::{cpu_seconds, peak_rss_mb, pids_named};

use super::demo::{DevicesOver, fleet_sim_audit};
use crate::{progress, sandbox::Sandbox};

mod raw;
mod raw_mqtt;

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Devices (tasks) per run.
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Runs per case; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Simulated device latencies to measure, in ms (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    latencies: Vec<u64>,
    /// Deliveries in flight per worker (also the raw pipeline's prefetch).
    #[arg(long, default_value_t = 1024)]
    concurrency: u16,
    /// Settings file for RabbitMQ and Redis URLs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Cancel each job once this fraction of its devices is done (0: never), and report how
    /// long after the cancel the last device was contacted (`cancel_stop_ms`).
    #[arg(long, default_value_t = 0.0)]
    cancel_at: f64,
    /// Skip the raw pipeline (e.g. when measuring cancel latency only).
    #[arg(long)]
    no_raw: bool,
    /// How the devices are reached: the built-in simulator, or a `fleet-sim` process on this
    /// machine over MQTT (fleetbatch protocol or AWS IoT Jobs API) or HTTP; its CPU, its
    /// memory per device and the MQTT broker's CPU are then reported too. Over MQTT the raw
    /// pipeline is the path's bare MQTT exchange through the same broker.
    #[arg(long, value_enum, default_value = "simulator")]
    devices_over: DevicesOver,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds spread over `devices`, in whole microseconds a device.
fn per_device_us(seconds: f64, devices: u64) -> f64 {
    (seconds * 1e6 / devices.max(1) as f64).round()
}

/// CPU seconds of the broker (RabbitMQ's Erlang VM) on this machine.
fn broker_cpu() -> f64 {
    pids_named("beam.smp").into_iter().map(cpu_seconds).sum()
}

/// CPU seconds of the MQTT broker (Mosquitto) on this machine.
fn mqtt_broker_cpu() -> f64 {
    pids_named("mosquitto").into_iter().map(cpu_seconds).sum()
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let settings = Settings::load(args.config.as_deref()).context("loading settings")?;
    eprintln!(
        "bench: {} devices, {} runs per case, {} workers, concurrency {}",
        args.devices, args.repeat, args.workers, args.concurrency
    );

    // Over MQTT the raw pipeline is the MQTT exchange the path needs at the least (the
    // broker's floor for it); otherwise the raw broker pipeline.
    let exchange = match args.devices_over {
        DevicesOver::Mqtt => Some(raw_mqtt::Exchange::Fleetbatch),
        DevicesOver::AwsIotJobs => Some(raw_mqtt::Exchange::AwsIotJobs),
        DevicesOver::Simulator | DevicesOver::Http | DevicesOver::Http2 => None,
    };
    let mut raw_rates = Vec::new();
    let mut raw_mqtt_cpu = Vec::new();
    for i in 0..if args.no_raw { 0 } else { args.repeat } {
        if let Some(exchange) = exchange {
            let before = mqtt_broker_cpu();
            let (rate, secs) = raw_mqtt::raw_mqtt_pipeline(
                &settings.worker.mqtt,
                exchange,
                args.devices,
                u64::from(args.concurrency) * args.workers as u64,
            )
            .await?;
            let cpu = mqtt_broker_cpu() - before;
            eprintln!(
                "raw MQTT pipeline ({exchange:?}) run {}: {rate:.0} devices/s ({secs:.1}s, MQTT broker CPU {cpu:.1}s)",
                i + 1,
            );
            raw_rates.push(rate);
            raw_mqtt_cpu.push(cpu);
            continue;
        }
        let broker_before = broker_cpu();
        let (rate, secs) = raw::raw_pipeline(&settings, args.devices, args.concurrency).await?;
        eprintln!(
            "raw pipeline run {}: {rate:.0} devices/s ({secs:.1}s, broker CPU {:.1}s)",
            i + 1,
            broker_cpu() - broker_before
        );
        raw_rates.push(rate);
    }
    let raw = median(raw_rates);
    let raw_mqtt_cpu = median(raw_mqtt_cpu);
    eprintln!("raw pipeline median: {raw:.0} devices/s");

    let mut lines = Vec::new();
    for &latency in &args.latencies {
        let mut runs = Vec::new();
        for i in 0..args.repeat {
            let r = product_run(&args, latency).await?;
            eprintln!(
                "fleetbatch latency {latency} ms run {}: {:.0} devices/s, latency p50 {} ms p99 {} ms, coordinator {:.0} MB / {:.1} CPU s, workers {} MB / {} CPU s, broker {:.1} CPU s, Redis {:.1} CPU s, Redis {} B/device ({} after delete)",
                i + 1,
                r["devices_per_s"].as_f64().unwrap_or(0.0),
                r["latency_ms"]["p50"],
                r["latency_ms"]["p99"],
                r["coordinator_peak_rss_mb"].as_f64().unwrap_or(0.0),
                r["coordinator_cpu_s"].as_f64().unwrap_or(0.0),
                r["worker_peak_rss_mb_each"],
                r["worker_cpu_s_each"],
                r["broker_cpu_s"].as_f64().unwrap_or(0.0),
                r["redis_cpu_s"].as_f64().unwrap_or(0.0),
                r["redis_bytes_per_device"],
                r["redis_bytes_per_device_after_delete"],
            );
            if args.devices_over != DevicesOver::Simulator {
                eprintln!(
                    "  devices over {:?}: fleet-sim {:.1} CPU s, {} B/device peak RSS; MQTT broker {:.1} CPU s",
                    args.devices_over,
                    r["fleet_sim_cpu_s"].as_f64().unwrap_or(0.0),
                    r["fleet_sim_peak_bytes_per_device"],
                    r["mqtt_broker_cpu_s"].as_f64().unwrap_or(0.0),
                );
            }
            runs.push(r);
        }
        let med = |k: &str| median(runs.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect());
        let med_lat = |k: &str| {
            median(
                runs.iter()
                    .map(|r| r["latency_ms"][k].as_f64().unwrap_or(0.0))
                    .collect(),
            )
        };
        let rate = med("devices_per_s");
        let line = json!({
            "devices": args.devices,
            "device_latency_ms": latency,
            "workers": args.workers,
            "runs": args.repeat,
            "devices_per_s": rate.round(),
            "raw_devices_per_s": raw.round(),
            "ratio": if raw > 0.0 { ((rate / raw) * 100.0).round() / 100.0 } else { 0.0 },
            "latency_ms": {"p50": med_lat("p50"), "p99": med_lat("p99")},
            "coordinator_peak_rss_mb": (med("coordinator_peak_rss_mb") * 10.0).round() / 10.0,
            "worker_peak_rss_mb": (med("worker_peak_rss_mb") * 10.0).round() / 10.0,
            "coordinator_cpu_s": (med("coordinator_cpu_s") * 10.0).round() / 10.0,
            "worker_cpu_s": (med("worker_cpu_s") * 10.0).round() / 10.0,
            "broker_cpu_s": (med("broker_cpu_s") * 10.0).round() / 10.0,
            "redis_cpu_s": (med("redis_cpu_s") * 10.0).round() / 10.0,
            // CPU microseconds each device cost each process (medians of the runs).
            "cpu_us_per_device": {
                "coordinator": per_device_us(med("coordinator_cpu_s"), args.devices),
                "workers": per_device_us(med("worker_cpu_s"), args.devices),
                "rabbitmq": per_device_us(med("broker_cpu_s"), args.devices),
                "redis": per_device_us(med("redis_cpu_s"), args.devices),
            },
            "all_exact": runs.iter().all(|r| r["exact"] == true),
            "extra_deliveries": runs.iter().map(|r| r["extra_deliveries"].as_u64().unwrap_or(0)).sum::<u64>(),
            "redis_bytes_per_device": med("redis_bytes_per_device"),
            "redis_bytes_per_device_after_delete": med("redis_bytes_per_device_after_delete"),
        });
        let mut line = line;
        if args.devices_over != DevicesOver::Simulator {
            line["devices_over"] = json!(
                clap::ValueEnum::to_possible_value(&args.devices_over)
                    .map(|v| v.get_name().to_owned())
            );
            line["mqtt_broker_cpu_s"] = json!((med("mqtt_broker_cpu_s") * 10.0).round() / 10.0);
            line["fleet_sim_cpu_s"] = json!((med("fleet_sim_cpu_s") * 10.0).round() / 10.0);
            line["cpu_us_per_device"]["mqtt_broker"] =
                json!(per_device_us(med("mqtt_broker_cpu_s"), args.devices));
            line["cpu_us_per_device"]["fleet_sim"] =
                json!(per_device_us(med("fleet_sim_cpu_s"), args.devices));
            line["fleet_sim_peak_bytes_per_device"] = json!(med("fleet_sim_peak_bytes_per_device"));
            if exchange.is_some() && raw > 0.0 {
                // The raw MQTT pipeline's broker CPU a device: the floor of the path.
                line["raw_mqtt_broker_cpu_us_per_device"] =
                    json!(per_device_us(raw_mqtt_cpu, args.devices));
            }
        }
        if args.cancel_at > 0.0 {
            line["cancel_stop_ms"] = json!(med("cancel_stop_ms"));
        }
        lines.push(line);
    }
    let ok = lines.iter().all(|l| l["all_exact"] == true);
    for l in lines {
        println!("{l}");
    }
    Ok(if ok { 0 } else { 1 })
}

/// One fleetbatch run; returns its figures.
async fn product_run(args: &BenchArgs, latency_ms: u64) -> anyhow::Result<Value> {
    let http_port = harness::cluster::free_port()?;
    let mut env = vec![
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", latency_ms.to_string()),
        (
            "FLEETBATCH_WORKER__CONCURRENCY",
            args.concurrency.to_string(),
        ),
    ];
    env.extend(args.devices_over.worker_env(http_port));
    let mut sandbox = Sandbox::start(args.config.as_deref(), "bench", args.workers, &env).await?;
    let outcome = match args
        .devices_over
        .start_fleet_sim(&mut sandbox, http_port, args.devices)
        .await
    {
        Ok(sim) => measure(args, &sandbox, sim.as_deref()).await,
        Err(e) => Err(e),
    };
    sandbox.finish(false).await;
    outcome
}

/// Redis's `used_memory`, in bytes, once the objects it frees in the background (deleted
/// keys, `UNLINK`) are freed (waiting 30 s at most): otherwise a job deleted just before
/// would be counted, or its freeing subtracted from the next one's bytes.
async fn redis_used_bytes(redis: &mut RedisConn) -> anyhow::Result<u64> {
    let mut waits = 0;
    loop {
        let info: String = redis::cmd("INFO").arg("memory").query_async(redis).await?;
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if field("lazyfree_pending_objects:").unwrap_or(0) == 0 || waits >= 300 {
            return field("used_memory:").context("INFO memory has no used_memory");
        }
        waits += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Redis's own CPU seconds (user + system) since it started.
async fn redis_cpu_seconds(redis: &mut RedisConn) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(redis).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user:") + field("used_cpu_sys:"))
}

async fn measure(args: &BenchArgs, sandbox: &Sandbox, sim: Option<&str>) -> anyhow::Result<Value> {
    sandbox.import_fleet(args.devices).await?;
    let mut redis =
        shared::store::connect(&sandbox.settings.redis, sandbox.names.key_prefix()).await?;
    let redis_before = redis_used_bytes(&mut redis).await?;
    let coordinator = sandbox
        .cluster
        .coordinator_pid()
        .context("coordinator pid")?;
    let workers = sandbox.cluster.worker_pids();
    let cpu_before: Vec<f64> = std::iter::once(coordinator)
        .chain(workers.iter().copied())
        .map(cpu_seconds)
        .collect();
    let sim_pid = sandbox.cluster.fleet_sim_pids().first().copied();
    let sim_before = sim_pid.map_or(0.0, cpu_seconds);
    let mqtt_before = mqtt_broker_cpu();
    let broker_before = broker_cpu();
    let redis_cpu_before = redis_cpu_seconds(&mut redis).await?;
    let started = Instant::now();
    let job_id = sandbox.create_firmware_job("bench", json!({})).await?;
    let mut canceled_at_ms = None;
    let job = loop {
        let job: Value = sandbox.client.get(&format!("/v1/jobs/{job_id}")).await?;
        if progress::is_finished(&job) {
            break job;
        }
        if args.cancel_at > 0.0
            && canceled_at_ms.is_none()
            && progress::count(&job, "terminal") as f64 >= args.cancel_at * args.devices as f64
        {
            let _: Value = sandbox
                .client
                .post(&format!("/v1/jobs/{job_id}/cancel"), "application/json", "")
                .await?;
            canceled_at_ms = Some(shared::now_ms());
            eprintln!(
                "canceled at {} devices done",
                progress::count(&job, "terminal")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after: Vec<f64> = std::iter::once(coordinator)
        .chain(workers.iter().copied())
        .map(cpu_seconds)
        .collect();
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let broker_cpu_s = broker_cpu() - broker_before;
    let redis_cpu_s = redis_cpu_seconds(&mut redis).await? - redis_cpu_before;
    let mqtt_broker_cpu_s = mqtt_broker_cpu() - mqtt_before;
    let sim_cpu_s = sim_pid.map_or(0.0, cpu_seconds) - sim_before;
    let sim_bytes_per_device = sim_pid.map_or(0.0, |p| {
        peak_rss_mb(p) * 1024.0 * 1024.0 / args.devices.max(1) as f64
    });
    let coordinator_rss = peak_rss_mb(coordinator);
    let worker_rss: Vec<f64> = workers.iter().map(|p| peak_rss_mb(*p)).collect();

    // What the finished job keeps in Redis (statuses, results, idempotency records...).
    let redis_with_job = redis_used_bytes(&mut redis).await?;
    // Per-device latency: first publication to outcome recorded.
    let job_uuid = uuid::Uuid::parse_str(&job_id)?;
    let mut latencies = Vec::with_capacity(args.devices as usize);
    let mut cursor: u64 = 0;
    loop {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(sandbox.names.job_status(job_uuid))
            .arg(cursor)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut redis)
            .await?;
        for pair in flat.chunks_exact(2) {
            if let Ok(s) = serde_json::from_str::<DeviceStatus>(&pair[1])
                && let Some(p) = s.published_at_ms
            {
                latencies.push(s.updated_at_ms.saturating_sub(p));
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    latencies.sort_unstable();
    let audit = fleet_sim_audit(&mut redis, &sandbox.names, job_uuid, sim).await?;
    let last_delivery_ms: Option<u64> = redis
        .hget(sandbox.names.sim_totals(job_uuid), "last_delivery_ms")
        .await?;
    // Negative: no device was contacted after the cancel.
    let cancel_stop_ms = match (canceled_at_ms, last_delivery_ms) {
        (Some(c), Some(l)) => l as i64 - c as i64,
        _ => 0,
    };
    // What is left once the job's data is deleted (as retention does).
    let _: Value = sandbox.client.delete(&format!("/v1/jobs/{job_id}")).await?;
    let redis_after_delete = redis_used_bytes(&mut redis).await?;
    let per_device =
        |after: u64| after.saturating_sub(redis_before) as f64 / args.devices.max(1) as f64;
    let worker_max_rss = worker_rss.iter().copied().fold(0.0, f64::max);
    let worker_cpu_each: Vec<f64> = cpu[1..].iter().map(|c| (c * 10.0).round() / 10.0).collect();
    Ok(json!({
        "devices_per_s": progress::count(&job, "targeted") as f64 / seconds,
        "seconds": seconds,
        "latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99)},
        "coordinator_peak_rss_mb": coordinator_rss,
        "worker_peak_rss_mb": worker_max_rss,
        "worker_peak_rss_mb_each": worker_rss.iter().map(|m| (m * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "coordinator_cpu_s": cpu[0],
        "worker_cpu_s": cpu[1..].iter().sum::<f64>(),
        "worker_cpu_s_each": worker_cpu_each,
        "broker_cpu_s": broker_cpu_s,
        "redis_cpu_s": redis_cpu_s,
        "mqtt_broker_cpu_s": mqtt_broker_cpu_s,
        "fleet_sim_cpu_s": sim_cpu_s,
        "fleet_sim_peak_bytes_per_device": sim_bytes_per_device.round(),
        "extra_deliveries": audit.extra_deliveries,
        "exact": audit.lost == 0 && audit.counters_exact && audit.duplicate_applications == 0,
        "cancel_stop_ms": cancel_stop_ms,
        "redis_bytes_per_device": per_device(redis_with_job).round(),
        "redis_bytes_per_device_after_delete": per_device(redis_after_delete).round(),
    }))
}
