//! Private RabbitMQ and Redis servers for tests that restart them (the shared servers must
//! stay up for the tests running beside them). Each runs on free ports with its data in a
//! temporary directory that survives restarts, as a production server's disk would.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

async fn wait_port(port: u16, up: bool, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while port_open(port) != up {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} not {} in {timeout:?}",
            if up { "open" } else { "closed" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis server with an append-only file, as `deploy/` configures.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut r = Self {
            port: harness::cluster::free_port().expect("port"),
            dir: tempfile::tempdir().expect("tmp"),
            child: None,
        };
        r.start_again().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts (is it installed?)");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(20)).await;
    }

    /// Stops it the way an operator or a crash-safe restart would (SHUTDOWN flushes the AOF).
    pub async fn stop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown"])
            .output()
            .await;
        if let Some(mut c) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
        wait_port(self.port, false, Duration::from_secs(10)).await;
    }

    /// Crashes it (SIGKILL): no shutdown, no final flush of the append-only file.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("redis-server killed");
        }
        wait_port(self.port, false, Duration::from_secs(10)).await;
    }
}

/// A RabbitMQ node of its own (node name, ports, data directory).
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
    _guard: tempfile::TempDir,
}

impl PrivateRabbit {
    pub async fn start() -> Self {
        let guard = tempfile::tempdir().expect("tmp");
        let dir = guard.path().to_path_buf();
        // The server runs as the rabbitmq user: let it write here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let port = harness::cluster::free_port().expect("port");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("conf");
        let r = Self {
            port,
            node: format!("fbt{port}@localhost"),
            dir,
            _guard: guard,
        };
        r.start_again().await;
        r
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn start_again(&self) {
        let dist = harness::cluster::free_port().expect("port");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("rabbitmq-server starts (is it installed?)");
        assert!(status.success(), "rabbitmq-server -detached failed");
        wait_port(self.port, true, Duration::from_secs(90)).await;
    }

    pub async fn stop(&self) {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_port(self.port, false, Duration::from_secs(30)).await;
    }

    /// Crashes the node (SIGKILL of its Erlang VM): no clean shutdown of queues or
    /// connections.
    pub async fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("rabbitmq pid file");
        let pid: i32 = pid.trim().parse().expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("rabbitmq killed");
        wait_port(self.port, false, Duration::from_secs(30)).await;
        // Let the VM's helpers (epmd registration, port programs) notice before a restart.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Gone, or a zombie nobody has reaped yet.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| !st.contains(") Z "))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rabbitmq {pid} still alive"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl PrivateRabbit {
    /// The Erlang node name (`rabbitmqctl -n`).
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Joins this (fresh) node to `first`'s cluster.
    pub async fn join(&self, first: &PrivateRabbit) {
        // Its AMQP port can open before the node answers its CLI.
        self.ctl(&["await_startup", "--timeout", "90"]).await;
        self.ctl(&["stop_app"]).await;
        self.ctl(&["join_cluster", &first.node]).await;
        self.ctl(&["start_app"]).await;
        wait_port(self.port, true, Duration::from_secs(90)).await;
    }
}

/// RabbitMQ nodes of this test's own, joined in one cluster.
pub struct RabbitCluster {
    pub nodes: Vec<PrivateRabbit>,
}

impl RabbitCluster {
    /// Starts `n` nodes and joins them to the first.
    pub async fn start(n: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(PrivateRabbit::start().await);
        }
        for node in &nodes[1..] {
            node.join(&nodes[0]).await;
        }
        let members = nodes[0]
            .ctl(&["cluster_status", "--formatter", "json"])
            .await;
        for node in &nodes {
            assert!(
                members.contains(node.node()),
                "{} not in the cluster: {members}",
                node.node()
            );
        }
        Self { nodes }
    }

    /// The index of the node leading quorum queue `queue`.
    pub async fn leader_of(&self, queue: &str) -> usize {
        self.leader_of_among(queue, usize::MAX).await
    }

    /// Every queue with its leader and message counts, as a node other than `down` reports
    /// them (for a quorum queue, `messages` beyond ready and unacknowledged ones are
    /// dead-lettered messages not yet forwarded).
    pub async fn queue_stats(&self, down: usize) -> String {
        self.nodes[usize::from(down == 0)]
            .ctl(&[
                "list_queues",
                "name",
                "type",
                "leader",
                "messages",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ])
            .await
    }

    /// The index of the node leading quorum queue `queue`, as a node other than `down`
    /// reports it.
    pub async fn leader_of_among(&self, queue: &str, down: usize) -> usize {
        let asked = usize::from(down == 0);
        let listed = self.nodes[asked]
            .ctl(&[
                "list_queues",
                "name",
                "leader",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
        let leader = listed
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("queue {queue} not listed: {listed}"));
        self.nodes
            .iter()
            .position(|n| n.node() == leader)
            .unwrap_or_else(|| panic!("leader {leader} is not one of the nodes"))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
