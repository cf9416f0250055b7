//! Bounded memory (guarantee 4): the coordinator streams a job's targets from the registry
//! while it plans, and a job's results page by page while it exports them, so neither costs
//! it more memory for a large job than for a small one.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{firmware_job, spawn_app};

/// Devices in the large job.
const DEVICES: u64 = 100_000;
/// What planning may add to the coordinator's resident memory. Holding the fleet's device
/// records (about 300 bytes each here) would take 30 MB and more; streaming needs a batch.
const PLANNING_BUDGET_MB: f64 = 16.0;

/// The resident memory of a process, in MB (from /proc).
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

#[tokio::test]
async fn planning_a_100000_device_job_keeps_the_coordinators_memory_bounded() {
    // Arrange: no workers, so the coordinator does nothing but plan. It is restarted after
    // the import, so the memory the import used is not there for planning to reuse.
    // No worker takes tasks here: the queue bound would hold planning at 20,000.
    let mut app = spawn_app(0, &[("FLEETBATCH_COORDINATOR__MAX_QUEUED_TASKS", "0")]).await;
    app.import_fleet(DEVICES).await;
    app.cluster
        .signal_coordinator(nix::sys::signal::Signal::SIGTERM)
        .expect("sigterm");
    let status = app
        .cluster
        .wait_coordinator(Duration::from_secs(30))
        .await
        .expect("coordinator stops");
    assert!(status.success(), "{status}");
    app.cluster.start_coordinator().await.expect("restart");
    let pid = app.cluster.coordinator_pid().expect("coordinator pid");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_mb(pid);

    // Act: plan the whole fleet, sampling the coordinator's memory throughout.
    let id = app.create_job(&firmware_job(json!({}))).await;
    let mut peak = baseline;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let job = loop {
        peak = peak.max(rss_mb(pid));
        let job = app.job(id).await;
        if job["planning_done"] == true {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "planning: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    peak = peak.max(rss_mb(pid));

    // Assert: every device was published, and planning grew the coordinator by a bounded
    // amount, not by the fleet.
    assert_eq!(job["targeted"].as_u64(), Some(DEVICES), "{job}");
    let growth = peak - baseline;
    eprintln!("coordinator RSS: baseline {baseline:.1} MB, peak {peak:.1} MB while planning");
    assert!(
        growth < PLANNING_BUDGET_MB,
        "planning {DEVICES} devices grew the coordinator by {growth:.1} MB \
         (baseline {baseline:.1} MB, peak {peak:.1} MB)"
    );

    // The export of every device's result (100,000 rows) streams: sampled throughout, the
    // coordinator grows by no more than planning may.
    let before = rss_mb(pid);
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0f64;
            while !stop.is_cancelled() {
                peak = peak.max(rss_mb(pid));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    let (status, csv) = app
        .get_text(&app.url(&format!("/v1/jobs/{id}/results?format=csv")))
        .await;
    sampling.cancel();
    let export_peak = sampler.await.expect("sampler").max(rss_mb(pid));
    assert_eq!(status, 200);
    assert_eq!(
        csv.lines().count() as u64,
        DEVICES + 1,
        "a header and a row per device"
    );
    let growth = export_peak - before;
    eprintln!("coordinator RSS: {before:.1} MB before the export, peak {export_peak:.1} MB");
    assert!(
        growth < PLANNING_BUDGET_MB,
        "exporting {DEVICES} results grew the coordinator by {growth:.1} MB"
    );

    // The queued tasks are of no further use: drop them with the queue.
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-memory")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(
        app.names.tasks_queue().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .expect("tasks queue deleted");
    let _ = conn.close(200, "done".into()).await;
    app.teardown().await;
}
