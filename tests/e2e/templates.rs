//! Job templates on real processes: a template stored with the CLI from TOML, a job made
//! from it with `--param` equal to the hand-written spec (and both run to the end), missing,
//! unknown and undeclared parameters refused by name.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{fleet_ids, spawn_app};

const TEMPLATE: &str = r#"
name = "fw-update"
description = "Firmware update of a group"

[[parameters]]
name = "version"
description = "Firmware version, e.g. 2.1.0"

[[parameters]]
name = "group"
default = "fleet"

[spec]
name = "firmware {{ version }}"
target = { groups = ["{{group}}"] }
retry = { max_attempts = 3 }

[spec.action]
type = "firmware_update"
url = "https://fw.example.com/{{version}}.bin"
version = "{{version}}"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;

#[tokio::test]
async fn a_job_from_a_template_equals_the_hand_written_spec_and_bad_parameters_are_named() {
    let app = spawn_app(1, &[]).await;
    let n = 200;
    app.import_fleet(n).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("fw-update.toml");
    std::fs::write(&file, TEMPLATE).expect("write");
    let out = app
        .fleetbatch(&["template", "create", "--file", file.to_str().expect("path")])
        .await;
    assert!(out.contains("fw-update (version, group=fleet)"), "{out}");
    let listed = app.fleetbatch(&["template", "list"]).await;
    assert!(listed.contains("fw-update"), "{listed}");

    let created: Value = serde_json::from_str(
        &app.fleetbatch(&[
            "job",
            "create",
            "--template",
            "fw-update",
            "--param",
            "version=2.1.0",
            "--json",
        ])
        .await,
    )
    .expect("json");
    let from_template: uuid::Uuid = created["job_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let by_hand = app
        .create_job(&json!({
            "name": "firmware 2.1.0",
            "target": {"groups": ["fleet"]},
            "retry": {"max_attempts": 3},
            "action": {"type": "firmware_update", "url": "https://fw.example.com/2.1.0.bin",
                       "version": "2.1.0",
                       "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
        }))
        .await;
    let a = app
        .wait_for_job(from_template, Duration::from_secs(120))
        .await;
    let b = app.wait_for_job(by_hand, Duration::from_secs(120)).await;
    assert_eq!(
        a["spec"], b["spec"],
        "the template's job is the hand-written one"
    );
    assert_eq!(a["state"], "COMPLETED", "{a}");
    app.assert_exact(from_template, &fleet_ids(n)).await;

    // Missing and unknown parameters, named.
    let post = |body: Value| {
        let app = &app;
        async move {
            let r = app
                .http
                .post(app.url("/v1/templates/fw-update/jobs"))
                .json(&body)
                .send()
                .await
                .expect("post");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let (status, body) = post(json!({"parameters": {"group": "fleet"}})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "parameters.version", "{body}");
    let (status, body) = post(json!({"parameters": {"version": "2", "verison": "2"}})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "parameters.verison", "{body}");
    // A value that makes the spec wrong is refused as the hand-written spec would be.
    let (status, body) = post(json!({"parameters": {"version": "2", "group": "no group"}})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["field"]
            .as_str()
            .is_some_and(|f| f.starts_with("target.groups")),
        "{body}"
    );
    // A template using a parameter it does not declare is not stored.
    let bad = TEMPLATE
        .replace("\"fw-update\"", "\"fw-bad\"")
        .replace("version = \"{{version}}\"", "version = \"{{release}}\"");
    let r = app
        .http
        .post(app.url("/v1/templates"))
        .header("content-type", "application/toml")
        .body(bad)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["field"], "spec.action.version", "{body}");
    app.teardown().await;
}
