//! Webhooks: push notifications of job state changes and device failures.
//!
//! Owns delivery of notifications to HTTP endpoints: the deployment's
//! `coordinator.webhooks` (every job's state changes) and each job's own
//! `notify.webhooks` (its state changes, and its device failures when asked). Every POST
//! carries `X-Fleetbatch-Event`, a unique `X-Fleetbatch-Delivery` id and
//! `X-Fleetbatch-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed by
//! `coordinator.webhook_secret`, and is retried with exponential backoff on errors and 5xx.
//!
//! It never slows the pipeline: [`Notifier::send`] only puts the event on a bounded queue;
//! when the queue is full the event is dropped and counted
//! (`fleetbatch_webhooks_dropped_total`), never waited for.

use shared::redis_conn::RedisConn;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use backoff::backoff::Backoff;
use hmac::{Hmac, Mac};
use prometheus::IntCounterVec;
use serde_json::{Value, json};
use sha2::Sha256;
use shared::{job::Webhook, state::JobState, store, topology::Names};
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-fleetbatch-signature";
/// Header carrying the event name.
pub const EVENT_HEADER: &str = "x-fleetbatch-event";
/// Header carrying the delivery id (the same on every retry of one notification).
pub const DELIVERY_HEADER: &str = "x-fleetbatch-delivery";

/// Event names.
pub const JOB_STATE: &str = "job.state";
/// Event names.
pub const DEVICE_FAILED: &str = "device.failed";
/// Event names: a wave started, passed or failed its gate, or waits for approval.
pub const JOB_WAVE: &str = "job.wave";

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug)]
struct Notification {
    job_id: Uuid,
    event: &'static str,
    body: Value,
}

/// The sending side of the webhook queue.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    counter: IntCounterVec,
}

/// Settings of the notifier.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Endpoints told about every job's state changes.
    pub deployment_urls: Vec<String>,
    /// The signing key.
    pub secret: Option<shared::config::Secret>,
    /// Attempts per POST.
    pub max_attempts: u32,
    /// First retry delay.
    pub initial_backoff: Duration,
    /// Job state changes are also written to the audit log, kept this long.
    pub audit_retention_days: u32,
    /// Where a job's own webhooks may go (checked again before each POST).
    pub outbound: crate::outbound::Policy,
}

impl Notifier {
    /// Starts the sender task; `counter` counts deliveries by result (sent, failed, dropped).
    pub fn start(
        config: NotifierConfig,
        redis: RedisConn,
        names: Names,
        counter: IntCounterVec,
    ) -> Self {
        let (tx, rx) = mpsc::channel(10_000);
        tokio::spawn(run(config, redis, names, rx, counter.clone()));
        Self { tx, counter }
    }

    /// Queues a job state change.
    pub fn job_state(&self, job_id: Uuid, state: JobState, counters: Value) {
        self.job_state_because(job_id, state, counters, None);
    }

    /// Queues a job state change with its reason (a pause, a failed gate, an abort).
    pub fn job_state_because(
        &self,
        job_id: Uuid,
        state: JobState,
        counters: Value,
        reason: Option<&str>,
    ) {
        self.send(Notification {
            job_id,
            event: JOB_STATE,
            body: json!({
                "event": JOB_STATE,
                "job_id": job_id,
                "state": state.as_str(),
                "reason": reason,
                "counters": counters,
                "at_ms": shared::now_ms(),
            }),
        });
    }

    /// Queues a wave event: `what` is `started`, `passed`, `failed` or `awaiting_approval`.
    pub fn job_wave(&self, job_id: Uuid, wave: usize, name: &str, what: &str, detail: Value) {
        self.send(Notification {
            job_id,
            event: JOB_WAVE,
            body: json!({
                "event": JOB_WAVE,
                "job_id": job_id,
                "wave": wave,
                "name": name,
                "what": what,
                "detail": detail,
                "at_ms": shared::now_ms(),
            }),
        });
    }

    /// Queues the final state of a job that just finished, with its counters.
    pub async fn job_finished(&self, redis: &mut RedisConn, names: &Names, job_id: Uuid) {
        match store::load_job(redis, names, job_id).await {
            Ok(Some(job)) => {
                tracing::info!(%job_id, state = job.state.as_str(), terminal = job.terminal(), "job finished");
                let counters = serde_json::to_value(&job.counts).unwrap_or(Value::Null);
                self.job_state(job_id, job.state, counters);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(%job_id, error.message = %e, "finished job not announced"),
        }
    }

    /// Queues a device failure (sent only to jobs that asked for them).
    pub fn device_failed(
        &self,
        job_id: Uuid,
        device_id: &str,
        state: &str,
        error: Option<&str>,
        attempts: u32,
    ) {
        self.send(Notification {
            job_id,
            event: DEVICE_FAILED,
            body: json!({
                "event": DEVICE_FAILED,
                "job_id": job_id,
                "device_id": device_id,
                "state": state,
                "error": error,
                "attempts": attempts,
                "at_ms": shared::now_ms(),
            }),
        });
    }

    fn send(&self, n: Notification) {
        if self.tx.try_send(n).is_err() {
            self.counter.with_label_values(&["dropped"]).inc();
        }
    }
}

async fn run(
    config: NotifierConfig,
    mut redis: RedisConn,
    names: Names,
    mut rx: mpsc::Receiver<Notification>,
    counter: IntCounterVec,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let config = Arc::new(config);
    // A slow endpoint must not hold up the others: each POST runs on its own task, at most
    // this many at once.
    let permits = Arc::new(Semaphore::new(64));
    let hooks: Mutex<HashMap<Uuid, Arc<Vec<Webhook>>>> = Mutex::new(HashMap::new());
    while let Some(n) = rx.recv().await {
        if n.event == JOB_STATE {
            let state = n.body["state"].as_str().unwrap_or_default().to_owned();
            let detail = json!({"counters": n.body["counters"], "reason": n.body["reason"]});
            crate::audit::job_event(
                &mut redis,
                &names,
                config.audit_retention_days,
                n.job_id,
                &state,
                detail,
            )
            .await;
        }
        let cached = hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&n.job_id)
            .cloned();
        let job_hooks = match cached {
            Some(h) => h,
            None => {
                let h = match store::load_job(&mut redis, &names, n.job_id).await {
                    Ok(Some(job)) => Arc::new(job.spec.notify.webhooks.clone()),
                    _ => Arc::new(Vec::new()),
                };
                let mut map = hooks.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() > 1000 {
                    map.clear();
                }
                map.insert(n.job_id, h.clone());
                h
            }
        };
        let mut urls: Vec<String> = Vec::new();
        let job_event = n.event == JOB_STATE || n.event == JOB_WAVE;
        if job_event {
            urls.extend(config.deployment_urls.iter().cloned());
        }
        for w in job_hooks.iter().filter(|w| job_event || w.device_failures) {
            // A job's own target may have come to resolve inside the network since.
            match config.outbound.check(&w.url).await {
                Ok(()) => urls.push(w.url.clone()),
                Err(problem) => {
                    tracing::warn!(job_id = %n.job_id, url = %w.url, %problem, security_event = "webhook_refused", "webhook not sent");
                    counter.with_label_values(&["refused"]).inc();
                }
            }
        }
        if urls.is_empty() {
            continue;
        }
        let body = serde_json::to_vec(&n.body).unwrap_or_default();
        let delivery = Uuid::new_v4().to_string();
        for url in urls {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (http, config, body, delivery, counter) = (
                http.clone(),
                config.clone(),
                body.clone(),
                delivery.clone(),
                counter.clone(),
            );
            let event = n.event;
            tokio::spawn(async move {
                let sent = post(&http, &config, &url, event, &delivery, body).await;
                counter
                    .with_label_values(&[if sent { "sent" } else { "failed" }])
                    .inc();
                drop(permit);
            });
        }
    }
}

/// POSTs one notification, retrying with exponential backoff; whether it was accepted.
async fn post(
    http: &reqwest::Client,
    config: &NotifierConfig,
    url: &str,
    event: &str,
    delivery: &str,
    body: Vec<u8>,
) -> bool {
    let mut delays = shared::backoff::outage(config.initial_backoff, Duration::from_secs(60));
    for attempt in 1..=config.max_attempts {
        let mut req = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(EVENT_HEADER, event)
            .header(DELIVERY_HEADER, delivery);
        if let Some(secret) = &config.secret {
            req = req.header(SIGNATURE_HEADER, sign(secret.expose(), &body));
        }
        match req.body(body.clone()).send().await {
            Ok(r) if r.status().is_success() => return true,
            // A 4xx other than 408/429 will not get better.
            Ok(r)
                if r.status().is_client_error()
                    && r.status() != reqwest::StatusCode::REQUEST_TIMEOUT
                    && r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::warn!(%url, status = %r.status(), "webhook refused");
                return false;
            }
            Ok(r) => {
                tracing::debug!(%url, status = %r.status(), attempt, "webhook failed; retrying")
            }
            Err(e) => {
                tracing::debug!(%url, error.message = %e, attempt, "webhook failed; retrying")
            }
        }
        if attempt < config.max_attempts {
            let delay = delays.next_backoff().unwrap_or(delays.max_interval);
            tokio::time::sleep(delay).await;
        }
    }
    tracing::warn!(%url, event, "webhook gave up");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        let sig = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
