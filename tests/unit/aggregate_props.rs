//! The aggregate loaded from summaries against the full-history model it
//! replaced. Random streams of commands run through both, as the message
//! bus runs them (a freed line is allocated again, in the same message):
//!
//! - the reference: today's rules on a product holding every line
//!   (tests/unit/reference/full_history_model.rs, the model before the change);
//! - the aggregate under test, as the PostgreSQL repository drives it: it is
//!   stored after every few messages by applying the changes it recorded
//!   (never by comparing copies), and loaded again from the summaries of
//!   its batches with stock left (or of every batch), or kept as the cache
//!   keeps it (its lines and its batches taken in full forgotten). It is
//!   told what a decision needs the way the repository tells it: whether a
//!   line is allocated, by key, with the batch it is allocated to; a batch
//!   a message names, by reference, or that the reference is not one of
//!   its batches; and a batch's most recent stored lines, newest first, a
//!   few at a time, for a quantity drop.
//!
//! Both must record the same events, refuse the same messages, and end
//! with the same batches, versions and stored lines in the same order.

use crate::reference;

use std::collections::{BTreeMap, VecDeque};

use allocation_worker::domain::{
    Batch, BatchRef, Change, DomainError, Event, OrderId, OrderLine, Product, Sku,
};
use chrono::NaiveDate;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Cmd {
    AddBatch { batch: u8, qty: u32, eta: u8 },
    Allocate { order: u8, qty: u32 },
    Change { batch: u8, qty: u32 },
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        1 => (0u8..5, 0u32..40, 0u8..4).prop_map(|(batch, qty, eta)| Cmd::AddBatch { batch, qty, eta }),
        6 => (0u8..40, 1u32..6).prop_map(|(order, qty)| Cmd::Allocate { order, qty }),
        2 => (0u8..5, 0u32..40).prop_map(|(batch, qty)| Cmd::Change { batch, qty }),
    ]
}

/// How the aggregate under test is kept between two transactions.
#[derive(Debug, Clone, Copy)]
enum Between {
    /// Read back from the summaries of the stored batches with stock left,
    /// as the repository loads a product.
    Reload,
    /// Read back from the summaries of every stored batch.
    ReloadEvery,
    /// Kept in memory without its lines, as the cache keeps it.
    Cached,
}

#[derive(Debug, Clone)]
struct Step {
    cmd: Cmd,
    /// Commit after this message, and how to go on.
    commit: Option<Between>,
    /// How many lines one read of a batch's lines returns.
    page: usize,
}

fn step() -> impl Strategy<Value = Step> {
    (
        cmd(),
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(Between::Reload)),
            1 => Just(Some(Between::ReloadEvery)),
            1 => Just(Some(Between::Cached)),
        ],
        1usize..4,
    )
        .prop_map(|(cmd, commit, page)| Step { cmd, commit, page })
}

fn sku() -> Sku {
    Sku::parse("LAMP").unwrap()
}

fn bref(i: u8) -> BatchRef {
    BatchRef::parse(format!("b{i}")).unwrap()
}

fn oid(i: u8) -> OrderId {
    OrderId::parse(format!("o{i}")).unwrap()
}

fn eta(i: u8) -> Option<NaiveDate> {
    match i {
        0 => None,
        n => NaiveDate::from_ymd_opt(2024, 3, u32::from(n)),
    }
}

/// What the tables hold: batches in creation order, each with its lines by
/// row id; a new row gets the next id.
#[derive(Debug, Default)]
struct Stored {
    version: i64,
    batches: Vec<StoredBatch>,
    next_id: i64,
}

#[derive(Debug)]
struct StoredBatch {
    reference: BatchRef,
    purchased: u32,
    created: u32,
    eta: Option<NaiveDate>,
    lines: BTreeMap<i64, OrderLine>,
}

impl Stored {
    /// A stored batch as the repository reads it, with its row id (here its
    /// place in creation order).
    fn batch_summary(&self, reference: &BatchRef) -> Option<(i64, Batch)> {
        self.batches
            .iter()
            .enumerate()
            .find(|(_, b)| &b.reference == reference)
            .map(|(id, b)| {
                let allocated = b.lines.values().map(|l| i64::from(l.qty)).sum();
                let batch = Batch::restore_summary(
                    b.reference.clone(),
                    sku(),
                    b.purchased,
                    b.eta,
                    allocated,
                )
                .created_with(b.created);
                (id as i64, batch)
            })
    }

    /// The product as the repository loads it: its batches with stock left.
    fn summary(&self) -> Product {
        let batches = self
            .batches
            .iter()
            .filter_map(|b| self.batch_summary(&b.reference))
            .filter(|(_, b)| b.available_quantity() > 0)
            .collect();
        Product::restore_some(sku(), self.version, batches)
    }

    /// The product from every batch's summary.
    fn every_summary(&self) -> Product {
        let batches = self
            .batches
            .iter()
            .filter_map(|b| self.batch_summary(&b.reference))
            .map(|(_, b)| b)
            .collect();
        Product::restore(sku(), self.version, batches)
    }

    fn position(&self, product: &Product, i: usize) -> usize {
        let reference = product.batches()[i].reference();
        self.batches
            .iter()
            .position(|b| &b.reference == reference)
            .expect("a changed batch is stored")
    }

    /// The lookup by (orderid, sku).
    fn line(&self, orderid: &OrderId) -> Option<(&BatchRef, u32)> {
        self.batches.iter().find_map(|b| {
            b.lines
                .values()
                .find(|l| &l.orderid == orderid)
                .map(|l| (&b.reference, l.qty))
        })
    }

    /// Up to `page` lines of batch `reference` below row `below`, newest
    /// first, with the lowest id read.
    fn lines_below(&self, reference: &BatchRef, below: i64, page: usize) -> Vec<(i64, OrderLine)> {
        self.batches
            .iter()
            .find(|b| &b.reference == reference)
            .map(|b| {
                b.lines
                    .range(..below)
                    .rev()
                    .take(page)
                    .map(|(id, l)| (*id, l.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies what the product recorded, in order.
    fn apply(&mut self, product: &mut Product) {
        let mut added = Vec::new();
        for change in product.take_changes() {
            match change {
                Change::BatchAdded(i) => {
                    let b = &product.batches()[i];
                    assert!(
                        self.batch_summary(b.reference()).is_none(),
                        "a new batch is not stored"
                    );
                    added.push((b.reference().clone(), self.batches.len() as i64));
                    self.batches.push(StoredBatch {
                        reference: b.reference().clone(),
                        purchased: b.purchased_quantity(),
                        created: b.created_quantity(),
                        eta: b.eta(),
                        lines: BTreeMap::new(),
                    });
                }
                Change::QuantityChanged(i) => {
                    let at = self.position(product, i);
                    self.batches[at].purchased = product.batches()[i].purchased_quantity();
                }
                Change::LineAllocated { batch, line } => {
                    let at = self.position(product, batch);
                    self.next_id += 1;
                    self.batches[at].lines.insert(self.next_id, line);
                }
                Change::LineFreed { batch, line } => {
                    let at = self.position(product, batch);
                    let lines = &mut self.batches[at].lines;
                    let id = lines
                        .iter()
                        .find(|(_, l)| l.orderid == line.orderid)
                        .map(|(id, _)| *id)
                        .expect("a freed line is stored");
                    lines.remove(&id);
                }
            }
        }
        // As a commit does: the new batches' row ids become their ties.
        for (reference, id) in added {
            product.stored_as(&reference, id);
        }
        self.version = product.version_number();
    }
}

/// The aggregate under test with what its "repository" read of its batches.
struct UnderTest {
    product: Product,
    /// By batch: the lowest row id read back.
    read_down_to: BTreeMap<BatchRef, i64>,
}

impl UnderTest {
    fn loaded(product: Product) -> Self {
        Self {
            product,
            read_down_to: BTreeMap::new(),
        }
    }

    /// What the repository does before an allocation: the line, with the
    /// batch it is allocated to.
    fn look_up(&mut self, stored: &Stored, orderid: &OrderId) {
        if !self.product.knows_line(orderid) {
            let at = stored.line(orderid);
            if let Some((reference, _)) = at {
                if let Some((id, batch)) = stored.batch_summary(reference) {
                    self.product.learn_batch(id, batch);
                }
            }
            self.product.learn_line(orderid.clone(), at);
        }
    }

    /// What the repository does before a message that names a batch (a
    /// creation, a quantity change): the batch, by reference, or that it is
    /// not one of the product's.
    fn name(&mut self, stored: &Stored, reference: &BatchRef) {
        if !self.product.knows_batch(reference) {
            match stored.batch_summary(reference) {
                Some((id, batch)) => self.product.learn_batch(id, batch),
                None => self.product.learn_not_a_batch(reference.clone()),
            }
        }
    }

    /// What the repository does before a quantity change.
    fn read_freed(&mut self, stored: &Stored, reference: &BatchRef, qty: u32, page: usize) {
        self.name(stored, reference);
        while self.product.lines_wanted(reference, qty) > 0 {
            let below = self
                .read_down_to
                .get(reference)
                .copied()
                .unwrap_or(i64::MAX);
            let rows = stored.lines_below(reference, below, page);
            let Some((lowest, _)) = rows.last() else {
                return;
            };
            self.read_down_to.insert(reference.clone(), *lowest);
            let lines = rows.into_iter().rev().map(|(_, l)| l).collect();
            self.product.learn_earlier_lines(reference, lines);
        }
    }
}

/// A refusal, by kind and text, comparable across the two models.
fn refusal(e: &DomainError) -> String {
    e.to_string()
}

fn reference_refusal(e: &reference::DomainError) -> String {
    e.to_string()
}

/// Runs one message through the reference as the bus does.
fn run_reference(p: &mut reference::Product, cmd: &Cmd) -> (Vec<Event>, Option<String>) {
    let mut events = Vec::new();
    let outcome = match cmd {
        Cmd::AddBatch { batch, qty, eta: e } => p
            .add_batch(bref(*batch), *qty, eta(*e))
            .map_err(|e| reference_refusal(&e)),
        Cmd::Allocate { order, qty } => p
            .allocate(reference::OrderLine {
                orderid: oid(*order),
                sku: sku(),
                qty: *qty,
            })
            .map(drop)
            .map_err(|e| reference_refusal(&e)),
        Cmd::Change { batch, qty } => {
            if p.change_batch_quantity(&bref(*batch), *qty) {
                Ok(())
            } else {
                Err("unknown batch".to_owned())
            }
        }
    };
    if let Err(e) = outcome {
        return (p.take_events(), Some(e));
    }
    let mut queue: VecDeque<Event> = p.take_events().into();
    while let Some(event) = queue.pop_front() {
        if let Event::Deallocated(d) = &event {
            let again = reference::OrderLine {
                orderid: d.orderid.clone(),
                sku: d.sku.clone(),
                qty: d.qty,
            };
            p.allocate(again).expect("a freed line is allocated again");
            queue.extend(p.take_events());
        }
        events.push(event);
    }
    (events, None)
}

/// Runs one message through the aggregate under test as the bus and the
/// repository do.
fn run_under_test(
    t: &mut UnderTest,
    stored: &Stored,
    cmd: &Cmd,
    page: usize,
) -> (Vec<Event>, Option<String>) {
    let mut events = Vec::new();
    let outcome = match cmd {
        Cmd::AddBatch { batch, qty, eta: e } => {
            t.name(stored, &bref(*batch));
            t.product
                .add_batch(bref(*batch), *qty, eta(*e))
                .map_err(|e| refusal(&e))
        }
        Cmd::Allocate { order, qty } => {
            t.look_up(stored, &oid(*order));
            t.product
                .allocate(OrderLine {
                    orderid: oid(*order),
                    sku: sku(),
                    qty: *qty,
                })
                .map(drop)
                .map_err(|e| refusal(&e))
        }
        Cmd::Change { batch, qty } => {
            t.read_freed(stored, &bref(*batch), *qty, page);
            match t.product.change_quantity(&bref(*batch), *qty) {
                Ok(true) => Ok(()),
                Ok(false) => Err("unknown batch".to_owned()),
                Err(e) => Err(refusal(&e)),
            }
        }
    };
    if let Err(e) = outcome {
        return (t.product.take_events(), Some(e));
    }
    let mut queue: VecDeque<Event> = t.product.take_events().into();
    while let Some(event) = queue.pop_front() {
        if let Event::Deallocated(d) = &event {
            t.look_up(stored, &d.orderid);
            let again = OrderLine {
                orderid: d.orderid.clone(),
                sku: d.sku.clone(),
                qty: d.qty,
            };
            t.product
                .allocate(again)
                .expect("a freed line is allocated again");
            queue.extend(t.product.take_events());
        }
        events.push(event);
    }
    (events, None)
}

/// The end state of the reference: per batch, (reference, purchased,
/// created, eta, lines in allocation order).
type State = (
    i64,
    Vec<(String, u32, u32, Option<NaiveDate>, Vec<(String, u32)>)>,
);

fn reference_state(p: &reference::Product) -> State {
    (
        p.version_number(),
        p.batches()
            .iter()
            .map(|b| {
                (
                    b.reference().to_string(),
                    b.purchased_quantity(),
                    b.created_quantity(),
                    b.eta(),
                    b.allocations()
                        .iter()
                        .map(|l| (l.orderid.to_string(), l.qty))
                        .collect(),
                )
            })
            .collect(),
    )
}

fn stored_state(s: &Stored) -> State {
    (
        s.version,
        s.batches
            .iter()
            .map(|b| {
                (
                    b.reference.to_string(),
                    b.purchased,
                    b.created,
                    b.eta,
                    b.lines
                        .values()
                        .map(|l| (l.orderid.to_string(), l.qty))
                        .collect(),
                )
            })
            .collect(),
    )
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut model = reference::Product::new(sku());
    let mut stored = Stored::default();
    let mut under_test = UnderTest::loaded(stored.summary());
    for (n, step) in steps.iter().enumerate() {
        let expected = run_reference(&mut model, &step.cmd);
        let got = run_under_test(&mut under_test, &stored, &step.cmd, step.page);
        prop_assert_eq!(&got, &expected, "message {} ({:?})", n, step.cmd);
        prop_assert_eq!(under_test.product.version_number(), model.version_number());
        for b in under_test.product.batches() {
            let r = model
                .batches()
                .iter()
                .find(|r| r.reference() == b.reference());
            prop_assert!(r.is_some(), "{} is the model's", b.reference());
            let r = r.unwrap();
            prop_assert_eq!(b.allocated_quantity(), r.allocated_quantity());
            prop_assert_eq!(b.available_quantity(), r.available_quantity());
        }
        if let Some(between) = step.commit {
            stored.apply(&mut under_test.product);
            prop_assert_eq!(stored_state(&stored), reference_state(&model));
            under_test = match between {
                Between::Reload => UnderTest::loaded(stored.summary()),
                Between::ReloadEvery => UnderTest::loaded(stored.every_summary()),
                Between::Cached => {
                    let mut product = under_test.product;
                    product.forget_lines();
                    UnderTest::loaded(product)
                }
            };
        }
    }
    stored.apply(&mut under_test.product);
    prop_assert_eq!(stored_state(&stored), reference_state(&model));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Same events, same refusals, same end state, however the stream is cut
    /// into transactions and however few lines each read returns.
    #[test]
    fn the_summary_aggregate_decides_as_the_full_history_model(
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        run(&steps)?;
    }
}

/// A quantity drop reads only the lines it frees: the product is told
/// nothing else, and decides the same.
#[test]
fn a_quantity_drop_needs_only_the_lines_it_frees() {
    let mut stored = Stored::default();
    let mut t = UnderTest::loaded(stored.summary());
    t.name(&stored, &bref(0));
    t.product.add_batch(bref(0), 1000, None).unwrap();
    for order in 0..200u8 {
        t.look_up(&stored, &oid(order));
        t.product
            .allocate(OrderLine {
                orderid: oid(order),
                sku: sku(),
                qty: 5,
            })
            .unwrap();
    }
    stored.apply(&mut t.product);
    let mut t = UnderTest::loaded(stored.summary());
    assert!(
        t.product.batch(&bref(0)).is_none(),
        "taken in full: not loaded"
    );
    t.name(&stored, &bref(0));
    assert!(t.product.batch(&bref(0)).unwrap().allocations().is_empty());
    // 1000 allocated; down to 988 frees three lines of 5.
    assert_eq!(t.product.lines_wanted(&bref(0), 988), 12);
    t.read_freed(&stored, &bref(0), 988, 2);
    assert_eq!(
        t.product.batch(&bref(0)).unwrap().allocations().len(),
        4,
        "two pages of two"
    );
    assert!(t.product.change_quantity(&bref(0), 988).unwrap());
    let freed: Vec<String> = t
        .product
        .take_events()
        .iter()
        .map(|e| match e {
            Event::Deallocated(d) => d.orderid.to_string(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(freed, ["o199", "o198", "o197"], "last in, first out");
}

/// Without being told, the aggregate refuses rather than guesses.
#[test]
fn a_summary_product_refuses_what_it_was_not_told() {
    let mut stored = Stored::default();
    let mut t = UnderTest::loaded(stored.summary());
    t.name(&stored, &bref(0));
    t.product.add_batch(bref(0), 10, None).unwrap();
    t.name(&stored, &bref(1));
    t.product.add_batch(bref(1), 0, None).unwrap();
    t.look_up(&stored, &oid(1));
    t.product
        .allocate(OrderLine {
            orderid: oid(1),
            sku: sku(),
            qty: 4,
        })
        .unwrap();
    stored.apply(&mut t.product);
    let mut product = stored.summary();
    let line = OrderLine {
        orderid: oid(1),
        sku: sku(),
        qty: 4,
    };
    assert!(matches!(
        product.allocate(line.clone()),
        Err(DomainError::LineNotLoaded { .. })
    ));
    assert!(matches!(
        product.change_quantity(&bref(0), 2),
        Err(DomainError::LinesNotLoaded(_))
    ));
    // Batch b1 has no stock, so is not loaded: the product does not know
    // whether b1, or a reference it has never seen, is one of its batches.
    assert!(product.batch(&bref(1)).is_none());
    assert_eq!(
        product.change_quantity(&bref(1), 9),
        Err(DomainError::BatchNotLoaded(bref(1)))
    );
    assert_eq!(
        product.add_batch(bref(1), 0, None),
        Err(DomainError::BatchNotLoaded(bref(1))),
        "a creation delivered again cannot be told from a new one"
    );
    assert_eq!(
        product.add_batch(bref(2), 5, None),
        Err(DomainError::BatchNotLoaded(bref(2)))
    );
    assert!(matches!(
        product.allocate(OrderLine {
            orderid: oid(2),
            sku: sku(),
            qty: 0,
        }),
        Err(DomainError::LineNotLoaded { .. })
    ));
    product.learn_line(oid(2), None);
    assert_eq!(
        product.allocate(OrderLine {
            orderid: oid(2),
            sku: sku(),
            qty: 0,
        }),
        Err(DomainError::EveryBatchNotLoaded(sku())),
        "any batch could take nothing, the preferred of all of them"
    );
    assert_eq!(product.version_number(), stored.version, "nothing changed");
    product.learn_line(oid(1), stored.line(&oid(1)));
    assert_eq!(product.allocate(line), Ok(None), "the same line again");
    // Told, it decides.
    let (id, b1) = stored.batch_summary(&bref(1)).unwrap();
    product.learn_batch(id, b1);
    assert_eq!(
        product.add_batch(bref(1), 0, None),
        Ok(()),
        "delivered again"
    );
    assert_eq!(
        product.add_batch(bref(1), 3, None),
        Err(DomainError::DuplicateBatch(bref(1)))
    );
    product.learn_not_a_batch(bref(2));
    assert_eq!(product.add_batch(bref(2), 5, None), Ok(()));
}
