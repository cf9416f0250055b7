//! A throw-away deployment for `demo` and `chaos`: a fresh namespace on the configured
//! RabbitMQ and Redis, a coordinator and workers as child processes, a generated fleet, and
//! removal of the namespace's queues and keys at the end.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use harness::{cluster::Cluster, fleet};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde_json::{Value, json};
use shared::{config::Settings, topology::Names};

use crate::client::Client;

pub(crate) struct Sandbox {
    pub(crate) settings: Settings,
    pub(crate) namespace: String,
    pub(crate) names: Names,
    pub(crate) cluster: Cluster,
    pub(crate) client: Client,
}

impl Sandbox {
    /// Starts a coordinator and `workers` workers in a new namespace `<prefix>-<hex>`; `env`
    /// adds settings for every process (e.g. the simulator's behaviour).
    pub(crate) async fn start(
        config: Option<&Path>,
        prefix: &str,
        workers: usize,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let settings = Settings::load(config).context("loading settings")?;
        let namespace = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let log_dir = std::env::temp_dir().join(format!("fleetbatch-{namespace}"));
        let mut child_env: Vec<(String, String)> = vec![
            ("FLEETBATCH_NAMESPACE".into(), namespace.clone()),
            ("FLEETBATCH_AMQP__URL".into(), settings.amqp.url.clone()),
            ("FLEETBATCH_REDIS__URL".into(), settings.redis.url.clone()),
            ("FLEETBATCH_AMQP__QUEUE_EXPIRES_MS".into(), "3600000".into()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ];
        child_env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        eprintln!(
            "fleetbatch {prefix}: namespace {namespace}, logs in {}",
            log_dir.display()
        );
        let mut cluster = Cluster::new(harness::cluster::bin_dir()?, log_dir, child_env)?;
        cluster.start_coordinator().await?;
        for _ in 0..workers {
            cluster.start_worker()?;
        }
        let client = Client::new(&cluster.api, Some(&cluster.admin_token), None)?;
        Ok(Self {
            names: Names::new(&namespace),
            settings,
            namespace,
            cluster,
            client,
        })
    }

    /// Registers generated devices `0..n` through the API.
    pub(crate) async fn import_fleet(&self, n: u64) -> anyhow::Result<()> {
        eprintln!("registering {n} simulated devices...");
        let t = Instant::now();
        let report: Value = self
            .client
            .post(
                "/v1/devices/import?format=ndjson",
                "application/x-ndjson",
                fleet::ndjson(n),
            )
            .await?;
        eprintln!(
            "registered {} devices in {:.1}s",
            report["imported"],
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Creates a firmware update for group `fleet`; `extra` adds or replaces spec fields.
    pub(crate) async fn create_firmware_job(
        &self,
        name: &str,
        extra: Value,
    ) -> anyhow::Result<String> {
        let mut spec = json!({
            "name": name,
            "target": {"groups": ["fleet"]},
            "action": {
                "type": "firmware_update",
                "url": "https://firmware.example.com/gw/2.0.0.bin",
                "version": "2.0.0",
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            },
            "retry": {"max_attempts": 5}
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        let created: Value = self
            .client
            .post("/v1/jobs", "application/json", spec.to_string())
            .await?;
        let id = created["job_id"].as_str().context("no job id")?.to_owned();
        eprintln!("job {id} created");
        Ok(id)
    }

    /// Stops the processes and, unless `keep`, deletes the namespace's queues and keys.
    pub(crate) async fn finish(mut self, keep: bool) {
        for problem in self.cluster.stop_all(Duration::from_secs(30)).await {
            eprintln!("fleetbatch: {problem}");
        }
        if !keep && let Err(e) = cleanup(&self.settings, &self.namespace).await {
            eprintln!("cleanup of {} failed: {e:#}", self.namespace);
        }
    }
}

/// Deletes the namespace's queues, exchanges and Redis keys.
async fn cleanup(settings: &Settings, namespace: &str) -> anyhow::Result<()> {
    let names = Names::new(namespace);
    let conn = shared::amqp::connect(&settings.amqp, "fleetbatch-cleanup").await?;
    let ch = conn.create_channel().await?;
    let mut queues = vec![
        names.tasks_queue(),
        names.results_queue(),
        names.dead_queue(),
        names.dead_watch_queue(),
    ];
    queues.extend((0..settings.worker.retry_delays_ms.len()).map(|n| names.retry_queue(n)));
    for q in queues {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    for e in [
        names.tasks_exchange(),
        names.results_exchange(),
        names.dead_exchange(),
        names.control_exchange(),
    ] {
        ch.exchange_delete(e.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "done".into()).await;
    let mut redis =
        shared::store::connect(&settings.redis, Names::new(namespace).key_prefix()).await?;
    shared::store::delete_matching(&mut redis, &Names::new(namespace).key_pattern()).await?;
    Ok(())
}
