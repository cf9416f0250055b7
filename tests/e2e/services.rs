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

/// One node of a [`RedisCluster`].
pub struct ClusterNode {
    pub port: u16,
    bus: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    async fn start() -> Self {
        let mut node = Self {
            port: harness::cluster::free_port().expect("port"),
            bus: harness::cluster::free_port().expect("port"),
            dir: tempfile::tempdir().expect("tmp"),
            child: None,
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &node.port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &node.bus.to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(node.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts (is it installed?)");
        node.child = Some(child);
        wait_port(node.port, true, Duration::from_secs(20)).await;
        node
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A Redis Cluster of this test's own: `masters` masters with one replica each, on free
/// ports (client and bus), each with its append-only file as `deploy/` configures, and a
/// node timeout of 2 s so a dead master's replica is promoted within seconds.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            nodes.push(ClusterNode::start().await);
        }
        let addrs: Vec<String> = nodes.iter().map(ClusterNode::addr).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli --cluster create runs");
        assert!(
            out.status.success(),
            "cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        for i in 0..cluster.nodes.len() {
            cluster.wait_ok(i).await;
        }
        cluster
    }

    /// The pids of the nodes still running.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().and_then(Child::id))
            .collect()
    }

    /// Commands the masters have processed (`total_commands_processed`; a script counts
    /// once, whatever it calls).
    pub async fn master_commands(&self) -> u64 {
        let mut total = 0;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let info = n.cli(&["info", "all"]).await;
            if !info.contains("role:master") {
                continue;
            }
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    }

    /// Redis's `used_memory` summed over the nodes still running (bytes).
    pub async fn used_memory(&self) -> u64 {
        let mut total = 0;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let info = n.cli(&["info", "memory"]).await;
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    }

    /// Every node's address, as `redis.cluster_urls` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}", n.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits (up to 30 s) until node `i` sees the cluster healthy, every slot served.
    async fn wait_ok(&self, i: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.nodes[i].cli(&["cluster", "info"]).await;
            if info.contains("cluster_state:ok") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} never saw the cluster ok: {info}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The index of the master serving `key`'s slot, as node `asked` sees it.
    pub async fn master_of(&self, key: &str, asked: usize) -> usize {
        self.live_master_of(key, asked)
            .await
            .unwrap_or_else(|| panic!("no live master serves {key}"))
    }

    /// The index of the live master serving `key`'s slot, as node `asked` sees it; `None`
    /// while the slot's master is failing and no replica has taken over yet.
    async fn live_master_of(&self, key: &str, asked: usize) -> Option<usize> {
        let slot: u16 = self.nodes[asked]
            .cli(&["cluster", "keyslot", key])
            .await
            .trim()
            .parse()
            .expect("a slot");
        let nodes = self.nodes[asked].cli(&["cluster", "nodes"]).await;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if serves {
                let addr = f[1].split('@').next().unwrap_or_default();
                return Some(
                    self.nodes
                        .iter()
                        .position(|n| n.addr() == addr)
                        .unwrap_or_else(|| panic!("{addr} is not one of the nodes")),
                );
            }
        }
        None
    }

    /// SIGKILLs node `i` (no shutdown, no final write of its append-only file).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().await.expect("redis-server killed");
        }
        wait_port(self.nodes[i].port, false, Duration::from_secs(10)).await;
    }

    /// Waits until a node other than `dead` serves `key`'s slot and the cluster is healthy
    /// again; returns the new master's index and how long the promotion took from `since`.
    pub async fn wait_failover(
        &self,
        key: &str,
        dead: usize,
        since: std::time::Instant,
    ) -> (usize, Duration) {
        let asked = usize::from(dead == 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info = self.nodes[asked].cli(&["cluster", "info"]).await;
            if info.contains("cluster_state:ok")
                && let Some(now) = self.live_master_of(key, asked).await
                && now != dead
            {
                return (now, since.elapsed());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica took over from node {dead} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
