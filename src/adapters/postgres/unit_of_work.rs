//! The unit of work on PostgreSQL: one transaction for a batch of messages
//! ([`PgUnitOfWork`]), in which each message is handled as if alone and
//! whose commit writes the products' changes, the outbox rows and the
//! idempotency keys together; and the store that begins one per attempt for
//! the batch processor ([`PgStore`]), on a kept connection and within the
//! partitions' share of the pool.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::Postgres;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::adapters::inbound::{InboundMessage, MessageContext};
use crate::adapters::outbox::{self, OutboxRecord, WrittenShards};
use crate::domain::{BatchRef, Event, OrderId, Sku};
use crate::service_layer::{ChunkUnitOfWork, RepositoryError, Store, UnitOfWork};
use crate::service_layer::{DeadLetterReason, ReadPosition};

use super::cache::{ProductCache, Stored};
use super::pool::{classify, KeptConnections};
use super::repository::PgProductRepository;
use super::writes;

/// One transaction for a batch of messages. Created by [`PgUnitOfWork::begin`]
/// (or [`PgStore`]); nothing is stored until [`ChunkUnitOfWork::commit`];
/// dropping it rolls back.
///
/// Between [`ChunkUnitOfWork::start_message`] and
/// [`ChunkUnitOfWork::finish_message`] it is the unit of work of one message:
/// events are numbered within the message, and
/// [`ChunkUnitOfWork::reject_message`] takes back what the message queued.
pub struct PgUnitOfWork<'c> {
    products: PgProductRepository<'c>,
    context: MessageContext,
    /// Outbox length when the current message started.
    message_start: usize,
    outbox: Vec<OutboxRecord>,
    processed: Vec<String>,
    /// Written with the batch (`partition_positions`), if recorded.
    position: Option<ReadPosition>,
    /// Quantity-change positions (see [`ChunkUnitOfWork::superseded`]):
    /// read from `batch_quantity_positions`, by batch, topic and partition
    /// (`None`: no row)...
    positions_read: HashMap<PositionKey, Option<i64>>,
    /// ...and those of the changes applied in this unit of work, written
    /// with them.
    positions_applied: HashMap<PositionKey, i64>,
    /// Told the shards of the outbox rows once they are committed, for the
    /// relay of this process ([`PgStore::with_written_shards`]).
    written: Option<&'c WrittenShards>,
}

/// A batch, and the topic and partition a change to it came from.
type PositionKey = (BatchRef, String, i32);

impl<'c> PgUnitOfWork<'c> {
    /// Begins on `conn`: the pool, or a connection in hand (see
    /// [`KeptConnections`]).
    pub async fn begin(
        conn: impl sqlx::Acquire<'c, Database = Postgres>,
        cache: &'c ProductCache,
    ) -> Result<Self, RepositoryError> {
        let tx = conn.begin().await.map_err(classify)?;
        Ok(Self {
            products: PgProductRepository::new(tx, cache),
            context: MessageContext {
                idempotency_key: String::new(),
                traceparent: None,
                tracestate: None,
            },
            message_start: 0,
            outbox: Vec::new(),
            processed: Vec::new(),
            position: None,
            positions_read: HashMap::new(),
            positions_applied: HashMap::new(),
            written: None,
        })
    }

    /// Records the shards of its outbox rows in `written` once committed.
    pub fn recording_shards(mut self, written: Option<&'c WrittenShards>) -> Self {
        self.written = written;
        self
    }
}

/// The database to the batch processor
/// ([`crate::service_layer::chunk::process`]): a unit of work per attempt at
/// a batch, on the connection of an earlier one when one is kept
/// ([`KeptConnections`]), with the products cache the partitions share.
pub struct PgStore {
    connections: KeptConnections,
    /// Shared by the partitions: products stay in memory between batches.
    cache: ProductCache,
    /// Transactions the partitions may have open at once: three connections
    /// fewer than the pool holds, so that the relay and the HTTP probes always
    /// find one, however many partitions are busy (or waiting on a lock).
    transactions: Semaphore,
    /// Attempts waiting in [`Store::session`] (`allocation_db_pool_waiting`).
    waiting: Option<prometheus::IntGauge>,
    /// Where a commit records the shards of its outbox rows for this
    /// process's relay.
    written: Option<Arc<WrittenShards>>,
}

/// Pool connections the partitions leave to the relay (one) and the HTTP
/// probes and metrics (two).
pub(crate) const RESERVED_CONNECTIONS: usize = 3;

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        // Up to one connection per busy partition, leaving three of the pool
        // to the relay and the HTTP probes (with a pool of fewer than four,
        // one for the partitions all the same).
        let most = (pool.options().get_max_connections() as usize)
            .saturating_sub(RESERVED_CONNECTIONS)
            .max(1);
        Self {
            connections: KeptConnections::new(pool, most),
            cache: ProductCache::default(),
            transactions: Semaphore::new(most),
            waiting: None,
            written: None,
        }
    }

    /// Records the shards each commit wrote outbox rows to in `written`,
    /// which this process's relay reads ([`crate::adapters::relay::Relay::with_written_shards`]).
    pub fn with_written_shards(mut self, written: Arc<WrittenShards>) -> Self {
        self.written = Some(written);
        self
    }

    /// Bounds the product cache at `mib` MiB of its estimate
    /// (`PRODUCT_CACHE_MIB`) instead of the default.
    pub fn with_product_cache_mib(mut self, mib: u32) -> Self {
        self.cache = std::mem::take(&mut self.cache).resized(mib);
        self
    }

    /// Counts the product cache's hits and misses in `lookups`.
    pub(crate) fn with_cache_lookups(mut self, lookups: &prometheus::IntCounterVec) -> Self {
        self.cache.count_lookups(lookups);
        self
    }

    /// Counts the attempts waiting for a session in `waiting`.
    pub(crate) fn with_waiting_gauge(mut self, waiting: prometheus::IntGauge) -> Self {
        self.waiting = Some(waiting);
        self
    }

    /// Hands every kept connection back to the pool (see
    /// [`KeptConnections::close`]): closing the pool waits for them.
    pub(crate) fn close(&self) {
        self.connections.close();
    }
}

/// What one attempt at a batch holds: its share of the pool, and a
/// connection.
pub struct PgSession<'a> {
    /// Held until the connection is back (kept, in the pool, or closed):
    /// dropped with the session, after [`Drop`] has seen to the connection.
    _transaction: SemaphorePermit<'a>,
    /// Taken by [`Store::end_session`]; still here when the attempt was
    /// dropped midway (a time bound, or a partition that stops).
    conn: Option<PoolConnection<Postgres>>,
}

impl Drop for PgSession<'_> {
    /// An attempt dropped midway leaves its connection in the middle of a
    /// statement, possibly on a route that has gone: closed (sqlx gives a
    /// close five seconds), not handed back to the pool, whose check of a
    /// returned connection has no time bound and would hold the pool's slot
    /// for as long as TCP retransmits.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// One attempt waiting for its session, for as long as it lives.
struct WaitingGuard<'a>(&'a prometheus::IntGauge);

impl<'a> WaitingGuard<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Store for PgStore {
    type Message = InboundMessage;
    type Context = MessageContext;
    type Session<'a> = PgSession<'a>;
    type UnitOfWork<'s> = PgUnitOfWork<'s>;

    async fn session(&self) -> Result<PgSession<'_>, RepositoryError> {
        // Counted until this returns, also when it is dropped midway.
        let _waiting = self.waiting.as_ref().map(WaitingGuard::enter);
        let transaction = self
            .transactions
            .acquire()
            .await
            .map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
        let conn = self.connections.acquire().await.map_err(classify)?;
        Ok(PgSession {
            _transaction: transaction,
            conn: Some(conn),
        })
    }

    async fn begin<'s, 'a: 's>(
        &'s self,
        session: &'s mut PgSession<'a>,
    ) -> Result<PgUnitOfWork<'s>, RepositoryError> {
        let conn = session.conn.as_mut().ok_or_else(|| {
            RepositoryError::Unavailable("the session's connection was already given back".into())
        })?;
        let uow = PgUnitOfWork::begin(&mut **conn, &self.cache).await?;
        Ok(uow.recording_shards(self.written.as_deref()))
    }

    fn end_session(&self, mut session: PgSession<'_>, committed: bool) {
        // Kept only after a commit; after an error it goes back to the pool,
        // which checks it. The permit goes with the session, after.
        if let Some(conn) = session.conn.take() {
            if committed {
                self.connections.keep(conn);
            } else {
                drop(conn);
            }
        }
    }
}

impl<'c> UnitOfWork for PgUnitOfWork<'c> {
    type Products = PgProductRepository<'c>;

    fn products(&mut self) -> &mut PgProductRepository<'c> {
        &mut self.products
    }

    fn publish(&mut self, event: &Event) {
        // Numbered within the message, so the event's ce_id does not depend
        // on which other messages share the transaction.
        let position = self.outbox.len() - self.message_start;
        let record = outbox::event_record(event, &self.context, position);
        self.outbox.push(record);
    }

    /// Only the products the current message touched can hold new events.
    fn collect_new_events(&mut self) -> Vec<Event> {
        let repo = &mut self.products;
        let mut events = Vec::new();
        for touched in &repo.touched {
            events.extend(repo.seen[touched.index].product.take_events());
        }
        events
    }
}

impl<'c> ChunkUnitOfWork for PgUnitOfWork<'c> {
    type Message = InboundMessage;
    type Context = MessageContext;

    async fn load(
        &mut self,
        skus: &[&Sku],
        refs: &[&BatchRef],
        keys: &[&str],
    ) -> Result<HashSet<String>, RepositoryError> {
        self.products.preload(skus, refs, keys).await
    }

    async fn load_lines(&mut self, lines: &[(&Sku, &OrderId)]) -> Result<(), RepositoryError> {
        self.products.load_lines(lines).await
    }

    async fn load_freed_lines(
        &mut self,
        changes: &[(&BatchRef, u32)],
    ) -> Result<(), RepositoryError> {
        self.products.load_lines_freed_by(changes).await
    }

    /// The message whose handling follows: its events carry its context.
    fn start_message(&mut self, context: MessageContext) {
        self.context = context;
        self.message_start = self.outbox.len();
        self.products.touched.clear();
    }

    /// The current message is done: its idempotency key is recorded with it.
    fn finish_message(&mut self) {
        self.processed
            .push(std::mem::take(&mut self.context.idempotency_key));
        self.products.end_message();
    }

    /// Takes back what the current, rejected message queued. `false` when it
    /// had changed a product, which cannot be taken back alone: call
    /// [`Self::reset`] and handle the batch's other messages again.
    fn reject_message(&mut self) -> bool {
        if !self.products.undo_message() {
            return false;
        }
        self.outbox.truncate(self.message_start);
        true
    }

    /// Forgets every message handled so far; the products are as loaded.
    fn reset(&mut self) {
        self.products.reset();
        self.outbox.clear();
        self.processed.clear();
        self.positions_applied.clear();
    }

    /// Only a replay can be older than what was applied: a change read where
    /// it was published comes after every change of its partition applied
    /// before it, and simply applies (which also keeps a topic that was
    /// recreated, its offsets starting again, from looking old).
    async fn superseded(
        &mut self,
        message: &InboundMessage,
        reference: &BatchRef,
    ) -> Result<bool, RepositoryError> {
        let position = message.order_position();
        if !position.replayed {
            return Ok(false);
        }
        let key = (reference.clone(), position.topic, position.partition);
        let last = match self.positions_applied.get(&key) {
            Some(offset) => Some(*offset),
            None => match self.positions_read.get(&key) {
                Some(read) => *read,
                None => {
                    let read: Option<i64> = sqlx::query_scalar(
                        "SELECT applied_offset FROM batch_quantity_positions \
                         WHERE batch_ref = $1 AND topic = $2 AND partition = $3",
                    )
                    .bind(key.0.as_str())
                    .bind(&key.1)
                    .bind(key.2)
                    .fetch_optional(&mut *self.products.tx)
                    .await
                    .map_err(classify)?;
                    self.positions_read.insert(key, read);
                    read
                }
            },
        };
        Ok(last.is_some_and(|last| last > position.offset))
    }

    fn quantity_changed(&mut self, message: &InboundMessage, reference: &BatchRef) {
        let position = message.order_position();
        self.positions_applied.insert(
            (reference.clone(), position.topic, position.partition),
            position.offset,
        );
    }

    fn dead_letter(
        &mut self,
        message: &InboundMessage,
        context: &MessageContext,
        reason: DeadLetterReason,
        error: &str,
    ) {
        self.outbox
            .push(outbox::dead_letter_record(message, reason, error));
        self.processed.push(context.idempotency_key.clone());
    }

    fn record_position(&mut self, position: &ReadPosition) {
        self.position = Some(position.clone());
    }

    /// Stores everything queued, then commits. A `Conflict` means the caller
    /// must retry the batch from the start in a new unit of work.
    async fn commit(mut self) -> Result<(), RepositoryError> {
        let started = std::time::Instant::now();
        writes::save_all(
            &mut self.products.tx,
            &mut self.products.seen,
            &self.outbox,
            &self.processed,
        )
        .await?;
        if let Some(position) = &self.position {
            writes::save_position(&mut self.products.tx, position).await?;
        }
        if !self.positions_applied.is_empty() {
            let mut refs = Vec::with_capacity(self.positions_applied.len());
            let mut topics = Vec::with_capacity(refs.capacity());
            let mut partitions = Vec::with_capacity(refs.capacity());
            let mut offsets = Vec::with_capacity(refs.capacity());
            for ((reference, topic, partition), offset) in &self.positions_applied {
                refs.push(reference.as_str());
                topics.push(topic.as_str());
                partitions.push(*partition);
                offsets.push(*offset);
            }
            sqlx::query(
                "INSERT INTO batch_quantity_positions (batch_ref, topic, partition, applied_offset) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[]) \
                 ON CONFLICT (batch_ref, topic, partition) \
                 DO UPDATE SET applied_offset = EXCLUDED.applied_offset",
            )
            .bind(&refs)
            .bind(&topics)
            .bind(&partitions)
            .bind(&offsets)
            .execute(&mut *self.products.tx)
            .await
            .map_err(classify)?;
        }
        tracing::debug!(saved = ?started.elapsed(), outbox_rows = self.outbox.len(), "batch writes");
        let PgProductRepository {
            tx,
            cache,
            seen,
            mut owners,
            new_owners,
            ..
        } = self.products;
        // Batch owners are learnt only once the commit succeeded: an owner
        // carries no revision, so one cached from a transaction that rolled
        // back could not be told from a true one. Only the owners this
        // transaction looked up or read, and those of the batches it added:
        // not every batch of every product it used, which cost a clone and a
        // cache insert per batch per transaction, and a product's batches
        // only grow. An owner that fell out of the cache is read again, by
        // reference, when a message names its batch.
        owners.extend(new_owners);
        // Products go back in the cache before the commit, owners only after
        // it (see ProductCache::put_back and learn_owners).
        // Without the lines they learnt, nor their batches taken in full:
        // what is kept between transactions is a product's batches with
        // stock and their sums, whatever its history.
        cache.put_back(seen.into_iter().map(|mut tracked| {
            tracked.product.forget_lines();
            // The batches taken in full are forgotten too: their ids with them.
            let product = &tracked.product;
            if tracked.batch_ids.len() > product.batches().len() {
                tracked
                    .batch_ids
                    .retain(|reference, _| product.batch(reference).is_some());
            }
            Stored {
                product: Box::new(tracked.product),
                batch_ids: tracked.batch_ids,
                revision: tracked.revision,
            }
        }));
        tx.commit().await.map_err(classify)?;
        cache.learn_owners(owners);
        // After the commit, so that the relay this wakes finds the rows.
        if let Some(written) = self.written {
            written.record_rows(&self.outbox);
        }
        Ok(())
    }
}
