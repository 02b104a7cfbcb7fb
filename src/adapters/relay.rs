//! The outbox relay: publishes committed outbox rows in id order, waits for the
//! broker to acknowledge them, then marks them sent. At least once: a crash
//! between publish and mark sends the rows again, with the same `ce_id`.
//!
//! One relay publishes at a time across all instances (a PostgreSQL advisory
//! lock held for the pass), because two relays interleaving rows of one SKU
//! would break the per-SKU order of events.
//!
//! Order within a pass: the rows of one message key (the SKU, for events)
//! are sent in id order; rows of one key bound for the same topic (so the same
//! partition) are pipelined, which the idempotent producer keeps in order; a
//! row bound for another topic than the key's previous one waits until that
//! one is acknowledged. At the first failure of a key, nothing more of that
//! key is sent in the pass. Marked sent is every acknowledged row not
//! preceded, in its key, by a row that was not: the rows of the other keys,
//! and the acknowledged rows before a failure, are never sent again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
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
use super::postgres::pool::{classify, KeptConnections};
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

/// A record on its way out: the relay's view of a Kafka record.
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, &'a [u8])>,
}

/// Resolves once the broker acknowledged a record (`Ok`) or its delivery
/// failed for good.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), KafkaError>> + Send>>;

/// What the relay publishes through: the Kafka producer in production, and
/// in tests a double that fails chosen sends.
pub trait Publisher: Send + Sync + 'static {
    /// Hands `record` over; `Err` when it is refused at once.
    fn send(&self, record: OutboundRecord<'_>) -> Result<Delivery, KafkaError>;
    /// Waits up to `timeout` for everything handed over to be delivered.
    fn flush(&self, timeout: Duration) -> Result<(), KafkaError>;
}

impl Publisher for FutureProducer<WorkerContext> {
    fn send(&self, record: OutboundRecord<'_>) -> Result<Delivery, KafkaError> {
        let count = record.headers.len();
        let headers = record.headers.into_iter().fold(
            OwnedHeaders::new_with_capacity(count),
            |hs, (n, v)| {
                hs.insert(Header {
                    key: n,
                    value: Some(v),
                })
            },
        );
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(record.topic).headers(headers);
        if let Some(key) = record.key {
            out = out.key(key);
        }
        if let Some(payload) = record.payload {
            out = out.payload(payload);
        }
        let delivery = self.send_result(out).map_err(|(e, _)| e)?;
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                // The producer was dropped with the record still queued.
                Err(_) => Err(KafkaError::Canceled),
            }
        }))
    }

    fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        Producer::flush(self, timeout)
    }
}

/// What became of one row in a pass.
enum Sent {
    Acknowledged,
    /// Refused or not delivered; `too_large` when for its size.
    Failed {
        error: String,
        too_large: bool,
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
    publisher: Box<dyn Publisher>,
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
        Self::with_publisher(pool, Box::new(producer), topics, wake, metrics)
    }

    /// A relay that publishes through `publisher` (a test double, say).
    pub fn with_publisher(
        pool: PgPool,
        publisher: Box<dyn Publisher>,
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
            publisher,
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

        // Full (or cut short by its byte bound): more rows are waiting.
        let full = rows.len() as i64 == self.batch_size
            || rows.first().is_some_and(|r| r.5 > rows.len() as i64);
        self.more_waiting.store(full, Ordering::Relaxed);

        // The rows of each key, in id order; keys in order of first row.
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: HashMap<Option<&[u8]>, usize> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let chain = *chain_of.entry(row.2.as_deref()).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[chain].push(i);
        }
        // Every key's rows go out concurrently with the other keys'.
        let outcomes: Vec<Vec<(usize, Sent)>> =
            futures::future::join_all(chains.iter().map(|chain| self.send_chain(&rows, chain)))
                .await;
        let produced = started.elapsed();

        let mut sent = Vec::with_capacity(rows.len());
        let mut sent_kinds = Vec::with_capacity(rows.len());
        let mut too_large_dead_letters = Vec::new();
        let mut failure: Option<String> = None;
        for chain in outcomes {
            let mut intact = true;
            for (i, outcome) in chain {
                let (id, kind) = (rows[i].0, OutboxKind::parse(&rows[i].1));
                match outcome {
                    Sent::Acknowledged if intact => {
                        sent.push(id);
                        sent_kinds.extend(kind);
                    }
                    // Acknowledged after a failed row of its key: sent again
                    // after that row, so that the key's last word stays last.
                    Sent::Acknowledged => {}
                    Sent::Failed { error, too_large } => {
                        intact = false;
                        if too_large && kind == Some(OutboxKind::DeadLetter) {
                            too_large_dead_letters.push(id);
                        }
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        // Marked in id order, as the rows were read.
        sent.sort_unstable();
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

    /// Sends the rows `chain` of one key, in order: pipelined while they go
    /// to the same topic, waiting for the acknowledgements before a row for
    /// another topic, and nothing more after the first failure. Returns the
    /// outcome of every row sent, in chain order.
    async fn send_chain(&self, rows: &[OutboxRow], chain: &[usize]) -> Vec<(usize, Sent)> {
        let mut outcomes = Vec::with_capacity(chain.len());
        let mut in_flight: Vec<(usize, Delivery)> = Vec::new();
        let mut topic_in_flight: Option<&str> = None;
        for &i in chain {
            let (id, kind, key, payload, headers, _) = &rows[i];
            // Written by a newer version, or damaged: stop here rather than
            // skip it and publish later rows of its key out of order.
            let Some(kind) = OutboxKind::parse(kind) else {
                let error = format!("outbox row {id} has unknown kind {kind:?}");
                outcomes.push((
                    i,
                    Sent::Failed {
                        error,
                        too_large: false,
                    },
                ));
                break;
            };
            let Some(headers) = decode_headers(headers) else {
                let error = format!("outbox row {id} has unreadable headers");
                outcomes.push((
                    i,
                    Sent::Failed {
                        error,
                        too_large: false,
                    },
                ));
                break;
            };
            let topic = self.topics.outbound(kind);
            if topic_in_flight.is_some_and(|t| t != topic)
                && !settle(&mut in_flight, &mut outcomes).await
            {
                break;
            }
            let record = OutboundRecord {
                topic,
                key: key.as_deref(),
                payload: payload.as_deref(),
                headers: wire_headers(kind, headers),
            };
            match self.publisher.send(record) {
                Ok(delivery) => {
                    in_flight.push((i, delivery));
                    topic_in_flight = Some(topic);
                }
                Err(e) => {
                    settle(&mut in_flight, &mut outcomes).await;
                    outcomes.push((i, failed(&e)));
                    break;
                }
            }
        }
        settle(&mut in_flight, &mut outcomes).await;
        outcomes
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
        if let Err(error) = tokio::task::block_in_place(|| self.publisher.flush(remaining)) {
            tracing::warn!(%error, "producer flush did not complete");
        }
        tracing::info!("outbox relay stopped");
    }
}

/// Waits for the deliveries in flight, in order, and records their outcomes;
/// `false` when one failed.
async fn settle(in_flight: &mut Vec<(usize, Delivery)>, outcomes: &mut Vec<(usize, Sent)>) -> bool {
    let mut all_acknowledged = true;
    for (i, delivery) in in_flight.drain(..) {
        match delivery.await {
            Ok(()) => outcomes.push((i, Sent::Acknowledged)),
            Err(e) => {
                all_acknowledged = false;
                outcomes.push((i, failed(&e)));
            }
        }
    }
    all_acknowledged
}

fn failed(error: &KafkaError) -> Sent {
    Sent::Failed {
        error: error.to_string(),
        too_large: too_large(error),
    }
}

/// Whether the producer or the broker refused a record for its size.
fn too_large(error: &KafkaError) -> bool {
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
