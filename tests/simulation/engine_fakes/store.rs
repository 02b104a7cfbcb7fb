//! An in-memory database for the engine ([`SimStore`], a `WorkerStore`),
//! shared by every instance of a run.
//!
//! What it keeps of PostgreSQL, because the engine's promises rest on it:
//! - a transaction sees nothing of others until it commits, and a commit is
//!   all or nothing;
//! - products are read under a lock until commit (`FOR UPDATE`): here, a
//!   commit fails with a conflict if a product it read was changed since,
//!   if a product it creates exists, or if a message it records as
//!   processed was recorded by another transaction (processed_messages'
//!   primary key), which orders transactions as the locks would;
//! - every call takes a little time (seeded), so transactions of several
//!   partitions and instances interleave;
//! - faults: an outage (every call fails as unavailable), a call that stalls
//!   past the transaction timeout, a conflict, and a commit whose answer is
//!   lost (it is applied, and the caller hears "unavailable").
//!
//! Every commit is logged, with the messages it recorded in order, for the
//! checks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allocation_worker::adapters::inbound::{InboundMessage, MessageContext};
use allocation_worker::domain::{BatchRef, Event, OrderId, Product, Sku};
use allocation_worker::engine::processor::WorkerStore;
use allocation_worker::service_layer::DeadLetterReason;
use allocation_worker::service_layer::{
    ChunkUnitOfWork, ProductRepository, RepositoryError, Store, UnitOfWork,
};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;

use super::life::Life;

/// What a commit stored of one message.
#[derive(Debug, Clone)]
pub enum Recorded {
    Applied {
        key: String,
        events: Vec<Event>,
    },
    DeadLettered {
        key: String,
        reason: DeadLetterReason,
    },
}

impl Recorded {
    pub fn key(&self) -> &str {
        match self {
            Recorded::Applied { key, .. } | Recorded::DeadLettered { key, .. } => key,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Commit {
    pub instance: u32,
    pub at: Instant,
    pub messages: Vec<Recorded>,
}

#[derive(Default)]
pub struct DbState {
    pub products: BTreeMap<String, Product>,
    /// Batch reference → SKU.
    pub batches: BTreeMap<String, String>,
    pub processed: BTreeSet<String>,
    pub commits: Vec<Commit>,
    /// An outage until then.
    pub outage_until: Option<Instant>,
}

/// Faults per call, in a thousand.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFaults {
    pub conflict: u32,
    pub lost_answer: u32,
    pub stall: u32,
    /// Longest time one call takes.
    pub latency_ms: u64,
    /// How long a stalled call takes.
    pub stall_for: Duration,
}

pub struct SimDb {
    pub state: Mutex<DbState>,
    rng: Arc<Mutex<StdRng>>,
}

impl SimDb {
    pub fn new(rng: Arc<Mutex<StdRng>>) -> Self {
        Self {
            state: Mutex::new(DbState::default()),
            rng,
        }
    }
}

/// One instance's view of the database.
pub struct SimStore {
    db: Arc<SimDb>,
    life: Arc<Life>,
    instance: u32,
    faults: StoreFaults,
}

impl SimStore {
    pub fn new(db: Arc<SimDb>, life: Arc<Life>, instance: u32, faults: StoreFaults) -> Self {
        Self {
            db,
            life,
            instance,
            faults,
        }
    }

    fn roll(&self, per_mille: u32) -> bool {
        per_mille > 0 && self.db.rng.lock().unwrap().random_range(0..1000) < per_mille
    }

    /// A round trip: the instance must be running, the database up; it
    /// takes a little while, or stalls.
    async fn call(&self) -> Result<(), RepositoryError> {
        self.life.gate().await;
        let latency = {
            let mut rng = self.db.rng.lock().unwrap();
            Duration::from_micros(rng.random_range(0..=self.faults.latency_ms * 1000))
        };
        let latency = if self.roll(self.faults.stall) {
            self.faults.stall_for
        } else {
            latency
        };
        tokio::time::sleep(latency).await;
        // A frozen instance's call is answered only once it runs again.
        self.life.gate().await;
        let down = self
            .db
            .state
            .lock()
            .unwrap()
            .outage_until
            .is_some_and(|until| Instant::now() < until);
        if down {
            return Err(RepositoryError::Unavailable("simulated outage".into()));
        }
        Ok(())
    }
}

impl WorkerStore for SimStore {}

impl Store for SimStore {
    type Message = InboundMessage;
    type Context = MessageContext;
    type Session<'a> = ();
    type UnitOfWork<'s> = SimUnitOfWork<'s>;

    async fn session(&self) -> Result<(), RepositoryError> {
        self.call().await
    }

    async fn begin<'s, 'a: 's>(
        &'s self,
        _session: &'s mut (),
    ) -> Result<SimUnitOfWork<'s>, RepositoryError> {
        self.call().await?;
        Ok(SimUnitOfWork {
            store: self,
            products: SimRepository::default(),
            loaded: BTreeMap::new(),
            recorded: Vec::new(),
            context: None,
            events: Vec::new(),
            message_start: 0,
            versions_at_start: Vec::new(),
        })
    }

    fn end_session(&self, _session: (), _committed: bool) {}

    fn conflict_jitter(&self) -> u64 {
        self.db.rng.lock().unwrap().random_range(0..1000)
    }
}

/// Products read in a transaction: copies of the committed ones, each
/// loaded once (the identity map), with the version read.
#[derive(Default)]
pub struct SimRepository {
    products: Vec<Product>,
    seen: Vec<Sku>,
    /// The database, as of each read.
    db: Option<Arc<SimDb>>,
    /// Versions as read (`None`: created here).
    read: BTreeMap<String, Option<i64>>,
}

impl SimRepository {
    fn find(&mut self, sku: &str) -> Option<usize> {
        if let Some(i) = self.products.iter().position(|p| p.sku().as_str() == sku) {
            return Some(i);
        }
        let db = self.db.as_ref()?;
        let product = db.state.lock().unwrap().products.get(sku).cloned()?;
        self.read
            .insert(sku.to_owned(), Some(product.version_number()));
        self.products.push(product);
        Some(self.products.len() - 1)
    }

    fn track(&mut self, index: Option<usize>) -> Option<&mut Product> {
        let product = &mut self.products[index?];
        if !self.seen.contains(product.sku()) {
            self.seen.push(product.sku().clone());
        }
        Some(product)
    }
}

impl ProductRepository for SimRepository {
    fn add(&mut self, product: Product) {
        self.read.insert(product.sku().as_str().to_owned(), None);
        self.seen.push(product.sku().clone());
        self.products.push(product);
    }

    async fn get(&mut self, sku: &Sku) -> Result<Option<&mut Product>, RepositoryError> {
        let index = self.find(sku.as_str());
        Ok(self.track(index))
    }

    async fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        let local = self
            .products
            .iter()
            .position(|p| p.batch(reference).is_some());
        let index = match local {
            Some(i) => Some(i),
            None => {
                let sku = self.db.as_ref().and_then(|db| {
                    db.state
                        .lock()
                        .unwrap()
                        .batches
                        .get(reference.as_str())
                        .cloned()
                });
                match sku {
                    Some(sku) => self.find(&sku),
                    None => None,
                }
            }
        };
        Ok(self.track(index))
    }

    fn seen(&mut self) -> Vec<&mut Product> {
        let seen = &self.seen;
        self.products
            .iter_mut()
            .filter(|p| seen.contains(p.sku()))
            .collect()
    }
}

pub struct SimUnitOfWork<'s> {
    store: &'s SimStore,
    products: SimRepository,
    /// As loaded, for `reset`.
    loaded: BTreeMap<String, Option<i64>>,
    recorded: Vec<Recorded>,
    context: Option<MessageContext>,
    /// The current message's events.
    events: Vec<Event>,
    message_start: usize,
    versions_at_start: Vec<i64>,
}

impl SimUnitOfWork<'_> {
    fn versions(&self) -> Vec<i64> {
        self.products
            .products
            .iter()
            .map(Product::version_number)
            .collect()
    }
}

impl UnitOfWork for SimUnitOfWork<'_> {
    type Products = SimRepository;

    fn products(&mut self) -> &mut SimRepository {
        if self.products.db.is_none() {
            self.products.db = Some(Arc::clone(&self.store.db));
        }
        &mut self.products
    }

    fn publish(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
}

impl ChunkUnitOfWork for SimUnitOfWork<'_> {
    type Message = InboundMessage;
    type Context = MessageContext;

    async fn load(
        &mut self,
        skus: &[&Sku],
        refs: &[&BatchRef],
        keys: &[&str],
    ) -> Result<HashSet<String>, RepositoryError> {
        self.store.call().await?;
        if self.products.db.is_none() {
            self.products.db = Some(Arc::clone(&self.store.db));
        }
        for sku in skus {
            self.products.find(sku.as_str());
        }
        for reference in refs {
            let sku = self
                .store
                .db
                .state
                .lock()
                .unwrap()
                .batches
                .get(reference.as_str())
                .cloned();
            if let Some(sku) = sku {
                self.products.find(&sku);
            }
        }
        self.loaded = self.products.read.clone();
        let state = self.store.db.state.lock().unwrap();
        Ok(keys
            .iter()
            .filter(|k| state.processed.contains(**k))
            .map(|k| k.to_string())
            .collect())
    }

    fn start_message(&mut self, context: MessageContext) {
        self.context = Some(context);
        self.events.clear();
        self.message_start = self.recorded.len();
        self.versions_at_start = self.versions();
    }

    fn finish_message(&mut self) {
        let key = self
            .context
            .as_ref()
            .map(|c| c.idempotency_key.clone())
            .unwrap_or_default();
        let events = std::mem::take(&mut self.events);
        self.recorded.push(Recorded::Applied { key, events });
    }

    fn reject_message(&mut self) -> bool {
        if self.versions() != self.versions_at_start {
            return false;
        }
        for product in &mut self.products.products {
            drop(product.take_events());
        }
        self.events.clear();
        self.recorded.truncate(self.message_start);
        true
    }

    fn reset(&mut self) {
        // The products as loaded: read again from the database's snapshot
        // would see later commits, which a real transaction would not; the
        // versions read stay those of the first read, so a commit of
        // products changed since still conflicts.
        let keep: Vec<String> = self.loaded.keys().cloned().collect();
        self.products.products.clear();
        self.products.seen.clear();
        let read = std::mem::take(&mut self.products.read);
        for sku in keep {
            self.products.find(&sku);
        }
        for (sku, version) in read {
            self.products.read.entry(sku).or_insert(version);
        }
        for (sku, version) in &self.loaded {
            self.products.read.insert(sku.clone(), *version);
        }
        self.recorded.clear();
        self.events.clear();
    }

    fn dead_letter(
        &mut self,
        _message: &InboundMessage,
        context: &MessageContext,
        reason: DeadLetterReason,
        _error: &str,
    ) {
        self.recorded.push(Recorded::DeadLettered {
            key: context.idempotency_key.clone(),
            reason,
        });
    }

    async fn commit(mut self) -> Result<(), RepositoryError> {
        self.store.call().await?;
        let store = self.store;
        if store.roll(store.faults.conflict) {
            return Err(RepositoryError::Conflict("simulated conflict".into()));
        }
        let lost_answer = store.roll(store.faults.lost_answer);
        let mut state = store.db.state.lock().unwrap();
        for r in &self.recorded {
            if state.processed.contains(r.key()) {
                return Err(RepositoryError::Conflict(format!(
                    "{} was processed concurrently",
                    r.key()
                )));
            }
        }
        // PostgreSQL locks every product a transaction reads (`FOR UPDATE`)
        // until it commits, so a decision is never made on a copy another
        // transaction changes meanwhile, even one that changes nothing (an
        // OutOfStock). Here the loser fails at commit instead of waiting:
        // the same serial order, found optimistically.
        for product in &self.products.products {
            let sku = product.sku().as_str();
            let read = self.products.read.get(sku).copied().flatten();
            let now = state.products.get(sku).map(Product::version_number);
            if now != read {
                return Err(RepositoryError::Conflict(format!(
                    "product {sku} was changed concurrently"
                )));
            }
        }
        for product in &mut self.products.products {
            let sku = product.sku().as_str().to_owned();
            let read = self.products.read.get(&sku).copied().flatten();
            if read == Some(product.version_number()) {
                continue;
            }
            drop(product.take_changes());
            for batch in product.batches() {
                state
                    .batches
                    .insert(batch.reference().as_str().to_owned(), sku.clone());
            }
            state.products.insert(sku, product.clone());
        }
        for r in &self.recorded {
            state.processed.insert(r.key().to_owned());
        }
        let commit = Commit {
            instance: store.instance,
            at: Instant::now(),
            messages: std::mem::take(&mut self.recorded),
        };
        state.commits.push(commit);
        drop(state);
        if lost_answer {
            return Err(RepositoryError::Unavailable(
                "simulated: the commit's answer was lost".into(),
            ));
        }
        Ok(())
    }
}

/// For the checks: a line's allocation in the end state.
pub fn allocations(products: &BTreeMap<String, Product>) -> Vec<(OrderId, Sku, BatchRef)> {
    let mut all = Vec::new();
    for product in products.values() {
        for batch in product.batches() {
            for line in batch.allocations() {
                all.push((
                    line.orderid.clone(),
                    product.sku().clone(),
                    batch.reference().clone(),
                ));
            }
        }
    }
    all
}
