//! One MQTT connection (3.1.1 or 5, optionally TLS), behind one small interface.
//!
//! Owns the rumqttc client and its event loop: connecting with the configured credentials and
//! certificates, subscribing again after every (re)connection, and handing incoming messages
//! to the caller over a channel. The event loop reconnects by itself with exponential
//! backoff and stops on the shutdown token. It never interprets payloads.

use std::time::Duration;

use backoff::{ExponentialBackoff, backoff::Backoff};
use bytes::Bytes;
use rumqttc::{QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use shared::config::{MqttSettings, MqttVersion};

/// An MQTT failure.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The URL is not `mqtt[s]://host[:port]`.
    #[error("worker.mqtt.url {0:?} is not mqtt://host[:port] or mqtts://host[:port]")]
    Url(String),
    /// A certificate or key file could not be read.
    #[error("reading {field} {path:?}")]
    File {
        /// The setting naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client's request queue is closed (its event loop stopped).
    #[error("MQTT client stopped: {0}")]
    Client(String),
    /// A payload above the configured limit.
    #[error("payload of {size} bytes exceeds max_payload_bytes ({limit})")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// A message received.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// MQTT 5 response topic, if the sender set one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, if the sender set it.
    pub correlation: Option<Bytes>,
}

#[derive(Debug, Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connected client; cheap to clone.
#[derive(Debug, Clone)]
pub struct Link {
    client: Client,
    max_payload: usize,
    connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `(host, port, tls)` of an `mqtt://` or `mqtts://` URL (parsed by the `url` crate; a path,
/// query or credentials in the URL are refused: credentials are settings of their own).
fn parse_url(raw: &str) -> Result<(String, u16, bool), MqttError> {
    let bad = || MqttError::Url(raw.to_owned());
    let url = url::Url::parse(raw).map_err(|_| bad())?;
    let tls = match url.scheme() {
        "mqtts" => true,
        "mqtt" => false,
        _ => return Err(bad()),
    };
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || !matches!(url.path(), "" | "/")
    {
        return Err(bad());
    }
    let host = match url.host().ok_or_else(bad)? {
        url::Host::Domain(d) if !d.is_empty() => d.to_owned(),
        url::Host::Domain(_) => return Err(bad()),
        url::Host::Ipv4(a) => a.to_string(),
        url::Host::Ipv6(a) => a.to_string(),
    };
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok((host, port, tls))
}

fn read(field: &'static str, path: &Option<String>) -> Result<Option<Vec<u8>>, MqttError> {
    path.as_ref()
        .map(|p| {
            std::fs::read(p).map_err(|source| MqttError::File {
                field,
                path: p.clone(),
                source,
            })
        })
        .transpose()
}

fn transport(settings: &MqttSettings, tls: bool) -> Result<Transport, MqttError> {
    if !tls {
        return Ok(Transport::tcp());
    }
    let ca = read("worker.mqtt.ca_file", &settings.ca_file)?;
    let cert = read("worker.mqtt.client_cert_file", &settings.client_cert_file)?;
    let key = read("worker.mqtt.client_key_file", &settings.client_key_file)?;
    Ok(match ca {
        Some(ca) => Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: cert.zip(key),
        }),
        // The system's roots.
        None => Transport::tls_with_config(TlsConfiguration::default()),
    })
}

/// QoS 1 filters made anew for each (re)subscription rather than kept for the life of the
/// connection: a client playing a large fleet names each device's topics, hundreds of bytes
/// a device.
#[derive(Clone)]
pub struct MadeFilters(pub std::sync::Arc<dyn Fn() -> Vec<String> + Send + Sync>);

impl std::fmt::Debug for MadeFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MadeFilters(..)")
    }
}

/// Topic filters to subscribe to.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    /// At QoS 1: requests and replies (the broker holds them for a slow reader, up to its
    /// queue limit).
    pub at_least_once: Vec<String>,
    /// At QoS 0: streams that are re-sent as retained messages on every (re)subscription
    /// (presence). A burst of them to a slow reader is not held against the broker's per-
    /// client queue limit (Mosquitto's `max_queued_messages`), which drops QoS 1 messages
    /// beyond it.
    pub at_most_once: Vec<String>,
    /// More filters at QoS 1, made at each subscription.
    pub made: Option<MadeFilters>,
}

impl From<Vec<String>> for Subscriptions {
    fn from(at_least_once: Vec<String>) -> Self {
        Self {
            at_least_once,
            ..Self::default()
        }
    }
}

impl Subscriptions {
    fn is_empty(&self) -> bool {
        self.at_least_once.is_empty() && self.at_most_once.is_empty() && self.made.is_none()
    }

    /// Every filter, made by `make(filter, at_least_once)`, in groups of at most
    /// [`SUBSCRIBE_CHUNK`] (one SUBSCRIBE packet each).
    fn chunks<F>(&self, make: impl Fn(String, bool) -> F) -> Vec<Vec<F>> {
        let made = self.made.as_ref().map(|m| (m.0)()).unwrap_or_default();
        let mut all = self
            .at_least_once
            .iter()
            .map(|f| make(f.clone(), true))
            .chain(made.into_iter().map(|f| make(f, true)))
            .chain(self.at_most_once.iter().map(|f| make(f.clone(), false)))
            .peekable();
        let mut chunks = Vec::new();
        while all.peek().is_some() {
            chunks.push(all.by_ref().take(SUBSCRIBE_CHUNK).collect());
        }
        chunks
    }
}

/// QoS 1 publishes a connection has awaiting the broker's acknowledgement at most.
const INFLIGHT: u16 = 1000;

/// Connects as `client_id` and keeps `subscriptions` across reconnections. Incoming
/// messages arrive on the returned channel, which applies back-pressure to the broker
/// connection when its reader falls behind. The event loop ends when `shutdown` fires or
/// the receiver is dropped.
///
/// # Errors
/// A bad URL or unreadable certificate files. Connection failures are not errors: the event
/// loop retries them until shutdown.
pub fn connect(
    settings: &MqttSettings,
    client_id: &str,
    subscriptions: impl Into<Subscriptions>,
    shutdown: CancellationToken,
) -> Result<(Link, mpsc::Receiver<Message>), MqttError> {
    let subscriptions = subscriptions.into();
    let (host, port, tls) = parse_url(&settings.url)?;
    let transport = transport(settings, tls)?;
    let keep_alive = Duration::from_secs(settings.keep_alive_secs.max(1));
    // The broker connection accepts packets well above the payload limit, so one oversized
    // device message is refused on its own instead of failing the whole connection.
    let packet = settings.max_payload_bytes.saturating_mul(16).max(1 << 20);
    let limit = settings.max_payload_bytes;
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel(4096);
    let client = match settings.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, host, port);
            o.set_keep_alive(keep_alive)
                .set_transport(transport)
                .set_max_packet_size(packet, packet)
                .set_inflight(INFLIGHT)
                .set_clean_session(true);
            if let Some(u) = &settings.username {
                o.set_credentials(u, password(settings));
            }
            let (client, events) = rumqttc::AsyncClient::new(o, 4096);
            let inbox = Inbox {
                tx,
                limit,
                connected: connected.clone(),
            };
            tokio::spawn(run(
                V4Session {
                    events,
                    client: client.clone(),
                },
                subscriptions,
                inbox,
                shutdown,
            ));
            Client::V4(client)
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
            // The client keeps a slot for every publish the broker lets it have in flight,
            // made up front: without a limit 65,536 of them, about 14 MB a connection.
            o.set_keep_alive(keep_alive)
                .set_transport(transport)
                .set_max_packet_size(Some(packet as u32))
                .set_outgoing_inflight_upper_limit(INFLIGHT)
                .set_clean_start(true);
            if let Some(u) = &settings.username {
                o.set_credentials(u, password(settings));
            }
            let (client, events) = rumqttc::v5::AsyncClient::new(o, 4096);
            let inbox = Inbox {
                tx,
                limit,
                connected: connected.clone(),
            };
            tokio::spawn(run(
                V5Session {
                    events,
                    client: client.clone(),
                },
                subscriptions,
                inbox,
                shutdown,
            ));
            Client::V5(client)
        }
    };
    Ok((
        Link {
            client,
            max_payload: settings.max_payload_bytes,
            connected,
        },
        rx,
    ))
}

/// Where incoming messages go, with the size limit applied.
struct Inbox {
    tx: mpsc::Sender<Message>,
    limit: usize,
    connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Inbox {
    /// Hands `m` to the reader, or refuses it when oversized. False when the reader is gone.
    async fn deliver(&self, m: Message) -> bool {
        if m.payload.len() > self.limit {
            tracing::warn!(topic = %m.topic, size = m.payload.len(), limit = self.limit, "oversized MQTT message refused");
            return true;
        }
        self.tx.send(m).await.is_ok()
    }

    fn set_connected(&self, up: bool) {
        self.connected
            .store(up, std::sync::atomic::Ordering::Relaxed);
    }
}

/// After a connection error: logs it and waits the next delay of `delays` (100 ms doubling
/// to 5 s, with jitter) before the event loop reconnects. False when shutdown came first.
async fn pause_after_error(
    error: String,
    delays: &mut ExponentialBackoff,
    shutdown: &CancellationToken,
) -> bool {
    let delay = delays.next_backoff().unwrap_or(delays.max_interval);
    tracing::warn!(error.message = %error, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost");
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// What one poll of a connection's event loop came to, whatever the MQTT version.
enum Happened {
    /// The broker accepted the (re)connection.
    Connected,
    /// A message arrived.
    Received(Message),
    /// Anything else (acks, pings).
    Nothing,
    /// The connection failed; the next poll reconnects.
    Failed(String),
}

/// One MQTT version's client and event loop, seen through [`Happened`].
trait Session: Send + 'static {
    /// The next event.
    fn next(&mut self) -> impl std::future::Future<Output = Happened> + Send;
    /// Subscribes to `filters` at their QoS, without waiting.
    fn subscribe(&self, filters: &Subscriptions) -> Result<(), String>;
    /// Disconnects, without waiting.
    fn disconnect(&self);
}

/// Filters in one SUBSCRIBE packet at most: a client playing many devices subscribes to
/// thousands, which must not make one packet larger than the broker or the client accepts.
const SUBSCRIBE_CHUNK: usize = 500;

struct V4Session {
    events: rumqttc::EventLoop,
    client: rumqttc::AsyncClient,
}

impl Session for V4Session {
    async fn next(&mut self) -> Happened {
        use rumqttc::{Event, Packet};
        match self.events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Happened::Connected,
            Ok(Event::Incoming(Packet::Publish(p))) => Happened::Received(Message {
                topic: p.topic,
                payload: p.payload,
                response_topic: None,
                correlation: None,
            }),
            Ok(_) => Happened::Nothing,
            Err(e) => Happened::Failed(e.to_string()),
        }
    }

    fn subscribe(&self, filters: &Subscriptions) -> Result<(), String> {
        let qos = |once| {
            if once {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            }
        };
        for chunk in filters.chunks(|f, once| rumqttc::SubscribeFilter::new(f, qos(once))) {
            self.client
                .try_subscribe_many(chunk)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn disconnect(&self) {
        let _ = self.client.try_disconnect();
    }
}

struct V5Session {
    events: rumqttc::v5::EventLoop,
    client: rumqttc::v5::AsyncClient,
}

impl Session for V5Session {
    async fn next(&mut self) -> Happened {
        use rumqttc::v5::{Event, mqttbytes::v5::Packet};
        match self.events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Happened::Connected,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let (response_topic, correlation) = p
                    .properties
                    .map(|props| (props.response_topic, props.correlation_data))
                    .unwrap_or_default();
                Happened::Received(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    response_topic,
                    correlation,
                })
            }
            Ok(_) => Happened::Nothing,
            Err(e) => Happened::Failed(e.to_string()),
        }
    }

    fn subscribe(&self, filters: &Subscriptions) -> Result<(), String> {
        use rumqttc::v5::mqttbytes::{QoS, v5::Filter};
        let qos = |once| {
            if once {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            }
        };
        for chunk in filters.chunks(|f, once| Filter::new(f, qos(once))) {
            self.client
                .try_subscribe_many(chunk)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn disconnect(&self) {
        let _ = self.client.try_disconnect();
    }
}

/// The event loop of one connection: subscribes again after every (re)connection, hands
/// messages to `inbox`, and backs off after failures until `shutdown`.
async fn run<S: Session>(
    mut session: S,
    subscriptions: Subscriptions,
    inbox: Inbox,
    shutdown: CancellationToken,
) {
    let mut delays = shared::backoff::outage(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let happened = tokio::select! {
            _ = shutdown.cancelled() => break,
            h = session.next() => h,
        };
        match happened {
            Happened::Connected => {
                delays.reset();
                inbox.set_connected(true);
                tracing::info!("MQTT connected");
                if !subscriptions.is_empty()
                    && let Err(e) = session.subscribe(&subscriptions)
                {
                    tracing::warn!(error.message = %e, "MQTT subscribe failed");
                }
            }
            Happened::Received(m) => {
                if !inbox.deliver(m).await {
                    break;
                }
            }
            Happened::Nothing => {}
            Happened::Failed(e) => {
                inbox.set_connected(false);
                if !pause_after_error(e, &mut delays, &shutdown).await {
                    break;
                }
            }
        }
    }
    session.disconnect();
}

impl Link {
    /// Publishes at QoS 1. With MQTT 5, `reply` sets the response topic and correlation data
    /// (3.1.1 has no such properties; the payload must carry them).
    ///
    /// # Errors
    /// An oversized payload, or a stopped client.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        reply: Option<(String, Bytes)>,
    ) -> Result<(), MqttError> {
        if payload.len() > self.max_payload {
            return Err(MqttError::TooLarge {
                size: payload.len(),
                limit: self.max_payload,
            });
        }
        match &self.client {
            Client::V4(c) => c
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
            Client::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                match reply {
                    Some((response_topic, correlation)) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                            response_topic: Some(response_topic),
                            correlation_data: Some(correlation),
                            content_type: Some("application/json".into()),
                            ..Default::default()
                        };
                        c.publish_with_properties(topic, qos, false, payload, props)
                            .await
                    }
                    None => c.publish(topic, qos, false, payload).await,
                }
                .map_err(|e| MqttError::Client(e.to_string()))
            }
        }
    }

    /// Publishes a retained message at QoS 1 (presence announcements); an empty payload
    /// clears the topic's retained message.
    ///
    /// # Errors
    /// A stopped client.
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), MqttError> {
        match &self.client {
            Client::V4(c) => c
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
            Client::V5(c) => c
                .publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    payload,
                )
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
        }
    }

    /// Whether the connection to the broker is up now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Largest payload this link sends or accepts.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// The broker password, for the one call that sends it.
fn password(settings: &MqttSettings) -> String {
    settings
        .password
        .as_ref()
        .map(|p| p.expose().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").expect("url"),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_url("mqtts://broker.example").expect("url"),
            ("broker.example".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1883").expect("url"),
            ("::1".into(), 1883, false)
        );
        assert!(parse_url("tcp://x").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://host:99999").is_err());
        assert!(parse_url("mqtt://user:pw@host").is_err());
    }

    #[test]
    fn made_filters_are_subscribed_at_least_once_in_packets_of_bounded_size() {
        let subs = Subscriptions {
            at_least_once: vec!["a".into()],
            at_most_once: vec!["p/+".into()],
            made: Some(MadeFilters(std::sync::Arc::new(|| {
                (0..1000).map(|i| format!("t/{i}")).collect()
            }))),
        };
        assert!(!subs.is_empty());
        let chunks = subs.chunks(|f, once| (f, once));
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            [SUBSCRIBE_CHUNK, SUBSCRIBE_CHUNK, 1002 - 2 * SUBSCRIBE_CHUNK]
        );
        let all: Vec<(String, bool)> = chunks.into_iter().flatten().collect();
        assert_eq!(all[0], ("a".to_owned(), true));
        assert_eq!(all[1000], ("t/999".to_owned(), true));
        assert_eq!(all[1001], ("p/+".to_owned(), false));
    }
}
