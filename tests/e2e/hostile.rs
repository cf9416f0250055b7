//! No input can stall or crash a component: while a 10,000-device job runs, 1,200 generated
//! hostile inputs reach the real processes (mutated and random HTTP bodies on every
//! state-changing route, bad paths and queries on the read routes, random and mutated
//! MessagePack on the tasks and results exchanges). None gets a 5xx; every refused HTTP
//! input says why; every queue input is dead-lettered with a reason; no process panics or
//! dies; and the job finishes exact, with nothing applied twice. Over MQTT, mutated and
//! oversized replies on the workers' reply topics, and hostile AWS IoT Jobs requests (the
//! AWS test sends them, since it owns the `$aws` topics), leave jobs exact with no extra
//! deliveries.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shared::config::MqttSettings;
use shared::messages::{DeviceTask, TaskResult, WIRE_VERSION};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    devices::{firmware_over_fleet_sim, mqtt_env, start_sim},
    helpers::{TestApp, firmware_job, fleet_ids, spawn_app},
};

const DEVICES: u64 = 10_000;

/// A small deterministic generator (xorshift64*): the same inputs on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `base` mutated: truncated, bytes flipped, a slice repeated, an extreme token spliced
    /// in, or replaced by random bytes.
    fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
        const TOKENS: [&str; 12] = [
            "18446744073709551615",
            "-1",
            "1e309",
            "null",
            "\"\\u0000\"",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            "\"$SYS/#\"",
            "\"a:b:{x}\"",
            "true",
            "{}",
            "\"\u{202e}\u{fffd}\"",
            "9999999999999999999999999999",
        ];
        let mut out = base.to_vec();
        match self.below(6) {
            0 if !out.is_empty() => out.truncate(self.below(out.len())),
            1 => {
                for _ in 0..=self.below(4) {
                    if !out.is_empty() {
                        let i = self.below(out.len());
                        out[i] = self.next() as u8;
                    }
                }
            }
            2 if !out.is_empty() => {
                let i = self.below(out.len());
                let j = (i + self.below(64)).min(out.len());
                let slice = out[i..j].to_vec();
                for _ in 0..self.below(50) {
                    out.splice(i..i, slice.iter().copied());
                }
            }
            3 if !out.is_empty() => {
                let i = self.below(out.len());
                let t = TOKENS[self.below(TOKENS.len())];
                out.splice(i..i, t.bytes());
            }
            4 => {
                let n = self.below(300);
                out = self.bytes(n);
            }
            _ => out = TOKENS[self.below(TOKENS.len())].as_bytes().to_vec(),
        }
        out
    }
}

/// What one HTTP input got.
struct Answer {
    what: String,
    status: u16,
    body: String,
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    ct: &str,
    body: Vec<u8>,
) -> Answer {
    let r = app
        .http
        .request(method.clone(), app.url(path))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = r.status().as_u16();
    Answer {
        what: format!("{method} {path} ({ct})"),
        status,
        body: r.text().await.unwrap_or_default(),
    }
}

#[tokio::test]
async fn a_thousand_hostile_inputs_crash_nothing_and_the_job_running_beside_them_ends_exact() {
    // Arrange: a 10,000-device job, running while the inputs arrive.
    let app = spawn_app(2, &[]).await;
    app.import_fleet(DEVICES).await;
    let id = app
        .create_job(&firmware_job(json!({"rollout": {"max_per_second": 2500}})))
        .await;
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);

    // Bases to mutate: specs that target a group that does not exist (so a mutation that
    // stays valid still moves no device), devices of their own group, tokens.
    let spec = firmware_job(json!({"target": {"groups": ["nope"]}, "retry": {"max_attempts": 3, "attempt_timeout_secs": 30}}))
        .to_string();
    let toml = "name = \"h\"\n[target]\ngroups = [\"nope\"]\n[action]\ntype = \"reboot\"\n[retry]\nmax_attempts = 2\n";
    let ndjson =
        "{\"id\":\"hx-1\",\"groups\":[\"hostile\"],\"model\":\"m\",\"tags\":{\"k\":\"v\"}}\n";
    let csv = "id,groups,model\nhx-2,hostile,m\n";
    let token = json!({"name": "h", "role": "viewer", "expires_in_secs": 60}).to_string();

    // Act 1: HTTP.
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let mut answers = Vec::new();
    for i in 0..800 {
        let answer = match i % 8 {
            0 | 1 => {
                let body = g.mutate(spec.as_bytes());
                send(&app, post.clone(), "/v1/jobs", "application/json", body).await
            }
            2 => {
                let body = g.mutate(toml.as_bytes());
                send(&app, post.clone(), "/v1/jobs", "application/toml", body).await
            }
            3 => {
                let body = g.mutate(ndjson.as_bytes());
                let path = "/v1/devices/import?format=ndjson";
                send(&app, post.clone(), path, "application/x-ndjson", body).await
            }
            4 => {
                let body = g.mutate(csv.as_bytes());
                send(
                    &app,
                    post.clone(),
                    "/v1/devices/import?format=csv",
                    "text/csv",
                    body,
                )
                .await
            }
            5 => {
                let body = g.mutate(token.as_bytes());
                send(&app, post.clone(), "/v1/tokens", "application/json", body).await
            }
            6 => {
                // Never valid JSON: a valid replay would put these inputs' dead letters back.
                let mut body = b"x".to_vec();
                body.extend(g.mutate(b"{\"only_decodable\":true}"));
                send(
                    &app,
                    post.clone(),
                    "/v1/dlq/replay",
                    "application/json",
                    body,
                )
                .await
            }
            _ => {
                // Read routes with hostile ids, cursors, limits and filters.
                let junk =
                    String::from_utf8_lossy(&g.mutate(b"01234567-89ab-cdef-0123-456789abcdef"))
                        .chars()
                        .filter(|c| !c.is_control() && !"#?/%".contains(*c))
                        .collect::<String>();
                let junk = url_escape(&junk);
                let paths = [
                    format!("/v1/jobs/{junk}"),
                    format!("/v1/jobs/{junk}/devices?limit=-1"),
                    format!("/v1/jobs/{id}/devices?cursor={junk}&status={junk}"),
                    format!("/v1/jobs/{id}/report?limit={junk}"),
                    format!("/v1/jobs/{junk}/cancel"),
                    format!("/v1/devices?cursor={junk}&limit=99999999999"),
                    format!("/v1/devices/count?group={junk}"),
                    format!("/v1/jobs?cursor={junk}&limit=0"),
                    format!("/v1/audit?cursor={junk}&limit=5000"),
                    format!("/v1/dlq?limit={junk}"),
                    format!("/v1/jobs/{junk}/events"),
                    format!("/v1/jobs/{junk}/results?format={junk}"),
                    format!("/v1/tokens/{junk}"),
                ];
                let path = &paths[g.below(paths.len())];
                let method = if path.ends_with("/cancel") {
                    post.clone()
                } else if path.starts_with("/v1/tokens/") {
                    reqwest::Method::DELETE
                } else {
                    get.clone()
                };
                send(&app, method, path, "application/json", Vec::new()).await
            }
        };
        answers.push(answer);
    }

    // Act 2: the queues. Random bytes, and mutated MessagePack of tasks and results of the
    // running job (for devices it does not target, with forged ids), 200 to each exchange.
    let task = DeviceTask {
        version: WIRE_VERSION,
        job_id: id,
        execution_id: Uuid::new_v4(),
        device_id: "hx-1".into(),
        attempts: 0,
        parked: 0,
        published_at_ms: shared::now_ms(),
    };
    let result = TaskResult {
        version: WIRE_VERSION,
        job_id: id,
        execution_id: Uuid::new_v4(),
        device_id: "hx-1".into(),
        state: shared::state::ExecutionState::Succeeded,
        attempts: 1,
        error: Some("e".into()),
        worker: "hostile".into(),
        published_at_ms: 0,
        finished_at_ms: shared::now_ms(),
        readings: None,
    };
    let task_bytes = shared::messages::encode(&task).expect("task");
    let result_bytes = shared::messages::encode(&result).expect("result");
    let messages: Vec<(String, &str, Vec<u8>)> = (0..400)
        .map(|i| {
            if i % 2 == 0 {
                let key = shared::topology::TASK_ROUTING_KEY;
                (app.names.tasks_exchange(), key, g.mutate(&task_bytes))
            } else {
                let key = shared::topology::RESULT_ROUTING_KEY;
                (app.names.results_exchange(), key, g.mutate(&result_bytes))
            }
        })
        .collect();
    let published = messages.len() as u64;
    app.publish_raw_all(messages).await;

    // Assert: no 5xx, and every refusal says what is wrong.
    let total = answers.len() as u64 + published;
    assert!(total >= 1_000, "{total} inputs");
    let server_errors: Vec<String> = answers
        .iter()
        .filter(|a| a.status >= 500)
        .map(|a| format!("{} -> {} {}", a.what, a.status, a.body))
        .collect();
    assert!(
        server_errors.is_empty(),
        "{} 5xx:\n{}",
        server_errors.len(),
        server_errors.join("\n")
    );
    for a in answers
        .iter()
        .filter(|a| (400..500).contains(&a.status) && a.status != 404 && a.status != 405)
    {
        let v: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{} -> {} without a reason: {}",
            a.what,
            a.status,
            a.body
        );
    }
    let refused = answers.iter().filter(|a| a.status >= 400).count();
    assert!(
        refused > 600,
        "{refused} of {} HTTP inputs refused",
        answers.len()
    );

    // The job beside them ended exact, nothing applied twice.
    let job = app.wait_for_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    app.assert_exact(id, &fleet_ids(DEVICES)).await;

    // Every queue input was dead-lettered, each with a reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut dead = Vec::new();
    while (dead.len() as u64) < published && tokio::time::Instant::now() < deadline {
        dead.extend(app.drain_dead_letters().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        dead.len() as u64,
        published,
        "every queue input dead-lettered"
    );
    for m in &dead {
        let reason = shared::amqp::header_str(
            m.properties.headers().as_ref(),
            shared::topology::HEADER_DEAD_REASON,
        )
        .expect("a reason header");
        assert!(!reason.is_empty());
    }
    app.teardown().await;
}

#[tokio::test]
async fn mutated_and_oversized_mqtt_replies_change_nothing_and_deliver_nothing_twice() {
    // Arrange: workers and fleet-sim over MQTT 3.1.1 with the fleetbatch protocol.
    let prefix = format!("fbt{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut app = spawn_app(2, &mqtt_env("3.1.1", &prefix)).await;
    let n = 3_000;
    let sim = start_sim(&mut app, None, n, "fleetbatch").await;

    // Act: another client learns the workers' reply topics and a real reply from the
    // devices' own replies, then sends mutations of it, and oversized ones, while the job
    // runs.
    let stop = CancellationToken::new();
    let settings = app.settings.worker.mqtt.clone();
    let hostile = async {
        // Its own limit is above the workers', so it can send what they must refuse.
        let mut own = settings.clone();
        own.max_payload_bytes *= 4;
        let (link, mut seen) = devices::mqtt::connect(
            &own,
            "hostile-replies",
            vec![format!("{prefix}/workers/+/replies")],
            stop.clone(),
        )
        .expect("connects");
        let mut g = Gen(0xD1B5_4A32_D192_ED03);
        let mut topics = HashSet::new();
        let mut base = Vec::new();
        let mut sent = 0u64;
        while !stop.is_cancelled() && sent < 600 {
            while let Ok(m) = seen.try_recv() {
                topics.insert(m.topic);
                base = m.payload.to_vec();
            }
            for topic in &topics {
                let payload = if sent % 50 == 49 {
                    vec![b'{'; settings.max_payload_bytes + 1]
                } else {
                    g.mutate(&base)
                };
                if link.publish(topic, payload, None).await.is_ok() {
                    sent += 1;
                }
            }
            let pause = if topics.is_empty() { 20 } else { 2 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        sent
    };
    let run = async {
        firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;
        stop.cancel();
    };
    let (sent, ()) = tokio::join!(hostile, run);

    // Assert (above: every device in its expected state, counts exact, no duplicate
    // application, no extra delivery), and the inputs did arrive.
    eprintln!("hostile replies sent: {sent}");
    assert!(sent >= 300, "{sent} hostile replies sent");
    app.teardown().await;
}

/// Sends hostile AWS IoT Jobs requests until `stop` (at least `min` of them): requests for
/// things no deployment knows, malformed and injected thing names and job ids, mutated and
/// random bodies, on every request topic the workers subscribe to. Returns how many.
pub async fn aws_requests(settings: &MqttSettings, min: u64, stop: CancellationToken) -> u64 {
    let (link, _replies) =
        devices::mqtt::connect(settings, "hostile-aws", vec![], stop.clone()).expect("connects");
    let mut g = Gen(0x5851_F42D_4C95_7F2D);
    let things = [
        "hx-1",
        "ee:ff",
        "aa:bb:cc:dd:ee:ff",
        "$SYS",
        "x..y",
        "%u",
        "{x}",
        "-",
    ];
    let jobs = [
        "$next".to_owned(),
        "ee:ff".to_owned(),
        Uuid::new_v4().to_string(),
        "../../x".to_owned(),
        String::new(),
    ];
    let base = br#"{"clientToken":"t","status":"SUCCEEDED","expectedVersion":1,"statusDetails":{"k":"v"},"stepTimeoutInMinutes":5}"#;
    let mut sent = 0u64;
    while sent < min || !stop.is_cancelled() {
        let thing = things[g.below(things.len())];
        let job = &jobs[g.below(jobs.len())];
        let topic = match g.below(4) {
            0 => format!("$aws/things/{thing}/jobs/get"),
            1 => format!("$aws/things/{thing}/jobs/start-next"),
            2 => format!("$aws/things/{thing}/jobs/{job}/get"),
            _ => format!("$aws/things/{thing}/jobs/{job}/update"),
        };
        if link.publish(&topic, g.mutate(base), None).await.is_ok() {
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sent
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
