//! The outbox relay: publishes committed outbox rows in id order, waits for the
//! broker to acknowledge them, then marks them sent. At least once: a crash
//! between publish and mark sends the rows again, with the same `ce_id`.
//!
//! One relay publishes at a time across all instances (a PostgreSQL advisory
//! lock held for the pass), because two relays interleaving rows of one SKU
//! would break the per-SKU order of events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::kafka::{Topics, WorkerContext};
use super::metrics::Metrics;
use super::outbox::{
    decode_headers, encode_headers, wire_headers, OutboxKind, VALUE_OMITTED_HEADER,
};
use super::postgres::{classify, KeptConnections};
use crate::service_layer::RepositoryError;

/// Most bytes of values in one relay pass (beyond its first row), so that a
/// run of large dead letters does not load gigabytes at once.
const MAX_PASS_BYTES: i64 = 16 * 1024 * 1024;

/// Arbitrary constant naming the relay's advisory lock.
const RELAY_LOCK: i64 = 0x616c_6c6f_6372_6c79;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] RepositoryError),
    #[error("publishing failed after {published} of {attempted} records: {error}")]
    Publish {
        published: usize,
        attempted: usize,
        error: String,
    },
}

type OutboxRow = (
    i64,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<u8>,
    // Rows the pass would have taken without its byte bound.
    i64,
);

pub struct Relay {
    /// One connection kept from pass to pass (see [`KeptConnections`]).
    connections: KeptConnections,
    producer: FutureProducer<WorkerContext>,
    topics: Topics,
    /// Rung by the worker after each commit, so events leave without waiting
    /// for the next poll.
    wake: Arc<Notify>,
    batch_size: i64,
    /// Set by each pass: it was full, so the next one need not wait.
    more_waiting: AtomicBool,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer: FutureProducer<WorkerContext>,
        topics: Topics,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // One kept connection, when the pool has room for it beside the
        // partitions' (which leave it three): with fewer than four, keeping
        // one could starve everything else.
        let most = usize::from(pool.options().get_max_connections() >= 4);
        Self {
            connections: KeptConnections::new(pool, most),
            producer,
            topics,
            wake,
            batch_size: 2000,
            more_waiting: AtomicBool::new(false),
            poll_interval: Duration::from_millis(500),
            metrics,
        }
    }

    /// Publishes one batch of unsent rows; returns how many were marked sent.
    /// Zero when there was nothing to send or another instance holds the lock.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let mut conn = self.connections.acquire().await.map_err(classify)?;
        let pass = self.pass(&mut conn).await;
        // A publishing error comes after the commit: the connection is fine.
        if !matches!(pass, Err(RelayError::Database(_))) {
            self.connections.keep(conn);
        }
        pass
    }

    async fn pass(&self, conn: &mut PgConnection) -> Result<usize, RelayError> {
        let started = Instant::now();
        let mut tx = conn.begin().await.map_err(classify)?;
        // The lock and the rows in one round trip. The scalar subquery is
        // evaluated once, as a one-time filter: without the lock (another
        // instance relays) no row is read at all. A pass holds at most
        // `batch_size` rows and, after the first row, `MAX_PASS_BYTES` of
        // values: dead letters can carry megabytes each. The pending ids
        // are taken first and the rows looked up by primary key: written as
        // a join, the plan hashed the whole outbox on every pass.
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, kind, message_key, payload, headers, rows FROM ( \
                 SELECT o.id, o.kind, o.message_key, o.payload, o.headers, \
                        sum(COALESCE(octet_length(o.payload), 0)) OVER (ORDER BY o.id) AS upto, \
                        count(*) OVER () AS rows \
                 FROM outbox o \
                 WHERE (SELECT pg_try_advisory_xact_lock($2)) \
                 AND o.id = ANY(ARRAY(SELECT id FROM outbox_pending ORDER BY id LIMIT $1))) r \
             WHERE upto - COALESCE(octet_length(payload), 0) < $3 \
             ORDER BY id",
        )
        .bind(self.batch_size)
        .bind(RELAY_LOCK)
        .bind(MAX_PASS_BYTES)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let selected = started.elapsed();

        let mut deliveries: Vec<(i64, OutboxKind, _)> = Vec::with_capacity(rows.len());
        let mut too_large_dead_letters = Vec::new();
        let mut failure = None;
        // Full (or cut short by its byte bound): more rows are waiting.
        let full = rows.len() as i64 == self.batch_size
            || rows.first().is_some_and(|r| r.5 > rows.len() as i64);
        self.more_waiting.store(full, Ordering::Relaxed);
        for (id, kind, key, payload, headers, _) in &rows {
            // Written by a newer version, or damaged: stop here rather than
            // skip it and publish later rows of its SKU out of order.
            let Some(kind) = OutboxKind::parse(kind) else {
                failure = Some(format!("outbox row {id} has unknown kind {kind:?}"));
                break;
            };
            let Some(headers) = decode_headers(headers) else {
                failure = Some(format!("outbox row {id} has unreadable headers"));
                break;
            };
            let headers = wire_headers(kind, headers);
            let count = headers.len();
            let headers =
                headers
                    .into_iter()
                    .fold(OwnedHeaders::new_with_capacity(count), |hs, (n, v)| {
                        hs.insert(Header {
                            key: n,
                            value: Some(v),
                        })
                    });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(self.topics.outbound(kind)).headers(headers);
            if let Some(key) = key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = payload {
                record = record.payload(payload.as_slice());
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push((*id, kind, delivery)),
                Err((e, _)) => {
                    if kind == OutboxKind::DeadLetter && too_large(&e) {
                        too_large_dead_letters.push(*id);
                    }
                    failure = Some(e.to_string());
                    break;
                }
            }
        }

        let produced = started.elapsed();
        // Only the prefix acknowledged in order is marked: a row after a failed
        // one is sent again next pass, so no SKU's events skip ahead.
        let attempted = deliveries.len();
        let mut sent = Vec::with_capacity(attempted);
        let mut sent_kinds = Vec::with_capacity(attempted);
        for (id, kind, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) if failure.is_none() => {
                    sent.push(id);
                    sent_kinds.push(kind);
                }
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    if kind == OutboxKind::DeadLetter && too_large(&e) {
                        too_large_dead_letters.push(id);
                    }
                    failure.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    failure.get_or_insert_with(|| "producer dropped the delivery".to_owned());
                }
            }
        }
        let acknowledged = started.elapsed();
        if !sent.is_empty() {
            // Marking deletes the rows' ids from outbox_pending; the rows
            // themselves are never rewritten (migration 20261128000005).
            // outbox_relay.marked_at is when the marks are written, after the
            // acknowledgements. The marks need not wait for the disk: should
            // a crash lose them, the rows are published again with the same
            // ce_id, which at-least-once allows, and waiting held up every
            // pass by a WAL flush. set_config(…, true) is SET LOCAL, for this
            // transaction only; evaluated once, in the statement, it saves a
            // round trip.
            sqlx::query(
                "WITH marked AS ( \
                     DELETE FROM outbox_pending WHERE id = ANY($1) \
                     AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off') \
                 UPDATE outbox_relay SET marked_at = statement_timestamp()",
            )
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        // A dead letter the broker will never take would hold up every row
        // behind it: send it again without its value, which stays readable at
        // dlq.original.* on the inbound topic.
        for id in too_large_dead_letters {
            let Some((.., Some(payload), _, _)) = rows.iter().find(|r| r.0 == id) else {
                continue; // its value is already omitted
            };
            tracing::warn!(
                outbox_id = id,
                "dead letter too large for the broker; omitting its value"
            );
            let size = format!("{} bytes", payload.len());
            let header = encode_headers([(VALUE_OMITTED_HEADER, size.as_bytes())])
                .map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
            sqlx::query(
                "UPDATE outbox SET payload = NULL, headers = headers || $2 \
                 WHERE id = $1 AND payload IS NOT NULL",
            )
            .bind(id)
            .bind(header)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        tracing::debug!(
            rows = rows.len(),
            ?selected,
            ?produced,
            ?acknowledged,
            committed = ?started.elapsed(),
            "relay pass"
        );
        for kind in sent_kinds {
            self.metrics
                .events_published
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        match failure {
            None => Ok(sent.len()),
            Some(error) => Err(RelayError::Publish {
                published: sent.len(),
                attempted: rows.len(),
                error,
            }),
        }
    }

    /// Publishes until `shutdown`, then makes a last pass and flushes the
    /// producer, both before the deadline that `deadline` yields once
    /// `shutdown` fired.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
        deadline: tokio::sync::oneshot::Receiver<Instant>,
    ) {
        let mut backoff = Backoff::default();
        loop {
            // A pass waiting on an unreachable broker or database is dropped
            // at shutdown: its transaction rolls back, its rows stay unsent.
            let pass = tokio::select! {
                pass = self.publish_pending() => pass,
                _ = shutdown.cancelled() => break,
            };
            let more = match pass {
                Ok(n) => {
                    if backoff.failures > 0 {
                        tracing::info!("outbox relay recovered");
                    }
                    backoff.reset();
                    n > 0 && self.more_waiting.load(Ordering::Relaxed)
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "outbox relay failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    false
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if !more {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        let deadline = deadline
            .await
            .unwrap_or_else(|_| Instant::now() + Duration::from_secs(1));
        // What the worker committed last is published now, not at restart.
        let last_pass = async {
            while let Ok(n) = self.publish_pending().await {
                if n == 0 {
                    break;
                }
            }
        };
        let flush_reserve = Duration::from_millis(500);
        let pass_deadline = deadline.checked_sub(flush_reserve).unwrap_or(deadline);
        if tokio::time::timeout_at(pass_deadline.into(), last_pass)
            .await
            .is_err()
        {
            tracing::warn!(
                "outbox relay stopped before the outbox was empty; the rest is sent on restart"
            );
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        // flush blocks its thread; block_in_place lets the runtime move other work away.
        if let Err(error) = tokio::task::block_in_place(|| self.producer.flush(remaining)) {
            tracing::warn!(%error, "producer flush did not complete");
        }
        tracing::info!("outbox relay stopped");
    }
}

/// Whether the producer or the broker refused a record for its size.
fn too_large(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// Unsent outbox rows and the age of the oldest, in seconds. Looked up by
/// primary key, like the relay's rows, not joined: the outbox keeps every row
/// ever written.
pub async fn outbox_backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 \
         FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM outbox_pending))",
    )
    .fetch_one(pool)
    .await
}

/// Exponential back-off from 100 ms to 5 s, for outages of the database or broker.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let delay = Duration::from_millis(100u64.saturating_mul(1 << self.failures.min(6)));
        self.failures = self.failures.saturating_add(1);
        delay.min(Duration::from_secs(5))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}
