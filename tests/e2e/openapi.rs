//! The API against its OpenAPI 3.1 description (`/openapi.json`): schemathesis (from PyPI,
//! in target/py) sends bounded examples generated from the description to every route of a
//! real coordinator with an admin token. Not one answer may be a server error or differ
//! from the schema the description gives for it.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{firmware_job, spawn_app};

/// Examples per operation (`FLEETBATCH_TEST_SCHEMA_EXAMPLES` to change).
fn examples() -> String {
    std::env::var("FLEETBATCH_TEST_SCHEMA_EXAMPLES").unwrap_or_else(|_| "30".to_owned())
}

#[tokio::test]
async fn every_answer_of_the_api_is_what_its_openapi_description_says() {
    let app = spawn_app(1, &[]).await;
    app.import_fleet(20).await;
    // A finished job and a token: the listings have entries to describe.
    let id = app.create_job(&firmware_job(json!({}))).await;
    app.wait_for_job(id, Duration::from_secs(60)).await;
    app.token_secret(json!({"name": "schema-viewer", "role": "viewer"}))
        .await;

    // The description is public and says it is OpenAPI 3.1.
    let doc: serde_json::Value = reqwest::get(app.url("/openapi.json"))
        .await
        .expect("description")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    let (status, page) = app.get_text(&app.url("/docs")).await;
    assert_eq!(status, 200);
    assert!(page.contains("/v1/jobs/{id}/approve"), "{page}");

    let py = crate::devices::python();
    let schemathesis = py.with_file_name("schemathesis");
    let report = tempfile::tempdir().expect("report dir");
    let out = tokio::process::Command::new(&schemathesis)
        .args([
            "run",
            &app.url("/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {}", app.cluster.admin_token),
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            &examples(),
            "--seed",
            "7",
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
            "--report-dir",
        ])
        .arg(report.path())
        // Its case cache stays with the report, out of the repository.
        .current_dir(report.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), out)
        .await
        .expect("schemathesis within 10 minutes")
        .expect("schemathesis runs");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{}",
        text.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "schemathesis found answers that break the description:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.teardown().await;
}
