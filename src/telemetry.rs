//! Structured logs: JSON lines for production, human-readable for a terminal.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber once; `RUST_LOG` filters (default `info`).
///
/// lapin's own logs are off unless `RUST_LOG` names lapin: the broker supervisor reports
/// every connection failure itself, and lapin logs a returned message with its whole body
/// (a CloudEvent), which must not reach the logs.
pub fn init(format: LogFormat) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    if !directives.contains("lapin") {
        filter = filter.add_directive("lapin=off".parse().expect("static directive"));
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
