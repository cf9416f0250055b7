//! The operator CLI against a real coordinator: every data command prints JSON with `--json`,
//! listings page with `--limit`/`--cursor`, CSV imports read quoted fields spanning lines.

use std::time::Duration;

use serde_json::Value;
use shared::state::ExecutionState;

use crate::helpers::{TestApp, spawn_app};

/// Runs `fleetbatch --api <app> args...`; returns stdout, failing the test on a non-zero exit.
async fn cli(app: &TestApp, args: &[&str]) -> String {
    let (code, out) = cli_exit(app, args).await;
    assert_eq!(code, Some(0), "fleetbatch {args:?} failed");
    out
}

/// Runs `fleetbatch --api <app> args...`; returns its exit code and stdout.
async fn cli_exit(app: &TestApp, args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(
        harness::cluster::bin_dir()
            .expect("bins")
            .join("fleetbatch"),
    )
    .args(["--api", &app.cluster.api])
    .env("FLEETBATCH_TOKEN", &app.cluster.admin_token)
    .args(args)
    .output()
    .await
    .expect("cli runs");
    if !out.status.success() {
        eprintln!(
            "fleetbatch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8"),
    )
}

/// Runs a command with `--json` and parses what it printed.
async fn cli_json(app: &TestApp, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = cli(app, &args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("fleetbatch {args:?}: {e}: {out}"))
}

#[tokio::test]
async fn every_data_command_prints_json_and_listings_page_with_a_cursor() {
    // Arrange: an empty registry first, then three devices from a CSV file whose quoted
    // fields hold a comma and a newline.
    let app = spawn_app(1, &[("FLEETBATCH_SIMULATOR__LATENCY_MS", "1")]).await;
    let groups = cli_json(&app, &["groups"]).await;
    assert_eq!(groups["groups"], serde_json::json!([]), "{groups}");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("fleet.csv");
    std::fs::write(
        &file,
        "id,groups,model,hardware_revision,firmware_version,tags\n\
         d-1,\"eu;canary\",\"gw, rev 2\",A,1.0,site=berlin\n\
         d-2,eu,\"gw\nmulti-line\",B,1.0,\n\
         bad id,eu,gw,A,1.0,\n\
         d-3,eu,gw,B,1.0,\"site=paris;rack=4\"\n",
    )
    .expect("write");

    // Act + Assert: the import reports the bad record by its own line (5: the record before
    // it spans lines 3 and 4).
    let (code, out) = cli_exit(&app, &["devices", "import", file.to_str().expect("path")]).await;
    assert_eq!(
        code,
        Some(2),
        "refused records make the import exit 2: {out}"
    );
    assert!(out.contains("imported 3 devices, 1 lines refused"), "{out}");
    assert!(out.contains("line 5:"), "{out}");

    let all = cli_json(&app, &["devices", "list"]).await;
    let ids: Vec<&str> = all["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["d-1", "d-2", "d-3"]);
    assert_eq!(all["devices"][0]["model"], "gw, rev 2");
    assert_eq!(all["devices"][1]["model"], "gw\nmulti-line");
    assert_eq!(all["next_cursor"], Value::Null);

    let page = cli_json(&app, &["devices", "list", "--limit", "2"]).await;
    assert_eq!(page["devices"].as_array().map(Vec::len), Some(2));
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = cli_json(
        &app,
        &["devices", "list", "--limit", "2", "--cursor", &cursor],
    )
    .await;
    assert_eq!(rest["devices"][0]["id"], "d-3");
    assert_eq!(rest["next_cursor"], Value::Null);

    let tagged = cli_json(&app, &["devices", "list", "--tag", "site=paris"]).await;
    assert_eq!(tagged["devices"].as_array().map(Vec::len), Some(1));
    let count = cli_json(&app, &["devices", "count", "--tag", "site=paris"]).await;
    assert_eq!(count["count"], 1, "tags filter counts as they filter lists");
    let count = cli_json(&app, &["devices", "count", "--group", "eu"]).await;
    assert_eq!(count["count"], 3);
    let groups = cli_json(&app, &["groups"]).await;
    assert_eq!(
        groups["groups"],
        serde_json::json!([{"group": "canary", "devices": 1}, {"group": "eu", "devices": 3}])
    );

    // A job through the CLI, followed and inspected with --json.
    let created = cli_json(
        &app,
        &["job", "create", "--group", "eu", "--action", "reboot"],
    )
    .await;
    let id = created["job_id"].as_str().expect("job id").to_owned();
    app.wait_for_job(id.parse().expect("uuid"), Duration::from_secs(60))
        .await;
    let job = cli_json(&app, &["job", "get", &id]).await;
    assert_eq!(job["state"], "COMPLETED");
    assert_eq!(job["targeted"], 3);
    let list = cli_json(&app, &["job", "list"]).await;
    assert_eq!(list["jobs"][0]["job_id"], id.as_str());
    let first = cli_json(&app, &["job", "list", "--limit", "1"]).await;
    assert_eq!(first["next_cursor"], id.as_str());
    let after = cli_json(&app, &["job", "list", "--limit", "1", "--cursor", &id]).await;
    assert_eq!(after["jobs"], serde_json::json!([]));
    assert_eq!(after["next_cursor"], Value::Null);
    let devices = cli_json(&app, &["job", "devices", &id, "--limit", "2"]).await;
    assert_eq!(devices["devices"].as_array().map(Vec::len), Some(2));
    let all_devices = cli_json(&app, &["job", "devices", &id, "--limit", "2", "--all"]).await;
    let states: Vec<&str> = all_devices["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["state"].as_str())
        .collect();
    assert_eq!(states.len(), 3, "{all_devices}");
    assert!(
        states
            .iter()
            .all(|s| ExecutionState::parse(s).is_some_and(ExecutionState::is_terminal)),
        "{states:?}"
    );
    let report = cli_json(&app, &["job", "report", &id]).await;
    assert_eq!(report["job"]["job_id"], id.as_str());
    let dlq = cli_json(&app, &["dlq", "list"]).await;
    assert_eq!(dlq["messages"], serde_json::json!([]));

    // Without --json the same commands print tables.
    let table = cli(&app, &["devices", "list"]).await;
    assert!(
        table.lines().next().is_some_and(|h| h.contains("DEVICE")),
        "{table}"
    );
    let completions = cli(&app, &["completions", "bash"]).await;
    assert!(
        completions.contains("fleetbatch"),
        "completion script printed"
    );
    cli(&app, &["health"]).await;
    app.teardown().await;
}
