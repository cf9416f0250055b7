use serde_json::json;

use crate::helpers::{firmware_job, spawn_app};

#[tokio::test]
async fn invalid_job_files_are_refused_naming_the_field() {
    // Arrange
    let app = spawn_app(0, &[]).await;
    app.import_fleet(10).await;

    // Act + Assert: a TOML file with a bad checksum.
    let toml = r#"
[target]
groups = ["fleet"]
[action]
type = "firmware_update"
url = "https://fw.example.com/2.0.bin"
version = "2.0.0"
sha256 = "not-a-checksum"
"#;
    let (status, body) = app.post_job(toml, "application/toml").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "action.sha256", "{body}");

    // A JSON field of the wrong type.
    let (status, body) = app
        .post_job(
            r#"{"target":{"devices":["dev-0000001"]},"action":{"type":"reboot","delay_secs":"soon"}}"#,
            "application/json",
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["field"], "action.delay_secs", "{body}");

    // Unknown devices and groups.
    let (status, body) = app
        .post_job(
            &firmware_job(json!({"target": {"devices": ["dev-0000001", "ghost-1"]}})).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["field"], "target.devices");
    assert!(
        body["error"].as_str().unwrap_or("").contains("ghost-1"),
        "{body}"
    );
    let (status, body) = app
        .post_job(
            &firmware_job(json!({"target": {"groups": ["nope"]}})).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["field"], "target.groups[0]");

    // Not JSON at all.
    let (status, body) = app.post_job("{not json", "application/json").await;
    assert_eq!(status, 422);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{body}"
    );

    // The CLI shows the same error and fails.
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, toml).expect("write");
    let out = tokio::process::Command::new(
        harness::cluster::bin_dir()
            .expect("bins")
            .join("fleetbatch"),
    )
    .args(["--api", &app.cluster.api, "job", "create"])
    .env("FLEETBATCH_TOKEN", &app.cluster.admin_token)
    .arg(&file)
    .output()
    .await
    .expect("cli runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("action.sha256"), "{stderr}");
    app.teardown().await;
}

#[tokio::test]
async fn invalid_device_lines_are_reported_by_number_and_valid_ones_imported() {
    // Arrange
    let app = spawn_app(0, &[]).await;
    let csv = "id,groups,model,hardware_revision,firmware_version,tags\n\
               d-1,eu;canary,gw,A,1.0,site=x\n\
               bad id,eu,gw,A,1.0,\n\
               d-3,eu,gw,B,1.0,notatag\n\
               d-4,eu,gw,B,1.0,\n";

    // Act
    let r = app
        .http
        .post(app.url("/v1/devices/import?format=csv"))
        .body(csv)
        .send()
        .await
        .expect("import");
    let report: serde_json::Value = r.json().await.expect("json");

    // Assert
    assert_eq!(report["imported"], 2, "{report}");
    assert_eq!(report["failed"], 2);
    let lines: Vec<u64> = report["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    assert_eq!(lines, vec![3, 4]);
    let count: serde_json::Value = app
        .http
        .get(app.url("/v1/devices/count?group=eu"))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(count["count"], 2);
    let count: serde_json::Value = app
        .http
        .get(app.url("/v1/devices/count?hardware_revision=B"))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(count["count"], 1);
    // An empty file imports nothing and is no error; a header without an id column is.
    for (body, status) in [("", 200), ("model,groups\ngw,eu\n", 400)] {
        let r = app
            .http
            .post(app.url("/v1/devices/import?format=csv"))
            .body(body)
            .send()
            .await
            .expect("import");
        assert_eq!(r.status().as_u16(), status, "{body:?}");
    }
    app.teardown().await;
}

#[tokio::test]
async fn a_missing_job_is_404_on_every_route_and_a_bad_cursor_is_an_error_naming_it() {
    // Arrange
    let app = spawn_app(0, &[]).await;
    app.import_fleet(10).await;
    let missing = uuid::Uuid::now_v7();

    // Act and assert: every route under /v1/jobs/{id}.
    for (method, path) in [
        ("GET", format!("/v1/jobs/{missing}")),
        ("GET", format!("/v1/jobs/{missing}/devices")),
        ("GET", format!("/v1/jobs/{missing}/report")),
        ("GET", format!("/v1/jobs/{missing}/results")),
        ("GET", format!("/v1/jobs/{missing}/events")),
        ("POST", format!("/v1/jobs/{missing}/cancel")),
    ] {
        let req = match method {
            "GET" => app.http.get(app.url(&path)),
            _ => app.http.post(app.url(&path)),
        };
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), 404, "{method} {path}");
    }
    // A cursor that no listing could have returned is refused, not read as "from the start".
    let id = app
        .create_job(&crate::helpers::firmware_job(json!({})))
        .await;
    for path in [
        format!("/v1/jobs/{id}/devices?cursor=not-a-cursor"),
        "/v1/devices?cursor=a/b".to_owned(),
        "/v1/jobs?cursor=nope".to_owned(),
        "/v1/audit?cursor=nope".to_owned(),
    ] {
        let r = app.http.get(app.url(&path)).send().await.expect("request");
        assert_eq!(r.status(), 400, "{path}");
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(body["field"], "cursor", "{path}: {body}");
    }
    app.teardown().await;
}

#[tokio::test]
async fn an_import_without_newlines_is_refused_at_the_line_limit_without_echoing_it() {
    // Arrange
    let app = spawn_app(0, &[]).await;
    let body = vec![b'x'; 2 * 1024 * 1024];

    // Act
    let r = app
        .http
        .post(app.url("/v1/devices/import?format=ndjson"))
        .body(body)
        .send()
        .await
        .expect("import");

    // Assert: 400 naming the limit, and a short answer (the input is not echoed back).
    assert_eq!(r.status(), 400);
    let text = r.text().await.expect("body");
    assert!(text.len() < 1024, "{} bytes answered", text.len());
    assert!(text.contains("longer than 65536 bytes"), "{text}");
    app.teardown().await;
}
