//! A local deployment: a coordinator and workers as child processes, for the demo, the
//! benchmark and the end-to-end tests.
//!
//! Owns finding the binaries (next to the running executable, or one directory up for test
//! binaries in `target/*/deps`), starting them with settings given as `FLEETBATCH_*`
//! environment variables, logging each to its own file, and signalling them (SIGTERM to
//! stop, SIGKILL to crash). Every child is killed when the [`Cluster`] is dropped. It never
//! talks to RabbitMQ or Redis itself.

use std::{
    collections::HashSet,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

/// The directory holding the `coordinator` and `worker` binaries.
///
/// # Errors
/// The current executable's path is unknown or no sibling binaries exist.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for _ in 0..2 {
        if dir.join("coordinator").exists() && dir.join("worker").exists() {
            return Ok(dir);
        }
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    bail!(
        "the coordinator and worker binaries are not next to {} (build them with `cargo build --bins`)",
        exe.display()
    )
}

/// A free TCP port on 127.0.0.1, below the kernel's range of ephemeral ports.
///
/// The caller binds it seconds later (a process that starts): a port of the ephemeral range
/// (what binding port 0 gives) may meanwhile become the local end of some outgoing
/// connection of a test running beside, and the bind then fails. Ports below the range are
/// never handed out that way, so the window only holds against another test's choice.
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 20_000u16.min(ephemeral_start.saturating_sub(1_000));
    let span = u128::from(ephemeral_start.saturating_sub(low).max(1));
    for _ in 0..200 {
        let port = low + (uuid::Uuid::new_v4().as_u128() % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A coordinator and workers running as child processes.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    /// The coordinator's API base URL.
    pub api: String,
    /// The coordinator's bootstrap admin token (random per cluster; given to the coordinator
    /// alone).
    pub admin_token: String,
    /// The CA the API's certificate is checked against (`FLEETBATCH_CA_FILE` in `env`).
    ca_pem: Option<Vec<u8>>,
    coordinator: Option<Child>,
    coordinator_starts: usize,
    /// Further coordinators of the same deployment (active-active), each on its own port.
    more_coordinators: Vec<Child>,
    workers: Vec<Option<Child>>,
    fleet_sims: Vec<Child>,
    /// Processes SIGKILLed on purpose: their deaths are not failures.
    killed: HashSet<u32>,
}

impl Cluster {
    /// A cluster whose processes get `env` (e.g. `FLEETBATCH_NAMESPACE`) and log into
    /// `log_dir`. The API listens on a free port.
    ///
    /// # Errors
    /// No free port.
    pub fn new(
        bin_dir: PathBuf,
        log_dir: PathBuf,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut env = env;
        let setting = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let scheme = if setting("FLEETBATCH_COORDINATOR__TLS__CERT_FILE").is_some() {
            "https"
        } else {
            "http"
        };
        let ca_pem = setting("FLEETBATCH_CA_FILE")
            .map(|path| std::fs::read(&path).with_context(|| format!("reading {path}")))
            .transpose()?;
        let api = format!("{scheme}://127.0.0.1:{port}");
        env.push((
            "FLEETBATCH_COORDINATOR__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        // The CLI's own variable, exported as an operator's shell would: every service
        // started here proves it ignores it.
        env.push(("FLEETBATCH_API".into(), api.clone()));
        Ok(Self {
            bin_dir,
            log_dir,
            env,
            api,
            ca_pem,
            admin_token: format!(
                "admin-{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            coordinator: None,
            coordinator_starts: 0,
            more_coordinators: Vec::new(),
            workers: Vec::new(),
            fleet_sims: Vec::new(),
            killed: HashSet::new(),
        })
    }

    fn spawn(
        &self,
        binary: &str,
        log_name: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<Child> {
        std::fs::create_dir_all(&self.log_dir)?;
        let log_path = self.log_dir.join(log_name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(self.bin_dir.join(binary));
        cmd.envs(self.env.iter().cloned())
            .envs(extra.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        cmd.spawn().with_context(|| format!("starting {binary}"))
    }

    /// The log file of the coordinator.
    pub fn coordinator_log(&self) -> PathBuf {
        self.log_dir.join("coordinator.log")
    }

    /// The log file of worker `i`.
    pub fn worker_log(&self, i: usize) -> PathBuf {
        self.log_dir.join(format!("worker-{i}.log"))
    }

    /// Starts (or restarts) the coordinator and waits until its API answers.
    ///
    /// # Errors
    /// It did not start, or did not answer within 30 s.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        self.start_coordinator_with(&[]).await
    }

    /// Starts (or restarts) the coordinator with extra environment (settings of this start
    /// only) and waits until its API answers.
    ///
    /// # Errors
    /// It did not start, or did not answer within 30 s.
    pub async fn start_coordinator_with(
        &mut self,
        extra: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut env = vec![(
            "FLEETBATCH_COORDINATOR__AUTH__BOOTSTRAP_TOKEN".to_owned(),
            self.admin_token.clone(),
        )];
        env.extend(extra.iter().cloned());
        let child = self.spawn("coordinator", "coordinator.log", &env)?;
        self.coordinator = Some(child);
        self.coordinator_starts += 1;
        let client = self.client_builder()?.build()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.api)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(c) = self.coordinator.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "the coordinator exited with {status}; see {}",
                    self.coordinator_log().display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the coordinator did not answer within 30 s; see {}",
                    self.coordinator_log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts one more coordinator of the same deployment (same namespace, Redis and broker),
    /// with its API on a port of its own; waits until it answers. Returns its process id and
    /// API address. [`Self::stop_all`] stops it (continuing it first if it was stopped).
    ///
    /// # Errors
    /// It did not start, or did not answer within 30 s.
    pub async fn start_another_coordinator(&mut self) -> anyhow::Result<(u32, String)> {
        let port = free_port()?;
        let scheme = self.api.split("://").next().unwrap_or("http");
        let api = format!("{scheme}://127.0.0.1:{port}");
        let n = self.more_coordinators.len() + 1;
        let env = [
            (
                "FLEETBATCH_COORDINATOR__AUTH__BOOTSTRAP_TOKEN".to_owned(),
                self.admin_token.clone(),
            ),
            (
                "FLEETBATCH_COORDINATOR__LISTEN".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
        ];
        let child = self.spawn("coordinator", &format!("coordinator-{n}.log"), &env)?;
        let pid = child.id().context("the coordinator has no process id")?;
        self.more_coordinators.push(child);
        let client = self.client_builder()?.build()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{api}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok((pid, api));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("coordinator {n} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the further coordinator with process id `pid` (its death is then not a
    /// failure).
    ///
    /// # Errors
    /// No such coordinator, or the signal failed.
    pub fn kill_another_coordinator(&mut self, pid: u32) -> anyhow::Result<()> {
        if !self.more_coordinators.iter().any(|c| c.id() == Some(pid)) {
            bail!("no further coordinator with process id {pid}");
        }
        self.killed.insert(pid);
        nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
            .context("signalling a coordinator")
    }

    /// An HTTP client builder for the API: trusts the cluster's CA when it serves HTTPS.
    ///
    /// # Errors
    /// The CA file is not a PEM certificate.
    pub fn client_builder(&self) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &self.ca_pem {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        Ok(builder)
    }

    /// Starts a worker with extra environment; returns its index.
    ///
    /// # Errors
    /// It could not be started.
    pub fn start_worker_with(&mut self, extra: &[(String, String)]) -> anyhow::Result<usize> {
        let i = self.workers.len();
        let child = self.spawn("worker", &format!("worker-{i}.log"), extra)?;
        self.workers.push(Some(child));
        Ok(i)
    }

    /// Starts a worker; returns its index.
    ///
    /// # Errors
    /// It could not be started.
    pub fn start_worker(&mut self) -> anyhow::Result<usize> {
        self.start_worker_with(&[])
    }

    /// Starts a `fleet-sim` with the cluster's settings and `args` (e.g. `--devices 1000
    /// --mqtt fleetbatch`), listening on `port` (e.g. from [`free_port`]), and waits until it
    /// answers. Returns its base URL (`/stats`, and HTTP devices at `/devices/{id}/jobs`).
    ///
    /// # Errors
    /// It did not start, or did not answer within 30 s.
    pub async fn start_fleet_sim(&mut self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let i = self.fleet_sims.len();
        let log_path = self.log_dir.join(format!("fleet-sim-{i}.log"));
        std::fs::create_dir_all(&self.log_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(self.bin_dir.join("fleet-sim"))
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting fleet-sim (build it with `cargo build --bins`)")?;
        self.fleet_sims.push(child);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(base);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "fleet-sim did not answer within 30 s (log: {})",
            log_path.display()
        )
    }

    /// Process ids of the `fleet-sim` processes started, in order.
    pub fn fleet_sim_pids(&self) -> Vec<u32> {
        self.fleet_sims.iter().filter_map(Child::id).collect()
    }

    /// Process id of the coordinator, if running.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref()?.id()
    }

    /// Process ids of every running coordinator (the first and those started beside it).
    pub fn coordinator_pids(&self) -> Vec<u32> {
        self.coordinator
            .iter()
            .chain(&self.more_coordinators)
            .filter_map(Child::id)
            .collect()
    }

    /// Process ids of the running workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .flatten()
            .filter_map(Child::id)
            .collect()
    }

    /// Process id of worker `i`, if running.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i)?.as_ref()?.id()
    }

    /// Sends `signal` to worker `i`.
    ///
    /// # Errors
    /// No such running worker, or the signal failed.
    pub fn signal_worker(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let pid = self.worker_pid(i).context("no such running worker")?;
        if signal == Signal::SIGKILL {
            self.killed.insert(pid);
        }
        nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).context("signalling a worker")
    }

    /// Waits for worker `i` to exit.
    ///
    /// # Errors
    /// Not running, or not exited within `timeout`.
    pub async fn wait_worker(&mut self, i: usize, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .workers
            .get_mut(i)
            .and_then(Option::as_mut)
            .context("no such worker")?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .context("worker did not exit in time")??;
        self.workers[i] = None;
        Ok(status)
    }

    /// Sends `signal` to the coordinator.
    ///
    /// # Errors
    /// Not running, or the signal failed.
    pub fn signal_coordinator(&mut self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .coordinator
            .as_ref()
            .and_then(Child::id)
            .context("coordinator not running")?;
        if signal == Signal::SIGKILL {
            self.killed.insert(pid);
        }
        nix::sys::signal::kill(Pid::from_raw(pid as i32), signal)
            .context("signalling the coordinator")
    }

    /// Waits for the coordinator to exit.
    ///
    /// # Errors
    /// Not running, or not exited within `timeout`.
    pub async fn wait_coordinator(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .coordinator
            .as_mut()
            .context("coordinator not running")?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .context("coordinator did not exit in time")??;
        self.coordinator = None;
        Ok(status)
    }

    /// SIGTERMs every process and waits for them (up to `timeout` each), then reports what
    /// went wrong: a process that exited before it was asked to (and was not SIGKILLed on
    /// purpose), one that did not exit 0 on SIGTERM or not in time, and every log line of a
    /// panic. Empty when every process was healthy to the end.
    pub async fn stop_all(&mut self, timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for i in 0..self.workers.len() {
            let Some(child) = self.workers[i].as_mut() else {
                continue;
            };
            let name = format!("worker {i}");
            let outcome = stop(child, timeout, &self.killed).await;
            problems.extend(outcome.map(|p| format!("{name}: {p}")));
            self.workers[i] = None;
        }
        if let Some(child) = self.coordinator.as_mut() {
            let outcome = stop(child, timeout, &self.killed).await;
            problems.extend(outcome.map(|p| format!("coordinator: {p}")));
            self.coordinator = None;
        }
        for (i, child) in self.more_coordinators.iter_mut().enumerate() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            }
            let outcome = stop(child, timeout, &self.killed).await;
            problems.extend(outcome.map(|p| format!("coordinator {}: {p}", i + 1)));
        }
        self.more_coordinators.clear();
        for (i, sim) in self.fleet_sims.iter_mut().enumerate() {
            if let Ok(Some(status)) = sim.try_wait() {
                problems.push(format!("fleet-sim {i}: exited on its own ({status})"));
            }
            let _ = sim.kill().await;
        }
        self.fleet_sims.clear();
        problems.extend(self.panics());
        problems
    }

    /// Log lines of panics in any process's log.
    pub fn panics(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.log_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            out.extend(
                text.lines()
                    .filter(|l| l.contains("panicked at"))
                    .map(|l| format!("{}: {l}", entry.path().display())),
            );
        }
        out
    }
}

/// SIGTERMs `child` unless it already exited; `None` when it exited 0 in time (or died of a
/// SIGKILL in `killed`), else what was wrong.
async fn stop(child: &mut Child, timeout: Duration, killed: &HashSet<u32>) -> Option<String> {
    let pid = child.id();
    let deliberate = pid.is_some_and(|p| killed.contains(&p));
    if let Ok(Some(status)) = child.try_wait() {
        return (!deliberate).then(|| format!("exited on its own ({status})"));
    }
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() || deliberate => None,
        Ok(Ok(status)) => Some(format!("stopped with {status} on SIGTERM")),
        Ok(Err(e)) => Some(format!("cannot be waited for: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Some(format!("did not stop within {timeout:?} of SIGTERM"))
        }
    }
}
