//! Safe create: a create retried with its idempotency key (a client that timed out, a CI
//! pipeline run twice) returns the first job instead of starting a second rollout, even when
//! the retries race; a key reused for another spec is refused naming the first job; keys of
//! different callers never collide.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, firmware_job, fleet_ids, spawn_app};

async fn create(
    app: &TestApp,
    client: &reqwest::Client,
    spec: &str,
    key: &str,
) -> (StatusCode, Option<String>, Value) {
    let r = client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(spec.to_owned())
        .send()
        .await
        .expect("create");
    let status = r.status();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, replayed, r.json().await.unwrap_or(Value::Null))
}

async fn job_count(app: &TestApp) -> usize {
    let list: Value = app
        .http
        .get(app.url("/v1/jobs?limit=100"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    list["jobs"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_returns_the_first_job_and_starts_one_rollout() {
    // Arrange
    let app = spawn_app(1, &[]).await;
    let n = 500;
    app.import_fleet(n).await;
    let spec = firmware_job(json!({})).to_string();

    // Act: eight creates with one key at once, as a client retrying through timeouts would.
    let key = "rollout-2.0.0-eu";
    let answers =
        futures::future::join_all((0..8).map(|_| create(&app, &app.http, &spec, key))).await;

    // Assert: one job made (201), seven answered with it (200, marked replayed).
    let created: Vec<_> = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    let id = created[0].2["job_id"].as_str().expect("job id").to_owned();
    for (status, replayed, body) in &answers {
        assert_eq!(body["job_id"], id.as_str(), "{body}");
        if *status == StatusCode::OK {
            assert_eq!(replayed.as_deref(), Some("true"));
            assert_eq!(body["idempotent_replay"], true);
        }
    }
    // A retry later gets the same job; one job exists.
    let (status, _, body) = create(&app, &app.http, &spec, key).await;
    assert_eq!(
        (status, body["job_id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    assert_eq!(job_count(&app).await, 1);

    // The same key for another spec is refused, naming the key and the first job.
    let other = firmware_job(json!({"name": "another rollout"})).to_string();
    let (status, _, body) = create(&app, &app.http, &other, key).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "idempotency-key", "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains(&id), "{body}");
    // A key no header can be refused by name.
    let (status, _, body) = create(&app, &app.http, &spec, &"k".repeat(300)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "idempotency-key", "{body}");

    // Another caller's key of the same name is its own: a new job.
    let other_caller = app
        .client_as(json!({"name": "pipeline-b", "role": "operator"}))
        .await;
    let (status, _, body) = create(&app, &other_caller, &spec, key).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let second = body["job_id"].as_str().expect("job id").to_owned();
    assert_ne!(second, id);

    // The CLI: the same command run twice with --idempotency-key makes one job.
    let cli = |key: &'static str| {
        let app = &app;
        async move {
            let out = app
                .fleetbatch(&[
                    "job",
                    "create",
                    "--group",
                    "fleet",
                    "--action",
                    "reboot",
                    "--idempotency-key",
                    key,
                    "--json",
                ])
                .await;
            let v: Value = serde_json::from_str(&out).expect("json");
            v["job_id"].as_str().expect("job id").to_owned()
        }
    };
    let (a, b) = (cli("reboot-once").await, cli("reboot-once").await);
    assert_eq!(a, b);
    assert_eq!(job_count(&app).await, 3);

    // Every job runs once per device: nothing applied twice.
    for job in [&id, &second, &a] {
        let job = job.parse().expect("uuid");
        let done = app.wait_for_job(job, Duration::from_secs(120)).await;
        assert_eq!(done["state"], "COMPLETED", "{done}");
        app.assert_exact(job, &fleet_ids(n)).await;
    }
    app.teardown().await;
}
