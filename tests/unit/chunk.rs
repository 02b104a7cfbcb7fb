//! Unit tests of the batch processor (`service_layer::chunk::process`) with
//! an in-memory store: one commit per batch, the rejection policy (a refused
//! message is dead-lettered or deferred while the others of its batch
//! apply), redeliveries, conflict retries and their limit, and a store that
//! cannot be reached. The same processor runs on PostgreSQL in
//! tests/services/postgres.rs.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use allocation_worker::domain::commands::{Allocate, ChangeBatchQuantity, CreateBatch};
use allocation_worker::domain::events::Allocated;
use allocation_worker::domain::{BatchRef, Command, Event, OrderId, Product, Sku};
use allocation_worker::service_layer::chunk::{
    process, Entry, Handled, Outcome, Plan, CONFLICT_RETRIES,
};
use allocation_worker::service_layer::{
    ChunkUnitOfWork, DeadLetterReason, Idempotent, RepositoryError, Store, UnitOfWork,
};

use testkit::fakes::FakeRepository;

// ------------------------------------------------------------------ fakes

/// A message as the fake transport delivers it; also its own context.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FakeMessage {
    key: String,
}

impl Idempotent for FakeMessage {
    fn idempotency_key(&self) -> &str {
        &self.key
    }
}

/// An outbox row: an event with the key of the message that caused it, or
/// a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Event(String, Event),
    DeadLetter(String, DeadLetterReason),
}

/// What commits stored.
#[derive(Default)]
struct Committed {
    products: Vec<Product>,
    processed: Vec<String>,
    outbox: Vec<Record>,
}

/// How the store fails the next commit.
#[derive(Clone, Copy)]
enum Fault {
    Conflict,
    Unavailable,
}

/// Committed state behind a lock, with faults to inject into the next
/// commits and counts of what the processor did.
#[derive(Default)]
struct FakeStore {
    committed: Mutex<Committed>,
    faults: Mutex<VecDeque<Fault>>,
    /// Units of work begun.
    begun: AtomicUsize,
    /// Commits that succeeded.
    commits: AtomicUsize,
    /// The quantity drops each unit of work was told of before its first
    /// message, and how many messages it had handled by then.
    drops_told: Mutex<Vec<DropsTold>>,
}

/// Quantity drops (batch, quantity) a unit of work was told of, and how
/// many messages it had handled by then.
type DropsTold = (Vec<(String, u32)>, usize);

impl FakeStore {
    fn fail_next_commits(&self, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap();
        faults.extend(std::iter::repeat_n(fault, times));
    }

    fn committed(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.committed.lock().unwrap()
    }

    fn begun(&self) -> usize {
        self.begun.load(Ordering::SeqCst)
    }

    fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    fn available(&self, sku_: &str, reference: &str) -> i64 {
        let committed = self.committed();
        let product = committed
            .products
            .iter()
            .find(|p| p.sku().as_str() == sku_)
            .unwrap_or_else(|| panic!("no product {sku_}"));
        product
            .batch(&bref(reference))
            .unwrap()
            .available_quantity()
    }
}

impl Store for FakeStore {
    type Message = FakeMessage;
    type Context = FakeMessage;
    type Session<'a> = ();
    type UnitOfWork<'s> = FakeBatchUnitOfWork<'s>;

    async fn session(&self) -> Result<(), RepositoryError> {
        Ok(())
    }

    async fn begin<'s, 'a: 's>(
        &'s self,
        _session: &'s mut (),
    ) -> Result<FakeBatchUnitOfWork<'s>, RepositoryError> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        let loaded = self.committed().products.clone();
        Ok(FakeBatchUnitOfWork {
            store: self,
            products: FakeRepository {
                products: loaded.clone(),
                seen: Vec::new(),
            },
            loaded,
            outbox: Vec::new(),
            processed: Vec::new(),
            context: None,
            message_start: 0,
            versions_at_start: Vec::new(),
        })
    }

    fn end_session(&self, _session: (), _committed: bool) {}
}

/// A copy of the committed products, written back whole at commit. Like the
/// PostgreSQL one, it takes a refused message back alone only when the
/// message changed no product.
struct FakeBatchUnitOfWork<'s> {
    store: &'s FakeStore,
    products: FakeRepository,
    /// As loaded, for `reset`.
    loaded: Vec<Product>,
    outbox: Vec<Record>,
    processed: Vec<String>,
    context: Option<FakeMessage>,
    /// Outbox length when the current message started.
    message_start: usize,
    /// Every product's version when the current message started.
    versions_at_start: Vec<i64>,
}

impl FakeBatchUnitOfWork<'_> {
    fn key(&self) -> String {
        self.context
            .as_ref()
            .expect("a message started")
            .key
            .clone()
    }

    fn versions(&self) -> Vec<i64> {
        self.products
            .products
            .iter()
            .map(Product::version_number)
            .collect()
    }
}

impl UnitOfWork for FakeBatchUnitOfWork<'_> {
    type Products = FakeRepository;

    fn products(&mut self) -> &mut FakeRepository {
        &mut self.products
    }

    fn publish(&mut self, event: &Event) {
        let key = self.key();
        self.outbox.push(Record::Event(key, event.clone()));
    }
}

impl ChunkUnitOfWork for FakeBatchUnitOfWork<'_> {
    type Message = FakeMessage;
    type Context = FakeMessage;

    async fn load(
        &mut self,
        _skus: &[&Sku],
        _refs: &[&BatchRef],
        keys: &[&str],
    ) -> Result<HashSet<String>, RepositoryError> {
        let committed = self.store.committed();
        Ok(keys
            .iter()
            .filter(|k| committed.processed.iter().any(|p| p == *k))
            .map(|k| k.to_string())
            .collect())
    }

    async fn load_freed_lines(
        &mut self,
        changes: &[(&BatchRef, u32)],
    ) -> Result<(), RepositoryError> {
        let told = changes
            .iter()
            .map(|(reference, qty)| (reference.as_str().to_owned(), *qty))
            .collect();
        let handled = self.processed.len();
        self.store.drops_told.lock().unwrap().push((told, handled));
        Ok(())
    }

    fn start_message(&mut self, context: FakeMessage) {
        self.context = Some(context);
        self.message_start = self.outbox.len();
        self.versions_at_start = self.versions();
    }

    fn finish_message(&mut self) {
        let key = self.key();
        self.processed.push(key);
    }

    fn reject_message(&mut self) -> bool {
        if self.versions() != self.versions_at_start {
            return false;
        }
        for product in &mut self.products.products {
            drop(product.take_events());
        }
        self.outbox.truncate(self.message_start);
        true
    }

    fn reset(&mut self) {
        self.products = FakeRepository {
            products: self.loaded.clone(),
            seen: Vec::new(),
        };
        self.outbox.clear();
        self.processed.clear();
    }

    fn dead_letter(
        &mut self,
        _message: &FakeMessage,
        context: &FakeMessage,
        reason: DeadLetterReason,
        _error: &str,
    ) {
        self.outbox
            .push(Record::DeadLetter(context.key.clone(), reason));
        self.processed.push(context.key.clone());
    }

    async fn commit(self) -> Result<(), RepositoryError> {
        let fault = self.store.faults.lock().unwrap().pop_front();
        match fault {
            Some(Fault::Conflict) => {
                return Err(RepositoryError::Conflict("injected conflict".into()))
            }
            Some(Fault::Unavailable) => {
                return Err(RepositoryError::Unavailable("injected outage".into()))
            }
            None => {}
        }
        let mut committed = self.store.committed();
        committed.products = self.products.products;
        committed.processed.extend(self.processed);
        committed.outbox.extend(self.outbox);
        self.store.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------- helpers

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

fn bref(s: &str) -> BatchRef {
    BatchRef::parse(s).unwrap()
}

fn create_batch(reference: &str, sku_: &str, qty: u32) -> Plan {
    Plan::Handle(Command::CreateBatch(CreateBatch {
        reference: bref(reference),
        sku: sku(sku_),
        qty,
        eta: None,
    }))
}

fn allocate(orderid: &str, sku_: &str, qty: u32) -> Plan {
    Plan::Handle(Command::Allocate(Allocate {
        orderid: OrderId::parse(orderid).unwrap(),
        sku: sku(sku_),
        qty,
    }))
}

fn change_quantity(reference: &str, qty: u32) -> Plan {
    Plan::Handle(Command::ChangeBatchQuantity(ChangeBatchQuantity {
        reference: bref(reference),
        qty,
    }))
}

fn allocated(key: &str, orderid: &str, sku_: &str, qty: u32, batchref: &str) -> Record {
    Record::Event(
        key.to_owned(),
        Event::Allocated(Allocated {
            orderid: OrderId::parse(orderid).unwrap(),
            sku: sku(sku_),
            qty,
            batchref: bref(batchref),
        }),
    )
}

/// A batch: each message with its idempotency key, plan and `give_up` flag.
struct Batch {
    messages: Vec<FakeMessage>,
    plans: Vec<Plan>,
    give_up: Vec<bool>,
}

fn batch(items: Vec<(&str, Plan)>) -> Batch {
    Batch {
        messages: items
            .iter()
            .map(|(key, _)| FakeMessage {
                key: (*key).to_owned(),
            })
            .collect(),
        give_up: vec![false; items.len()],
        plans: items.into_iter().map(|(_, plan)| plan).collect(),
    }
}

impl Batch {
    /// Every message's window has closed: unknown references are final.
    fn giving_up(mut self) -> Self {
        self.give_up = vec![true; self.plans.len()];
        self
    }
}

/// Runs `batch` through the processor on `store`; returns what it came to
/// and how many conflicts it retried.
async fn run(store: &FakeStore, batch: &Batch) -> (Result<Handled, RepositoryError>, u32) {
    let chunk: Vec<Entry<'_, FakeMessage, FakeMessage>> = batch
        .messages
        .iter()
        .zip(&batch.plans)
        .zip(&batch.give_up)
        .map(|((message, plan), &give_up)| Entry {
            message,
            plan,
            context: message.clone(),
            give_up,
        })
        .collect();
    let conflicts = AtomicU32::new(0);
    let handled = process(store, &chunk, None, || {
        conflicts.fetch_add(1, Ordering::SeqCst);
    })
    .await;
    (handled, conflicts.into_inner())
}

async fn outcomes(store: &FakeStore, batch: &Batch) -> Vec<Outcome> {
    let (handled, _) = run(store, batch).await;
    handled.expect("the batch commits").outcomes
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn a_batch_commits_once_with_every_message_in_it() {
    let store = FakeStore::default();
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 3)),
        ("m2", allocate("o2", "LAMP", 2)),
    ]);

    let (handled, conflicts) = run(&store, &b).await;
    let handled = handled.unwrap();

    assert_eq!(handled.outcomes, [Outcome::Applied; 3]);
    assert!(handled.dead_letters.is_empty());
    assert_eq!(conflicts, 0);
    assert_eq!((store.begun(), store.commits()), (1, 1), "one unit of work");
    assert_eq!(store.available("LAMP", "b1"), 5);
    let committed = store.committed();
    assert_eq!(committed.processed, ["m0", "m1", "m2"]);
    assert_eq!(
        committed.outbox,
        [
            allocated("m1", "o1", "LAMP", 3, "b1"),
            allocated("m2", "o2", "LAMP", 2, "b1"),
        ]
    );
}

#[tokio::test]
async fn refused_messages_are_dead_lettered_while_the_others_of_the_batch_apply() {
    let store = FakeStore::default();
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 2)),
        // The same line with another quantity.
        ("m2", allocate("o1", "LAMP", 5)),
        // The same reference for another SKU.
        ("m3", create_batch("b1", "RUG", 4)),
        // Refused before the transaction (undecodable, say).
        (
            "m4",
            Plan::DeadLetter(DeadLetterReason::InvalidMessage, "qty: -1".into()),
        ),
        ("m5", allocate("o2", "LAMP", 3)),
    ]);

    let handled = run(&store, &b).await.0.unwrap();

    assert_eq!(
        handled.outcomes,
        [
            Outcome::Applied,
            Outcome::Applied,
            Outcome::DeadLettered(DeadLetterReason::DuplicateLine),
            Outcome::DeadLettered(DeadLetterReason::DuplicateBatch),
            Outcome::DeadLettered(DeadLetterReason::InvalidMessage),
            Outcome::Applied,
        ]
    );
    let positions: Vec<usize> = handled.dead_letters.iter().map(|(i, _)| *i).collect();
    assert_eq!(positions, [2, 3, 4]);
    assert_eq!(handled.dead_letters[2].1, "qty: -1");
    assert_eq!(store.commits(), 1);
    assert_eq!(store.available("LAMP", "b1"), 5, "o1 (2) and o2 (3) only");
    let committed = store.committed();
    assert!(
        committed.products.iter().all(|p| p.sku().as_str() != "RUG"),
        "a refused message leaves nothing behind"
    );
    assert_eq!(committed.processed, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(
        committed.outbox,
        [
            allocated("m1", "o1", "LAMP", 2, "b1"),
            Record::DeadLetter("m2".into(), DeadLetterReason::DuplicateLine),
            Record::DeadLetter("m3".into(), DeadLetterReason::DuplicateBatch),
            Record::DeadLetter("m4".into(), DeadLetterReason::InvalidMessage),
            allocated("m5", "o2", "LAMP", 3, "b1"),
        ]
    );
}

#[tokio::test]
async fn an_unknown_reference_is_deferred_with_what_names_it_and_dead_lettered_once_given_up() {
    let store = FakeStore::default();
    let items = || {
        vec![
            ("m0", allocate("o1", "SOFA", 1)),
            ("m1", create_batch("b1", "LAMP", 10)),
            // Behind m0, naming the same SKU: held back untried.
            ("m2", allocate("o2", "SOFA", 1)),
            ("m3", allocate("o3", "LAMP", 1)),
        ]
    };

    let handled = run(&store, &batch(items())).await.0.unwrap();
    assert_eq!(
        handled.outcomes,
        [
            Outcome::Deferred,
            Outcome::Applied,
            Outcome::Deferred,
            Outcome::Applied,
        ]
    );
    assert!(handled.dead_letters.is_empty());
    assert_eq!(store.committed().processed, ["m1", "m3"]);

    // Their window closed: the unknown SKU is final now.
    let again = batch(items()).giving_up();
    assert_eq!(
        outcomes(&store, &again).await,
        [
            Outcome::DeadLettered(DeadLetterReason::UnknownSku),
            Outcome::Duplicate,
            Outcome::DeadLettered(DeadLetterReason::UnknownSku),
            Outcome::Duplicate,
        ]
    );
    assert_eq!(store.committed().processed, ["m1", "m3", "m0", "m2"]);
}

#[tokio::test]
async fn a_redelivered_message_is_a_duplicate_in_the_next_batch_and_in_its_own() {
    let store = FakeStore::default();
    outcomes(
        &store,
        &batch(vec![
            ("m0", create_batch("b1", "LAMP", 10)),
            ("m1", allocate("o1", "LAMP", 2)),
        ]),
    )
    .await;

    let b = batch(vec![
        ("m1", allocate("o1", "LAMP", 2)),
        ("m2", allocate("o2", "LAMP", 2)),
        ("m2", allocate("o2", "LAMP", 2)),
    ]);
    assert_eq!(
        outcomes(&store, &b).await,
        [Outcome::Duplicate, Outcome::Applied, Outcome::Duplicate]
    );
    assert_eq!(store.available("LAMP", "b1"), 6);
    assert_eq!(store.committed().processed, ["m0", "m1", "m2"]);
}

#[tokio::test]
async fn a_conflict_retries_the_whole_batch_in_a_new_unit_of_work() {
    let store = FakeStore::default();
    store.fail_next_commits(Fault::Conflict, 2);
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 3)),
        ("m2", allocate("o1", "LAMP", 4)),
    ]);

    let (handled, conflicts) = run(&store, &b).await;

    assert_eq!(
        handled.unwrap().outcomes,
        [
            Outcome::Applied,
            Outcome::Applied,
            Outcome::DeadLettered(DeadLetterReason::DuplicateLine),
        ]
    );
    assert_eq!(conflicts, 2);
    assert_eq!((store.begun(), store.commits()), (3, 1));
    assert_eq!(store.available("LAMP", "b1"), 7, "applied once");
    let committed = store.committed();
    assert_eq!(committed.processed, ["m0", "m1", "m2"]);
    assert_eq!(committed.outbox.len(), 2, "one event, one dead letter");
}

#[tokio::test]
async fn conflicts_that_keep_recurring_give_up_after_the_limit_with_nothing_stored() {
    let store = FakeStore::default();
    store.fail_next_commits(Fault::Conflict, CONFLICT_RETRIES as usize + 1);
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 3)),
    ]);

    let (handled, conflicts) = run(&store, &b).await;

    assert!(
        matches!(handled, Err(RepositoryError::Conflict(_))),
        "{handled:?}"
    );
    assert_eq!(conflicts, CONFLICT_RETRIES);
    assert_eq!(store.begun(), CONFLICT_RETRIES as usize + 1);
    assert_eq!(store.commits(), 0);
    let committed = store.committed();
    assert!(committed.products.is_empty() && committed.processed.is_empty());
    assert!(committed.outbox.is_empty());
}

#[tokio::test]
async fn an_unavailable_store_is_reported_at_once_and_nothing_is_half_applied() {
    let store = FakeStore::default();
    store.fail_next_commits(Fault::Unavailable, 1);
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 3)),
        ("m2", allocate("o2", "LAMP", 5)),
    ]);

    let (handled, conflicts) = run(&store, &b).await;

    assert!(
        matches!(handled, Err(RepositoryError::Unavailable(_))),
        "{handled:?}"
    );
    assert_eq!(conflicts, 0);
    assert_eq!(store.begun(), 1, "not retried here: the caller backs off");
    {
        let committed = store.committed();
        assert!(committed.products.is_empty() && committed.processed.is_empty());
        assert!(committed.outbox.is_empty());
    }

    // Tried again once the store is back: every message applies, once.
    assert_eq!(outcomes(&store, &b).await, [Outcome::Applied; 3]);
    assert_eq!(store.available("LAMP", "b1"), 2);
    assert_eq!(store.committed().processed, ["m0", "m1", "m2"]);
}

#[tokio::test]
async fn a_batch_tells_its_unit_of_work_every_quantity_drop_before_its_first_message() {
    // The store reads the lines those drops free in one go (PostgreSQL:
    // tests/services/postgres_aggregate.rs), not one read a message with the
    // batch's products locked.
    let store = FakeStore::default();
    let b = batch(vec![
        ("m0", create_batch("b1", "LAMP", 10)),
        ("m1", allocate("o1", "LAMP", 3)),
        ("m2", change_quantity("b1", 5)),
        ("m3", allocate("o2", "LAMP", 1)),
        ("m4", change_quantity("b1", 2)),
    ]);

    assert_eq!(outcomes(&store, &b).await, [Outcome::Applied; 5]);

    let told = store.drops_told.lock().unwrap();
    assert_eq!(
        *told,
        [(vec![("b1".to_owned(), 5), ("b1".to_owned(), 2)], 0)],
        "once, with every drop in batch order, before any message"
    );
}
