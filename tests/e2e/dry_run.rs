//! Dry run: `POST /v1/jobs?dry_run=true` (and `fleetbatch job create --dry-run`) validates a
//! spec like a create, creates and publishes nothing, and reports the blast radius: devices
//! targeted, sent and skipped by reason, broken down by group, model and hardware revision,
//! and the publishing time at the job's rate. Its counts are what the real job then does.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};

use crate::helpers::{firmware_job, spawn_app};

#[tokio::test]
async fn a_dry_run_creates_nothing_and_counts_exactly_what_the_job_then_does() {
    // Arrange: a fleet, and a spec for one region, model gw-100 only, that skips the old
    // hardware revision D, at 400 devices/s.
    let app = spawn_app(2, &[]).await;
    let n = 3_000;
    app.import_fleet(n).await;
    let region = harness::fleet::REGIONS[1];
    let spec = firmware_job(json!({
        "target": {"groups": [region], "filter": {"model": "gw-100"}},
        "compatibility": {"hardware_revisions": ["A", "B", "C"]},
        "rollout": {"max_per_second": 400},
    }));

    // What it must report, from the fleet's own definition.
    let targets: Vec<_> = (0..n)
        .map(harness::fleet::device)
        .filter(|d| d.groups.iter().any(|g| g == region) && d.model == "gw-100")
        .collect();
    let (sent, skipped): (Vec<_>, Vec<_>) =
        targets.iter().partition(|d| d.hardware_revision != "D");
    let mut by_hw: BTreeMap<String, u64> = BTreeMap::new();
    for d in &sent {
        *by_hw.entry(d.hardware_revision.clone()).or_default() += 1;
    }
    assert!(
        !skipped.is_empty() && sent.len() > 100,
        "a fleet worth previewing"
    );

    // Act
    let r = app
        .http
        .post(app.url("/v1/jobs?dry_run=true"))
        .json(&spec)
        .send()
        .await
        .expect("dry run");
    assert_eq!(r.status(), 200);
    let preview: Value = r.json().await.expect("json");

    // Assert: the counts, the breakdowns, the publishing time.
    assert_eq!(preview["dry_run"], true);
    assert_eq!(preview["targeted"], targets.len() as u64, "{preview}");
    assert_eq!(preview["to_send"], sent.len() as u64, "{preview}");
    assert_eq!(preview["skipped"], skipped.len() as u64, "{preview}");
    let reasons = preview["skipped_by_reason"].as_object().expect("reasons");
    assert_eq!(reasons.len(), 1, "{preview}");
    assert!(reasons.keys().all(|r| r.contains("\"D\"")), "{preview}");
    assert_eq!(
        preview["by_group"],
        json!({"fleet": sent.len(), region: sent.len()}),
        "{preview}"
    );
    assert_eq!(preview["by_model"], json!({"gw-100": sent.len()}));
    assert_eq!(preview["by_hardware_revision"], json!(by_hw));
    let secs = preview["publish_secs"].as_f64().expect("publish time");
    assert!((secs - sent.len() as f64 / 400.0).abs() < 1e-9, "{preview}");
    // Nothing was created.
    assert_eq!(app.job_if_any().await, None);
    // A spec with a mistake is refused as a create would refuse it.
    let r = app
        .http
        .post(app.url("/v1/jobs?dry_run=true"))
        .json(&firmware_job(json!({"target": {"groups": ["nope"]}})))
        .send()
        .await
        .expect("dry run");
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["field"], "target.groups[0]", "{body}");

    // The CLI prints the same report.
    let text = app
        .fleetbatch(&[
            "job",
            "create",
            "--group",
            region,
            "--action",
            "reboot",
            "--dry-run",
        ])
        .await;
    assert!(text.starts_with("dry run: nothing created"), "{text}");
    assert_eq!(app.job_if_any().await, None);

    // The real job does what the dry run said.
    let id = app.create_job(&spec).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(job["targeted"], preview["targeted"], "{job}");
    assert_eq!(job["skipped"], preview["skipped"], "{job}");
    let statuses = app.statuses(id).await;
    assert_eq!(statuses.len() as u64, targets.len() as u64);

    // Waves: a canary of revision-A devices, 10 %, the rest; the dry run's wave sizes are
    // the real job's.
    let mut waved = spec.clone();
    waved["rollout"] = json!({"max_per_second": 400, "waves": [
        {"name": "canary", "count": 20, "selector": {"hardware_revision": "A"}, "soak_secs": 1},
        {"percent": 10},
        {}
    ]});
    let preview: Value = app
        .http
        .post(app.url("/v1/jobs?dry_run=true"))
        .json(&waved)
        .send()
        .await
        .expect("dry run")
        .json()
        .await
        .expect("json");
    let sizes = |waves: &Value| -> Vec<u64> {
        waves
            .as_array()
            .expect("waves")
            .iter()
            .map(|w| w["size"].as_u64().expect("size"))
            .collect()
    };
    let planned = sizes(&preview["waves"]);
    assert_eq!(planned.iter().sum::<u64>(), sent.len() as u64, "{preview}");
    assert_eq!(planned[0], 20, "{preview}");
    assert_eq!(preview["soak_secs"], 1, "{preview}");
    let id = app.create_job(&waved).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    assert_eq!(sizes(&job["rollout"]["waves"]), planned, "{job}");
    // The canary took only revision-A devices.
    let mut redis = app.redis.clone();
    let canary: Vec<String> =
        redis::AsyncCommands::zrange(&mut redis, app.names.job_wave(id, 0), 0, -1)
            .await
            .expect("canary");
    assert!(
        canary.iter().all(|d| targets
            .iter()
            .any(|t| &t.id == d && t.hardware_revision == "A")),
        "{canary:?}"
    );
    app.teardown().await;
}
