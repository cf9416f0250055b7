//! The dead-letter queue, for operators: look at what was dead-lettered and why, and put
//! messages back once their cause is repaired.
//!
//! Owns reading and replaying `<ns>.dead`. Listing takes messages without acking them and
//! hands them all back, so nothing is lost by looking. Replaying publishes a message to the
//! queue it came from (confirmed) before acking it in the dead-letter queue; a message that
//! is still bad simply comes back with a fresh reason. It never decides whether a message is
//! good.

use lapin::{
    BasicProperties, Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::{Deserialize, Serialize};
use shared::{
    amqp::{self, AmqpError, Outgoing, Publisher},
    messages,
    topology::{HEADER_DEAD_REASON, HEADER_DEAD_SOURCE, Names},
};

/// One dead-lettered message, as listed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The message id (for tasks and results, the execution id).
    pub message_id: Option<String>,
    /// AMQP type.
    pub message_type: Option<String>,
    /// Queue it was taken from.
    pub source_queue: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// Body size in bytes.
    pub size: usize,
    /// The body decoded as a task (an array of tasks for a batch) or a result, when it
    /// decodes.
    pub decoded: Option<serde_json::Value>,
    /// The first bytes of the body, hex, when it does not decode.
    pub head_hex: Option<String>,
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
    let p = &m.delivery.properties;
    let headers = p.headers().as_ref();
    let data = &m.delivery.data;
    let decoded = messages::decode_tasks(data)
        .ok()
        .and_then(|t| match t.as_slice() {
            [one] => serde_json::to_value(one).ok(),
            _ => serde_json::to_value(t).ok(),
        })
        .or_else(|| {
            messages::decode_result(data)
                .ok()
                .and_then(|r| serde_json::to_value(r).ok())
        });
    DeadLetter {
        message_id: p.message_id().as_ref().map(|s| s.to_string()),
        message_type: p.kind().as_ref().map(|s| s.to_string()),
        source_queue: source_queue(headers),
        reason: reason(headers),
        size: data.len(),
        head_hex: decoded.is_none().then(|| {
            data.iter()
                .take(64)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        }),
        decoded,
    }
}

/// The queue a dead-lettered message came from: the header a fleetbatch process set, else
/// RabbitMQ's own `x-death`.
pub(crate) fn source_queue(headers: Option<&FieldTable>) -> Option<String> {
    amqp::header_str(headers, HEADER_DEAD_SOURCE).or_else(|| x_death_queue(headers))
}

/// Why a message was dead-lettered.
pub(crate) fn reason(headers: Option<&FieldTable>) -> Option<String> {
    amqp::header_str(headers, HEADER_DEAD_REASON).or_else(|| {
        let q = x_death(headers, "queue")?;
        Some(match x_death(headers, "reason").as_deref() {
            Some("delivery_limit") => format!(
                "poison: delivered to consumers of {q} up to the queue's delivery limit, never acked"
            ),
            Some("expired") => format!("expired in {q}"),
            Some("maxlen") => format!("{q} was full"),
            _ => format!("rejected by a consumer of {q}"),
        })
    })
}

/// A field of the latest entry of RabbitMQ's own `x-death` header (messages the broker
/// dead-lettered: a reject, a delivery limit, an expiry).
fn x_death(headers: Option<&FieldTable>, field: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    amqp::header_str(Some(first), field)
}

/// The queue named in RabbitMQ's own `x-death` header.
fn x_death_queue(headers: Option<&FieldTable>) -> Option<String> {
    x_death(headers, "queue")
}

/// Lists up to `limit` dead-lettered messages without removing them.
///
/// # Errors
/// Broker errors.
pub async fn list(
    connection: &Connection,
    names: &Names,
    limit: usize,
) -> Result<Vec<DeadLetter>, AmqpError> {
    let channel = connection.create_channel().await?;
    let mut out = Vec::new();
    let mut last_tag = None;
    while out.len() < limit {
        let Some(m) = channel
            .basic_get(names.dead_queue().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        last_tag = Some(m.delivery.delivery_tag);
        out.push(describe(&m));
    }
    if let Some(tag) = last_tag {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = channel.close(200, "listed".into()).await;
    Ok(out)
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct ReplayRequest {
    /// Only messages with these ids (all when absent).
    #[serde(default)]
    pub message_ids: Option<Vec<String>>,
    /// Only messages that decode now (a repaired consumer or a created job may accept them).
    #[serde(default)]
    pub only_decodable: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ReplayReport {
    /// Messages put back on their source queue.
    pub replayed: u64,
    /// Messages left in the dead-letter queue.
    pub kept: u64,
}

/// Puts the selected dead letters back on the queues they came from.
///
/// # Errors
/// Broker errors; messages not yet replayed stay in the dead-letter queue.
pub async fn replay(
    connection: &Connection,
    publisher: &Publisher,
    names: &Names,
    request: &ReplayRequest,
) -> Result<ReplayReport, AmqpError> {
    let channel = connection.create_channel().await?;
    // Only the messages present now: kept ones are handed back at the end, not looped over.
    let queue = channel
        .queue_declare(
            names.dead_queue().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut report = ReplayReport::default();
    let mut keep_tags = Vec::new();
    for _ in 0..queue.message_count() {
        let Some(m) = channel
            .basic_get(names.dead_queue().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let d = describe(&m);
        let wanted = request
            .message_ids
            .as_ref()
            .is_none_or(|ids| d.message_id.as_ref().is_some_and(|id| ids.contains(id)))
            && (!request.only_decodable || d.decoded.is_some());
        let Some(source) = d.source_queue.filter(|_| wanted) else {
            keep_tags.push(m.delivery.delivery_tag);
            report.kept += 1;
            continue;
        };
        let mut headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let cleaned: std::collections::BTreeMap<_, _> = headers
            .inner()
            .iter()
            .filter(|(k, _)| {
                let k = k.as_str();
                k != HEADER_DEAD_REASON && k != HEADER_DEAD_SOURCE && k != "x-death"
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers = FieldTable::from(cleaned);
        let props: BasicProperties = m.delivery.properties.clone().with_headers(headers);
        publisher
            .publish(Outgoing {
                exchange: "",
                routing_key: &source,
                payload: &m.delivery.data,
                properties: props,
            })
            .await?;
        channel
            .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        report.replayed += 1;
    }
    for tag in keep_tags {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = channel.close(200, "replayed".into()).await;
    tracing::info!(
        replayed = report.replayed,
        kept = report.kept,
        "dead letters replayed"
    );
    Ok(report)
}
