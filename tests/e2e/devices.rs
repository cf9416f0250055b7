//! Devices over the network: `fleet-sim` over MQTT (fleetbatch protocol, 3.1.1 and 5; AWS IoT
//! Jobs API) and HTTP, an agent written against the AWS IoT Device SDK v2 for Python, and a
//! data-retrieval job's readings. Real Mosquitto, RabbitMQ and Redis; real processes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use devices::simdevice::DeviceProfile;
use serde_json::{Value, json};
use shared::{config::SimulatorSettings, state::ExecutionState};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::helpers::{TestApp, firmware_job, fleet_ids, spawn_app};

/// Simulated fleet behaviour shared by these tests: latency, transient glitches, permanent
/// failures, rejections and offline devices.
pub(crate) const FLEET: &[(&str, &str)] = &[
    ("FLEETBATCH_SIMULATOR__LATENCY_MS", "3"),
    ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "2"),
    ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0.03"),
    ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.01"),
    ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0.01"),
    ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0.01"),
    ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS", "1"),
    ("FLEETBATCH_WORKER__BACKOFF__INITIAL_MS", "20"),
];

/// The state each device must end in, from its simulated profile.
fn expected_state(settings: &SimulatorSettings, device: &str) -> ExecutionState {
    let p = DeviceProfile::for_device(settings, device);
    if p.rejects {
        ExecutionState::Rejected
    } else if p.fails_permanently {
        ExecutionState::Failed
    } else {
        ExecutionState::Succeeded
    }
}

pub(crate) async fn get_json(app: &TestApp, url: &str) -> Value {
    app.http
        .get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

/// Deliveries fleet-sim's devices received for job `id` beyond the attempts recorded for
/// them.
pub(crate) async fn extra_deliveries(
    app: &TestApp,
    sim: &str,
    id: Uuid,
    statuses: &std::collections::HashMap<String, shared::state::DeviceStatus>,
) -> u64 {
    let received: Value = get_json(app, &format!("{sim}/deliveries/{id}")).await;
    statuses
        .iter()
        .map(|(d, s)| {
            received[d.as_str()]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(u64::from(s.attempts))
        })
        .sum()
}

/// Runs a firmware job on `n` fleet-sim devices and checks every device's state against its
/// profile, the counters, and the devices' own record of deliveries and applications: no
/// device is contacted more often than the attempts recorded for it, beyond `max_extra`
/// deliveries in all (0 unless the test breaks something).
/// `max_extra`: the deliveries allowed beyond the attempts recorded; `None` for AWS IoT Jobs
/// devices, whose ignored notifications and dropped jobs the simulator counts as deliveries
/// while fleetbatch counts only the jobs a device took and finished (then at most the
/// simulator's silent and transient answers).
pub(crate) async fn firmware_over_fleet_sim(
    app: &TestApp,
    sim: &str,
    n: u64,
    max_extra: Option<u64>,
) {
    let id = app.create_job(&firmware_job(json!({}))).await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let mut wrong = Vec::new();
    for (device, s) in &statuses {
        let want = expected_state(&app.settings.simulator, device);
        if s.state != want {
            wrong.push(format!(
                "{device}: {:?} (want {want:?}, {:?})",
                s.state, s.error
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} devices in the wrong state: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let succeeded = job["succeeded"].as_u64().expect("succeeded");
    assert!(
        job["failed"].as_u64() > Some(0) && job["rejected"].as_u64() > Some(0),
        "{job}"
    );
    let stats = get_json(app, &format!("{sim}/stats")).await;
    assert_eq!(stats["duplicate_applications"], 0, "{stats}");
    assert_eq!(
        stats["applications"].as_u64(),
        Some(succeeded),
        "each succeeded device applied the job once: {stats}"
    );
    assert!(
        stats["silent"].as_u64() > Some(0),
        "offline devices were retried: {stats}"
    );
    // Extra deliveries: what devices received beyond the attempts recorded for them.
    let received = get_json(app, &format!("{sim}/deliveries/{id}")).await;
    let mut extra = 0u64;
    let mut examples = Vec::new();
    for (device, s) in &statuses {
        let got = received[device.as_str()].as_u64().unwrap_or(0);
        if got > u64::from(s.attempts) {
            extra += got - u64::from(s.attempts);
            examples.push(format!(
                "{device}: {got} deliveries, {} attempts",
                s.attempts
            ));
        }
    }
    let max_extra = max_extra.unwrap_or_else(|| {
        stats["silent"].as_u64().unwrap_or(0) + stats["transient"].as_u64().unwrap_or(0)
    });
    eprintln!("extra deliveries: {extra} (bound {max_extra})");
    assert!(
        extra <= max_extra,
        "{extra} extra deliveries > {max_extra}: {:?}",
        &examples[..examples.len().min(10)]
    );
    // `redundant_deliveries` (a device sent an execution it already applied) is not
    // asserted: a retry after a reply that came later than the attempt timeout is one, and
    // legitimate; the deliveries beyond the recorded attempts above are the real signal.
    eprintln!("redundant deliveries: {}", stats["redundant_deliveries"]);
}

/// Starts `fleet-sim` with `n` devices and `mqtt` (`fleetbatch`, `aws-iot-jobs`, `none`) on
/// `port` (or a free one), and registers the same devices; returns its base URL.
pub(crate) async fn start_sim(app: &mut TestApp, port: Option<u16>, n: u64, mqtt: &str) -> String {
    let port = port.unwrap_or_else(|| harness::cluster::free_port().expect("port"));
    let sim = app
        .cluster
        .start_fleet_sim(port, &["--devices", &n.to_string(), "--mqtt", mqtt])
        .await
        .expect("fleet-sim");
    app.import_fleet(n).await;
    sim
}

/// Settings for workers speaking the fleetbatch protocol over MQTT `version` under topic
/// `prefix`, with the shared fleet behaviour.
pub(crate) fn mqtt_env<'a>(version: &'a str, prefix: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&str, &str)> = FLEET.to_vec();
    env.extend([
        ("FLEETBATCH_WORKER__TRANSPORT", "mqtt"),
        ("FLEETBATCH_WORKER__MQTT__PROTOCOL", "fleetbatch"),
        ("FLEETBATCH_WORKER__MQTT__VERSION", version),
        ("FLEETBATCH_WORKER__MQTT__TOPIC_PREFIX", prefix),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "1500"),
    ]);
    env
}

async fn plain_mqtt(version: &str, n: u64) {
    let prefix = format!("fbt{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut app = spawn_app(2, &mqtt_env(version, &prefix)).await;
    let sim = start_sim(&mut app, None, n, "fleetbatch").await;
    firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_10000_device_job_over_mqtt5_with_the_fleetbatch_protocol_completes_exactly() {
    plain_mqtt("5", 10_000).await;
}

#[tokio::test]
async fn a_job_over_mqtt311_with_the_fleetbatch_protocol_completes_exactly() {
    plain_mqtt("3.1.1", 3_000).await;
}

/// The Python interpreter with awsiotsdk and kubernetes-validate (`deploy/dev/pyagent.sh`,
/// run by `deploy/dev/test.sh`, prepares it).
pub(crate) fn python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("FLEETBATCH_TEST_PYTHON") {
        return p.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let p = root.join("target/py/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run deploy/dev/test.sh, or deploy/dev/pyagent.sh",
        p.display()
    );
    p
}

/// An AWS IoT Device SDK agent for `thing` in `mode`, started and subscribed.
async fn start_agent(
    thing: &str,
    mode: &str,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/aws_jobs_agent.py");
    let mut child = tokio::process::Command::new(python())
        .arg(script)
        .args(["--thing", thing, "--mode", mode, "--timeout", "240"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python agent starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Wait for its subscriptions before any job exists for it.
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(v) = rx.recv().await {
            if v["event"] == "ready" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "agent {thing} did not get ready");
    (child, rx)
}

/// Runs an agent to its end; returns its events.
async fn finish_agent(
    mut child: tokio::process::Child,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
) -> (bool, Vec<Value>) {
    let status = tokio::time::timeout(Duration::from_secs(260), child.wait())
        .await
        .expect("agent finished in time")
        .expect("agent status");
    let mut events = Vec::new();
    while let Ok(v) = rx.try_recv() {
        events.push(v);
    }
    (status.success(), events)
}

/// Workers serving the AWS IoT Jobs device API over MQTT 5, with the shared fleet behaviour.
pub(crate) fn aws_env() -> Vec<(&'static str, &'static str)> {
    let mut env: Vec<(&str, &str)> = FLEET.to_vec();
    env.extend([
        ("FLEETBATCH_WORKER__TRANSPORT", "mqtt"),
        ("FLEETBATCH_WORKER__MQTT__PROTOCOL", "aws-iot-jobs"),
        ("FLEETBATCH_WORKER__MQTT__VERSION", "5"),
    ]);
    env
}

/// AWS IoT Jobs topics (`$aws/things/{thing}/jobs/...`) carry no namespace: the workers of one
/// test would answer the requests of another test's devices, and a test listening on a thing's
/// topics would hear another test's device of the same name. Tests that run AWS IoT Jobs
/// workers or devices hold this for their whole run.
pub(crate) static AWS_TOPICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn aws_iot_jobs_devices_run_fleetbatch_jobs_unmodified() {
    let _topics = AWS_TOPICS.lock().await;
    let mut env = aws_env();
    env.push(("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "3000"));
    let mut app = spawn_app(2, &env).await;
    let n = 10_000;
    let sim = start_sim(&mut app, None, n, "aws-iot-jobs").await;

    // Devices driven by the AWS IoT Device SDK v2 for Python, one per scenario.
    let tag = &app.names.namespace()[1..9];
    let things: Vec<(String, &str)> = [
        "succeed",
        "fail",
        "version-mismatch",
        "step-timeout",
        "long-step",
    ]
    .iter()
    .map(|m| (format!("py-{tag}-{m}"), *m))
    .collect();
    let registry: String = things
        .iter()
        .map(|(t, _)| format!("{}\n", json!({"id": t, "groups": ["agents"], "model": "py", "hardware_revision": "A", "firmware_version": "1.0.0"})))
        .collect();
    let r = app
        .http
        .post(app.url("/v1/devices/import?format=ndjson"))
        .body(registry)
        .send()
        .await
        .expect("import");
    assert!(r.status().is_success());
    let mut agents = Vec::new();
    for (thing, mode) in &things {
        agents.push(start_agent(thing, mode).await);
    }

    // One job per agent, then the fleet-sim job while the agents work.
    let mut agent_jobs = Vec::new();
    for (thing, _) in &things {
        // The timers are the devices' own: a 5 s attempt timeout bounds no device that is
        // working on its job.
        let id = app
            .create_job(&firmware_job(json!({
                "target": {"devices": [thing]},
                "retry": {"attempt_timeout_secs": 5, "max_attempts": 2}
            })))
            .await;
        agent_jobs.push(id);
    }
    // While the fleet-sim job runs, hostile requests arrive on the AWS IoT Jobs topics (this
    // test owns them): they change nothing of the job, and no process fails.
    let stop = tokio_util::sync::CancellationToken::new();
    let run = async {
        firmware_over_fleet_sim(&app, &sim, n, None).await;
        stop.cancel();
    };
    let (hostile, ()) = tokio::join!(
        crate::hostile::aws_requests(&app.settings.worker.mqtt, 300, stop.clone()),
        run
    );
    eprintln!("hostile AWS requests sent: {hostile}");
    assert!(hostile >= 300, "{hostile} hostile requests sent");

    let mut outcomes = HashMap::new();
    for (((thing, mode), (child, rx)), id) in things.iter().zip(agents).zip(&agent_jobs) {
        let (ok, events) = finish_agent(child, rx).await;
        assert!(ok, "agent {mode} did not see what it expects: {events:#?}");
        let job = app.wait_for_job(*id, Duration::from_secs(200)).await;
        let statuses = app.statuses(*id).await;
        let s = &statuses[thing];
        outcomes.insert(*mode, (s.state, s.error.clone(), events, job));
    }
    let (state, _, events, _) = &outcomes["succeed"];
    assert_eq!(*state, ExecutionState::Succeeded);
    let started = events
        .iter()
        .find(|e| e["event"] == "start-next-accepted" && e["job_id"].is_string())
        .expect("start-next");
    assert_eq!(started["document"]["type"], "firmware_update", "{started}");
    assert_eq!(
        started["version"], 2,
        "QUEUED is version 1, IN_PROGRESS version 2: {started}"
    );
    assert_eq!(started["client_token"], format!("start-py-{tag}-succeed"));
    let (state, error, _, _) = &outcomes["fail"];
    assert_eq!(*state, ExecutionState::Failed);
    assert!(
        error.as_deref().unwrap_or("").contains("disk full"),
        "{error:?}"
    );
    let (state, _, events, _) = &outcomes["version-mismatch"];
    assert_eq!(*state, ExecutionState::Succeeded);
    assert!(
        events.iter().any(|e| e["code"] == "VersionMismatch"),
        "{events:#?}"
    );
    let (state, error, _, _) = &outcomes["step-timeout"];
    assert_eq!(*state, ExecutionState::TimedOut, "{error:?}");
    // Given its own 5 minutes, the device finishes after 25 s, and its end is recorded when
    // it says so, as one attempt.
    let (state, error, events, _) = &outcomes["long-step"];
    assert_eq!(*state, ExecutionState::Succeeded, "{error:?}");
    let said = events
        .iter()
        .find(|e| e["event"] == "update-accepted" && e["client_token"] == "final")
        .and_then(|e| e["at_ms"].as_u64())
        .expect("the final update accepted");
    let thing = &things[4].0;
    let s = &app.statuses(agent_jobs[4]).await[thing];
    assert_eq!(s.attempts, 1, "{s:?}");
    // Recorded when the device said so, not at its step timer 5 minutes on: the woken task
    // may queue behind the 10,000 simulated devices' tasks, so allow seconds, not minutes.
    assert!(
        s.updated_at_ms.saturating_sub(said) < 30_000,
        "recorded {} ms after the device's update",
        s.updated_at_ms.saturating_sub(said)
    );
    app.teardown().await;
}

/// Two workers with the shared fleet behaviour, speaking HTTP `version` to a fleet-sim to be
/// started on the port returned.
async fn http_app(version: &str) -> (TestApp, u16) {
    let port = harness::cluster::free_port().expect("port");
    let template = format!("http://127.0.0.1:{port}/devices/{{device_id}}/jobs");
    let mut env: Vec<(&str, &str)> = FLEET.to_vec();
    env.extend([
        ("FLEETBATCH_WORKER__TRANSPORT", "http"),
        ("FLEETBATCH_WORKER__HTTP__URL_TEMPLATE", template.as_str()),
        ("FLEETBATCH_WORKER__HTTP__VERSION", version),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "1500"),
    ]);
    (spawn_app(2, &env).await, port)
}

#[tokio::test]
async fn http2_deliveries_share_a_few_connections_to_the_gateway_and_reach_every_device_once() {
    let (mut app, port) = http_app("http2").await;
    let n = 3_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;
    let before = get_json(&app, &format!("{sim}/stats")).await["http_connections"]
        .as_u64()
        .expect("http_connections");

    // Every device in its one right state, each applied once, no delivery beyond the
    // attempts recorded; offline devices' unanswered requests time out as streams.
    firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;

    let stats = get_json(&app, &format!("{sim}/stats")).await;
    let deliveries = stats["deliveries"].as_u64().expect("deliveries");
    assert!(deliveries >= n, "{stats}");
    assert_eq!(
        stats["http_versions"],
        json!({"HTTP/2.0": deliveries}),
        "every delivery over HTTP/2: {stats}"
    );
    // Two workers, a connection each (one more apiece if one was lost), and the test's own
    // report reads on one; HTTP/1.1 takes one per delivery in flight, hundreds here.
    let opened = stats["http_connections"]
        .as_u64()
        .expect("http_connections")
        - before;
    eprintln!("{deliveries} deliveries over HTTP/2 on {opened} connections");
    assert!(
        opened <= 5,
        "{opened} connections for {deliveries} deliveries: {stats}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn http_devices_return_readings_and_the_report_summarises_them() {
    let (mut app, port) = http_app("auto").await;
    let n = 3_000;
    let sim = start_sim(&mut app, Some(port), n, "none").await;

    // A plain firmware job over HTTP.
    firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;

    // A data-retrieval job.
    let id = app
        .create_job(&json!({
            "target": {"groups": ["fleet"]},
            "action": {"type": "data_retrieval", "metrics": ["temperature", "battery"]}
        }))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(300)).await;
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let succeeded: HashSet<&String> = statuses
        .iter()
        .filter(|(_, s)| s.state == ExecutionState::Succeeded)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(job["succeeded"].as_u64(), Some(succeeded.len() as u64));

    // What the devices sent, by metric, for the devices that succeeded.
    let sent: BTreeMap<String, BTreeMap<String, f64>> =
        serde_json::from_value(get_json(&app, &format!("{sim}/readings/{id}")).await)
            .expect("readings");
    let mut values: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (device, r) in &sent {
        assert!(
            succeeded.contains(device),
            "{device} sent readings but is not SUCCEEDED"
        );
        for (m, v) in r {
            values.entry(m.as_str()).or_default().push(*v);
        }
        assert_eq!(
            statuses[device].readings.as_ref(),
            Some(r),
            "{device}'s stored readings"
        );
    }
    assert_eq!(sent.len(), succeeded.len());
    let report = get_json(&app, &app.url(&format!("/v1/jobs/{id}/report"))).await;
    for (metric, mut v) in values {
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        let s = &report["readings"][metric];
        assert_eq!(s["count"].as_u64(), Some(v.len() as u64), "{metric}: {s}");
        assert_eq!(s["min"].as_f64(), Some(v[0]), "{metric}: {s}");
        assert_eq!(s["max"].as_f64(), Some(v[v.len() - 1]), "{metric}: {s}");
        assert_eq!(s["p50"].as_f64(), Some(rank(50.0)), "{metric}: {s}");
        assert_eq!(s["p95"].as_f64(), Some(rank(95.0)), "{metric}: {s}");
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            (s["mean"].as_f64().expect("mean") - mean).abs() < 1e-9,
            "{metric}: {s}"
        );
    }

    // The export: one row per device, readings in their columns.
    let (status, csv) = app
        .get_text(&app.url(&format!("/v1/jobs/{id}/results?format=csv")))
        .await;
    assert_eq!(status, 200);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("device_id,state,attempts,error,updated_at_ms,temperature,battery")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len() as u64, n);
    let first_ok = sent.keys().next().expect("a device succeeded");
    let row = rows
        .iter()
        .find(|r| r.starts_with(&format!("{first_ok},")))
        .expect("row");
    assert!(
        row.ends_with(&format!(
            ",{},{}",
            sent[first_ok]["temperature"], sent[first_ok]["battery"]
        )),
        "{row}"
    );
    let (_, ndjson) = app
        .get_text(&app.url(&format!("/v1/jobs/{id}/results?format=ndjson")))
        .await;
    assert_eq!(ndjson.lines().count() as u64, n);
    app.teardown().await;
}

/// A private Mosquitto with TLS (its own CA, client certificates required) and a password
/// file, on a free port. Killed when dropped.
struct SecureBroker {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    port: u16,
    ca: String,
    cert: String,
    key: String,
}

async fn secure_broker() -> SecureBroker {
    let ca = crate::helpers::TestCa::new();
    let dir = ca.dir;
    let d = dir.path();
    crate::helpers::run(
        "mosquitto_passwd",
        &["-b", "-c", "passwd", "fleet", "s3cret"],
        d,
    );
    let port = harness::cluster::free_port().expect("port");
    let conf = format!(
        "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\nallow_anonymous false\npassword_file {d}/passwd\n",
        d = d.display()
    );
    std::fs::write(d.join("mosquitto.conf"), conf).expect("conf");
    // Mosquitto started as root drops to its own user: let it read the files.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(d).expect("dir") {
        let path = entry.expect("entry").path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = |f: &str| d.join(f).display().to_string();
    SecureBroker {
        port,
        ca: path("ca.pem"),
        cert: path("client.pem"),
        key: path("client.key"),
        child: start_mosquitto(d, port).await,
        dir,
    }
}

async fn start_mosquitto(dir: &std::path::Path, port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(crate::helpers::system_binary("mosquitto"))
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto starts");
    crate::helpers::wait_for_port(port, "mosquitto").await;
    child
}

impl SecureBroker {
    /// Kills the broker (SIGKILL) and starts it again after `down`.
    async fn restart(&mut self, down: Duration) {
        self.child.kill().await.expect("mosquitto killed");
        tokio::time::sleep(down).await;
        self.child = start_mosquitto(self.dir.path(), self.port).await;
    }
}

#[tokio::test]
async fn mqtt_over_tls_with_client_certificates_and_a_password_survives_a_broker_restart() {
    let mut broker = secure_broker().await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let mut env: Vec<(&str, &str)> = FLEET.to_vec();
    env.extend([
        ("FLEETBATCH_WORKER__TRANSPORT", "mqtt"),
        ("FLEETBATCH_WORKER__MQTT__PROTOCOL", "fleetbatch"),
        ("FLEETBATCH_WORKER__MQTT__VERSION", "3.1.1"),
        ("FLEETBATCH_WORKER__MQTT__URL", url.as_str()),
        ("FLEETBATCH_WORKER__MQTT__CA_FILE", broker.ca.as_str()),
        (
            "FLEETBATCH_WORKER__MQTT__CLIENT_CERT_FILE",
            broker.cert.as_str(),
        ),
        (
            "FLEETBATCH_WORKER__MQTT__CLIENT_KEY_FILE",
            broker.key.as_str(),
        ),
        ("FLEETBATCH_WORKER__MQTT__USERNAME", "fleet"),
        ("FLEETBATCH_WORKER__MQTT__PASSWORD", "s3cret"),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "1500"),
    ]);
    let mut app = spawn_app(1, &env).await;
    let n = 3_000;
    let sim = start_sim(&mut app, None, n, "fleetbatch").await;
    // The broker dies mid-job and comes back 2 s later; workers and devices reconnect.
    let restart = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let before = loop {
            let job = app.job_if_any().await.unwrap_or_default();
            if job["terminal"].as_u64().unwrap_or(0) >= 300 {
                break job;
            }
            assert!(tokio::time::Instant::now() < deadline, "job did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let killed_at = shared::now_ms();
        broker.restart(Duration::from_secs(2)).await;
        (before, killed_at)
    };
    // A broker that dies may take QoS 1 requests in flight with it: each is sent again after
    // the reconnect, at most the worker's in-flight limit.
    let bound = u64::from(app.settings.worker.concurrency);
    let (_, (before, killed_at)) =
        tokio::join!(firmware_over_fleet_sim(&app, &sim, n, Some(bound)), restart);
    // The broker died under a running job (devices still pending) that finished after it.
    assert!(before["terminal"].as_u64() < Some(n), "{before}");
    let job = app.job_if_any().await.expect("the job");
    assert!(job["finished_at_ms"].as_u64() > Some(killed_at), "{job}");
    let log = std::fs::read_to_string(app.cluster.worker_log(0)).unwrap_or_default();
    assert!(
        log.contains("MQTT connection lost"),
        "the broker restart was seen"
    );
    app.teardown().await;
}

#[tokio::test]
async fn replies_forged_by_another_mqtt_client_are_refused_counted_and_never_recorded() {
    // Arrange: two observed workers and fleet-sim over MQTT 3.1.1.
    let prefix = format!("fbt{}", &Uuid::new_v4().simple().to_string()[..10]);
    let mut app = spawn_app(0, &mqtt_env("3.1.1", &prefix)).await;
    let ports = [app.start_observed_worker(), app.start_observed_worker()];
    let n = 2_000;
    let sim = start_sim(&mut app, None, n, "fleetbatch").await;
    // The forger targets the devices that must not succeed: those that fail, reject, or are
    // offline at first.
    let victims: Vec<String> = fleet_ids(n)
        .into_iter()
        .filter(|d| {
            let p = DeviceProfile::for_device(&app.settings.simulator, d);
            p.rejects || p.fails_permanently || p.offline_attempts > 0
        })
        .collect();
    assert!(victims.len() > 20, "{} victims", victims.len());

    // Act: while the job runs, another MQTT client learns the workers' reply topics (from the
    // devices' real replies) and answers SUCCEEDED for every victim, with its computed
    // execution id, without a nonce and with a made-up one.
    let stop = tokio_util::sync::CancellationToken::new();
    let (link, mut seen) = devices::mqtt::connect(
        &app.settings.worker.mqtt,
        "forger",
        vec![format!("{prefix}/workers/+/replies")],
        stop.clone(),
    )
    .expect("forger connects");
    let forge = async {
        let mut topics: HashSet<String> = HashSet::new();
        let mut sent = 0u64;
        while !stop.is_cancelled() {
            while let Ok(m) = seen.try_recv() {
                topics.insert(m.topic);
            }
            let job = app.job_if_any().await;
            if let Some(id) = job
                .as_ref()
                .and_then(|j| j["job_id"].as_str())
                .and_then(|j| Uuid::parse_str(j).ok())
            {
                for topic in &topics {
                    for d in &victims {
                        let x = shared::state::execution_id(id, d);
                        for body in [
                            json!({"executionId": x, "status": "SUCCEEDED"}),
                            json!({"executionId": x, "status": "SUCCEEDED", "nonce": "0000"}),
                        ] {
                            if link
                                .publish(topic, body.to_string().into_bytes(), None)
                                .await
                                .is_ok()
                            {
                                sent += 1;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sent
    };
    let run = async {
        firmware_over_fleet_sim(&app, &sim, n, Some(0)).await;
        stop.cancel();
    };
    let (sent, ()) = tokio::join!(forge, run);

    // Assert: every device ended as its own answers say (checked above: no victim succeeded),
    // and the workers refused and counted the forgeries.
    assert!(sent > 0, "the forger sent nothing");
    let mut refused = 0.0;
    for port in ports {
        let (_, text) = app
            .get_text(&format!("http://127.0.0.1:{port}/metrics"))
            .await;
        refused += crate::helpers::metric(&text, "fleetbatch_worker_replies_refused_total", &[]);
    }
    eprintln!("forged replies sent {sent}, refused {refused}");
    assert!(refused > 0.0, "no forged reply was counted as refused");
    app.teardown().await;
}

#[tokio::test]
async fn devices_verify_signed_job_documents_through_a_key_rotation_and_reject_unsigned_or_unknown_ones()
 {
    use shared::signing::Signer25519;
    // Arrange: devices (fleet-sim over HTTP) trust keys k1 and k2; the coordinator signs with
    // k1 first.
    let [k1, k2, k3] = ["k1", "k2", "k3"].map(|id| Signer25519::generate(id).expect("key"));
    let trusted = format!("k1={},k2={}", k1.public_hex(), k2.public_hex());
    let port = harness::cluster::free_port().expect("port");
    let template = format!("http://127.0.0.1:{port}/devices/{{device_id}}/jobs");
    let env = [
        ("FLEETBATCH_WORKER__TRANSPORT", "http"),
        ("FLEETBATCH_WORKER__HTTP__URL_TEMPLATE", template.as_str()),
        ("FLEETBATCH_SIMULATOR__TRUSTED_KEYS", trusted.as_str()),
    ];
    let mut app = spawn_app(1, &env).await;
    let n = 300;
    start_sim(&mut app, Some(port), n, "none").await;

    // Act and assert: each signing setting of the coordinator, one job each.
    let signing = |k: Option<&Signer25519>| -> Vec<(String, String)> {
        k.map(|k| {
            vec![
                (
                    "FLEETBATCH_COORDINATOR__SIGNING__KEY".to_owned(),
                    k.seed_hex(),
                ),
                (
                    "FLEETBATCH_COORDINATOR__SIGNING__KEY_ID".to_owned(),
                    k.key_id.clone(),
                ),
            ]
        })
        .unwrap_or_default()
    };
    for (key, want, reason) in [
        (Some(&k1), ExecutionState::Succeeded, None),
        // Rotation: the coordinator moves to k2, which the devices already trust.
        (Some(&k2), ExecutionState::Succeeded, None),
        // A key the devices do not trust (as k1 is once retired from their list).
        (
            Some(&k3),
            ExecutionState::Rejected,
            Some("unknown key \"k3\""),
        ),
        (None, ExecutionState::Rejected, Some("signature missing")),
    ] {
        app.cluster
            .signal_coordinator(nix::sys::signal::Signal::SIGTERM)
            .expect("sigterm");
        app.cluster
            .wait_coordinator(Duration::from_secs(30))
            .await
            .expect("coordinator stops");
        app.cluster
            .start_coordinator_with(&signing(key))
            .await
            .expect("coordinator starts");
        let id = app.create_job(&firmware_job(json!({}))).await;
        let job = app.wait_for_job(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "COMPLETED", "{job}");
        let statuses = app.assert_exact(id, &fleet_ids(n)).await;
        for (d, s) in &statuses {
            assert_eq!(
                s.state,
                want,
                "{d} with key {:?}: {s:?}",
                key.map(|k| &k.key_id)
            );
            if let Some(r) = reason {
                let e = s.error.as_deref().unwrap_or_default();
                assert!(e.contains(r), "{d}: {e:?} should name {r}");
            }
        }
    }
    app.teardown().await;
}

/// What a device sends on the topics `heard` listens to (operation and body) within `window`.
async fn listen(
    heard: &mut tokio::sync::mpsc::Receiver<devices::mqtt::Message>,
    window: Duration,
) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + window;
    while let Ok(Some(m)) = tokio::time::timeout_at(end, heard.recv()).await {
        let op = m
            .topic
            .rsplit("/jobs/")
            .next()
            .unwrap_or_default()
            .to_owned();
        got.push((op, serde_json::from_slice(&m.payload).unwrap_or_default()));
    }
    got
}

/// A simulated AWS IoT Jobs device repeats a request it hears no answer to, as an agent with
/// request timeouts does (a broker may drop a QoS 1 message for a client that falls behind),
/// and stops once answered: `start-next` until `start-next/accepted` names its job, its final
/// `update` until `update/accepted`.
#[tokio::test]
async fn a_simulated_aws_iot_jobs_device_repeats_unanswered_requests_until_answered() {
    let _topics = AWS_TOPICS.lock().await;
    // No workers: this test answers the device itself.
    let mut app = spawn_app(
        0,
        &[
            ("FLEETBATCH_WORKER__TRANSPORT", "mqtt"),
            ("FLEETBATCH_WORKER__MQTT__PROTOCOL", "aws-iot-jobs"),
            ("FLEETBATCH_WORKER__MQTT__VERSION", "5"),
        ],
    )
    .await;
    let port = harness::cluster::free_port().expect("port");
    app.cluster
        .start_fleet_sim(port, &["--devices", "16", "--mqtt", "aws-iot-jobs"])
        .await
        .expect("fleet-sim");
    let stop = tokio_util::sync::CancellationToken::new();
    let thing = "dev-0000005";
    let (link, mut heard) = devices::mqtt::connect(
        &app.settings.worker.mqtt,
        &format!("answers-{}", &app.names.namespace()[1..9]),
        vec![
            devices::aws::topic(thing, "start-next"),
            devices::aws::topic(thing, "+/update"),
        ],
        stop.clone(),
    )
    .expect("connects");
    while !link.is_connected() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publish = |op: &str, body: Value| {
        let (link, topic) = (link.clone(), devices::aws::topic(thing, op));
        async move {
            link.publish(&topic, body.to_string().into_bytes(), None)
                .await
                .expect("publish");
        }
    };
    publish(
        "notify-next",
        json!({"timestamp": 1, "execution": {"jobId": "j1", "executionNumber": 1, "versionNumber": 1, "status": "QUEUED"}}),
    )
    .await;
    // Unanswered: asked at once, and again about 5 s later.
    let asked = listen(&mut heard, Duration::from_millis(8_500)).await;
    let tokens: Vec<&str> = asked
        .iter()
        .map(|(op, b)| {
            assert_eq!(op, "start-next", "{asked:?}");
            b["clientToken"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        tokens,
        ["dev-0000005:j1", "dev-0000005:j1:again"],
        "{asked:?}"
    );

    publish(
        "start-next/accepted",
        json!({"execution": {"jobId": "j1", "executionNumber": 1, "versionNumber": 2, "status": "IN_PROGRESS"}}),
    )
    .await;
    // Answered: no more start-next; the final update comes, and again while unanswered.
    let updates = listen(&mut heard, Duration::from_millis(8_500)).await;
    assert_eq!(updates.len(), 2, "{updates:?}");
    for (op, body) in &updates {
        assert_eq!(op, "j1/update", "{updates:?}");
        assert_eq!(body["status"], "SUCCEEDED");
        assert_eq!(body["expectedVersion"], 2);
    }
    publish("j1/update/accepted", json!({"timestamp": 2})).await;
    let after = listen(&mut heard, Duration::from_secs(7)).await;
    assert!(after.is_empty(), "repeated after its answer: {after:?}");
    stop.cancel();
    app.teardown().await;
}

#[tokio::test]
async fn an_aws_iot_jobs_device_that_missed_its_notification_is_notified_again_and_finishes() {
    let _topics = AWS_TOPICS.lock().await;
    let mut env = aws_env();
    env.push(("FLEETBATCH_WORKER__MQTT__AWS_RENOTIFY_MS", "2000"));
    let app = spawn_app(1, &env).await;
    let thing = format!("py-{}-deaf", &app.names.namespace()[1..9]);
    let record = json!({"id": thing, "groups": ["agents"], "model": "py",
        "hardware_revision": "A", "firmware_version": "1.0.0"});
    app.import_ndjson(format!("{record}\n").into_bytes()).await;
    let (child, rx) = start_agent(&thing, "missed-notify").await;

    // The device loses the job's notify-next (as when a broker drops it) and never asks on
    // its own: only a second notification gets the job done before its deadline.
    let id = app
        .create_job(&firmware_job(json!({
            "target": {"devices": [thing]},
            "retry": {"attempt_timeout_secs": 30, "max_attempts": 1, "deadline_secs": 60}
        })))
        .await;
    let (ok, events) = finish_agent(child, rx).await;
    assert!(ok, "the device never got its job: {events:#?}");
    let heard: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event"].as_str())
        .filter(|e| e.starts_with("notify-next"))
        .collect();
    assert_eq!(
        heard[..2],
        ["notify-next-missed", "notify-next"],
        "{events:#?}"
    );
    let job = app.wait_for_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "COMPLETED", "{job}");
    let statuses = app.statuses(id).await;
    assert_eq!(
        statuses[&thing].state,
        ExecutionState::Succeeded,
        "{:?}",
        statuses[&thing]
    );
    assert_eq!(statuses[&thing].attempts, 1, "{:?}", statuses[&thing]);
    app.teardown().await;
}

#[tokio::test]
async fn an_aws_iot_jobs_device_that_connects_after_a_cancel_is_not_handed_the_job() {
    let _topics = AWS_TOPICS.lock().await;
    let env = aws_env();
    let app = spawn_app(1, &env).await;
    let thing = format!("py-{}-late", &app.names.namespace()[1..9]);
    let record = json!({"id": thing, "groups": ["agents"], "model": "py",
        "hardware_revision": "A", "firmware_version": "1.0.0"});
    app.import_ndjson(format!("{record}\n").into_bytes()).await;

    // The job's execution waits QUEUED for a device that is not connected; then the job is
    // canceled, and the device connects 5 s later.
    let id = app
        .create_job(&firmware_job(json!({
            "target": {"devices": [thing]},
            "retry": {"attempt_timeout_secs": 120, "max_attempts": 2}
        })))
        .await;
    crate::rollouts::wait_until(&app, id, Duration::from_secs(30), |j| {
        j["pending"] == 1 && j["planning_done"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = app.cancel(id).await;
    assert!((200..300).contains(&r), "{r}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (child, rx) = start_agent(&thing, "after-cancel").await;
    let (ok, events) = finish_agent(child, rx).await;
    assert!(ok, "the device was handed the canceled job: {events:#?}");

    // The execution ended CANCELED (not FAILED, and not after the 120 s attempt).
    let job = app.wait_for_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "CANCELED", "{job}");
    let statuses = app.statuses(id).await;
    assert_eq!(
        statuses[&thing].state,
        ExecutionState::Canceled,
        "{:?}",
        statuses[&thing]
    );
    app.teardown().await;
}
