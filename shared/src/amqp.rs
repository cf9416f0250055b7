//! RabbitMQ plumbing: connecting, confirmed publishing, and carrying W3C trace context in
//! AMQP headers.
//!
//! Owns the lapin types at the edges of the rest of the code. It never decides what to
//! publish or when to ack: that belongs to the coordinator's `planner` and `aggregate`
//! and the worker's `consume` and `report`.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::AmqpSettings;

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The client library reported an error (connection lost, channel closed, refused).
    #[error("rabbitmq operation failed")]
    Lapin(#[from] lapin::Error),
    /// The broker refused to take responsibility for a published message.
    #[error("rabbitmq nacked a publish to {exchange:?}")]
    Nacked {
        /// Exchange of the publish.
        exchange: String,
    },
    /// A mandatory message could not be routed to any queue.
    #[error("no queue is bound for a publish to {exchange:?} with key {routing_key:?}")]
    Unroutable {
        /// Exchange of the publish.
        exchange: String,
        /// Routing key of the publish.
        routing_key: String,
    },
    /// No confirm arrived in time.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// The broker ended a consumer we did not cancel (channel closed, queue deleted).
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    /// The channel is no longer connected, though its consumer has not said so yet.
    #[error("the channel is no longer connected")]
    ConnectionLost,
    /// The message could not be encoded.
    #[error("cannot encode the message")]
    Encode(#[from] crate::messages::WireError),
}

impl AmqpError {
    /// Whether the connection or channel is gone (reconnecting may help), as opposed to the
    /// broker refusing this one message.
    pub fn is_connection_error(&self) -> bool {
        match self {
            AmqpError::Lapin(e) => !e.is_amqp_soft_error(),
            AmqpError::ConfirmTimeout(_)
            | AmqpError::ConsumerCancelled
            | AmqpError::ConnectionLost => true,
            AmqpError::Nacked { .. } | AmqpError::Unroutable { .. } | AmqpError::Encode(_) => false,
        }
    }
}

/// Opens a connection named after the process, so `rabbitmqctl list_connections` tells the
/// processes apart.
///
/// # Errors
/// The broker is unreachable or refuses the credentials.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    let mut last = None;
    for url in std::iter::once(&settings.url).chain(&settings.fallback_urls) {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect(url, props).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if !settings.fallback_urls.is_empty() {
                    tracing::warn!(broker = %crate::config::redact_url(url), error.message = %e, "broker node unreachable; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.map_or(AmqpError::ConnectionLost, AmqpError::from))
}

/// A channel in confirm mode: every publish is confirmed by the broker before it counts.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

/// One message to publish.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Exchange ("" for the default exchange).
    pub exchange: &'a str,
    /// Routing key (the queue name on the default exchange).
    pub routing_key: &'a str,
    /// Body.
    pub payload: &'a [u8],
    /// Properties, headers included.
    pub properties: BasicProperties,
}

impl Publisher {
    /// Opens a channel on `connection` and switches it to confirm mode.
    ///
    /// # Errors
    /// The channel could not be opened.
    pub async fn new(connection: &Connection, settings: &AmqpSettings) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            confirm_timeout: Duration::from_secs(settings.confirm_timeout_secs),
        })
    }

    /// The underlying channel (for declarations).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends a mandatory, persistent message and returns the pending confirm, so callers can
    /// pipeline many publishes and await their confirms together.
    ///
    /// # Errors
    /// The channel is closed.
    pub async fn send(&self, msg: Outgoing<'_>) -> Result<PendingConfirm, AmqpError> {
        let confirm = self
            .channel
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                msg.payload,
                msg.properties.with_delivery_mode(2),
            )
            .await?;
        Ok(PendingConfirm {
            confirm,
            exchange: msg.exchange.to_owned(),
            routing_key: msg.routing_key.to_owned(),
            timeout: self.confirm_timeout,
        })
    }

    /// Sends a message and waits until the broker has taken responsibility for it.
    ///
    /// # Errors
    /// The channel is closed, the broker nacks, the message is unroutable, or no confirm comes
    /// in time.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), AmqpError> {
        self.send(msg).await?.wait().await
    }
}

/// A publish whose confirm has not been awaited yet.
#[derive(Debug)]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
    timeout: Duration,
}

impl PendingConfirm {
    /// Waits for the broker's confirm.
    ///
    /// # Errors
    /// Nack, unroutable (a mandatory message came back), timeout, or a closed channel.
    pub async fn wait(self) -> Result<(), AmqpError> {
        let confirmation = tokio::time::timeout(self.timeout, self.confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.timeout))??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable {
                exchange: self.exchange,
                routing_key: self.routing_key,
            }),
            Confirmation::Nack(_) => Err(AmqpError::Nacked {
                exchange: self.exchange,
            }),
        }
    }
}

/// Properties of a fleetbatch message: MessagePack, typed, with a message id.
pub fn properties(message_type: &str, message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(crate::messages::CONTENT_TYPE.into())
        .with_type(message_type.into())
        .with_message_id(message_id.into())
        .with_timestamp(crate::now_ms() / 1000)
        .with_headers(headers)
}

/// Inserts a string header.
pub fn set_header(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

/// Reads a string header, if present and textual.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Writes W3C trace-context headers (`traceparent`, `tracestate`) into an AMQP header table.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        set_header(self.0, key, &value);
    }
}

/// Reads W3C trace-context headers from an AMQP header table.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Injects the current span's context into `headers`.
pub fn inject_current_context(headers: &mut FieldTable) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Extracts the remote context carried in `headers` (an empty context when there is none).
pub fn extract_context(headers: Option<&FieldTable>) -> opentelemetry::Context {
    match headers {
        Some(h) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)))
        }
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace context carried in `headers` (the consumer side of
/// propagation). Messages without trace context leave the span a root.
pub fn continue_trace(span: &tracing::Span, headers: Option<&FieldTable>) {
    let cx = extract_context(headers);
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error.message = %e, "span parent not set");
    }
}

/// Links `span` to the trace context carried in `headers`, leaving `span` the root of a trace
/// of its own. Device tasks use this: a job of a million devices would otherwise be one
/// unusable trace of a million spans; instead each task is its own small trace, linked to
/// the job's.
pub fn link_trace(span: &tracing::Span, headers: Option<&FieldTable>) {
    use opentelemetry::trace::TraceContextExt;
    let cx = extract_context(headers);
    let remote = cx.span().span_context().clone();
    if remote.is_valid() {
        span.add_link(remote);
    }
}

/// The current span's context as a W3C `traceparent` value (to store with a job, so work
/// done later for it joins the trace of the request that created it).
pub fn current_traceparent() -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Makes `span` a child of a stored `traceparent`.
pub fn continue_traceparent(span: &tracing::Span, traceparent: &str) {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error.message = %e, "span parent not set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    #[test]
    fn trace_context_survives_a_trip_through_amqp_headers() {
        let propagator = TraceContextPropagator::new();
        let sc = SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut headers = FieldTable::default();
        propagator.inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert!(header_str(Some(&headers), "traceparent").is_some());
        let back = propagator.extract(&HeaderExtractor(&headers));
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
    }
}
