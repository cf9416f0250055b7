//! The MQTT transport: deliveries over an MQTT broker, in the fleetbatch device protocol or
//! the AWS IoT Jobs device API ([`super::aws`]).
//!
//! Owns the worker's MQTT connection, its reply topic and the table of attempts waiting for
//! an answer. Fleetbatch protocol: one request per attempt on `{prefix}/devices/{id}/jobs`,
//! answered on this worker's reply topic (also set as the MQTT 5 response topic, with the
//! execution id as correlation data). Incoming messages are routed by one dispatcher task:
//! replies to the attempt waiting for them, AWS IoT Jobs requests to [`super::aws`]. A job
//! canceled while a device works on it: the attempt asks the device once, on
//! `{prefix}/devices/{id}/cancel`, to stop; the device's answer (`CANCELED`, or its final
//! status if it refuses) ends the attempt as usual. It never records outcomes.

use devices::keys::DeviceKeys;
use shared::redis_conn::RedisConn;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use devices::{
    mqtt::{self, Link, Message, MqttError},
    protocol::{self, DeviceReply},
};
use shared::{
    config::{DeviceProtocol, Settings},
    state::ExecutionState,
    topology::Names,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::jobs::JobCache;

use super::{
    aws::{self, AwsJobs},
    request::{DeliverError, DeliveryRequest, Reply, reply_outcome},
};

/// Attempts waiting for messages about their execution, by execution id.
#[derive(Debug, Default)]
pub(crate) struct Waiting(Mutex<HashMap<Uuid, mpsc::UnboundedSender<Routed>>>);

/// What reaches an attempt waiting for its device.
#[derive(Debug)]
pub(crate) enum Routed {
    /// A message on this worker's reply topic: a device's reply, or another worker's word
    /// that an AWS IoT Jobs execution changed. Anyone who may publish there could have sent
    /// it: the attempt checks it, or reads the execution from storage.
    Message(Bytes),
    /// An AWS IoT Jobs execution as this worker's own answer to its device's final update
    /// left it: final, and never from the network.
    Concluded(Box<aws::Record>),
}

/// Removes a waiting attempt when it ends (answered, timed out or dropped).
pub(crate) struct WaitGuard<'a>(&'a Waiting, Uuid);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl Waiting {
    /// Registers an attempt for `execution`; messages for it arrive on the receiver.
    pub(crate) fn register(
        &self,
        execution: Uuid,
    ) -> (WaitGuard<'_>, mpsc::UnboundedReceiver<Routed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(execution, tx);
        (WaitGuard(self, execution), rx)
    }

    /// Hands `payload` to the attempt waiting for `execution`; false when none waits here.
    pub(crate) fn route(&self, execution: Uuid, payload: Routed) -> bool {
        let waiting = self.0.lock().unwrap_or_else(|p| p.into_inner());
        waiting
            .get(&execution)
            .is_some_and(|tx| tx.send(payload).is_ok())
    }
}

#[derive(Debug)]
struct Inner {
    link: Link,
    prefix: String,
    reply_topic: String,
    waiting: Arc<Waiting>,
    aws: Option<AwsJobs>,
    /// Replies refused because they do not carry the attempt's nonce (forged or stale).
    refused: prometheus::IntCounter,
    /// Presence announcements, applied in arrival order by one task.
    presence: mpsc::UnboundedSender<(String, bool)>,
    /// Job states, for cancel requests to devices running a job that was canceled.
    jobs: JobCache,
    redis: RedisConn,
    names: Names,
}

/// The MQTT transport; cheap to clone.
#[derive(Debug, Clone)]
pub struct MqttTransport(Arc<Inner>);

/// How often a worker waiting for a device looks whether the job was canceled meanwhile.
const CANCEL_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

/// The execution id named by a message on a reply topic.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Addressed {
    execution_id: Uuid,
}

impl MqttTransport {
    /// Whether devices on this transport answer health probes (the fleetbatch protocol
    /// does; AWS IoT Jobs has no such call).
    pub fn probes_health(&self) -> bool {
        self.0.aws.is_none()
    }

    /// Connects to the broker and starts the dispatcher. With the AWS IoT Jobs protocol the
    /// worker also answers devices' jobs requests, sharing the subscription with every
    /// worker of the deployment.
    ///
    /// # Errors
    /// Bad URL or unreadable certificate files.
    pub fn start(
        settings: &Settings,
        worker_id: &str,
        redis: RedisConn,
        names: Names,
        refused: prometheus::IntCounter,
        shutdown: CancellationToken,
    ) -> Result<Self, MqttError> {
        let m = &settings.worker.mqtt;
        let reply_topic = protocol::reply_topic(&m.topic_prefix, worker_id);
        let mut subscriptions = vec![reply_topic.clone()];
        if m.protocol == DeviceProtocol::AwsIotJobs {
            let group = m.shared_subscriptions.then(|| names.mqtt_share_group());
            subscriptions.extend(devices::aws::filters(
                &devices::aws::REQUEST_OPERATIONS,
                group.as_deref(),
            ));
        }
        // Presence at QoS 0: a burst of announcements (a site losing power) is not dropped
        // by the broker's per-client queue limit, and every reconnection re-sends the
        // retained state.
        let (link, messages) = mqtt::connect(
            m,
            &format!("fleetbatch-{worker_id}"),
            mqtt::Subscriptions {
                at_least_once: subscriptions,
                at_most_once: vec![protocol::presence_filter(&m.topic_prefix)],
                made: None,
            },
            shutdown.clone(),
        )?;
        let (presence, announcements) = mpsc::unbounded_channel();
        tokio::spawn(apply_presence(
            announcements,
            redis.clone(),
            names.clone(),
            shutdown.clone(),
        ));
        let waiting = Arc::new(Waiting::default());
        let aws = (m.protocol == DeviceProtocol::AwsIotJobs).then(|| {
            AwsJobs::new(
                link.clone(),
                waiting.clone(),
                redis.clone(),
                names.clone(),
                reply_topic.clone(),
                aws::Timing {
                    job_cache: settings.worker.job_cache(),
                    retention: std::time::Duration::from_secs(settings.worker.done_retention_secs),
                    hold: std::time::Duration::from_millis(m.aws_hold_ms),
                    attempt_timeout: settings.worker.attempt_timeout(),
                    dedupe: (!m.shared_subscriptions)
                        .then(|| std::time::Duration::from_millis(m.request_dedupe_ms.max(1))),
                    renotify: (m.aws_renotify_ms > 0)
                        .then(|| std::time::Duration::from_millis(m.aws_renotify_ms)),
                },
            )
        });
        let transport = Self(Arc::new(Inner {
            link,
            prefix: m.topic_prefix.clone(),
            reply_topic,
            waiting,
            aws,
            refused,
            presence,
            jobs: JobCache::new(settings.worker.job_cache()),
            redis,
            names,
        }));
        tokio::spawn(transport.clone().dispatch(messages, shutdown));
        Ok(transport)
    }

    async fn dispatch(self, mut messages: mpsc::Receiver<Message>, shutdown: CancellationToken) {
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.recv() => match m { Some(m) => m, None => return },
            };
            if m.topic == self.0.reply_topic {
                match serde_json::from_slice::<Addressed>(&m.payload) {
                    Ok(a) => {
                        if !self
                            .0
                            .waiting
                            .route(a.execution_id, Routed::Message(m.payload))
                        {
                            tracing::debug!(execution_id = %a.execution_id, "late reply: no attempt waiting");
                        }
                    }
                    Err(e) => tracing::warn!(error.message = %e, "unreadable reply ignored"),
                }
            } else if let Some(device) =
                protocol::device_of_presence_topic(&self.0.prefix, &m.topic)
            {
                match (
                    shared::device::validate_id(device),
                    serde_json::from_slice::<protocol::Presence>(&m.payload),
                ) {
                    (Ok(()), Ok(p)) => {
                        let _ = self.0.presence.send((device.to_owned(), p.online));
                    }
                    (Err(e), _) => {
                        tracing::debug!(error.message = %e, "presence of an invalid device id ignored")
                    }
                    (_, Err(e)) => {
                        tracing::debug!(device_id = %device, error.message = %e, "unreadable presence ignored")
                    }
                }
            } else if let Some(aws) = &self.0.aws {
                let aws = aws.clone();
                let name = aws.request_name(&m);
                tokio::spawn(async move { aws.handle_request(m, name).await });
            }
        }
    }

    /// Devices on this transport announce their presence (a retained online message and an
    /// offline last will), so an offline device's tasks wait for it.
    pub fn announces_presence(&self) -> bool {
        true
    }

    /// One attempt.
    ///
    /// # Errors
    /// The device's answer; broker trouble is transient.
    pub async fn deliver(&self, req: &DeliveryRequest) -> Result<Reply, DeliverError> {
        if !self.0.link.is_connected() {
            return Err(DeliverError::Unavailable(
                "not connected to the MQTT broker".into(),
            ));
        }
        let (_guard, rx) = self.0.waiting.register(req.execution_id);
        match &self.0.aws {
            Some(aws) => aws.deliver(req, rx).await,
            None => self.deliver_plain(req, rx).await,
        }
    }

    async fn deliver_plain(
        &self,
        req: &DeliveryRequest,
        mut rx: mpsc::UnboundedReceiver<Routed>,
    ) -> Result<Reply, DeliverError> {
        let nonce = Uuid::new_v4().simple().to_string();
        let mut body = req.to_device_request(Some(self.0.reply_topic.clone()));
        body.nonce = Some(nonce.clone());
        let payload = serde_json::to_vec(&body)
            .map_err(|e| DeliverError::Permanent(format!("request not encodable: {e}")))?;
        self.0
            .link
            .publish(
                &protocol::request_topic(&self.0.prefix, &req.device_id),
                payload,
                Some((
                    self.0.reply_topic.clone(),
                    Bytes::from(req.execution_id.to_string()),
                )),
            )
            .await
            .map_err(|e| match e {
                MqttError::TooLarge { .. } => DeliverError::Permanent(e.to_string()),
                e => DeliverError::Transient(e.to_string()),
            })?;
        // A job canceled while the device works on it: the device is asked once to stop,
        // and may refuse; either way its answer ends the attempt as usual.
        let mut look = tokio::time::interval(CANCEL_LOOK);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        look.tick().await;
        let mut asked = false;
        loop {
            let payload = tokio::select! {
                p = rx.recv() => p,
                _ = look.tick(), if !asked => {
                    if self.job_stopping(req.job_id).await {
                        asked = true;
                        self.ask_to_cancel(req, &nonce).await;
                    }
                    continue;
                }
            };
            let payload = match payload {
                Some(Routed::Message(p)) => p,
                // Only the AWS IoT Jobs API concludes executions in process.
                Some(Routed::Concluded(_)) => continue,
                None => return Err(DeliverError::Transient("MQTT dispatcher stopped".into())),
            };
            // Only the device asked can answer: the reply must carry this attempt's nonce.
            let raw: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            if !protocol::answers(&raw, req.execution_id, &nonce) {
                self.0.refused.inc();
                tracing::warn!(security_event = "reply_refused", device_id = %req.device_id, execution_id = %req.execution_id, "reply without this attempt's nonce refused");
                continue;
            }
            let reply: DeviceReply = match serde_json::from_value(raw) {
                Ok(r) => r,
                Err(e) => {
                    return Err(DeliverError::Permanent(format!(
                        "device reply is not a fleetbatch reply document: {e}"
                    )));
                }
            };
            match reply_outcome(&req.spec, reply) {
                Some(outcome) => return outcome,
                None => tracing::debug!(device_id = %req.device_id, "device reports progress"),
            }
        }
    }

    /// Whether the job was canceled or aborted (as this worker's cache knows it).
    async fn job_stopping(&self, job: Uuid) -> bool {
        let mut redis = self.0.redis.clone();
        matches!(
            self.0.jobs.get(&mut redis, &self.0.names, job).await,
            Ok(Some(view)) if view.state.is_stopping()
        )
    }

    /// Asks the device to stop the attempt under way (the one whose request carried
    /// `nonce`).
    async fn ask_to_cancel(&self, req: &DeliveryRequest, nonce: &str) {
        let cancel = protocol::CancelRequest {
            execution_id: req.execution_id,
            job_id: req.job_id,
            device_id: req.device_id.clone(),
            nonce: nonce.to_owned(),
            reason: "the job was canceled".into(),
        };
        let Ok(payload) = serde_json::to_vec(&cancel) else {
            return;
        };
        let topic = protocol::cancel_topic(&self.0.prefix, &req.device_id);
        match self.0.link.publish(&topic, payload, None).await {
            Ok(()) => {
                tracing::info!(device_id = %req.device_id, job_id = %req.job_id, "device asked to stop a canceled job")
            }
            Err(e) => {
                tracing::warn!(device_id = %req.device_id, error.message = %e, "cancel request not sent; the device finishes the job")
            }
        }
    }

    /// Whether the device changed its AWS IoT Jobs execution since `version`.
    pub async fn execution_changed(&self, req: &DeliveryRequest, version: u64) -> bool {
        match &self.0.aws {
            Some(aws) => aws.changed_since(req, version).await,
            None => false,
        }
    }

    /// Device-side bookkeeping of an ending the device did not report (AWS IoT Jobs only).
    pub async fn conclude(&self, req: &DeliveryRequest, state: ExecutionState) {
        if let Some(aws) = &self.0.aws {
            aws.conclude(req, state).await;
        }
    }
}

/// Records presence announcements in arrival order (an offline followed at once by an
/// online must end online), waking the tasks of devices that come online. Redis trouble is
/// retried with a pause: a lost announcement would leave a device waiting.
async fn apply_presence(
    mut announcements: mpsc::UnboundedReceiver<(String, bool)>,
    mut redis: RedisConn,
    names: Names,
    shutdown: CancellationToken,
) {
    loop {
        let (device, online) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = announcements.recv() => match a { Some(a) => a, None => return },
        };
        loop {
            match shared::parking::announce(&mut redis, &names, &device, online, shared::now_ms())
                .await
            {
                Ok(woken) => {
                    tracing::debug!(device_id = %device, online, woken, "presence recorded");
                    break;
                }
                Err(e) => {
                    tracing::warn!(device_id = %device, error.message = %e, "presence not recorded; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}
