//! The test harness: a namespaced deployment of real processes, and assertions on outcomes.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use harness::cluster::Cluster;
use redis::AsyncCommands;
use serde_json::Value;
use shared::{
    config::Settings,
    state::{DeviceStatus, ExecutionState},
    topology::Names,
};
use uuid::Uuid;

/// A running deployment for one test.
pub struct TestApp {
    pub cluster: Cluster,
    pub names: Names,
    /// The settings the child processes run with.
    pub settings: Settings,
    pub http: reqwest::Client,
    pub redis: RedisConn,
}

/// The services' settings pointing at the test suite's RabbitMQ and Redis.
pub fn service_env() -> Vec<(String, String)> {
    vec![
        (
            "FLEETBATCH_AMQP__URL".into(),
            shared::config::test_amqp_url(),
        ),
        (
            "FLEETBATCH_REDIS__URL".into(),
            shared::config::test_redis_url(),
        ),
    ]
}

/// Starts a coordinator and `workers` workers in a fresh namespace; `env` adds settings
/// (as `FLEETBATCH_*` variables) for every process.
pub async fn spawn_app(workers: usize, env: &[(&str, &str)]) -> TestApp {
    // A fresh namespace, unless the test brings its own (e.g. one its broker users are for).
    let namespace = env
        .iter()
        .find(|(k, _)| *k == "FLEETBATCH_NAMESPACE")
        .map_or_else(
            || format!("t{}", &Uuid::new_v4().simple().to_string()[..12]),
            |(_, v)| (*v).to_owned(),
        );
    let mut child_env = service_env();
    child_env.push(("FLEETBATCH_NAMESPACE".into(), namespace.clone()));
    child_env.push(("FLEETBATCH_AMQP__QUEUE_EXPIRES_MS".into(), "600000".into()));
    child_env.push((
        "RUST_LOG".into(),
        std::env::var("TEST_LOG").unwrap_or_else(|_| "info,lapin=warn".into()),
    ));
    for (k, v) in env {
        child_env.push(((*k).into(), (*v).into()));
    }
    let map: HashMap<String, String> = child_env.iter().cloned().collect();
    let settings = Settings::load_from(None, &map).expect("test settings load");
    let log_dir = std::env::temp_dir().join("fleetbatch-e2e").join(&namespace);
    let mut cluster = Cluster::new(
        harness::cluster::bin_dir().expect("binaries built (cargo build --bins)"),
        log_dir,
        child_env,
    )
    .expect("cluster");
    cluster
        .start_coordinator()
        .await
        .expect("coordinator starts");
    for _ in 0..workers {
        cluster.start_worker().expect("worker starts");
    }
    let redis = shared::store::connect(
        &settings.redis,
        shared::topology::Names::new(&settings.namespace).key_prefix(),
    )
    .await
    .expect("redis");
    let http = with_token(
        cluster.client_builder().expect("the cluster's CA"),
        Some(&cluster.admin_token),
    );
    // Ready means connected to the broker with the topology declared: tests may publish to
    // the namespace's exchanges straight away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{}/readyz", cluster.api))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator was not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    TestApp {
        cluster,
        names: Names::new(&namespace),
        settings,
        http,
        redis,
    }
}

/// An HTTP client sending `token` as its bearer token. A hung coordinator fails the test
/// instead of hanging the suite (the longest request, an event stream followed to the job's
/// end, is bounded at 120 s).
pub fn client_with_token(token: Option<&str>) -> reqwest::Client {
    with_token(reqwest::Client::builder(), token)
}

/// `builder` finished as [`client_with_token`] does.
pub fn with_token(builder: reqwest::ClientBuilder, token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    builder
        .default_headers(headers)
        .timeout(Duration::from_secs(180))
        .build()
        .expect("http client")
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cluster.api)
    }

    /// Registers generated devices `0..n` (all in group `fleet`).
    pub async fn import_fleet(&self, n: u64) {
        let v = self.import_ndjson(harness::fleet::ndjson(n)).await;
        assert_eq!(v["imported"].as_u64(), Some(n), "{v}");
    }

    /// Imports devices from NDJSON lines; returns the import report.
    pub async fn import_ndjson(&self, lines: Vec<u8>) -> Value {
        let r = self
            .http
            .post(self.url("/v1/devices/import?format=ndjson"))
            .body(lines)
            .send()
            .await
            .expect("import request");
        assert!(r.status().is_success(), "import failed: {}", r.status());
        r.json().await.expect("import report")
    }

    /// Posts a job; returns the status and body.
    pub async fn post_job(&self, body: &str, content_type: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/v1/jobs"))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .expect("create request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a job that must be accepted.
    pub async fn create_job(&self, spec: &Value) -> Uuid {
        let (status, body) = self.post_job(&spec.to_string(), "application/json").await;
        assert_eq!(status, 201, "job refused: {body}");
        Uuid::parse_str(body["job_id"].as_str().expect("job id")).expect("uuid")
    }

    /// The newest job, if one exists.
    pub async fn job_if_any(&self) -> Option<Value> {
        let list: Value = self
            .http
            .get(self.url("/v1/jobs?limit=1"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let first = list
            .as_array()
            .or_else(|| list["jobs"].as_array())?
            .first()?;
        Some(first.clone())
    }

    pub async fn job(&self, id: Uuid) -> Value {
        self.http
            .get(self.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .expect("get job")
            .json()
            .await
            .expect("job json")
    }

    /// Polls until the job is over (COMPLETED, CANCELED or ABORTED).
    pub async fn wait_for_job(&self, id: Uuid, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if matches!(
                job["state"].as_str(),
                Some("COMPLETED" | "CANCELED" | "ABORTED")
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job did not finish within {timeout:?}: {job}\nlogs: {}",
                self.cluster
                    .coordinator_log()
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until at least `n` devices of the job are terminal.
    pub async fn wait_for_terminal(&self, id: Uuid, n: u64, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if job["terminal"].as_u64().unwrap_or(0) >= n {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not {n} terminal in time: {job}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Replaces the test's own Redis connection (after a Redis restart the old one reports
    /// its broken pipe once before reconnecting).
    pub async fn reconnect_redis(&mut self) {
        self.redis = shared::store::connect(&self.settings.redis, self.names.key_prefix())
            .await
            .expect("redis");
    }

    /// Starts a worker whose `/metrics` listens on a known port; returns the port.
    pub fn start_observed_worker(&mut self) -> u16 {
        let port = harness::cluster::free_port().expect("port");
        self.cluster
            .start_worker_with(&[(
                "FLEETBATCH_WORKER__LISTEN".into(),
                format!("127.0.0.1:{port}"),
            )])
            .expect("worker starts");
        port
    }

    /// GETs a URL's body as text.
    pub async fn get_text(&self, url: &str) -> (u16, String) {
        let r = self.http.get(url).send().await.expect("get");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// Every device's stored status.
    pub async fn statuses(&self, id: Uuid) -> HashMap<String, DeviceStatus> {
        let mut redis = self.redis.clone();
        let raw: HashMap<String, String> = redis
            .hgetall(self.names.job_status(id))
            .await
            .expect("statuses");
        raw.into_iter()
            .map(|(d, s)| (d, serde_json::from_str(&s).expect("status json")))
            .collect()
    }

    /// The simulator's counters for a job.
    pub async fn sim_totals(&self, id: Uuid) -> HashMap<String, u64> {
        let mut redis = self.redis.clone();
        redis
            .hgetall(self.names.sim_totals(id))
            .await
            .expect("sim totals")
    }

    /// Asserts the guarantees on a finished job targeting exactly `expected` devices: one
    /// terminal status per device, counters equal to those statuses and summing to the target
    /// count, and no device applying the job twice. Returns the statuses.
    pub async fn assert_exact(
        &self,
        id: Uuid,
        expected: &HashSet<String>,
    ) -> HashMap<String, DeviceStatus> {
        let job = self.job(id).await;
        let statuses = self.statuses(id).await;
        assert_eq!(
            job["targeted"].as_u64(),
            Some(expected.len() as u64),
            "{job}"
        );
        let got: HashSet<String> = statuses.keys().cloned().collect();
        assert_eq!(got.len(), expected.len(), "one status per targeted device");
        assert!(
            got == *expected,
            "statuses are for exactly the targeted devices"
        );
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (device, s) in &statuses {
            assert!(s.state.is_terminal(), "{device} is {:?}", s.state);
            *by_state.entry(s.state.counter()).or_default() += 1;
        }
        let mut sum = 0;
        for state in ExecutionState::TERMINAL {
            let counter = job[state.counter()].as_u64().unwrap_or(0);
            assert_eq!(
                counter,
                by_state.get(state.counter()).copied().unwrap_or(0),
                "counter {} matches the per-device states: {job}",
                state.counter()
            );
            sum += counter;
        }
        assert_eq!(
            sum,
            expected.len() as u64,
            "counters sum to the target count"
        );
        assert_eq!(job["terminal"].as_u64(), Some(sum));
        let totals = self.sim_totals(id).await;
        assert_eq!(
            totals.get("duplicate_applications").copied().unwrap_or(0),
            0,
            "{totals:?}"
        );
        statuses
    }

    /// Publishes `payload` as is to the namespace's exchange `exchange` with `key`, confirmed
    /// (messages that did not come from a coordinator or worker: garbage, forgeries).
    pub async fn publish_raw(&self, exchange: String, key: &str, payload: &[u8]) {
        self.publish_raw_all(vec![(exchange, key, payload.to_vec())])
            .await;
    }

    /// [`Self::publish_raw`] for many messages over one connection, each confirmed.
    pub async fn publish_raw_all(&self, messages: Vec<(String, &str, Vec<u8>)>) {
        let conn = shared::amqp::connect(&self.settings.amqp, "e2e-publish")
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        for (exchange, key, payload) in messages {
            ch.basic_publish(
                exchange.into(),
                key.into(),
                lapin::options::BasicPublishOptions::default(),
                &payload,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
        let _ = conn.close(200, "done".into()).await;
    }

    /// Cancels job `id` through the API; returns the HTTP status.
    pub async fn cancel(&self, id: Uuid) -> u16 {
        self.http
            .post(self.url(&format!("/v1/jobs/{id}/cancel")))
            .send()
            .await
            .expect("cancel")
            .status()
            .as_u16()
    }

    /// Messages in the namespace's dead-letter queue (taken off the queue).
    pub async fn drain_dead_letters(&self) -> Vec<lapin::message::BasicGetMessage> {
        let conn = shared::amqp::connect(&self.settings.amqp, "e2e-dlq")
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(
                self.names.dead_queue().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            out.push(m);
        }
        let _ = conn.close(200, "done".into()).await;
        out
    }

    /// Stops every process and deletes the namespace's Redis keys.
    /// Fails the test if any process it started panicked, exited unexpectedly, or did not
    /// stop cleanly (exit 0) on SIGTERM.
    /// Imports devices `0..n`, runs a firmware job to COMPLETED over all of them and checks
    /// it exact (every device in one terminal state, counters equal, nothing applied twice);
    /// returns the job and its statuses.
    pub async fn run_fleet_job(
        &self,
        n: u64,
        extra: Value,
    ) -> (Uuid, HashMap<String, DeviceStatus>) {
        self.import_fleet(n).await;
        let id = self.create_job(&firmware_job(extra)).await;
        let job = self.wait_for_job(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "COMPLETED", "{job}");
        let statuses = self.assert_exact(id, &fleet_ids(n)).await;
        (id, statuses)
    }

    /// Kills the coordinator with SIGKILL and starts a new one (same settings).
    pub async fn crash_coordinator(&mut self) {
        self.cluster
            .signal_coordinator(nix::sys::signal::Signal::SIGKILL)
            .expect("kill");
        self.cluster
            .wait_coordinator(Duration::from_secs(10))
            .await
            .expect("dead");
        self.cluster.start_coordinator().await.expect("restart");
    }

    /// An HTTP client calling as a new API token made by the admin with `token` (name,
    /// role, groups...).
    pub async fn client_as(&self, token: Value) -> reqwest::Client {
        let secret = self.token_secret(token).await;
        with_token(reqwest::Client::builder(), Some(&secret))
    }

    /// The secret of a new API token made by the admin with `token` (name, role, groups...).
    pub async fn token_secret(&self, token: Value) -> String {
        let r: Value = self
            .http
            .post(self.url("/v1/tokens"))
            .json(&token)
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("json");
        r["secret"].as_str().expect("a secret").to_owned()
    }

    /// Runs `fleetbatch --api <this app> args...` as the admin; its stdout, failing the test
    /// on a non-zero exit.
    pub async fn fleetbatch(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(
            harness::cluster::bin_dir()
                .expect("bins")
                .join("fleetbatch"),
        )
        .args(["--api", &self.cluster.api])
        .args(args)
        .env("FLEETBATCH_TOKEN", &self.cluster.admin_token)
        .output()
        .await
        .expect("cli runs");
        assert!(
            out.status.success(),
            "fleetbatch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub async fn teardown(mut self) {
        let problems = self.cluster.stop_all(Duration::from_secs(30)).await;
        assert!(
            problems.is_empty(),
            "processes were not healthy to the end:\n{}",
            problems.join("\n")
        );
        let mut redis = self.redis.clone();
        shared::store::delete_matching(&mut redis, &self.names.key_pattern())
            .await
            .expect("namespace keys deleted");
    }
}

/// The ids of generated devices `0..n`.
pub fn fleet_ids(n: u64) -> HashSet<String> {
    (0..n).map(harness::fleet::device_id).collect()
}

/// A firmware-update job for group `fleet`.
pub fn firmware_job(extra: Value) -> Value {
    let mut spec = serde_json::json!({
        "name": "e2e",
        "target": {"groups": ["fleet"]},
        "action": {
            "type": "firmware_update",
            "url": "https://fw.example.com/2.0.bin",
            "version": "2.0.0",
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        }
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}

/// The value of a sample in Prometheus text exposition: `name` with exactly these labels
/// (in any order). 0 when absent: for counters, which appear at their first increment.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// A sample that must be exposed (gauges): fails the test when it is missing, so a gauge that
/// disappeared cannot read as 0.
pub fn gauge(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} is not exposed"))
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric_name, label_part) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let found: Vec<(String, String)> = label_part
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        if found.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| found.iter().any(|(fk, fv)| fk == k && fv == v))
        {
            return value.parse().ok();
        }
    }
    None
}

/// Runs a command in `dir`; panics with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str], dir: &std::path::Path) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA made with openssl in a temporary directory, with a server certificate for
/// 127.0.0.1 and localhost (`server.pem`, `server.key`) and a client certificate
/// (`client.pem`, `client.key`), all signed by `ca.pem`. Files are world-readable (servers
/// started as root may drop to their own user).
pub struct TestCa {
    pub dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let subj = |cn: &str| format!("/CN={cn}");
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                &subj("fleetbatch test CA"),
            ],
            d,
        );
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext");
        for name in ["server", "client"] {
            run(
                "openssl",
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &subj(name),
                ],
                d,
            );
            run(
                "openssl",
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.pem"),
                    "-extfile",
                    "san.ext",
                ],
                d,
            );
        }
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(d).expect("dir") {
            let path = entry.expect("entry").path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir }
    }

    /// The path of one of its files (`ca.pem`, `server.pem`, ...).
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// A server binary from the system's packages: its path under /usr/sbin or /usr/bin (not
/// always on a test's PATH), else the bare name.
pub fn system_binary(name: &str) -> String {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| name.to_owned())
}

/// Waits up to 5 s for a server started by the test to open `port` on 127.0.0.1.
pub async fn wait_for_port(port: u16, what: &str) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not open port {port} within 5 s");
}
