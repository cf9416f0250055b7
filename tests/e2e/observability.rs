//! Metrics, health, the progress stream, webhooks and traces, checked against real
//! processes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use serde_json::{Value, json};

use crate::helpers::{firmware_job, gauge, metric, spawn_app};

#[tokio::test]
async fn metrics_and_health_agree_with_the_job() {
    // Arrange: 10% permanent failures, two workers with known metrics ports.
    let mut app = spawn_app(
        0,
        &[("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.1")],
    )
    .await;
    let ports = [app.start_observed_worker(), app.start_observed_worker()];
    app.import_fleet(3_000).await;
    for port in ports {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while app
            .get_text(&format!("http://127.0.0.1:{port}/readyz"))
            .await
            .0
            != 200
        {
            assert!(tokio::time::Instant::now() < deadline, "worker never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            app.get_text(&format!("http://127.0.0.1:{port}/healthz"))
                .await
                .0,
            200
        );
    }
    assert_eq!(app.get_text(&app.url("/readyz")).await.0, 200);

    // Act
    let id = app.create_job(&firmware_job(json!({}))).await;
    let (_, during) = app.get_text(&app.url("/metrics")).await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    let (_, after) = app.get_text(&app.url("/metrics")).await;

    // Assert: queue gauges exist while running; counters equal the job's own counts.
    let tasks_queue = app.names.tasks_queue();
    assert!(
        during.contains(&format!(
            "fleetbatch_queue_messages{{queue=\"{tasks_queue}\"}}"
        )),
        "{during}"
    );
    let succeeded = job["succeeded"].as_f64().expect("succeeded");
    let failed = job["failed"].as_f64().expect("failed");
    assert!(failed > 0.0);
    assert_eq!(
        metric(&after, "fleetbatch_tasks_published_total", &[]),
        3_000.0
    );
    assert_eq!(
        metric(
            &after,
            "fleetbatch_results_recorded_total",
            &[("state", "succeeded")]
        ),
        succeeded
    );
    assert_eq!(
        metric(
            &after,
            "fleetbatch_results_recorded_total",
            &[("state", "failed")]
        ),
        failed
    );
    assert_eq!(
        metric(&after, "fleetbatch_jobs", &[("state", "COMPLETED")]),
        1.0
    );
    assert!(metric(&after, "fleetbatch_task_latency_seconds_count", &[]) >= succeeded + failed);
    let mut worker_ok = 0.0;
    let mut worker_failed = 0.0;
    for port in ports {
        let (_, text) = app
            .get_text(&format!("http://127.0.0.1:{port}/metrics"))
            .await;
        worker_ok += metric(
            &text,
            "fleetbatch_worker_tasks_total",
            &[("outcome", "SUCCEEDED")],
        );
        worker_failed += metric(
            &text,
            "fleetbatch_worker_tasks_total",
            &[("outcome", "FAILED")],
        );
        assert_eq!(gauge(&text, "fleetbatch_worker_tasks_in_flight", &[]), 0.0);
        assert_eq!(gauge(&text, "fleetbatch_worker_concurrency", &[]), 256.0);
        assert!(metric(&text, "fleetbatch_worker_delivery_seconds_count", &[]) > 0.0);
    }
    assert_eq!(worker_ok, succeeded);
    assert_eq!(worker_failed, failed);
    app.teardown().await;
}

#[tokio::test]
async fn the_event_stream_reports_progress_until_the_job_finishes() {
    // Arrange
    let app = spawn_app(2, &[("FLEETBATCH_SIMULATOR__LATENCY_MS", "5")]).await;
    app.import_fleet(2_000).await;
    let id = app.create_job(&firmware_job(json!({}))).await;

    // Act: read the SSE stream to its end.
    let resp = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .expect("events");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = tokio::time::timeout(Duration::from_secs(120), resp.text())
        .await
        .expect("the stream ends when the job finishes")
        .expect("body");

    // Assert
    let mut events: Vec<(String, Value)> = Vec::new();
    for block in body.split("\n\n") {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !name.is_empty() {
            events.push((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
        }
    }
    assert_eq!(events.first().map(|e| e.0.as_str()), Some("state"));
    assert!(events.iter().any(|(n, _)| n == "progress"));
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "finished");
    assert_eq!(data["state"], "COMPLETED");
    assert_eq!(data["terminal"], 2_000);
    app.teardown().await;
}

/// One POST the receiver got: headers, body, and the status it answered.
type Call = (HeaderMap, Vec<u8>, u16);

#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<Call>>>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut calls = r.calls.lock().expect("lock");
    // The very first POST fails, to prove the retry.
    let status = if calls.is_empty() { 500 } else { 200 };
    calls.push((headers, body.to_vec(), status));
    StatusCode::from_u16(status).expect("status")
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_report_state_changes_and_device_failures() {
    // Arrange: a receiver that fails its first request.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        axum::serve(
            listener,
            Router::new()
                .route("/hook", post(receive))
                .with_state(receiver.clone()),
        )
        .into_future(),
    );
    let secret = "s3cret-for-tests";
    let app = spawn_app(
        1,
        &[
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.1"),
            ("FLEETBATCH_COORDINATOR__WEBHOOK_SECRET", secret),
            ("FLEETBATCH_COORDINATOR__WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    )
    .await;
    app.import_fleet(500).await;

    // Act
    let id = app
        .create_job(&firmware_job(
            json!({"notify": {"webhooks": [{"url": url, "device_failures": true}]}}),
        ))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    let failed = job["failed"].as_u64().expect("failed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let calls = loop {
        let calls = receiver.calls.lock().expect("lock").clone();
        let completed = calls.iter().any(|(_, b, s)| {
            *s == 200 && serde_json::from_slice::<Value>(b).is_ok_and(|v| v["state"] == "COMPLETED")
        });
        let failures = calls
            .iter()
            .filter(|(_, b, s)| {
                *s == 200
                    && serde_json::from_slice::<Value>(b)
                        .is_ok_and(|v| v["event"] == "device.failed")
            })
            .count() as u64;
        let retried = {
            let mut by_delivery: HashMap<String, Vec<u16>> = HashMap::new();
            for (headers, _, status) in &calls {
                let id = headers["x-fleetbatch-delivery"]
                    .to_str()
                    .unwrap_or("")
                    .to_owned();
                by_delivery.entry(id).or_default().push(*status);
            }
            by_delivery.values().any(|s| s == &vec![500, 200])
        };
        if completed && failures >= failed && retried {
            break calls;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks missing: {} calls",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Assert: every POST is signed; the failed first delivery came again with the same id;
    // each failed device was reported once.
    let mut by_delivery: HashMap<String, Vec<u16>> = HashMap::new();
    let mut failed_devices = std::collections::HashSet::new();
    for (headers, body, status) in &calls {
        let sig = headers["x-fleetbatch-signature"].to_str().expect("ascii");
        assert_eq!(sig, coordinator::notify::sign(secret, body));
        let delivery = headers["x-fleetbatch-delivery"]
            .to_str()
            .expect("ascii")
            .to_owned();
        by_delivery.entry(delivery).or_default().push(*status);
        let v: Value = serde_json::from_slice(body).expect("json");
        assert_eq!(v["job_id"], id.to_string());
        assert_eq!(
            headers["x-fleetbatch-event"].to_str().expect("ascii"),
            v["event"].as_str().expect("event")
        );
        if v["event"] == "device.failed" && *status == 200 {
            assert_eq!(v["error"], worker::deliver::simulator::PERMANENT_ERROR);
            failed_devices.insert(v["device_id"].as_str().expect("device").to_owned());
        }
    }
    assert!(
        by_delivery.values().any(|s| s == &vec![500, 200]),
        "{by_delivery:?}"
    );
    assert_eq!(failed_devices.len() as u64, failed);
    // Each failed device was reported exactly once: no device.failed answered 200 twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = receiver.calls.lock().expect("lock").clone();
    let reported: Vec<String> = late
        .iter()
        .filter(|(_, _, status)| *status == 200)
        .filter_map(|(_, b, _)| serde_json::from_slice::<Value>(b).ok())
        .filter(|v| v["event"] == "device.failed")
        .filter_map(|v| v["device_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        reported.len() as u64,
        failed,
        "one device.failed per failed device"
    );
    server.abort();
    app.teardown().await;
}

#[tokio::test]
async fn a_job_naming_webhooks_is_refused_where_nothing_can_sign_them() {
    let app = spawn_app(0, &[]).await;
    app.import_fleet(5).await;
    let (status, body) = app
        .post_job(
            &firmware_job(json!({"notify": {"webhooks": [{"url": "http://127.0.0.1:9/x"}]}}))
                .to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["field"], "notify.webhooks");
    app.teardown().await;
}

#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests
            .lock()
            .expect("lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            V::IntValue(i) => Some(i.to_string()),
            V::BoolValue(b) => Some(b.to_string()),
            V::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    })
}

#[tokio::test]
async fn a_jobs_trace_spans_the_coordinator_and_both_workers() {
    // Arrange: an OTLP/gRPC collector inside the test.
    let collector = Collector::default();
    let port = harness::cluster::free_port().expect("port");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(format!("127.0.0.1:{port}").parse().expect("addr")),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut app = spawn_app(
        2,
        &[
            ("FLEETBATCH_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.2"),
            ("FLEETBATCH_WORKER__BACKOFF__INITIAL_MS", "5"),
        ],
    )
    .await;
    app.import_fleet(300).await;
    // Both workers consume before the job's 300 tasks go out (one consumer with room for
    // all of them would otherwise take them all).
    let conn = shared::amqp::connect(&app.settings.amqp, "e2e-consumers")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let q = ch
            .queue_declare(
                app.names.tasks_queue().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("tasks queue");
        if q.consumer_count() >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers not consuming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "done".into()).await;

    // Act: a job; then stop the processes so their exporters flush.
    let id = app.create_job(&firmware_job(json!({}))).await;
    app.wait_for_job(id, Duration::from_secs(60)).await;
    let problems = app.cluster.stop_all(Duration::from_secs(30)).await;
    assert!(problems.is_empty(), "{problems:?}");

    // Assert
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let requests = collector.requests.lock().expect("lock").clone();
        let mut instances: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        let mut job_traces = std::collections::HashSet::new();
        let mut task_spans = Vec::new();
        for req in &requests {
            for rs in &req.resource_spans {
                let res = rs
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                let service = attr(&res, "service.name").unwrap_or_default();
                let instance = attr(&res, "service.instance.id").unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        instances
                            .entry(service.clone())
                            .or_default()
                            .insert(instance.clone());
                        if (span.name == "POST /v1/jobs" || span.name == "plan job")
                            && attr(&span.attributes, "job_id").as_deref() == Some(&id.to_string())
                        {
                            job_traces.insert((span.name.clone(), span.trace_id.clone()));
                        }
                        if span.name == "process fleetbatch.tasks" {
                            task_spans.push((instance.clone(), span.clone()));
                        }
                    }
                }
            }
        }
        let job_trace_ids: std::collections::HashSet<_> =
            job_traces.iter().map(|(_, t)| t.clone()).collect();
        let worker_instances: std::collections::HashSet<_> =
            task_spans.iter().map(|(i, _)| i.clone()).collect();
        let ready = instances
            .get("fleetbatch-coordinator")
            .is_some_and(|i| !i.is_empty())
            && worker_instances.len() >= 2
            && job_traces.len() >= 2
            && task_spans.len() >= 300;
        if ready {
            // The API call and the planning share one trace: the job's.
            assert_eq!(job_trace_ids.len(), 1, "{job_traces:?}");
            let job_trace = job_trace_ids.into_iter().next().expect("trace");
            // Every task span links to the job's trace and carries the task's identity.
            for (_, span) in &task_spans {
                assert!(
                    span.links.iter().any(|l| l.trace_id == job_trace),
                    "task span not linked to the job"
                );
                assert_eq!(
                    attr(&span.attributes, "job_id").as_deref(),
                    Some(id.to_string().as_str())
                );
                assert!(attr(&span.attributes, "device_id").is_some_and(|d| d.starts_with("dev-")));
                assert!(attr(&span.attributes, "attempt").is_some());
                assert!(attr(&span.attributes, "outcome").is_some());
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans missing: services {instances:?}, job spans {job_traces:?}, {} task spans from {worker_instances:?}",
            task_spans.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.abort();
    app.teardown().await;
}
