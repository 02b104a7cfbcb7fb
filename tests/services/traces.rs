//! Traces (README "Operating it"): with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the
//! real binary exports a span per batch and one per message over OTLP
//! (HTTP, protobuf) to a receiver inside the test; a message's span has the
//! inbound `traceparent` as parent, and the outbound `traceparent` names it.
//! Without the variable, the trace context is carried as it came.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use testkit::{check, check_eq};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use testkit::{random_hex, unique, TestEnv, DEADLINE};

/// An OTLP/HTTP receiver: keeps every span posted to `/v1/traces`.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        async fn traces(
            State(spans): State<Arc<Mutex<Vec<Span>>>>,
            body: Bytes,
        ) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
            let content = [(header::CONTENT_TYPE, "application/x-protobuf")];
            match ExportTraceServiceRequest::decode(body) {
                Ok(request) => {
                    let mut kept = spans.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            kept.extend(scope.spans);
                        }
                    }
                    (StatusCode::OK, content, Vec::new())
                }
                Err(e) => {
                    eprintln!("[traces] undecodable export request: {e}");
                    (StatusCode::BAD_REQUEST, content, Vec::new())
                }
            }
        }
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr: SocketAddr = listener.local_addr().expect("receiver address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            spans,
            task,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .clone()?;
    Some(match value.value? {
        Value::StringValue(s) => s,
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

fn describe(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} trace={} span={} parent={} links={:?}",
                s.name,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id),
                s.links.iter().map(|l| hex(&l.span_id)).collect::<Vec<_>>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn exports_batch_and_message_spans_and_the_outbound_traceparent_names_the_message_span() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let (bc, ar) = (
        env.topics.batch_created.clone(),
        env.topics.allocation_required.clone(),
    );

    let sku = unique("sku");
    let batch = unique("batch");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    let trace_id = random_hex(32);
    let erp_span = random_hex(16);
    let traceparent = format!("00-{trace_id}-{erp_span}-01");
    let orderid = unique("order");
    let delivered = env
        .allocation_required(
            &orderid,
            &sku,
            2,
            &[("traceparent", &traceparent), ("tracestate", "erp=7")],
        )
        .await;

    // The event carries the trace on, naming the worker's span.
    let allocated = env
        .wait_for_count("Allocated", &env.topics.allocated, 1, DEADLINE, |r| {
            r.field("orderid") == orderid
        })
        .await;
    let outbound = allocated[0].header("traceparent").unwrap_or_default();
    let parts: Vec<&str> = outbound.split('-').collect();
    check_eq!(env, parts.len(), 4, "outbound traceparent {outbound:?}");
    check_eq!(env, parts[0], "00", "version of {outbound:?}");
    check_eq!(
        env,
        parts[1],
        trace_id,
        "the ERP's trace goes on: {outbound:?}"
    );
    check!(
        env,
        parts[2] != erp_span,
        "the worker's span is named: {outbound:?}"
    );
    check_eq!(env, parts[3], "01", "sampled, as it came: {outbound:?}");
    check_eq!(
        env,
        allocated[0].header("tracestate").as_deref(),
        Some("erp=7"),
        "tracestate"
    );
    let message_span = parts[2].to_owned();

    // The receiver has that span: child of the ERP's, linked to its batch.
    let spans = env
        .eventually("the message span exported", DEADLINE, || {
            let spans = receiver.spans();
            let found = spans.iter().any(|s| hex(&s.span_id) == message_span);
            async move { Ok::<_, String>(found.then_some(spans)) }
        })
        .await;
    let span = spans
        .iter()
        .find(|s| hex(&s.span_id) == message_span)
        .expect("found above");
    let all = describe(&spans);
    check_eq!(
        env,
        hex(&span.trace_id),
        trace_id,
        "trace of the message span\n{all}"
    );
    check_eq!(
        env,
        hex(&span.parent_span_id),
        erp_span,
        "parent of the message span\n{all}"
    );
    check_eq!(env, span.name, format!("process {ar}"), "name\n{all}");
    check_eq!(
        env,
        attribute(span, "messaging.kafka.offset"),
        Some(delivered.offset.to_string()),
        "offset attribute\n{all}"
    );
    check_eq!(
        env,
        attribute(span, "outcome").as_deref(),
        Some("Applied"),
        "outcome attribute\n{all}"
    );
    check_eq!(env, span.links.len(), 1, "one link, to the batch\n{all}");
    let batch_span = hex(&span.links[0].span_id);
    let spans = env
        .eventually("the batch span exported", DEADLINE, || {
            let spans = receiver.spans();
            let found = spans
                .iter()
                .any(|s| hex(&s.span_id) == batch_span && s.name == "batch");
            async move { Ok::<_, String>(found.then_some(spans)) }
        })
        .await;

    // A message without a trace context is a child of its batch's span.
    let all = describe(&spans);
    let created = spans
        .iter()
        .find(|s| s.name == format!("process {bc}"))
        .unwrap_or_else(|| panic!("no span of the BatchCreated message\n{all}"));
    let parent = spans
        .iter()
        .find(|s| s.span_id == created.parent_span_id)
        .unwrap_or_else(|| panic!("the BatchCreated span's parent was not exported\n{all}"));
    check_eq!(
        env,
        parent.name,
        "batch",
        "parent of a message without traceparent\n{all}"
    );
    check_eq!(env, parent.trace_id, created.trace_id, "one trace\n{all}");
    check_eq!(
        env,
        attribute(parent, "topic"),
        Some(bc.clone()),
        "batch attributes\n{all}"
    );

    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn without_an_endpoint_the_trace_context_is_carried_as_it_came() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker();
    let sku = unique("sku");
    let batch = unique("batch");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    let traceparent = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    let orderid = unique("order");
    env.allocation_required(
        &orderid,
        &sku,
        1,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "erp=8,other=x"),
        ],
    )
    .await;
    let allocated = env
        .wait_for_count("Allocated", &env.topics.allocated, 1, DEADLINE, |r| {
            r.field("orderid") == orderid
        })
        .await;
    check_eq!(
        env,
        allocated[0].header("traceparent"),
        Some(traceparent),
        "traceparent"
    );
    check_eq!(
        env,
        allocated[0].header("tracestate").as_deref(),
        Some("erp=8,other=x"),
        "tracestate"
    );
    drop(worker);
    env.finish().await;
}

/// A collector that does not answer holds up neither the messages nor the
/// exit after SIGTERM (the last spans are given at most a few seconds).
#[tokio::test]
async fn an_unreachable_collector_holds_up_neither_the_work_nor_the_exit() {
    let env = TestEnv::new().await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let endpoint = format!("http://{closed}");
    let mut worker = env.spawn_worker_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("SHUTDOWN_TIMEOUT", "5s"),
    ]);
    let sku = unique("sku");
    let batch = unique("batch");
    env.batch_created(&batch, &sku, 10, None).await;
    let orderid = unique("order");
    let traceparent = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    env.allocation_required(&orderid, &sku, 1, &[("traceparent", &traceparent)])
        .await;
    env.wait_for_count("Allocated", &env.topics.allocated, 1, DEADLINE, |r| {
        r.field("orderid") == orderid
    })
    .await;
    let started = std::time::Instant::now();
    let status = worker.terminate(std::time::Duration::from_secs(20)).await;
    check!(env, status.success(), "exit status {status}");
    check!(
        env,
        started.elapsed() < std::time::Duration::from_secs(15),
        "took {:?} to exit",
        started.elapsed()
    );
    drop(worker);
    env.finish().await;
}
