//! What the worker keeps in memory between transactions: products, so that
//! a product is not read back from the database after every commit, and the
//! owner of each batch reference. A copy of a product is used only while its
//! row carries the random revision written with it (`fresh_revision`), so
//! a copy from a transaction that rolled back, or one another instance has
//! since changed, is never used.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::domain::{BatchRef, Product, Sku};

/// Products kept in memory between transactions, shared by the worker's
/// partitions. A transaction takes a product out when it has locked its row,
/// and uses it only if the row still carries the revision the copy was saved
/// with; it puts its products back before committing, so the next holder of
/// the lock finds them. A copy whose transaction rolled back carries a
/// revision the database never got, and is never used.
#[derive(Default)]
pub struct ProductCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
pub(super) struct CacheState {
    products: HashMap<Sku, Stored>,
    /// A batch reference never changes product, so its owner is kept for good.
    owners: HashMap<BatchRef, Sku>,
}

/// Bound on cached products (and batch owners). A product with a few hundred
/// lines takes tens of KiB; past the bound the cache is emptied, which costs
/// one read per product and nothing else.
const CACHE_CAPACITY: usize = 2048;

/// A product as saved, with the ids of its batch rows and its revision.
pub(super) struct Stored {
    pub(super) product: Product,
    pub(super) batch_ids: HashMap<BatchRef, i64>,
    pub(super) revision: i64,
}

impl ProductCache {
    /// The cache, locked: a transaction takes out all its products under one
    /// lock ([`CacheState::take_current`]).
    pub(super) fn state(&self) -> MutexGuard<'_, CacheState> {
        // A panic while the lock was held left at worst a stale entry, which
        // the revision check refuses: carry on with the data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies the known owner of each of `refs` into `owners`.
    pub(super) fn owners_of(&self, refs: &[&BatchRef], owners: &mut HashMap<BatchRef, Sku>) {
        let state = self.state();
        for reference in refs {
            if let Some(sku) = state.owners.get(*reference) {
                owners.insert((*reference).clone(), sku.clone());
            }
        }
    }

    /// Forgets an owner found not to hold the batch.
    pub(super) fn forget_owner(&self, reference: &BatchRef) {
        self.state().owners.remove(reference);
    }

    /// Puts a transaction's products back, before its commit, so that the
    /// next transaction to lock one of them (it waits for this one) finds it.
    /// Should the commit fail, their revisions are not the database's, and
    /// the copies are never used.
    pub(super) fn put_back(&self, products: impl IntoIterator<Item = Stored>) {
        let mut state = self.state();
        for stored in products {
            state.products.insert(stored.product.sku().clone(), stored);
        }
        if state.products.len() > CACHE_CAPACITY {
            state.products.clear();
        }
    }

    /// Learns the batch owners of a transaction once it has committed: an
    /// owner carries no revision, so one cached from a transaction that
    /// rolled back could not be told from a true one.
    pub(super) fn learn_owners(&self, owners: HashMap<BatchRef, Sku>) {
        let mut state = self.state();
        state.owners.extend(owners);
        if state.owners.len() > 4 * CACHE_CAPACITY {
            state.owners.clear();
        }
    }
}

impl CacheState {
    /// Takes out the copy of `sku` if it is the one its locked row holds
    /// (the same revision and version); a copy that is not is dropped.
    pub(super) fn take_current(
        &mut self,
        sku: &Sku,
        version: i64,
        revision: i64,
    ) -> Option<Stored> {
        self.products.remove(sku).filter(|stored| {
            stored.revision == revision && stored.product.version_number() == version
        })
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
