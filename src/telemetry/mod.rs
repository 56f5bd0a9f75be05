//! Structured logs (JSON lines for production, human-readable for a terminal) and, when an
//! OTLP endpoint is configured, OpenTelemetry traces of each delivery (`spans` makes and
//! links them; the README's "Traces" says which spans exist).

mod json_fields;
mod spans;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use spans::{HttpHeaders, client, consumer, continue_trace, otel, producer, responded, traceparent, with_trace_context};

use crate::config::LogFormat;

/// Set once by [`init`] when spans are exported. Everything only traces need (extracting and
/// injecting trace context, producer spans) checks it first, so that a relay without an
/// endpoint pays one relaxed load for tracing and nothing else.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint was configured at start-up).
pub fn enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// How long the last export on the way out may take: a collector that does not answer must
/// not hold up a stopping relay for long.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the span exporter; dropping it exports the spans still buffered, so the deliveries
/// finished during a graceful shutdown show up in their traces too.
#[must_use = "dropping it at once stops the export of spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            // The subscriber may already be going away with the process: straight to stderr.
            eprintln!("error: exporting the last spans failed: {error}");
        }
    }
}

/// Installs the global subscriber once; `RUST_LOG` filters the logs (default `default_filter`). With
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, the relay's own
/// spans at info level and above also go to the OpenTelemetry layer, whatever `RUST_LOG`
/// says: production runs `RUST_LOG=warn`, and its traces must still have every span.
///
/// lapin's own logs are off unless `RUST_LOG` names lapin: the broker supervisor reports
/// every connection failure itself, and lapin logs a returned message with its whole body
/// (a CloudEvent), which must not reach the logs.
pub fn init(format: LogFormat, default_filter: &str) -> anyhow::Result<Telemetry> {
    let provider = tracer_provider()?;
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.to_owned());
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    if !directives.contains("lapin") {
        filter = filter.add_directive("lapin=off".parse().expect("static directive"));
    }
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).with_span_list(true).fmt_fields(json_fields::JsonFields).boxed(),
        LogFormat::Pretty => logs.boxed(),
    };
    let traces = provider.as_ref().map(|provider| {
        let own_spans = Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO);
        tracing_opentelemetry::layer().with_tracer(provider.tracer(env!("CARGO_PKG_NAME"))).with_filter(own_spans)
    });
    let installed = tracing_subscriber::registry().with(logs.with_filter(filter)).with(traces).try_init().is_ok();
    EXPORTING.store(installed && provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// The OTLP exporter the standard variables describe, or `None` when no endpoint is set.
/// The exporter reads the endpoints, `OTEL_EXPORTER_OTLP_HEADERS` and the timeouts itself,
/// the SDK `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*`; the protocol is read here, because this
/// exporter version leaves that to the application.
fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
        return Ok(None);
    }
    let protocol = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL")).as_deref() {
        None | Some("http/protobuf") => Protocol::HttpBinary,
        Some("http/json") => Protocol::HttpJson,
        Some(other) => anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL: {other:?} is not supported; use http/protobuf (the default) or http/json"),
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter")?;
    // The SDK names a service `unknown_service` unless OTEL_SERVICE_NAME or
    // OTEL_RESOURCE_ATTRIBUTES name it.
    let detected = Resource::builder().build();
    let named = detected.get(&"service.name".into()).is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let resource = if named { detected } else { Resource::builder().with_service_name(env!("CARGO_PKG_NAME")).build() };
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
}
