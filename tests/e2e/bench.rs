//! A smoke run of the benchmark command: it runs end to end and prints its figures. Speed is
//! measured by the command itself, never asserted here.

use serde_json::Value;

#[tokio::test]
async fn the_benchmark_command_runs_and_reports_every_figure() {
    // Arrange
    let amqp = std::env::var("FLEETBATCH_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis = std::env::var("FLEETBATCH_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let bin = harness::cluster::bin_dir()
        .expect("binaries")
        .join("fleetbatch");

    // Act
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
        .env("FLEETBATCH_AMQP__URL", amqp)
        .env("FLEETBATCH_REDIS__URL", redis)
        .output()
        .await
        .expect("bench runs");

    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
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
    assert!(line["devices_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(line["raw_devices_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(line["coordinator_peak_rss_mb"].as_f64().unwrap_or(0.0) > 1.0);
    assert!(
        line["latency_ms"]["p99"].as_f64().unwrap_or(-1.0)
            >= line["latency_ms"]["p50"].as_f64().unwrap_or(0.0)
    );
}
