//! The sequential model of the end-to-end tests: the crate's own `Product`
//! aggregates, driven the way the message bus drives them (events first in,
//! first out; a deallocated line is allocated again, its event queued
//! behind the others), and the events they decided, per SKU, as a
//! subscriber sees them (type and JSON value, contract §4).

use std::collections::{BTreeMap, VecDeque};

use chrono::NaiveDate;
use serde_json::{json, Value};

use allocation_worker::domain::{BatchRef, Event, OrderId, OrderLine, Product, Sku};

/// An outbound event as published: its type and its JSON value.
pub type Ev = (&'static str, Value);

pub fn outbound(event: &Event) -> Ev {
    match event {
        Event::Allocated(e) => (
            "Allocated",
            json!({"orderid": e.orderid.as_str(), "sku": e.sku.as_str(), "qty": e.qty, "batchref": e.batchref.as_str()}),
        ),
        Event::Deallocated(e) => (
            "Deallocated",
            json!({"orderid": e.orderid.as_str(), "sku": e.sku.as_str(), "qty": e.qty}),
        ),
        Event::OutOfStock(e) => (
            "OutOfStock",
            json!({"sku": e.sku.as_str(), "orderid": e.orderid.as_str(), "qty": e.qty}),
        ),
    }
}

/// What a message asks of its SKU's product.
pub enum Step<'a> {
    Batch {
        reference: &'a str,
        qty: u32,
        eta: Option<NaiveDate>,
    },
    Order {
        orderid: &'a str,
        qty: u32,
    },
    Change {
        reference: &'a str,
        qty: u32,
    },
}

#[derive(Default)]
pub struct SequentialModel {
    pub products: BTreeMap<String, Product>,
    /// Per SKU, the events in decision order.
    pub events: BTreeMap<String, Vec<Ev>>,
}

impl SequentialModel {
    /// Applies one message of `sku`. The streams of the tests that use it
    /// never reuse a batch reference, repeat a line only with its quantity,
    /// and change only existing batches: anything else is a broken test.
    pub fn apply(&mut self, sku: &str, step: Step<'_>) {
        let sku_of = || Sku::parse(sku.to_owned()).unwrap();
        let product = self
            .products
            .entry(sku.to_owned())
            .or_insert_with(|| Product::new(sku_of()));
        match step {
            Step::Batch {
                reference,
                qty,
                eta,
            } => product
                .add_batch(BatchRef::parse(reference).unwrap(), qty, eta)
                .expect("a new batch reference"),
            Step::Order { orderid, qty } => {
                product
                    .allocate(OrderLine {
                        orderid: OrderId::parse(orderid).unwrap(),
                        sku: sku_of(),
                        qty,
                    })
                    .expect("a new line, or one repeated with its quantity");
            }
            Step::Change { reference, qty } => {
                let known =
                    product.change_batch_quantity(&BatchRef::parse(reference).unwrap(), qty);
                assert!(known, "a change of an existing batch");
            }
        }
        let mut queue: VecDeque<Event> = product.take_events().into();
        let decided = self.events.entry(sku.to_owned()).or_default();
        while let Some(event) = queue.pop_front() {
            decided.push(outbound(&event));
            if let Event::Deallocated(d) = &event {
                product
                    .allocate(OrderLine {
                        orderid: d.orderid.clone(),
                        sku: d.sku.clone(),
                        qty: d.qty,
                    })
                    .expect("a freed line is allocatable");
                queue.extend(product.take_events());
            }
        }
    }
}
