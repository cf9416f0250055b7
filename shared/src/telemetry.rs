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
    /// An `OTEL_EXPORTER_OTLP_*PROTOCOL` variable names a protocol this build does not speak.
    #[error("{variable}={value:?}: OTLP protocol not supported (use grpc or http/protobuf)")]
    Protocol {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
    },
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

    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (otel, provider) = match Export::resolve(settings, env)? {
        Some(export) => {
            // An endpoint from the environment is left to the exporter, which reads the
            // standard variables itself (a traces endpoint as is, a base endpoint plus
            // `/v1/traces` for HTTP).
            let exporter = match (export.protocol, export.endpoint) {
                (OtlpProtocol::Grpc, endpoint) => {
                    let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                    match endpoint {
                        Some(e) => b.with_endpoint(e).build()?,
                        None => b.build()?,
                    }
                }
                (OtlpProtocol::Http, endpoint) => {
                    let b = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary);
                    match endpoint {
                        Some(e) => b
                            .with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')))
                            .build()?,
                        None => b.build()?,
                    }
                }
            };
            // The builder's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
            // the service's own name applies only when the operator named none.
            let mut resource = Resource::builder();
            if env("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name(service);
            }
            let resource = resource
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

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Export {
    /// The configured endpoint; `None` when it comes from the standard variables, which the
    /// exporter reads itself.
    endpoint: Option<String>,
    protocol: OtlpProtocol,
}

impl Export {
    /// Settings first, then the standard OpenTelemetry variables (`env` looks one up).
    /// `None`: no endpoint anywhere, nothing to export.
    fn resolve(
        settings: &TelemetrySettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let configured = settings.otlp_endpoint.clone().filter(|e| !e.is_empty());
        let from_env = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_some();
        if configured.is_none() && !from_env {
            return Ok(None);
        }
        let protocol = match settings.otlp_protocol {
            Some(p) => p,
            None => {
                let var = [
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                ]
                .into_iter()
                .find_map(|k| env(k).map(|v| (k, v)));
                match var {
                    None => OtlpProtocol::Grpc,
                    Some((_, v)) if v == "grpc" => OtlpProtocol::Grpc,
                    Some((_, v)) if v == "http/protobuf" => OtlpProtocol::Http,
                    Some((variable, value)) => {
                        return Err(TelemetryError::Protocol { variable, value });
                    }
                }
            }
        };
        Ok(Some(Self {
            endpoint: configured,
            protocol,
        }))
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(endpoint: Option<&str>, protocol: Option<OtlpProtocol>) -> TelemetrySettings {
        TelemetrySettings {
            log_filter: "info".into(),
            log_format: LogFormat::Compact,
            otlp_endpoint: endpoint.map(Into::into),
            otlp_protocol: protocol,
        }
    }

    fn resolve(
        s: &TelemetrySettings,
        vars: &[(&str, &str)],
    ) -> Result<Option<Export>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Export::resolve(s, |k| vars.get(k).cloned())
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let r = resolve(
            &settings(None, None),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        );
        assert_eq!(r.expect("resolves"), None);
    }

    #[test]
    fn the_standard_protocol_variables_choose_http_or_grpc() {
        let env_endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let http = resolve(
            &settings(None, None),
            &[
                env_endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .expect("resolves")
        .expect("exports");
        assert_eq!(http.protocol, OtlpProtocol::Http);
        assert_eq!(
            http.endpoint, None,
            "the exporter reads the variable itself"
        );
        let traces = resolve(
            &settings(None, None),
            &[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://c:4318/v1/traces",
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ],
        )
        .expect("resolves")
        .expect("exports");
        assert_eq!(
            traces.protocol,
            OtlpProtocol::Http,
            "the traces variable wins"
        );
        let grpc = resolve(&settings(None, None), &[env_endpoint])
            .expect("resolves")
            .expect("exports");
        assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn settings_win_over_the_standard_variables() {
        let e = resolve(
            &settings(Some("http://jaeger:4317"), Some(OtlpProtocol::Grpc)),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
        )
        .expect("resolves")
        .expect("exports");
        assert_eq!(e.protocol, OtlpProtocol::Grpc);
        assert_eq!(e.endpoint.as_deref(), Some("http://jaeger:4317"));
    }

    #[test]
    fn an_unsupported_protocol_is_an_error_naming_the_variable() {
        let err = resolve(
            &settings(Some("http://c:4318"), None),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
        )
        .expect_err("refused");
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{err}"
        );
    }

    #[test]
    fn cause_chains_join_every_source() {
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain(e.as_ref()), "outer: middle: inner");
    }
}
