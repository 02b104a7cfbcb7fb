//! PostgreSQL behind the service layer: the product repository, the unit of
//! work that commits the state, outbox rows and idempotency records of a
//! batch of messages in one transaction, and the migrations. The read model
//! `allocations_view` is a view over `allocations` and `batches`, so it is
//! current as soon as they are.
//!
//! A unit of work here spans several messages of one partition, so that the
//! cost of a commit (a WAL flush with `synchronous_commit` on) is shared.
//! The products the batch names are locked up front in SKU order
//! (`SELECT ... FOR UPDATE`), which makes the versions read current for the
//! whole transaction and makes concurrent batches queue rather than deadlock.
//! Writes are set-based: one statement per table, whatever the batch size.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::NaiveDate;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::domain::{Batch, BatchRef, Event, OrderId, OrderLine, Product, Sku};
use crate::service_layer::batch::DeadLetterReason;
use crate::service_layer::{
    BatchUnitOfWork, ProductRepository, RepositoryError, Store, UnitOfWork,
};

use super::outbox::{self, InboundMessage, MessageContext, OutboxColumns, OutboxRecord};

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Session settings of the worker's connections, each unless DATABASE_URL
/// sets it already (`application_name=…`, or `options=-c name=value`):
///
/// - `application_name`: the worker, in `pg_stat_activity` and the logs;
/// - `statement_timeout`: no statement of the worker takes seconds; one that
///   runs away is cancelled and its transaction retried, like an outage;
/// - `lock_timeout`: a transaction waiting for a row lock (another session
///   holding a product) gives up, hands its connection back and is retried
///   after a back-off, rather than holding a connection for as long as the
///   lock is held;
/// - `idle_in_transaction_session_timeout`: a session that leaves a
///   transaction open (the worker stuck between two statements) loses it and
///   its locks. The relay holds its transaction while the broker
///   acknowledges a pass (up to librdkafka's `message.timeout.ms`, 30 s by
///   default), so this is well above that.
///
/// They go in the startup packet's `options`, set once per connection at no
/// cost per transaction. A pooler in transaction mode (PgBouncer) refuses
/// that parameter unless told to ignore it (`ignore_startup_parameters =
/// options`); set them on the database role instead then (`ALTER ROLE …
/// SET lock_timeout = '10s'`). Migrations run without them (see bootstrap).
pub fn worker_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    let options = match options.get_application_name() {
        Some(_) => options,
        None => options.application_name(APPLICATION_NAME),
    };
    let given = options.get_options().unwrap_or_default().to_owned();
    let missing: Vec<(&str, &str)> = SESSION_TIMEOUTS
        .iter()
        .filter(|(name, _)| !given.contains(&format!("{name}=")))
        .copied()
        .collect();
    if missing.is_empty() {
        options
    } else {
        options.options(missing)
    }
}

/// `application_name` of the worker's connections.
pub const APPLICATION_NAME: &str = "allocation-worker";

/// See [`worker_connect_options`].
pub const SESSION_TIMEOUTS: [(&str, &str); 3] = [
    ("statement_timeout", "30s"),
    ("lock_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "2min"),
];

/// A pool that does not connect until first used, so that the worker can start,
/// report not-ready and back off while the database is down.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        // sqlx pings a connection on every acquire by default: a round trip
        // before each transaction. Only a connection that sat idle is
        // checked; a broken busy one fails its first statement, which is
        // retried like any outage, and sqlx drops it on release.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

/// How long a pooled connection may sit unused before it is checked on
/// acquire.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections kept out of the pool from one transaction to the next. sqlx
/// 0.8 pings every connection the pool takes back, a round trip per
/// transaction that cannot be switched off; a caller that begins its next
/// transaction soon after reuses the connection of its last one instead.
/// Only a connection whose transaction committed should be kept: one that
/// failed goes back to the pool, which checks it. One found, at the next
/// acquire, to have been kept for `IDLE_BEFORE_PING` or longer goes back to
/// the pool too instead of being used, so a connection that sat idle is
/// checked as any other. Until then, kept connections count as in use.
pub struct KeptConnections {
    pool: PgPool,
    kept: Mutex<Vec<(PoolConnection<Postgres>, std::time::Instant)>>,
    most: usize,
    /// Set by [`Self::close`]: nothing is kept any more.
    closed: AtomicBool,
}

impl KeptConnections {
    /// Keeps at most `most` connections, which the pool counts as in use:
    /// leave it some for the others (the HTTP probes).
    pub fn new(pool: PgPool, most: usize) -> Self {
        Self {
            pool,
            kept: Mutex::new(Vec::with_capacity(most)),
            most,
            closed: AtomicBool::new(false),
        }
    }

    /// The most recently kept connection, or one from the pool.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        loop {
            let next = self.lock().pop();
            match next {
                Some((conn, since)) if since.elapsed() < IDLE_BEFORE_PING => return Ok(conn),
                // Dropped: back to the pool, which checks it.
                Some(_) => continue,
                None => return self.pool.acquire().await,
            }
        }
    }

    /// Keeps `conn` for the next [`Self::acquire`]; hands it back to the pool
    /// when enough are kept.
    pub fn keep(&self, conn: PoolConnection<Postgres>) {
        let mut kept = self.lock();
        if kept.len() < self.most && !self.closed.load(Ordering::Relaxed) {
            kept.push((conn, std::time::Instant::now()));
        }
    }

    /// Hands every kept connection back to the pool, and keeps none from now
    /// on: closing the pool waits for all its connections, and a task still
    /// running at shutdown (a message stuck on a lock) keeps this alive.
    pub fn close(&self) {
        let mut kept = self.lock();
        self.closed.store(true, Ordering::Relaxed);
        kept.clear();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, std::time::Instant)>> {
        // A panic while holding it cannot leave the list inconsistent.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Maps a database error to the service layer's two transient kinds. Unique
/// violations, serialization failures and deadlocks mean another transaction
/// won a race; anything else means the database is not usable right now.
pub fn classify(error: sqlx::Error) -> RepositoryError {
    if let sqlx::Error::Database(db) = &error {
        if matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01")) {
            return RepositoryError::Conflict(db.message().to_owned());
        }
    }
    RepositoryError::Unavailable(Box::new(error))
}

/// Products kept in memory between transactions, shared by the worker's
/// partitions, so that a product is not read back from the database after
/// every commit. A transaction takes a product out when it has locked its row,
/// and uses it only if the row still carries the revision the copy was saved
/// with; it puts its products back before committing, so the next holder of
/// the lock finds them. A copy whose transaction rolled back carries a
/// revision the database never got, and is never used.
#[derive(Default)]
pub struct ProductCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    products: HashMap<Sku, Stored>,
    /// A batch reference never changes product, so its owner is kept for good.
    owners: HashMap<BatchRef, Sku>,
}

/// Bound on cached products (and batch owners). A product with a few hundred
/// lines takes tens of KiB; past the bound the cache is emptied, which costs
/// one read per product and nothing else.
const CACHE_CAPACITY: usize = 2048;

impl ProductCache {
    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A panic while the lock was held left at worst a stale entry, which
        // the revision check refuses: carry on with the data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A product as saved, with the ids of its batch rows and its revision.
struct Stored {
    product: Product,
    batch_ids: HashMap<BatchRef, i64>,
    revision: i64,
}

/// A new revision number: random, so that no other writer (another instance,
/// or a transaction that rolled back) can produce the same one.
fn fresh_revision() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    // 0 is the column's default for rows written before revisions existed.
    match hasher.finish() as i64 {
        0 => 1,
        n => n,
    }
}

/// A product in a unit of work, kept beside the state it was loaded in, so
/// that commit writes only the difference.
struct Tracked {
    product: Product,
    /// `None` for a product created in this unit of work.
    original: Option<Product>,
    batch_ids: HashMap<BatchRef, i64>,
    /// As read (0 for a new product); set anew when the product is written.
    revision: i64,
    /// Handed to a handler in this unit of work: saved (and version-checked) at commit.
    used: bool,
}

type ProductRow = (String, i64, i64);
type BatchRow = (i64, String, String, i64, i64, Option<NaiveDate>);
type LineRow = (String, i64, String, i64);

pub struct PgProductRepository<'c> {
    tx: Transaction<'c, Postgres>,
    cache: &'c ProductCache,
    seen: Vec<Tracked>,
    /// Owners of stored batches, as learnt from the cache or the database.
    owners: HashMap<BatchRef, Sku>,
    index: HashMap<Sku, usize>,
    /// Owners of batches created in this unit of work by finished messages.
    new_owners: HashMap<BatchRef, Sku>,
    /// Names looked up and not stored (when this unit of work began).
    absent_skus: HashSet<Sku>,
    absent_refs: HashSet<BatchRef>,
    /// Products handed out during the current message, with their version
    /// then, and whether the message created them.
    touched: Vec<(usize, i64, bool)>,
}

impl PgProductRepository<'_> {
    fn touch(&mut self, i: usize, created: bool) {
        if !self.touched.iter().any(|(t, _, _)| *t == i) {
            let version = self.seen[i].product.version_number();
            self.touched.push((i, version, created));
        }
        self.seen[i].used = true;
    }

    /// Locks and loads every product named by `skus` or owning one of `refs`
    /// that is not loaded yet, and returns which of the idempotency `keys`
    /// are recorded as processed already (in the same round trip). Locks are
    /// taken in SKU order, so two batches naming the same products wait for
    /// each other instead of deadlocking.
    pub async fn preload(
        &mut self,
        skus: &[&Sku],
        refs: &[&BatchRef],
        keys: &[&str],
    ) -> Result<HashSet<String>, RepositoryError> {
        if refs.iter().any(|r| !self.owners.contains_key(*r)) {
            let state = self.cache.state();
            for reference in refs {
                if let Some(sku) = state.owners.get(*reference) {
                    self.owners.insert((*reference).clone(), sku.clone());
                }
            }
        }
        let unknown_refs: Vec<&str> = refs
            .iter()
            .filter(|r| {
                !self.owners.contains_key(**r)
                    && !self.new_owners.contains_key(**r)
                    && !self.absent_refs.contains(**r)
            })
            .map(|r| r.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !unknown_refs.is_empty() {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT reference, sku FROM batches WHERE reference = ANY($1)")
                    .bind(&unknown_refs)
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(classify)?;
            for (reference, sku) in rows {
                let reference = stored_name(BatchRef::parse(reference))?;
                let sku = stored_name(Sku::parse(sku))?;
                self.owners.insert(reference, sku);
            }
            for reference in unknown_refs {
                if let Ok(reference) = BatchRef::parse(reference) {
                    if !self.owners.contains_key(&reference) {
                        self.absent_refs.insert(reference);
                    }
                }
            }
        }

        let mut wanted: Vec<String> = skus
            .iter()
            .copied()
            .chain(refs.iter().filter_map(|r| self.owners.get(*r)))
            .filter(|s| !self.index.contains_key(*s) && !self.absent_skus.contains(*s))
            .map(|s| s.as_str().to_owned())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() && keys.is_empty() {
            return Ok(HashSet::new());
        }
        // A processed key comes back as a row without a version.
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "WITH locked AS ( \
                 SELECT sku, version_number, revision FROM products WHERE sku = ANY($1) \
                 ORDER BY sku FOR UPDATE) \
             SELECT sku, version_number, revision FROM locked \
             UNION ALL \
             SELECT idempotency_key, NULL, NULL FROM processed_messages \
             WHERE idempotency_key = ANY($2)",
        )
        .bind(&wanted)
        .bind(keys)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(classify)?;
        let mut done = HashSet::new();
        let mut locked: Vec<ProductRow> = Vec::with_capacity(rows.len());
        for (name, version, revision) in rows {
            match (version, revision) {
                (Some(version), Some(revision)) => locked.push((name, version, revision)),
                _ => {
                    done.insert(name);
                }
            }
        }

        let mut to_read: Vec<(Sku, i64, i64)> = Vec::new();
        let mut found: HashSet<&str> = HashSet::with_capacity(locked.len());
        let mut hits = Vec::new();
        {
            let mut state = self.cache.state();
            for (sku, version, revision) in &locked {
                found.insert(sku.as_str());
                let sku = stored_name(Sku::parse(sku.clone()))?;
                match state.products.remove(&sku) {
                    Some(stored)
                        if stored.revision == *revision
                            && stored.product.version_number() == *version =>
                    {
                        hits.push(stored);
                    }
                    _ => to_read.push((sku, *version, *revision)),
                }
            }
        }
        for stored in hits {
            self.push_loaded(stored.product, stored.batch_ids, stored.revision);
        }
        for sku in wanted.iter().filter(|s| !found.contains(s.as_str())) {
            if let Ok(sku) = Sku::parse(sku.as_str()) {
                self.absent_skus.insert(sku);
            }
        }
        if !to_read.is_empty() {
            self.read(to_read).await?;
        }
        Ok(done)
    }

    fn push_loaded(&mut self, product: Product, batch_ids: HashMap<BatchRef, i64>, revision: i64) {
        self.index.insert(product.sku().clone(), self.seen.len());
        self.seen.push(Tracked {
            original: Some(product.clone()),
            product,
            batch_ids,
            revision,
            used: false,
        });
    }

    /// Reads locked products' batches and allocations, in creation order.
    async fn read(&mut self, products: Vec<(Sku, i64, i64)>) -> Result<(), RepositoryError> {
        let skus: Vec<&str> = products.iter().map(|(s, _, _)| s.as_str()).collect();
        let conn: &mut PgConnection = &mut self.tx;
        let batch_rows: Vec<BatchRow> = sqlx::query_as(
            "SELECT id, sku, reference, purchased_quantity, \
             COALESCE(created_quantity, purchased_quantity), eta FROM batches \
             WHERE sku = ANY($1) ORDER BY id",
        )
        .bind(&skus)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        let line_rows: Vec<LineRow> = sqlx::query_as(
            "SELECT a.sku, a.batch_id, a.orderid, a.qty FROM allocations a \
             JOIN batches b ON b.id = a.batch_id WHERE b.sku = ANY($1) ORDER BY a.id",
        )
        .bind(&skus)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;

        let by_sku: HashMap<&str, &Sku> =
            products.iter().map(|(s, _, _)| (s.as_str(), s)).collect();
        let sku_of = |name: &str| {
            by_sku.get(name).copied().ok_or_else(|| {
                RepositoryError::Unavailable(format!("unexpected SKU {name} in a read").into())
            })
        };
        let mut lines: HashMap<i64, Vec<OrderLine>> = HashMap::new();
        for (sku, batch_id, orderid, qty) in line_rows {
            lines.entry(batch_id).or_default().push(OrderLine {
                orderid: stored_name(OrderId::parse(orderid))?,
                sku: sku_of(&sku)?.clone(),
                qty: stored_qty(qty)?,
            });
        }
        let mut batches: HashMap<&str, (Vec<Batch>, HashMap<BatchRef, i64>)> = HashMap::new();
        for (id, sku, reference, purchased, created, eta) in batch_rows {
            let owner = sku_of(&sku)?;
            let reference = stored_name(BatchRef::parse(reference))?;
            let entry = batches.entry(owner.as_str()).or_default();
            entry.1.insert(reference.clone(), id);
            self.owners.insert(reference.clone(), owner.clone());
            entry.0.push(
                Batch::restore(
                    reference,
                    owner.clone(),
                    stored_qty(purchased)?,
                    eta,
                    lines.remove(&id).unwrap_or_default(),
                )
                .created_with(stored_qty(created)?),
            );
        }
        for (sku, version, revision) in &products {
            let (list, ids) = batches.remove(sku.as_str()).unwrap_or_default();
            self.push_loaded(
                Product::restore(sku.clone(), *version, list),
                ids,
                *revision,
            );
        }
        Ok(())
    }

    /// Called when a message is done: its new batches become known by reference.
    fn end_message(&mut self) {
        for (i, _, _) in std::mem::take(&mut self.touched) {
            let product = &self.seen[i].product;
            for batch in product.batches() {
                if !self.owners.contains_key(batch.reference()) {
                    self.new_owners
                        .insert(batch.reference().clone(), product.sku().clone());
                }
            }
        }
    }

    /// Forgets what the current message did, when it changed nothing (a
    /// rejected command is refused before the aggregate changes). `false` when
    /// it did change something: the caller must then start over.
    fn undo_message(&mut self) -> bool {
        let unchanged = self.touched.iter().all(|(i, version, created)| {
            !created && self.seen[*i].product.version_number() == *version
        });
        if unchanged {
            for (i, _, _) in std::mem::take(&mut self.touched) {
                drop(self.seen[i].product.take_events());
            }
        }
        unchanged
    }

    /// Back to the state as loaded: nothing of this unit of work's messages.
    fn reset(&mut self) {
        self.seen.retain(|t| t.original.is_some());
        for tracked in &mut self.seen {
            if let Some(original) = &tracked.original {
                tracked.product = original.clone();
            }
            tracked.used = false;
        }
        self.index = self
            .seen
            .iter()
            .enumerate()
            .map(|(i, t)| (t.product.sku().clone(), i))
            .collect();
        self.new_owners.clear();
        self.touched.clear();
    }

    /// Writes every product handed to a handler and what the messages
    /// queued, set-based. The rarer writes (new products and batches, changed
    /// quantities, freed lines) get a statement each when there are any; the
    /// rest, which every batch has, go in one statement of data-modifying
    /// CTEs, so that a batch costs few round trips. Products were locked when
    /// loaded; the version check guards against a writer that did not lock.
    async fn save_all(
        &mut self,
        outbox: &[OutboxRecord],
        processed: &[String],
    ) -> Result<(), RepositoryError> {
        let mut writes = Writes::default();
        for (i, tracked) in self.seen.iter().enumerate().filter(|(_, t)| t.used) {
            writes.add(i, tracked);
        }
        let mut new_ids: HashMap<BatchRef, i64> = HashMap::new();
        let conn: &mut PgConnection = &mut self.tx;
        if !writes.new_products.0.is_empty() {
            sqlx::query(
                "INSERT INTO products (sku, version_number, revision) \
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])",
            )
            .bind(&writes.new_products.0)
            .bind(&writes.new_products.1)
            .bind(&writes.new_products.2)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if !writes.new_batches.0.is_empty() {
            let ids: Vec<(i64, String)> = sqlx::query_as(
                "INSERT INTO batches (reference, sku, purchased_quantity, created_quantity, eta) \
                 SELECT r, s, q, c, e \
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::date[], $5::int8[]) \
                 WITH ORDINALITY AS v(r, s, q, e, c, n) ORDER BY n RETURNING id, reference",
            )
            .bind(&writes.new_batches.0)
            .bind(&writes.new_batches.1)
            .bind(&writes.new_batches.2)
            .bind(&writes.new_batches.3)
            .bind(&writes.new_batches.4)
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
            for (id, reference) in ids {
                new_ids.insert(stored_name(BatchRef::parse(reference))?, id);
            }
        }
        if !writes.quantities.0.is_empty() {
            sqlx::query(
                "UPDATE batches b SET purchased_quantity = v.q \
                 FROM unnest($1::text[], $2::int8[]) AS v(r, q) WHERE b.reference = v.r",
            )
            .bind(&writes.quantities.0)
            .bind(&writes.quantities.1)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        // A statement of its own, before the inserts: a line may move to
        // another batch, and (orderid, sku) is unique.
        if !writes.removed.0.is_empty() {
            sqlx::query(
                "DELETE FROM allocations a USING unnest($1::text[], $2::text[]) AS v(o, s) \
                 WHERE a.orderid = v.o AND a.sku = v.s",
            )
            .bind(&writes.removed.0)
            .bind(&writes.removed.1)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }

        let mut batch_ids = Vec::with_capacity(writes.added.len());
        let mut orderids = Vec::with_capacity(writes.added.len());
        let mut line_skus = Vec::with_capacity(writes.added.len());
        let mut qtys = Vec::with_capacity(writes.added.len());
        for (owner, reference, line) in &writes.added {
            let id = self.seen[*owner]
                .batch_ids
                .get(*reference)
                .or_else(|| new_ids.get(*reference))
                .copied()
                .ok_or_else(|| {
                    RepositoryError::Conflict(format!("batch {reference} has no stored id"))
                })?;
            batch_ids.push(id);
            orderids.push(line.orderid.as_str());
            line_skus.push(line.sku.as_str());
            qtys.push(i64::from(line.qty));
        }
        let records =
            OutboxColumns::new(outbox).map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
        // Allocation rows go in list order, so that ids keep each batch's
        // allocation order (LIFO deallocation reads it back); outbox rows in
        // decision order, which the relay publishes in. A concurrent delivery
        // of a message in this batch fails on processed_messages' primary
        // key (a Conflict): retried, it finds the key taken.
        let updated: i64 = sqlx::query_scalar(
            "WITH \
             versions AS ( \
                 UPDATE products p SET version_number = v.new, revision = v.rev \
                 FROM unnest($1::text[], $2::int8[], $3::int8[], $13::int8[]) \
                 AS v(sku, old, new, rev) \
                 WHERE p.sku = v.sku AND p.version_number = v.old RETURNING 1), \
             lines AS ( \
                 INSERT INTO allocations (batch_id, orderid, sku, qty) \
                 SELECT b, o, s, q FROM unnest($4::int8[], $5::text[], $6::text[], $7::int8[]) \
                 WITH ORDINALITY AS v(b, o, s, q, n) ORDER BY n), \
             keys AS ( \
                 INSERT INTO processed_messages (idempotency_key) SELECT unnest($8::text[])), \
             records AS ( \
                 INSERT INTO outbox (kind, message_key, payload, headers) \
                 SELECT x.kind, x.k, x.p, x.h \
                 FROM unnest($9::text[], $10::bytea[], $11::bytea[], $12::bytea[]) \
                 WITH ORDINALITY AS x(kind, k, p, h, n) ORDER BY x.n RETURNING id), \
             pending AS ( \
                 INSERT INTO outbox_pending (id) SELECT id FROM records) \
             SELECT count(*) FROM versions",
        )
        .bind(&writes.versions.0)
        .bind(&writes.versions.1)
        .bind(&writes.versions.2)
        .bind(&batch_ids)
        .bind(&orderids)
        .bind(&line_skus)
        .bind(&qtys)
        .bind(processed)
        .bind(&records.kinds)
        .bind(&records.keys)
        .bind(&records.payloads)
        .bind(&records.headers)
        .bind(&writes.versions.3)
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
        if updated != writes.versions.0.len() as i64 {
            return Err(RepositoryError::Conflict(
                "a product is no longer at the version it was loaded at".into(),
            ));
        }
        let revisions = std::mem::take(&mut writes.revisions);
        drop(writes);
        for (position, revision) in revisions {
            self.seen[position].revision = revision;
        }
        for tracked in &mut self.seen {
            for batch in tracked.product.batches() {
                if let Some(id) = new_ids.get(batch.reference()) {
                    tracked.batch_ids.insert(batch.reference().clone(), *id);
                }
            }
        }
        Ok(())
    }
}

/// reference, sku, purchased quantity, eta, created quantity.
type NewBatches<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
    Vec<Option<NaiveDate>>,
    Vec<i64>,
);

/// The rows a commit writes, gathered product by product.
#[derive(Default)]
struct Writes<'a> {
    /// sku, version, revision.
    new_products: (Vec<&'a str>, Vec<i64>, Vec<i64>),
    /// sku, loaded version, new version, new revision.
    versions: (Vec<&'a str>, Vec<i64>, Vec<i64>, Vec<i64>),
    /// Position of the tracked product and its new revision.
    revisions: Vec<(usize, i64)>,
    new_batches: NewBatches<'a>,
    quantities: (Vec<&'a str>, Vec<i64>),
    removed: (Vec<&'a str>, Vec<&'a str>),
    /// Position of the tracked product, batch, line.
    added: Vec<(usize, &'a BatchRef, &'a OrderLine)>,
}

impl<'a> Writes<'a> {
    fn add(&mut self, position: usize, tracked: &'a Tracked) {
        let product = &tracked.product;
        let sku = product.sku().as_str();
        match &tracked.original {
            None => {
                let revision = fresh_revision();
                self.new_products.0.push(sku);
                self.new_products.1.push(product.version_number());
                self.new_products.2.push(revision);
                self.revisions.push((position, revision));
            }
            // An unchanged product is not written: it stays locked until
            // commit, so a decision such as OutOfStock made on it holds.
            Some(original) if original.version_number() == product.version_number() => {}
            Some(original) => {
                let revision = fresh_revision();
                self.versions.0.push(sku);
                self.versions.1.push(original.version_number());
                self.versions.2.push(product.version_number());
                self.versions.3.push(revision);
                self.revisions.push((position, revision));
            }
        }
        let original_batches: HashMap<&BatchRef, &Batch> = tracked
            .original
            .iter()
            .flat_map(|p| p.batches())
            .map(|b| (b.reference(), b))
            .collect();
        for batch in product.batches() {
            match original_batches.get(batch.reference()) {
                None => {
                    self.new_batches.0.push(batch.reference().as_str());
                    self.new_batches.1.push(sku);
                    self.new_batches
                        .2
                        .push(i64::from(batch.purchased_quantity()));
                    self.new_batches.3.push(batch.eta());
                    self.new_batches.4.push(i64::from(batch.created_quantity()));
                }
                Some(old) if old.purchased_quantity() != batch.purchased_quantity() => {
                    self.quantities.0.push(batch.reference().as_str());
                    self.quantities
                        .1
                        .push(i64::from(batch.purchased_quantity()));
                }
                Some(_) => {}
            }
        }
        // Allocations, batch by batch: the stored rows' ids must keep the
        // domain's allocation order. Rows both lists share from the start
        // stay; the rest of the old list is deleted and the rest of the new
        // list inserted in order, so a line freed and allocated again, even to
        // the same batch, moves to the end.
        for batch in product.batches() {
            let old = original_batches
                .get(batch.reference())
                .map_or(&[][..], |b| b.allocations());
            let new = batch.allocations();
            let kept = old.iter().zip(new).take_while(|(o, n)| o == n).count();
            for line in &old[kept..] {
                self.removed.0.push(line.orderid.as_str());
                self.removed.1.push(sku);
            }
            for line in &new[kept..] {
                self.added.push((position, batch.reference(), line));
            }
        }
    }
}

/// Stored names were validated on the way in; one that no longer parses means
/// the data was changed by hand, which retrying will not fix but must not panic.
fn stored_name<T>(parsed: Result<T, crate::domain::InvalidName>) -> Result<T, RepositoryError> {
    parsed.map_err(|e| RepositoryError::Unavailable(format!("invalid stored name: {e}").into()))
}

fn stored_qty(value: i64) -> Result<u32, RepositoryError> {
    u32::try_from(value).map_err(|_| {
        RepositoryError::Unavailable(format!("invalid stored quantity {value}").into())
    })
}

impl ProductRepository for PgProductRepository<'_> {
    fn add(&mut self, product: Product) {
        let i = self.seen.len();
        self.index.insert(product.sku().clone(), i);
        self.seen.push(Tracked {
            product,
            original: None,
            batch_ids: HashMap::new(),
            revision: 0,
            used: false,
        });
        self.touch(i, true);
    }

    async fn get(&mut self, sku: &Sku) -> Result<Option<&mut Product>, RepositoryError> {
        if !self.index.contains_key(sku) && !self.absent_skus.contains(sku) {
            // Not named by the batch up front (a test, or a handler reaching
            // for another product): lock and load it now.
            self.preload(&[sku], &[], &[]).await?;
        }
        match self.index.get(sku).copied() {
            Some(i) => {
                self.touch(i, false);
                Ok(Some(&mut self.seen[i].product))
            }
            None => Ok(None),
        }
    }

    async fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        let owner = self
            .owners
            .get(reference)
            .or_else(|| self.new_owners.get(reference))
            .cloned()
            .or_else(|| {
                // A batch created earlier in the current message.
                self.touched.iter().find_map(|(i, _, _)| {
                    let p = &self.seen[*i].product;
                    p.batch(reference).map(|_| p.sku().clone())
                })
            });
        let owner = match owner {
            Some(sku) => Some(sku),
            None if self.absent_refs.contains(reference) => None,
            None => {
                self.preload(&[], &[reference], &[]).await?;
                self.owners.get(reference).cloned()
            }
        };
        let Some(sku) = owner else { return Ok(None) };
        let holds = self
            .get(&sku)
            .await?
            .is_some_and(|p| p.batch(reference).is_some());
        if holds {
            return self.get(&sku).await;
        }
        // An owner that does not hold the batch: never learnt from a
        // committed transaction, then. Forget it and ask the database.
        tracing::warn!(%reference, owner = %sku, "cached batch owner was wrong; reading it again");
        self.owners.remove(reference);
        self.new_owners.remove(reference);
        self.cache.state().owners.remove(reference);
        self.absent_refs.remove(reference);
        self.preload(&[], &[reference], &[]).await?;
        match self.owners.get(reference).cloned() {
            Some(owner) if owner != sku => self.get(&owner).await,
            _ => Ok(None),
        }
    }

    fn seen(&mut self) -> Vec<&mut Product> {
        self.seen.iter_mut().map(|t| &mut t.product).collect()
    }
}

/// One transaction for a batch of messages. Created by [`PgUnitOfWork::begin`]
/// (or [`PgStore`]); nothing is stored until [`BatchUnitOfWork::commit`];
/// dropping it rolls back.
///
/// Between [`BatchUnitOfWork::start_message`] and
/// [`BatchUnitOfWork::finish_message`] it is the unit of work of one message:
/// events are numbered within the message, and
/// [`BatchUnitOfWork::reject_message`] takes back what the message queued.
pub struct PgUnitOfWork<'c> {
    products: PgProductRepository<'c>,
    context: MessageContext,
    /// Outbox length when the current message started.
    message_start: usize,
    outbox: Vec<OutboxRecord>,
    processed: Vec<String>,
}

impl<'c> PgUnitOfWork<'c> {
    /// Begins on `conn`: the pool, or a connection in hand (see
    /// [`KeptConnections`]).
    pub async fn begin(
        conn: impl sqlx::Acquire<'c, Database = Postgres>,
        cache: &'c ProductCache,
    ) -> Result<Self, RepositoryError> {
        let tx = conn.begin().await.map_err(classify)?;
        Ok(Self {
            products: PgProductRepository {
                tx,
                cache,
                owners: HashMap::new(),
                seen: Vec::new(),
                index: HashMap::new(),
                new_owners: HashMap::new(),
                absent_skus: HashSet::new(),
                absent_refs: HashSet::new(),
                touched: Vec::new(),
            },
            context: MessageContext {
                idempotency_key: String::new(),
                traceparent: None,
                tracestate: None,
            },
            message_start: 0,
            outbox: Vec::new(),
            processed: Vec::new(),
        })
    }
}

/// The database to the batch processor
/// ([`crate::service_layer::batch::process`]): a unit of work per attempt at
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
}

/// Pool connections the partitions leave to the relay (one) and the HTTP
/// probes and metrics (two).
pub const RESERVED_CONNECTIONS: usize = 3;

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
        }
    }

    /// Hands every kept connection back to the pool (see
    /// [`KeptConnections::close`]): closing the pool waits for them.
    pub fn close(&self) {
        self.connections.close();
    }
}

/// What one attempt at a batch holds: its share of the pool, and a
/// connection.
pub struct PgSession<'a> {
    /// Held until the connection is back (kept or in the pool).
    transaction: SemaphorePermit<'a>,
    conn: PoolConnection<Postgres>,
}

impl Store for PgStore {
    type Message = InboundMessage;
    type Context = MessageContext;
    type Session<'a> = PgSession<'a>;
    type UnitOfWork<'s> = PgUnitOfWork<'s>;

    async fn session(&self) -> Result<PgSession<'_>, RepositoryError> {
        let transaction = self
            .transactions
            .acquire()
            .await
            .map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
        let conn = self.connections.acquire().await.map_err(classify)?;
        Ok(PgSession { transaction, conn })
    }

    async fn begin<'s, 'a: 's>(
        &'s self,
        session: &'s mut PgSession<'a>,
    ) -> Result<PgUnitOfWork<'s>, RepositoryError> {
        PgUnitOfWork::begin(&mut *session.conn, &self.cache).await
    }

    fn end_session(&self, session: PgSession<'_>, committed: bool) {
        let PgSession { transaction, conn } = session;
        // Kept only after a commit; after an error it goes back to the pool,
        // which checks it.
        if committed {
            self.connections.keep(conn);
        } else {
            drop(conn);
        }
        drop(transaction);
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
        for (i, _, _) in &repo.touched {
            events.extend(repo.seen[*i].product.take_events());
        }
        events
    }
}

impl<'c> BatchUnitOfWork for PgUnitOfWork<'c> {
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

    /// Stores everything queued, then commits. A `Conflict` means the caller
    /// must retry the batch from the start in a new unit of work.
    async fn commit(mut self) -> Result<(), RepositoryError> {
        let started = std::time::Instant::now();
        self.products
            .save_all(&self.outbox, &self.processed)
            .await?;
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
        // back could not be told from a true one.
        owners.extend(new_owners);
        for tracked in &seen {
            for batch in tracked.product.batches() {
                if !owners.contains_key(batch.reference()) {
                    owners.insert(batch.reference().clone(), tracked.product.sku().clone());
                }
            }
        }
        // Products go back in the cache before the commit, so that the next
        // transaction to lock one of them (it waits for this one) finds it.
        // Should the commit fail, their revisions are not the database's,
        // and the copies are never used.
        {
            let mut state = cache.state();
            for tracked in seen {
                state.products.insert(
                    tracked.product.sku().clone(),
                    Stored {
                        product: tracked.product,
                        batch_ids: tracked.batch_ids,
                        revision: tracked.revision,
                    },
                );
            }
            if state.products.len() > CACHE_CAPACITY {
                state.products.clear();
            }
        }
        tx.commit().await.map_err(classify)?;
        let mut state = cache.state();
        state.owners.extend(owners);
        if state.owners.len() > 4 * CACHE_CAPACITY {
            state.owners.clear();
        }
        Ok(())
    }
}
