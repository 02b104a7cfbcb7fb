//! Logging: `tracing` to stderr, readable text or JSON lines, filtered by
//! RUST_LOG (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use super::cli::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files or collectors.
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
