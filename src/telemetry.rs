//! Logging and traces.
//!
//! Logs: `tracing` to stderr, readable text or JSON lines, filtered by
//! RUST_LOG (default `info`).
//!
//! Traces: only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g.
//! `http://otel-collector:4318`), spans are exported over OTLP, HTTP and
//! protobuf (`/v1/traces`; the exporter's other `OTEL_*` variables apply,
//! such as `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_BSP_SCHEDULE_DELAY`): the
//! worker's `batch` span (one transaction of one partition) and one `message`
//! span per message, whose parent is the inbound `traceparent`/`tracestate`
//! (linked to its batch), or its batch when it has none. Nothing else is
//! exported, whatever RUST_LOG says. When the variable is not set, no layer
//! is installed and no message span is made: traces cost nothing.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::any::TypeId;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::adapters::inbound::{InboundMessage, MessageContext};

/// The variable that turns traces on.
pub(crate) const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether spans are exported; read on every batch, so a plain flag.
static TRACES: AtomicBool = AtomicBool::new(false);

/// True when spans are exported.
pub(crate) fn traces_enabled() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// What must outlive the program's work: the span exporter, flushed by
/// [`Telemetry::shutdown`].
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered, waiting at most 3 s: an
    /// unreachable collector must not hold up the exit. Call outside the async
    /// runtime (the exporter's HTTP client blocks).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown_with_timeout(std::time::Duration::from_secs(3)) {
                eprintln!("warning: exporting the last spans failed: {error}");
            }
        }
    }
}

/// How log lines are written: `--log-format` / `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs logging, and traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// Must run before the async runtime starts (the exporter's HTTP client
/// has a runtime of its own). An exporter that cannot be built (a bad
/// endpoint) is a bad setting: one line, for exit code 2.
pub fn init(format: LogFormat) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files or collectors.
    let ansi = std::io::stderr().is_terminal();
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let endpoint = std::env::var(OTLP_ENDPOINT_VAR)
        .ok()
        .filter(|e| !e.trim().is_empty());
    let provider = match endpoint {
        None => None,
        Some(_) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .map_err(|e| format!("invalid setting {OTLP_ENDPOINT_VAR}: {e}"))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name("allocation-worker")
                            .build(),
                    )
                    .build(),
            )
        }
    };
    let traces = provider.as_ref().map(|provider| Traced {
        inner: tracing_opentelemetry::layer().with_tracer(provider.tracer("allocation-worker")),
    });
    // try_init: a second call (tests) keeps the first subscriber.
    // One global filter, RUST_LOG, and no per-layer filter: the traces layer
    // picks its spans itself (see `Traced`).
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    TRACES.store(installed && provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// The spans exported: the worker's batches and messages.
fn is_traced(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span()
        && meta.target().starts_with("allocation_worker")
        && matches!(meta.name(), "batch" | "message")
}

/// The OpenTelemetry layer, shown only the spans [`is_traced`] picks and no
/// event (a span event per log line would cost for nothing). Not a per-layer
/// filter: with one, the first batch span of a thread was at times left out
/// (a verdict left over from an event no layer wanted).
struct Traced<L> {
    inner: L,
}

impl<S, L> Layer<S> for Traced<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if is_traced(attrs.metadata()) {
            self.inner.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.inner.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) && traced(follows, &ctx) {
            self.inner.on_follows_from(id, follows, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.inner.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.inner.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if traced(&id, &ctx) {
            self.inner.on_close(id, ctx);
        }
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        if traced(old, &ctx) {
            self.inner.on_id_change(old, new, ctx);
        }
    }

    // `Span::context()` finds the OpenTelemetry layer through this.
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded as is; the inner layer answers for its types.
            unsafe { self.inner.downcast_raw(id) }
        }
    }
}

fn traced<S>(id: &span::Id, ctx: &Context<'_, S>) -> bool
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    ctx.metadata(id).is_some_and(is_traced)
}

/// Reads the W3C headers of an inbound message.
struct Headers<'a>(&'a InboundMessage);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// The span of one message within the current (batch) span, when traces
/// are exported: its parent is the inbound trace context when there is a
/// valid one (then linked to the batch), the batch otherwise. `context`'s
/// `traceparent` (and `tracestate`) become this span's, so that the events
/// the message causes carry the trace on to their subscribers. `None`, and
/// `context` untouched, when traces are off.
pub(crate) fn message_span(
    message: &InboundMessage,
    context: &mut MessageContext,
) -> Option<tracing::Span> {
    if !traces_enabled() {
        return None;
    }
    let span = tracing::info_span!(
        "message",
        otel.name = %format!("process {}", message.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.destination.partition.id = message.partition,
        messaging.kafka.offset = message.offset,
        messaging.message.id = %context.idempotency_key,
        outcome = tracing::field::Empty,
    );
    let propagator = TraceContextPropagator::new();
    let inbound = propagator.extract(&Headers(message));
    let remote = inbound.span().span_context().is_valid();
    if remote {
        let batch = tracing::Span::current().context();
        let _ = span.set_parent(inbound);
        span.add_link(batch.span().span_context().clone());
    }
    if context.traceparent.is_some() && remote {
        let mut outbound: HashMap<String, String> = HashMap::new();
        propagator.inject_context(&span.context(), &mut outbound);
        if let Some(traceparent) = outbound.remove("traceparent") {
            context.traceparent = Some(traceparent.into_bytes());
            context.tracestate = outbound
                .remove("tracestate")
                .filter(|s| !s.is_empty())
                .map(String::into_bytes);
        }
    }
    Some(span)
}
