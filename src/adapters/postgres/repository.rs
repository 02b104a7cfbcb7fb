//! The product repository on PostgreSQL: the products of one transaction,
//! locked and loaded in one round trip per batch (with which messages were
//! processed before), taken from the cache when its copy is current, and
//! tracked beside the state they were loaded in so that a commit writes only
//! the difference (see `writes`). It also takes back what a refused message
//! did, for the unit of work.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDate;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::domain::{Batch, BatchRef, OrderId, OrderLine, Product, Sku};
use crate::service_layer::{ProductRepository, RepositoryError};

use super::cache::ProductCache;
use super::pool::{classify, stored_name, stored_qty};

/// A product in a unit of work, kept beside the state it was loaded in, so
/// that commit writes only the difference.
pub(super) struct Tracked {
    pub(super) product: Product,
    /// `None` for a product created in this unit of work.
    pub(super) original: Option<Product>,
    pub(super) batch_ids: HashMap<BatchRef, i64>,
    /// As read (0 for a new product); set anew when the product is written.
    pub(super) revision: i64,
    /// Handed to a handler in this unit of work: saved (and version-checked) at commit.
    pub(super) used: bool,
}

/// A product handed out during the current message.
pub(super) struct Touched {
    /// Its position in [`PgProductRepository`]'s tracked products.
    pub(super) index: usize,
    /// Its version when the message first got it.
    version: i64,
    /// Whether the message created it.
    created: bool,
}

type ProductRow = (String, i64, i64);
type BatchRow = (i64, String, String, i64, i64, Option<NaiveDate>);
type LineRow = (String, i64, String, i64);

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

impl PgProductRepository<'_> {
    fn touch(&mut self, i: usize, created: bool) {
        if !self.touched.iter().any(|t| t.index == i) {
            let version = self.seen[i].product.version_number();
            self.touched.push(Touched {
                index: i,
                version,
                created,
            });
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
                match state.take_current(&sku, *version, *revision) {
                    Some(stored) => hits.push(stored),
                    None => to_read.push((sku, *version, *revision)),
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
    pub(super) fn end_message(&mut self) {
        for touched in std::mem::take(&mut self.touched) {
            let product = &self.seen[touched.index].product;
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
    pub(super) fn reset(&mut self) {
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

    fn seen(&mut self) -> Vec<&mut Product> {
        self.seen.iter_mut().map(|t| &mut t.product).collect()
    }
}
