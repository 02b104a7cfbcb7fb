//! The small HTTP surface (contract §7): `/metrics`, `/healthz`, `/readyz` and the
//! read model at `/allocations/{orderid}`, on one listener, or the read model
//! on a listener of its own (`READ_MODEL_ADDR`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sqlx::PgPool;

use crate::adapters::health::{schema, Health, Schema};
use crate::adapters::metrics::Metrics;
use crate::adapters::relay::outbox_backlog;
use crate::domain::OrderId;

/// What the endpoints read; cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// What the worker tells the probes.
    pub health: Arc<Health>,
    /// `/healthz` fails when the loop has not polled for this long.
    pub health_poll_timeout: Duration,
    /// `/readyz` fails once a partition's batch has kept failing this long.
    pub partition_stall_timeout: Duration,
    /// The read model's queries: a pool of their own, so that client
    /// traffic never takes the connections the probes and the worker need.
    pub read_pool: PgPool,
}

/// A probe or scrape must answer quickly even while the database hangs.
const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Every endpoint on one listener (`HTTP_ADDR`), the read model included.
pub fn router(state: HttpState) -> Router {
    operations_routes()
        .merge(read_model_routes())
        .with_state(state)
}

/// The endpoints of `HTTP_ADDR` when the read model has a listener of its
/// own: metrics and the probes, for Prometheus and the kubelet.
pub(crate) fn operations_router(state: HttpState) -> Router {
    operations_routes().with_state(state)
}

/// The read model's own listener (`READ_MODEL_ADDR`): `/allocations` for
/// the clients, and a `/readyz` that judges only what the read model needs,
/// so that a load balancer keeps sending reads to a pod whose database is
/// fine while its consumer waits out a broker outage or a rebalance
/// (docs/design.md, "Probes").
pub(crate) fn read_model_router(state: HttpState) -> Router {
    read_model_routes()
        .route("/readyz", get(read_model_readyz))
        .with_state(state)
}

fn operations_routes() -> Router<HttpState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn read_model_routes() -> Router<HttpState> {
    Router::new()
        .route("/allocations/{orderid}", get(allocations))
        // The route above needs a non-empty segment; an empty id is still a
        // request for an order, and a bad one.
        .route("/allocations/", get(empty_orderid))
}

/// Alive unless the consumer loop is stuck: it has been away from the
/// consumer (not waiting for a message) for longer than
/// HEALTH_POLL_TIMEOUT. An outage of PostgreSQL or Kafka is not for this
/// probe: the loop keeps polling (or waits in the poll) through both.
async fn healthz(State(state): State<HttpState>) -> Response {
    match state.health.poll_clock.away() {
        Some(away) if away > state.health_poll_timeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "consumer loop stuck: it has not polled Kafka for {:.1}s (HEALTH_POLL_TIMEOUT {})\n",
                away.as_secs_f64(),
                humantime::format_duration(state.health_poll_timeout)
            ),
        )
            .into_response(),
        _ => "ok\n".into_response(),
    }
}

/// Ready when the database answers with every migration this binary needs
/// applied, and the consumer is running as a member of its group (an
/// assignment, possibly empty, is held).
async fn readiness(state: &HttpState) -> (bool, String) {
    let schema = database_ready(&state.pool).await;
    let ready = if schema != Schema::Current {
        (false, format!("{}\n", schema.reason()))
    } else if !state.health.consumer_running.load(Ordering::Relaxed) {
        (false, "consumer not running\n".to_owned())
    } else if !state.health.consumer_assigned.load(Ordering::Relaxed) {
        (
            false,
            "consumer not in its group (broker unreachable, or rebalancing)\n".to_owned(),
        )
    } else if let Some(stalled) = state.health.failing.stalled(state.partition_stall_timeout) {
        (
            false,
            format!(
                "partition {}/{} has failed its batch for {}s: {}\n",
                stalled.topic,
                stalled.partition,
                stalled.for_.as_secs(),
                stalled.error
            ),
        )
    } else {
        (true, "ready\n".to_owned())
    };
    state.metrics.ready.set(i64::from(ready.0));
    ready
}

/// The schema check alone: the database answers with every migration this
/// binary needs.
async fn database_ready(pool: &PgPool) -> Schema {
    tokio::time::timeout(DB_PROBE_TIMEOUT, schema(pool))
        .await
        .unwrap_or_else(|_| Schema::Unreachable("timed out".into()))
}

async fn read_model_readyz(State(state): State<HttpState>) -> Response {
    match database_ready(&state.read_pool).await {
        Schema::Current => (StatusCode::OK, "ready\n").into_response(),
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", other.reason()),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    match readiness(&state).await {
        (true, body) => (StatusCode::OK, body).into_response(),
        (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body).into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    // Gauges read at scrape time, so they are never staler than the scrape.
    readiness(&state).await;
    state.metrics.observe_pool(&state.pool);
    if let Ok(Ok((backlog, age))) =
        tokio::time::timeout(DB_PROBE_TIMEOUT, outbox_backlog(&state.pool)).await
    {
        state.metrics.outbox_backlog.set(backlog);
        state.metrics.outbox_oldest_age.set(age);
    }
    match state.metrics.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[derive(Serialize, sqlx::FromRow)]
struct AllocationView {
    sku: String,
    batchref: String,
}

/// `GET /allocations/{orderid}`. The id is checked with the rule the inbound
/// decoder applies to `orderid` (non-empty, at most 255 characters, no NUL):
/// an id no message could carry is the client's mistake, 400, and never
/// reaches PostgreSQL, which would refuse a NUL with an error that reads as
/// an outage. A percent-escape that does not decode to UTF-8 is also 400.
async fn allocations(
    State(state): State<HttpState>,
    orderid: Result<Path<String>, PathRejection>,
) -> Response {
    let orderid = match orderid {
        Ok(Path(raw)) => match OrderId::parse(raw) {
            Ok(orderid) => orderid,
            Err(error) => return bad_request(&format!("orderid {error}")),
        },
        Err(rejection) => return bad_request(&rejection.body_text()),
    };
    let rows: Result<Vec<AllocationView>, _> = sqlx::query_as(
        "SELECT sku, batchref FROM allocations_view WHERE orderid = $1 ORDER BY sku",
    )
    .bind(orderid.as_str())
    .fetch_all(&state.read_pool)
    .await;
    match rows {
        Ok(rows) if rows.is_empty() => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no allocations for this order"})),
        )
            .into_response(),
        Ok(rows) => Json(rows).into_response(),
        Err(error) => {
            tracing::warn!(%error, "read model query failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
        }
    }
}

async fn empty_orderid() -> Response {
    bad_request(&format!("orderid {}", crate::domain::InvalidName::Empty))
}

fn bad_request(reason: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": reason })),
    )
        .into_response()
}
