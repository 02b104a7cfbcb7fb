//! What the worker keeps in memory between transactions: products, so that
//! a product is not read back from the database after every commit, and the
//! owner of each batch reference. A copy of a product is used only while its
//! row carries the random revision written with it (`fresh_revision`), so
//! a copy from a transaction that rolled back, or one another instance has
//! since changed, is never used.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, IntCounterVec};
use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::domain::{BatchRef, Product, Sku};

/// Products kept in memory between transactions, shared by the worker's
/// partitions. A transaction takes a product out when it has locked its row,
/// and uses it only if the row still carries the revision the copy was saved
/// with; it puts its products back before committing, so the next holder of
/// the lock finds them. A copy whose transaction rolled back carries a
/// revision the database never got, and is never used.
///
/// Bounded by an estimate of the memory its entries take, and evicted one
/// entry at a time (quick_cache's CLOCK-Pro: entries used once leave before
/// those used again), so a catalogue wider than the bound costs a read of
/// the products that fell out, not of every product at once. A product is
/// kept as its batches and their sums ([`Product::forget_lines`]), so its
/// entry does not grow with its history.
pub struct ProductCache {
    products: Cache<Sku, Stored, StoredWeight>,
    /// A batch reference never changes product, so its owner is kept until
    /// evicted.
    owners: Cache<BatchRef, Sku>,
    /// Counts each [`Self::take_current`]: hits, then misses
    /// (`allocation_product_cache_lookups_total`).
    lookups: Option<(IntCounter, IntCounter)>,
}

/// The bound by default, in MiB of the estimate ([`StoredWeight`]): about
/// 14,500 products of one batch, 6,900 of three, or 2,400 of ten. A miss
/// costs one indexed read of the product's batches (about 0.1 ms, in the
/// same statement as the transaction's other misses), so the bound is set
/// by the worker's memory, not by the catalogue: twice this, with twice the
/// owners, took a catalogue of 20,000 products to a peak RSS of about 70
/// MiB (with the C library's malloc), over the 64 MiB the deployment plans
/// for (BENCHMARKS.md, "A wide catalogue"). `PRODUCT_CACHE_MIB` sets it for
/// a deployment that can spare the memory: at 32, which holds all 20,000,
/// their bursts took 56.5 ms of CPU per 1,000 lines against 84.5, at a
/// peak RSS of 87.7 MiB against 56.2 ("A wide catalogue in a burst").
pub(crate) const DEFAULT_MIB: u32 = 8;

/// Batch owners kept per MiB of the bound, 32,768 at the default: about
/// 250 bytes of RSS each (27,000 more took 6.6 MiB more, BENCHMARKS.md, "A
/// wide catalogue in a burst"), so about another MiB per MiB once there are
/// that many batches.
const OWNERS_PER_MIB: usize = 4_096;

impl Default for ProductCache {
    fn default() -> Self {
        Self::with_mib(DEFAULT_MIB)
    }
}

/// A product as saved, with the ids of its batch rows and its revision.
/// The product is boxed: the cache keeps its entries in slots that grow by
/// doubling and stay allocated, so a slot should be small. Inline, a product
/// made every slot about 500 bytes, empty or not (heaptrack of a
/// `--products 20000` run: 7 MB of slots); boxed, an empty slot costs about
/// 100 bytes, and a product's memory is allocated only while it is cached.
#[derive(Clone)]
pub(super) struct Stored {
    pub(super) product: Box<Product>,
    pub(super) batch_ids: HashMap<BatchRef, i64>,
    pub(super) revision: i64,
}

/// An entry's weight: an estimate of its bytes, from its batches (a cached
/// product knows no lines, so this is all that varies).
#[derive(Clone)]
pub(super) struct StoredWeight;

/// Per product (the structs, its SKU, the maps) and per batch (the batch,
/// its reference and SKU, its id, and its entries in the product's indexes
/// by reference and by preference), measured roughly with `size_of` and a
/// name of twenty bytes.
const PRODUCT_BYTES: u64 = 256;
const BATCH_BYTES: u64 = 320;

impl Weighter<Sku, Stored> for StoredWeight {
    fn weight(&self, _sku: &Sku, stored: &Stored) -> u64 {
        PRODUCT_BYTES + BATCH_BYTES * stored.product.batches().len() as u64
    }
}

impl ProductCache {
    /// A cache of at most about `mib` MiB of products, as [`StoredWeight`]
    /// estimates them, and of their batches' owners in proportion.
    pub(crate) fn with_mib(mib: u32) -> Self {
        let mib = mib.max(1);
        Self::with_capacity(
            u64::from(mib) << 20,
            OWNERS_PER_MIB.saturating_mul(mib as usize),
        )
    }

    /// The same cache, empty, bounded at `mib` instead; it counts its
    /// lookups where this one did.
    pub(crate) fn resized(self, mib: u32) -> Self {
        Self {
            lookups: self.lookups,
            ..Self::with_mib(mib)
        }
    }

    /// A cache of at most about `bytes` of products and `owners` batch owners.
    pub(crate) fn with_capacity(bytes: u64, owners: usize) -> Self {
        let estimated = usize::try_from(bytes / (PRODUCT_BYTES + BATCH_BYTES)).unwrap_or(1);
        Self {
            products: Cache::with_weighter(estimated.max(1), bytes, StoredWeight),
            owners: Cache::new(owners.max(1)),
            lookups: None,
        }
    }

    /// How many products are kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.products.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.products.is_empty()
    }

    /// Counts its lookups in `lookups` (`result` = `hit` or `miss`).
    pub(crate) fn count_lookups(&mut self, lookups: &IntCounterVec) {
        self.lookups = Some((
            lookups.with_label_values(&["hit"]),
            lookups.with_label_values(&["miss"]),
        ));
    }

    /// Takes out the copy of `sku` if it is the one its locked row holds
    /// (the same revision and version); a copy that is not is dropped.
    pub(super) fn take_current(&self, sku: &Sku, version: i64, revision: i64) -> Option<Stored> {
        let current = self
            .products
            .remove(sku)
            .map(|(_, stored)| stored)
            .filter(|stored| {
                stored.revision == revision && stored.product.version_number() == version
            });
        if let Some((hits, misses)) = &self.lookups {
            if current.is_some() { hits } else { misses }.inc();
        }
        current
    }

    /// Copies the known owner of each of `refs` into `owners`.
    pub(super) fn owners_of(&self, refs: &[&BatchRef], owners: &mut HashMap<BatchRef, Sku>) {
        for reference in refs {
            if let Some(sku) = self.owners.get(*reference) {
                owners.insert((*reference).clone(), sku);
            }
        }
    }

    /// Forgets an owner found not to hold the batch.
    pub(super) fn forget_owner(&self, reference: &BatchRef) {
        self.owners.remove(reference);
    }

    /// Puts a transaction's products back, before its commit, so that the
    /// next transaction to lock one of them (it waits for this one) finds it.
    /// Should the commit fail, their revisions are not the database's, and
    /// the copies are never used.
    pub(super) fn put_back(&self, products: impl IntoIterator<Item = Stored>) {
        for stored in products {
            self.products.insert(stored.product.sku().clone(), stored);
        }
    }

    /// Learns the batch owners of a transaction once it has committed: an
    /// owner carries no revision, so one cached from a transaction that
    /// rolled back could not be told from a true one.
    pub(super) fn learn_owners(&self, owners: HashMap<BatchRef, Sku>) {
        for (reference, sku) in owners {
            self.owners.insert(reference, sku);
        }
    }
}

/// A new revision number: random, so that no other writer (another instance,
/// or a transaction that rolled back) can produce the same one.
pub(super) fn fresh_revision() -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Batch;

    fn stored(sku: &str, batches: usize, revision: i64) -> Stored {
        let sku = Sku::parse(sku).unwrap();
        let list = (0..batches)
            .map(|i| {
                let reference = BatchRef::parse(format!("{sku}-{i}")).unwrap();
                Batch::restore_summary(reference, sku.clone(), 10, None, 3)
            })
            .collect();
        Stored {
            product: Box::new(Product::restore(sku, 4, list)),
            batch_ids: HashMap::new(),
            revision,
        }
    }

    #[test]
    fn a_copy_is_used_only_at_the_revision_and_version_it_was_saved_with() {
        let cache = ProductCache::default();
        let sku = Sku::parse("LAMP").unwrap();
        cache.put_back([stored("LAMP", 1, 7)]);
        assert!(cache.take_current(&sku, 4, 8).is_none(), "another revision");
        assert!(cache.take_current(&sku, 4, 7).is_none(), "and dropped");
        cache.put_back([stored("LAMP", 1, 7)]);
        assert!(cache.take_current(&sku, 5, 7).is_none(), "another version");
        cache.put_back([stored("LAMP", 1, 7)]);
        assert!(cache.take_current(&sku, 4, 7).is_some());
        assert!(cache.is_empty(), "taken out while in use");
    }

    #[test]
    fn a_full_cache_evicts_entries_one_at_a_time_not_all_at_once() {
        // Room for about 100 products of one batch.
        let cache = ProductCache::with_capacity(100 * (PRODUCT_BYTES + BATCH_BYTES), 100);
        for i in 0..1000 {
            cache.put_back([stored(&format!("SKU-{i}"), 1, 1)]);
            assert!(cache.len() <= 110, "bounded: {} after {i}", cache.len());
        }
        assert!(cache.len() >= 50, "most of it kept: {}", cache.len());
        let last = Sku::parse("SKU-999").unwrap();
        assert!(
            cache.take_current(&last, 4, 1).is_some(),
            "the newest is there"
        );
    }

    #[test]
    fn the_bound_in_mib_sets_how_many_products_are_kept_and_survives_a_resize() {
        let lookups = prometheus::IntCounterVec::new(
            prometheus::Opts::new("lookups", "lookups"),
            &["result"],
        )
        .unwrap();
        let mut cache = ProductCache::default();
        cache.count_lookups(&lookups);
        // 1 MiB: about 860 products of three batches by the estimate.
        let cache = cache.resized(1);
        let per_product = PRODUCT_BYTES + 3 * BATCH_BYTES;
        for i in 0..3_000 {
            cache.put_back([stored(&format!("SKU-{i}"), 3, 1)]);
        }
        let room = (1 << 20) / per_product as usize;
        assert!(
            cache.len() <= room + room / 10,
            "bounded near {room}: {}",
            cache.len()
        );
        assert!(cache.len() >= room / 2, "most of it kept: {}", cache.len());
        let last = Sku::parse("SKU-2999").unwrap();
        assert!(cache.take_current(&last, 4, 1).is_some());
        assert_eq!(
            lookups.with_label_values(&["hit"]).get(),
            1,
            "still counted"
        );

        // Eight times the room, as PRODUCT_CACHE_MIB=8 (the default) gives.
        let cache = ProductCache::with_mib(DEFAULT_MIB);
        for i in 0..3_000 {
            cache.put_back([stored(&format!("SKU-{i}"), 3, 1)]);
        }
        assert_eq!(cache.len(), 3_000, "all of them fit in the default");
    }

    #[test]
    fn a_product_with_more_batches_weighs_more() {
        let cache = ProductCache::with_capacity(100 * (PRODUCT_BYTES + BATCH_BYTES), 100);
        for i in 0..100 {
            cache.put_back([stored(&format!("SKU-{i}"), 9, 1)]);
        }
        assert!(
            cache.len() <= 25,
            "{} products of nine batches",
            cache.len()
        );
    }
}
