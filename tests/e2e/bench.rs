//! Smoke runs of the commands that start their own deployment: `bench` runs end to end and
//! prints its figures (speed is measured by the command itself, never asserted here), and
//! `demo` exits as the README promises.

use serde_json::Value;

use crate::helpers::service_env;

#[tokio::test]
async fn the_demo_exits_0_with_every_device_terminal_and_nothing_delivered_twice() {
    // Act
    let out = tokio::process::Command::new(
        harness::cluster::bin_dir()
            .expect("binaries")
            .join("fleetbatch"),
    )
    .args(["demo", "--devices", "2000", "--json"])
    .envs(service_env())
    .output()
    .await
    .expect("demo runs");

    // Assert: exit 0 (the README's promise) with a last JSON line that says why.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "demo failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(line["state"], "COMPLETED", "{line}");
    assert_eq!(line["targeted"], 2000, "{line}");
    assert_eq!(line["all_terminal"], true, "{line}");
    assert_eq!(line["duplicate_applications"], 0, "{line}");
    assert_eq!(line["extra_deliveries"], 0, "{line}");
    let sum: u64 = [
        "succeeded",
        "failed",
        "rejected",
        "timed_out",
        "canceled",
        "skipped",
    ]
    .iter()
    .map(|k| line[k].as_u64().unwrap_or(0))
    .sum();
    assert_eq!(sum, 2000, "{line}");
}

/// `fleetbatch bench` on 1,000 devices, one run at 0 ms, one worker of 64 deliveries, with
/// `extra` arguments: its last line, once it exited 0.
async fn bench(extra: &[&str]) -> Value {
    let bin = harness::cluster::bin_dir()
        .expect("binaries")
        .join("fleetbatch");
    let out = tokio::process::Command::new(bin)
        .args([
            "bench",
            "--devices",
            "1000",
            "--repeat",
            "1",
            "--latencies",
            "0",
            "--workers",
            "1",
            "--concurrency",
            "64",
        ])
        .args(extra)
        .envs(service_env())
        .output()
        .await
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

#[tokio::test]
async fn the_benchmark_command_runs_and_reports_every_figure() {
    // Act
    let line = bench(&[]).await;

    // Assert
    for field in [
        "devices",
        "devices_per_s",
        "raw_devices_per_s",
        "ratio",
        "latency_ms",
        "coordinator_peak_rss_mb",
        "worker_peak_rss_mb",
    ] {
        assert!(line.get(field).is_some(), "missing {field}: {line}");
    }
    assert_eq!(line["devices"], 1000);
    assert_eq!(line["all_exact"], true);
    assert_eq!(line["extra_deliveries"], 0, "{line}");
    assert!(line["devices_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(line["raw_devices_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(line["coordinator_peak_rss_mb"].as_f64().unwrap_or(0.0) > 1.0);
    assert!(
        line["latency_ms"]["p99"].as_f64().unwrap_or(-1.0)
            >= line["latency_ms"]["p50"].as_f64().unwrap_or(0.0)
    );
    // The raw pipeline's idempotency keys went with it (this is the one test that runs it):
    // left behind, a bench's 600,000 keys slow down every namespace's clean-up scans.
    let mut redis = redis::Client::open(shared::config::test_redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("{bench-raw*")
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    assert!(
        left.is_empty(),
        "{} raw pipeline keys left, e.g. {:?}",
        left.len(),
        left.first()
    );
}

#[tokio::test]
async fn the_benchmark_measures_a_device_path_with_the_devices_own_counts_and_costs() {
    // Act: devices reached over HTTP, served by a fleet-sim process.
    let line = bench(&["--no-raw", "--devices-over", "http"]).await;

    // Assert: exact by the devices' own counts, and fleet-sim's costs reported.
    assert_eq!(line["devices_over"], "http", "{line}");
    assert_eq!(line["all_exact"], true, "{line}");
    assert_eq!(line["extra_deliveries"], 0, "{line}");
    assert!(
        line["fleet_sim_cpu_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{line}"
    );
    assert!(
        line["fleet_sim_peak_bytes_per_device"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{line}"
    );
    assert!(line.get("mqtt_broker_cpu_s").is_some(), "{line}");
}

#[tokio::test]
async fn the_aws_iot_jobs_path_is_measured_against_its_raw_mqtt_exchange_in_the_same_run() {
    // Arrange: `$aws/things/...` topics are the same in every namespace; the other tests on
    // them wait until this one is done.
    let _topics = crate::devices::AWS_TOPICS.lock().await;

    // Act: devices on the AWS IoT Jobs API over MQTT, and before them the bare five-message
    // exchange through the same broker.
    let line = bench(&["--devices-over", "aws-iot-jobs"]).await;

    // Assert: exact, and the raw MQTT floor measured, with its broker CPU and the ratio.
    assert_eq!(line["devices_over"], "aws-iot-jobs", "{line}");
    assert_eq!(line["all_exact"], true, "{line}");
    let raw = line["raw_devices_per_s"].as_f64().unwrap_or(0.0);
    let rate = line["devices_per_s"].as_f64().unwrap_or(0.0);
    assert!(raw > 0.0, "{line}");
    assert!(
        (line["ratio"].as_f64().unwrap_or(0.0) - rate / raw).abs() < 0.01,
        "{line}"
    );
    assert!(
        line["raw_mqtt_broker_cpu_us_per_device"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{line}"
    );
}

#[tokio::test]
async fn chaos_exits_0_when_every_check_holds_and_non_zero_when_the_run_fails() {
    let bin = harness::cluster::bin_dir()
        .expect("binaries")
        .join("fleetbatch");
    // Act 1: a short chaos run (workers killed every second, the coordinator once).
    let out = tokio::process::Command::new(&bin)
        .args([
            "chaos",
            "--devices",
            "8000",
            "--workers",
            "2",
            "--kill-every-secs",
            "1",
            "--concurrency",
            "16",
        ])
        .envs(service_env())
        .output()
        .await
        .expect("chaos runs");

    // Assert 1: exit 0, and the JSON line says every check held after real kills.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "chaos failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(line["ok"], true, "{line}");
    assert_eq!(line["targeted"], 8000, "{line}");
    assert_eq!(line["lost"], 0, "{line}");
    assert_eq!(line["duplicate_applications"], 0, "{line}");
    assert_eq!(line["counters_exact"], true, "{line}");
    assert_eq!(line["coordinator_restarts"], 1, "{line}");
    assert!(line["worker_kills"].as_u64() >= Some(1), "{line}");

    // Act 2 and assert: a run that cannot finish in time fails with a non-zero exit.
    let out = tokio::process::Command::new(&bin)
        .args(["chaos", "--devices", "1000", "--timeout-secs", "0"])
        .envs(service_env())
        .output()
        .await
        .expect("chaos runs");
    assert_ne!(out.status.code(), Some(0), "a failed chaos run exited 0");
}
