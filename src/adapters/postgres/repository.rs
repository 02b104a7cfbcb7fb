//! The product repository on PostgreSQL: the products of one transaction,
//! locked and loaded in one round trip per batch (with which messages were
//! processed before), taken from the cache when its copy is current, and
//! tracked beside the state they were loaded in, for a message taken back.
//! A commit writes what each product recorded as changed (see `writes`).
//!
//! A product is loaded as its batches with stock left and how much of each
//! is allocated (`batches.allocated_quantity`), never as every batch or
//! every line it ever had: what else a decision needs is read when it is
//! needed, by key: whether a line is allocated, with the batch it is
//! allocated to (all the lines of a chunk of messages in one statement,
//! [`PgProductRepository::load_lines`]); a batch taken in full that a
//! message names, by reference; and the most recent lines of a batch whose
//! quantity drops, as many as it frees, newest first.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDate;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::domain::{Batch, BatchRef, Change, OrderId, OrderLine, Product, Sku};
use crate::service_layer::{ProductRepository, RepositoryError};

use super::cache::ProductCache;
use super::pool::{classify, stored_name, stored_qty};

/// A product in a unit of work. Commit writes what the product records as
/// changed ([`Product::take_changes`]), checked against the version it was
/// loaded at. No copy of the product as loaded is kept: that copy cost a
/// clone of every batch per transaction, and a product's batches only grow.
/// A unit of work that must start over ([`PgProductRepository::reset`])
/// reads its products again instead.
pub(super) struct Tracked {
    pub(super) product: Product,
    /// The version it was loaded at; `None` for a product created in this
    /// unit of work.
    pub(super) loaded_version: Option<i64>,
    pub(super) batch_ids: HashMap<BatchRef, i64>,
    /// As read (0 for a new product); set anew when the product is written.
    pub(super) revision: i64,
    /// Handed to a handler in this unit of work: saved (and version-checked) at commit.
    pub(super) used: bool,
    /// By batch: the id of the earliest allocation row read back (the
    /// batch's lines from there on are known to the product). Lines are read
    /// below it, newest first.
    pub(super) read_down_to: HashMap<BatchRef, i64>,
}

/// A product handed out during the current message.
pub(super) struct Touched {
    /// Its position in [`PgProductRepository`]'s tracked products.
    pub(super) index: usize,
    /// Its version when the message first got it.
    version: i64,
    /// Whether the message created it.
    created: bool,
    /// How many changes it had recorded when the message first got it: the
    /// message's own are those after.
    changes_from: usize,
}

type ProductRow = (String, i64, i64);
type BatchRow = (i64, String, String, i64, i64, Option<NaiveDate>, i64);
/// A product's batches as read, with their row ids, and the ids by reference.
type LoadedBatches = (Vec<(i64, Batch)>, HashMap<BatchRef, i64>);
/// A line's order id and quantity, then its batch's row.
type LineRow = (
    String,
    i64,
    i64,
    String,
    String,
    i64,
    i64,
    Option<NaiveDate>,
    i64,
);

/// The most lines read back in one statement for a quantity drop; the
/// first read asks for as many as the quantity to free could need, up to
/// [`FIRST_LINES`], and each further one for four times as many.
const FIRST_LINES: i64 = 64;
const MOST_LINES: i64 = 16_384;

/// The products of one transaction, by SKU, with an identity map: each is
/// locked and loaded (from the cache when its copy there is current) once,
/// and tracked beside the state it was loaded in.
pub struct PgProductRepository<'c> {
    pub(super) tx: Transaction<'c, Postgres>,
    pub(super) cache: &'c ProductCache,
    pub(super) seen: Vec<Tracked>,
    /// Owners of stored batches, as learnt from the cache or the database.
    pub(super) owners: HashMap<BatchRef, Sku>,
    index: HashMap<Sku, usize>,
    /// Owners of batches created in this unit of work by finished messages.
    pub(super) new_owners: HashMap<BatchRef, Sku>,
    /// Names looked up and not stored (when this unit of work began).
    absent_skus: HashSet<Sku>,
    absent_refs: HashSet<BatchRef>,
    /// Products handed out during the current message.
    pub(super) touched: Vec<Touched>,
}

impl<'c> PgProductRepository<'c> {
    /// Nothing loaded yet, in transaction `tx`.
    pub(super) fn new(tx: Transaction<'c, Postgres>, cache: &'c ProductCache) -> Self {
        Self {
            tx,
            cache,
            owners: HashMap::new(),
            seen: Vec::new(),
            index: HashMap::new(),
            new_owners: HashMap::new(),
            absent_skus: HashSet::new(),
            absent_refs: HashSet::new(),
            touched: Vec::new(),
        }
    }
}

/// The batches with stock left of the products named by `$1` (an array of
/// SKUs), as a load of [`PgProductRepository`] reads them. Public for
/// the service test that holds its plan to primary-key lookups.
pub const OPEN_BATCHES_OF: &str = "SELECT id, sku, reference, purchased_quantity, \
     COALESCE(created_quantity, purchased_quantity), eta, allocated_quantity \
     FROM batches \
     WHERE id = ANY(ARRAY(SELECT batch_id FROM open_batches WHERE sku = ANY($1))) \
     AND purchased_quantity > allocated_quantity \
     ORDER BY id";

impl PgProductRepository<'_> {
    fn touch(&mut self, i: usize, created: bool) {
        if !self.touched.iter().any(|t| t.index == i) {
            let product = &self.seen[i].product;
            self.touched.push(Touched {
                index: i,
                version: product.version_number(),
                created,
                changes_from: product.changes().len(),
            });
        }
        self.seen[i].used = true;
    }

    /// Locks and loads every product named by `skus` or owning one of `refs`
    /// that is not loaded yet, and returns which of the idempotency `keys`
    /// are recorded as processed already (in the same round trip). Locks are
    /// taken in SKU order, so two batches naming the same products wait for
    /// each other instead of deadlocking.
    pub(crate) async fn preload(
        &mut self,
        skus: &[&Sku],
        refs: &[&BatchRef],
        keys: &[&str],
    ) -> Result<HashSet<String>, RepositoryError> {
        if refs.iter().any(|r| !self.owners.contains_key(*r)) {
            self.cache.owners_of(refs, &mut self.owners);
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
            // Nothing to lock; a named batch of a product loaded already
            // may still be unknown to it.
            self.learn_named(refs).await?;
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
        for (sku, version, revision) in &locked {
            found.insert(sku.as_str());
            let sku = stored_name(Sku::parse(sku.clone()))?;
            match self.cache.take_current(&sku, *version, *revision) {
                Some(stored) => hits.push(stored),
                None => to_read.push((sku, *version, *revision)),
            }
        }
        for stored in hits {
            self.push_loaded(*stored.product, stored.batch_ids, stored.revision);
        }
        for sku in wanted.iter().filter(|s| !found.contains(s.as_str())) {
            if let Ok(sku) = Sku::parse(sku.as_str()) {
                self.absent_skus.insert(sku);
            }
        }
        if !to_read.is_empty() {
            self.read(to_read).await?;
        }
        self.learn_named(refs).await?;
        Ok(done)
    }

    /// Gives the loaded products the batches of `refs` they own and do not
    /// know (taken in full, so not loaded with them), in one statement.
    async fn learn_named(&mut self, refs: &[&BatchRef]) -> Result<(), RepositoryError> {
        let mut named: Vec<(usize, BatchRef)> = Vec::new();
        for reference in refs {
            let Some(&i) = self.owners.get(*reference).and_then(|s| self.index.get(s)) else {
                continue;
            };
            if !self.seen[i].product.knows_batch(reference)
                && !named.iter().any(|(_, r)| r == *reference)
            {
                named.push((i, (*reference).clone()));
            }
        }
        self.learn_batches(&named).await
    }

    fn push_loaded(&mut self, product: Product, batch_ids: HashMap<BatchRef, i64>, revision: i64) {
        self.index.insert(product.sku().clone(), self.seen.len());
        self.seen.push(Tracked {
            loaded_version: Some(product.version_number()),
            product,
            batch_ids,
            revision,
            used: false,
            read_down_to: HashMap::new(),
        });
    }

    /// Tells tracked product `i` where a line is allocated, as stored.
    fn learn_line(&mut self, i: usize, orderid: &OrderId, at: Option<(&BatchRef, u32)>) {
        self.seen[i].product.learn_line(orderid.clone(), at);
    }

    /// Tells the tracked products whether each of `lines` is allocated, and
    /// where, in one statement for all of them. Lines of products not
    /// loaded, or that know them already, are not read.
    pub(crate) async fn load_lines(
        &mut self,
        lines: &[(&Sku, &OrderId)],
    ) -> Result<(), RepositoryError> {
        let mut wanted: Vec<(usize, &OrderId)> = Vec::new();
        let mut orderids: Vec<&str> = Vec::new();
        let mut skus: Vec<&str> = Vec::new();
        for (sku, orderid) in lines {
            if let Some(&i) = self.index.get(*sku) {
                if !self.seen[i].product.knows_line(orderid) {
                    wanted.push((i, orderid));
                    orderids.push(orderid.as_str());
                    skus.push(sku.as_str());
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // (orderid, sku) is unique: the index answers each line. The batch
        // comes with it: a line may be allocated to a batch taken in full,
        // which its product did not load.
        let rows: Vec<LineRow> = sqlx::query_as(
            "SELECT a.orderid, a.qty, b.id, b.sku, b.reference, b.purchased_quantity, \
             COALESCE(b.created_quantity, b.purchased_quantity), b.eta, b.allocated_quantity \
             FROM unnest($1::text[], $2::text[]) AS v(o, s) \
             JOIN allocations a ON a.orderid = v.o AND a.sku = v.s \
             JOIN batches b ON b.id = a.batch_id",
        )
        .bind(&orderids)
        .bind(&skus)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(classify)?;
        let mut found: HashMap<(String, String), (BatchRef, u32)> = HashMap::new();
        for (orderid, qty, id, sku, reference, purchased, created, eta, allocated) in rows {
            let (id, batch) =
                stored_batch((id, sku, reference, purchased, created, eta, allocated))?;
            let key = (orderid, batch.sku().as_str().to_owned());
            let at = (batch.reference().clone(), stored_qty(qty)?);
            if let Some(&i) = self.index.get(batch.sku()) {
                self.learn_batch(i, id, batch);
            }
            found.insert(key, at);
        }
        for (i, orderid) in wanted {
            let key = (
                orderid.as_str().to_owned(),
                self.seen[i].product.sku().as_str().to_owned(),
            );
            let at = found.get(&key).map(|(r, q)| (r, *q));
            self.learn_line(i, orderid, at);
        }
        Ok(())
    }

    /// Gives the loaded products, for every batch that `changes` lower, the
    /// stored lines the lowest quantity asked of it would free, newest
    /// first, in one statement for all of them. A batch of quantity changes
    /// then reads no lines message by message: each such read was a round
    /// trip made while the batch's products were locked, and the products'
    /// locks are what a batch of changes queues on. A message that needs
    /// more (its batch was allocated to since, or the statement's bound
    /// left it out) reads the rest itself ([`Self::load_freed_lines`]); a
    /// batch whose lines are not there is left to it too, and refused
    /// there. The statement reads [`MOST_LINES`] lines at most, as one of
    /// those reads may: a batch of drops of big batches must not make a
    /// statement that `statement_timeout` could stop every time.
    pub(crate) async fn load_lines_freed_by(
        &mut self,
        changes: &[(&BatchRef, u32)],
    ) -> Result<(), RepositoryError> {
        // The lowest quantity asked of a batch frees the most.
        let mut lowest: Vec<(&BatchRef, u32)> = Vec::new();
        let mut at: HashMap<&BatchRef, usize> = HashMap::new();
        for &(reference, qty) in changes {
            match at.get(reference) {
                Some(&k) => lowest[k].1 = lowest[k].1.min(qty),
                None => {
                    at.insert(reference, lowest.len());
                    lowest.push((reference, qty));
                }
            }
        }
        let mut owners: Vec<(usize, &BatchRef)> = Vec::new();
        let mut batch_ids: Vec<i64> = Vec::new();
        let mut belows: Vec<i64> = Vec::new();
        let mut limits: Vec<i64> = Vec::new();
        let mut budget = MOST_LINES;
        for (reference, qty) in lowest {
            if budget == 0 {
                break;
            }
            let Some(&i) = self.owners.get(reference).and_then(|s| self.index.get(s)) else {
                continue;
            };
            let tracked = &self.seen[i];
            let wanted = tracked.product.lines_wanted(reference, qty);
            // A batch new in this unit of work has no stored lines.
            let Some(&batch_id) = tracked.batch_ids.get(reference) else {
                continue;
            };
            if wanted == 0 {
                continue;
            }
            owners.push((i, reference));
            batch_ids.push(batch_id);
            belows.push(
                tracked
                    .read_down_to
                    .get(reference)
                    .copied()
                    .unwrap_or(i64::MAX),
            );
            // Every line has a quantity of at least 1.
            let limit = wanted.min(budget);
            budget -= limit;
            limits.push(limit);
        }
        if owners.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i64, i64, String, i64)> = sqlx::query_as(
            "SELECT v.n, a.id, a.orderid, a.qty \
             FROM unnest($1::int8[], $2::int8[], $3::int8[]) \
             WITH ORDINALITY AS v(batch_id, below, most, n) \
             CROSS JOIN LATERAL ( \
                 SELECT id, orderid, qty FROM allocations \
                 WHERE batch_id = v.batch_id AND id < v.below \
                 ORDER BY id DESC LIMIT v.most) a \
             ORDER BY v.n, a.id DESC",
        )
        .bind(&batch_ids)
        .bind(&belows)
        .bind(&limits)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(classify)?;
        // Newest first within each batch; a batch's lines are learnt oldest
        // first.
        let mut read: Vec<Vec<(i64, String, i64)>> = vec![Vec::new(); owners.len()];
        for (n, id, orderid, qty) in rows {
            // n counts the batches asked from 1.
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|k| read.get_mut(k)) {
                slot.push((id, orderid, qty));
            }
        }
        for ((i, reference), rows) in owners.into_iter().zip(read) {
            self.learn_earlier_rows(i, reference, rows)?;
        }
        Ok(())
    }

    /// Gives tracked product `i` the rows of batch `reference` read below
    /// every line it knows, newest first (id, order id, quantity), and
    /// records how far down the batch is now known. `false` when there were
    /// none.
    fn learn_earlier_rows(
        &mut self,
        i: usize,
        reference: &BatchRef,
        rows: Vec<(i64, String, i64)>,
    ) -> Result<bool, RepositoryError> {
        let Some(&(earliest, _, _)) = rows.last() else {
            return Ok(false);
        };
        let sku = self.seen[i].product.sku().clone();
        let mut lines = Vec::with_capacity(rows.len());
        for (_, orderid, qty) in rows.into_iter().rev() {
            lines.push(OrderLine {
                orderid: stored_name(OrderId::parse(orderid))?,
                sku: sku.clone(),
                qty: stored_qty(qty)?,
            });
        }
        let tracked = &mut self.seen[i];
        tracked.product.learn_earlier_lines(reference, lines);
        tracked.read_down_to.insert(reference.clone(), earliest);
        Ok(true)
    }

    /// Gives tracked product `i` the stored lines of batch `reference` that
    /// a change of its quantity to `qty` frees, newest first, a few
    /// statements at most, each reading only lines it needs (or a few more).
    async fn load_freed_lines(
        &mut self,
        i: usize,
        reference: &BatchRef,
        qty: u32,
    ) -> Result<(), RepositoryError> {
        let mut most = FIRST_LINES;
        loop {
            let wanted = self.seen[i].product.lines_wanted(reference, qty);
            if wanted == 0 {
                return Ok(());
            }
            let tracked = &self.seen[i];
            // A batch without a stored id is new in this unit of work: its
            // product knows every line of it.
            let Some(&batch_id) = tracked.batch_ids.get(reference) else {
                return Ok(());
            };
            let below = tracked
                .read_down_to
                .get(reference)
                .copied()
                .unwrap_or(i64::MAX);
            // Every line has a quantity of at least 1.
            let limit = wanted.min(most);
            let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT id, orderid, qty FROM allocations \
                 WHERE batch_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .bind(batch_id)
            .bind(below)
            .bind(limit)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(classify)?;
            if !self.learn_earlier_rows(i, reference, rows)? {
                // The stored sum counts lines that are not there: the
                // product refuses the change rather than guess.
                return Ok(());
            }
            most = (most * 4).min(MOST_LINES);
        }
    }

    /// Reads locked products' batches with stock left (their ids are in
    /// `open_batches`, kept by triggers), with how much of each is
    /// allocated: not their lines, nor the batches taken in full, however
    /// many the product has had. The predicate is repeated on the batch's
    /// row, which is what decides. The ids go by array, not by a join: as a
    /// join, on tables not analysed yet, `EXPLAIN` showed a hash join over a
    /// sequential scan of every batch, for each load, whereas an array of
    /// ids is looked up by primary key whatever the statistics say.
    async fn read(&mut self, products: Vec<(Sku, i64, i64)>) -> Result<(), RepositoryError> {
        let skus: Vec<&str> = products.iter().map(|(s, _, _)| s.as_str()).collect();
        let conn: &mut PgConnection = &mut self.tx;
        let batch_rows: Vec<BatchRow> = sqlx::query_as(OPEN_BATCHES_OF)
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
        let mut batches: HashMap<&str, LoadedBatches> = HashMap::new();
        // Owners are not learnt here: a load reads every open batch of a
        // product, and caching each one's owner cost a cache insert per
        // batch per load. A message that names a batch looks its owner up.
        for row in batch_rows {
            let owner = sku_of(&row.1)?;
            let (id, batch) = stored_batch_of(owner, row)?;
            let entry = batches.entry(owner.as_str()).or_default();
            entry.1.insert(batch.reference().clone(), id);
            entry.0.push((id, batch));
        }
        for (sku, version, revision) in &products {
            let (list, ids) = batches.remove(sku.as_str()).unwrap_or_default();
            self.push_loaded(
                Product::restore_some(sku.clone(), *version, list),
                ids,
                *revision,
            );
        }
        Ok(())
    }

    /// Gives tracked products batches of theirs they do not know, by
    /// reference, in one statement: `(i, reference)` asks for the batch
    /// `reference` of tracked product `i`. A reference that is not one of
    /// product `i`'s batches is told to it as such.
    async fn learn_batches(&mut self, wanted: &[(usize, BatchRef)]) -> Result<(), RepositoryError> {
        if wanted.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = wanted.iter().map(|(_, r)| r.as_str()).collect();
        let rows: Vec<BatchRow> = sqlx::query_as(
            "SELECT id, sku, reference, purchased_quantity, \
             COALESCE(created_quantity, purchased_quantity), eta, allocated_quantity \
             FROM batches WHERE reference = ANY($1)",
        )
        .bind(&refs)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(classify)?;
        for row in rows {
            let (id, batch) = stored_batch(row)?;
            if let Some(&i) = self.index.get(batch.sku()) {
                self.learn_batch(i, id, batch);
            }
        }
        for (i, reference) in wanted {
            self.seen[*i].product.learn_not_a_batch(reference.clone());
        }
        Ok(())
    }

    /// Gives tracked product `i` its stored batch `batch`, row `id`.
    fn learn_batch(&mut self, i: usize, id: i64, batch: Batch) {
        let tracked = &mut self.seen[i];
        if tracked.product.batch(batch.reference()).is_none() {
            tracked.batch_ids.insert(batch.reference().clone(), id);
            tracked.product.learn_batch(id, batch);
        }
    }

    /// Called when a message is done: its new batches become known by
    /// reference. Only the batches the message added are looked at (every
    /// batch of a product it created), not every batch of the products it
    /// touched: a product's batches only grow, and this runs per message.
    pub(super) fn end_message(&mut self) {
        for touched in std::mem::take(&mut self.touched) {
            let product = &self.seen[touched.index].product;
            let batches = product.batches();
            let added: Vec<usize> = if touched.created {
                (0..batches.len()).collect()
            } else {
                product
                    .changes()
                    .get(touched.changes_from..)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|change| match change {
                        Change::BatchAdded(i) => Some(*i),
                        _ => None,
                    })
                    .collect()
            };
            for batch in added.into_iter().filter_map(|i| batches.get(i)) {
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
    pub(super) fn undo_message(&mut self) -> bool {
        let unchanged = self
            .touched
            .iter()
            .all(|t| !t.created && self.seen[t.index].product.version_number() == t.version);
        if unchanged {
            for touched in std::mem::take(&mut self.touched) {
                drop(self.seen[touched.index].product.take_events());
            }
        }
        unchanged
    }

    /// Back to the state as loaded: nothing of this unit of work's messages.
    /// The products are dropped and read again from the database when next
    /// asked for: nothing is written before commit, and this transaction
    /// still holds their rows' locks, so what it reads is what it loaded. A
    /// start over is rare (a message rejected after it changed a product),
    /// so it pays the reads rather than every transaction a copy.
    pub(super) fn reset(&mut self) {
        self.seen.clear();
        self.index.clear();
        self.new_owners.clear();
        self.touched.clear();
    }
}

/// A `batches` row as the domain's batch, with its row id.
fn stored_batch(row: BatchRow) -> Result<(i64, Batch), RepositoryError> {
    let sku = stored_name(Sku::parse(row.1.as_str()))?;
    stored_batch_of(&sku, row)
}

/// A `batches` row of the product `sku` (the row's own `sku`, read by the
/// caller) as the domain's batch, with its row id. The batch shares the
/// product's name rather than holding a copy: a cached product of three
/// batches was 1,400 bytes of heap in 13 allocations, 3 of them its
/// batches' copies of its SKU (`tools/examples/cached_product.rs`).
fn stored_batch_of(sku: &Sku, row: BatchRow) -> Result<(i64, Batch), RepositoryError> {
    let (id, _, reference, purchased, created, eta, allocated) = row;
    if allocated < 0 {
        return Err(RepositoryError::Unavailable(
            format!("invalid stored allocated quantity {allocated}").into(),
        ));
    }
    let batch = Batch::restore_summary(
        stored_name(BatchRef::parse(reference))?,
        sku.clone(),
        stored_qty(purchased)?,
        eta,
        allocated,
    )
    .created_with(stored_qty(created)?);
    Ok((id, batch))
}

impl ProductRepository for PgProductRepository<'_> {
    fn add(&mut self, product: Product) {
        let i = self.seen.len();
        self.index.insert(product.sku().clone(), i);
        self.seen.push(Tracked {
            product,
            loaded_version: None,
            batch_ids: HashMap::new(),
            revision: 0,
            used: false,
            read_down_to: HashMap::new(),
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
                self.touched.iter().find_map(|t| {
                    let p = &self.seen[t.index].product;
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
        let knows = self
            .get(&sku)
            .await?
            .is_some_and(|p| p.knows_batch(reference));
        if !knows {
            // A batch taken in full, not loaded with its product.
            if let Some(&i) = self.index.get(&sku) {
                self.learn_batches(&[(i, reference.clone())]).await?;
            }
        }
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
        self.cache.forget_owner(reference);
        self.absent_refs.remove(reference);
        self.preload(&[], &[reference], &[]).await?;
        match self.owners.get(reference).cloned() {
            Some(owner) if owner != sku => self.get(&owner).await,
            _ => Ok(None),
        }
    }

    async fn get_for_batch(
        &mut self,
        sku: &Sku,
        reference: &BatchRef,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        if self.get(sku).await?.is_none() {
            return Ok(None);
        }
        let Some(&i) = self.index.get(sku) else {
            return Ok(None);
        };
        if !self.seen[i].product.knows_batch(reference) {
            let owner = self
                .owners
                .get(reference)
                .or_else(|| self.new_owners.get(reference));
            match owner {
                // Stored nowhere when the unit of work began (the usual
                // case: a new batch), or another product's: not this one's,
                // which needs no statement.
                None if self.absent_refs.contains(reference) => {
                    self.seen[i].product.learn_not_a_batch(reference.clone());
                }
                Some(owner) if owner != sku => {
                    self.seen[i].product.learn_not_a_batch(reference.clone());
                }
                _ => self.learn_batches(&[(i, reference.clone())]).await?,
            }
        }
        Ok(Some(&mut self.seen[i].product))
    }

    async fn get_for_line(
        &mut self,
        sku: &Sku,
        orderid: &OrderId,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        if self.get(sku).await?.is_none() {
            return Ok(None);
        }
        let Some(&i) = self.index.get(sku) else {
            return Ok(None);
        };
        if !self.seen[i].product.knows_line(orderid) {
            // Not looked up with its batch of messages (a reallocated line
            // is known already; a test, or a handler reaching further).
            let row: Option<LineRow> = sqlx::query_as(
                "SELECT a.orderid, a.qty, b.id, b.sku, b.reference, b.purchased_quantity, \
                 COALESCE(b.created_quantity, b.purchased_quantity), b.eta, \
                 b.allocated_quantity \
                 FROM allocations a \
                 JOIN batches b ON b.id = a.batch_id WHERE a.orderid = $1 AND a.sku = $2",
            )
            .bind(orderid.as_str())
            .bind(sku.as_str())
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(classify)?;
            let at = match row {
                Some((_, qty, id, sku, reference, purchased, created, eta, allocated)) => {
                    let (id, batch) =
                        stored_batch((id, sku, reference, purchased, created, eta, allocated))?;
                    let reference = batch.reference().clone();
                    self.learn_batch(i, id, batch);
                    Some((reference, stored_qty(qty)?))
                }
                None => None,
            };
            self.learn_line(i, orderid, at.as_ref().map(|(r, q)| (r, *q)));
        }
        Ok(Some(&mut self.seen[i].product))
    }

    async fn get_for_quantity_change(
        &mut self,
        reference: &BatchRef,
        qty: u32,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        let sku = match self.get_by_batchref(reference).await? {
            Some(product) => product.sku().clone(),
            None => return Ok(None),
        };
        let Some(&i) = self.index.get(&sku) else {
            return Ok(None);
        };
        self.load_freed_lines(i, reference, qty).await?;
        Ok(Some(&mut self.seen[i].product))
    }

    fn seen(&mut self) -> Vec<&mut Product> {
        self.seen.iter_mut().map(|t| &mut t.product).collect()
    }
}
