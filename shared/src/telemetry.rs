//! Logs and traces, set up in one place.
//!
//! [`init`] installs the global subscriber: an `EnvFilter` (`RUST_LOG`, else the configured
//! filter), a fmt layer (JSON for log shippers, compact or pretty for people), and, when an
//! OTLP endpoint is configured, an OpenTelemetry layer exporting spans in batches with the
//! service's name, version and instance in the resource. The W3C propagator is installed
//! globally so trace context crosses the broker in AMQP headers (see [`crate::amqp`]).
//! Nothing else in the code base touches subscriber or exporter setup.

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, OtlpProtocol, TelemetrySettings};

/// Keeps the trace exporter alive; dropping it flushes and shuts the exporter down. Hold it in
/// `main` until after graceful shutdown so the last spans are exported.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown failed: {e}");
        }
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs logging and (when configured) trace export for a service.
///
/// `instance` tells processes of one service apart (e.g. the worker id).
///
/// # Errors
/// A bad filter, an unbuildable exporter, or a subscriber already installed.
pub fn init(
    service: &'static str,
    instance: &str,
    settings: &TelemetrySettings,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(&settings.log_filter)?,
    };
    let fmt = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .pretty()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Compact => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let endpoint = settings
        .otlp_endpoint
        .clone()
        .filter(|e| !e.is_empty())
        .or_else(|| {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
        });
    let (otel, provider) = match endpoint {
        Some(endpoint) => {
            let exporter = match settings.otlp_protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()?,
                OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                    .build()?,
            };
            let resource = Resource::builder()
                .with_service_name(service)
                .with_attributes([
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                    KeyValue::new("service.instance.id", instance.to_owned()),
                ])
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer(service);
            opentelemetry::global::set_tracer_provider(provider.clone());
            // The exporter's own HTTP/gRPC stack must not trace itself.
            let otel_filter = EnvFilter::new(
                "info,lapin=off,h2=off,tonic=off,hyper=off,hyper_util=off,tower=off,reqwest=off",
            );
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(otel_filter);
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };

    tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// Records the span's OpenTelemetry trace id in its `trace_id` field (declared `Empty`), so
/// log lines inside it carry the id to look up in Jaeger. Does nothing when traces are not
/// exported.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// An error and its sources, outermost first, joined by `: ` (the `error.cause_chain` field of
/// log events). Never a backtrace: set `RUST_BACKTRACE` and read the panic output for those.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
