//! The `Product` aggregate as it was before it was loaded from summaries
//! (every line of every batch in memory), kept unchanged as the reference
//! that tests/unit/aggregate_props.rs compares the present aggregate with. Only
//! the imports differ from the original (src/domain/model.rs at b367018),
//! and the loaders and getters the comparison never calls are left out.

use chrono::NaiveDate;

use allocation_worker::domain::events::{Allocated, Deallocated, Event, OutOfStock};
use allocation_worker::domain::names::{BatchRef, OrderId, Sku};

/// A rule of the domain refused the change. Permanent: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("batch {0} already exists with different data")]
    DuplicateBatch(BatchRef),
    #[error(
        "order line ({orderid}, {sku}) is already allocated with qty {allocated}, not {requested}"
    )]
    DuplicateLine {
        orderid: OrderId,
        sku: Sku,
        allocated: u32,
        requested: u32,
    },
    #[error("order line for SKU {line_sku} offered to product {product_sku}")]
    WrongSku { product_sku: Sku, line_sku: Sku },
}

/// A customer's request for `qty` units of `sku`; identified by `(orderid, sku)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub orderid: OrderId,
    pub sku: Sku,
    pub qty: u32,
}

impl OrderLine {
    fn same_line(&self, orderid: &OrderId, sku: &Sku) -> bool {
        &self.orderid == orderid && &self.sku == sku
    }
}

/// Stock of one SKU that arrives (or arrived, when `eta` is `None`) together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    reference: BatchRef,
    sku: Sku,
    purchased_quantity: u32,
    /// The quantity the batch was created with: a BatchCreated that carries
    /// it (and the same SKU and eta) is the same message again, whatever
    /// quantity changes came since.
    created_quantity: u32,
    eta: Option<NaiveDate>,
    /// In the order they were allocated: quantity drops free the last first.
    allocations: Vec<OrderLine>,
}

impl Batch {
    pub fn new(
        reference: BatchRef,
        sku: Sku,
        purchased_quantity: u32,
        eta: Option<NaiveDate>,
    ) -> Self {
        Self {
            reference,
            sku,
            purchased_quantity,
            created_quantity: purchased_quantity,
            eta,
            allocations: Vec::new(),
        }
    }

    pub fn reference(&self) -> &BatchRef {
        &self.reference
    }

    pub fn eta(&self) -> Option<NaiveDate> {
        self.eta
    }

    pub fn purchased_quantity(&self) -> u32 {
        self.purchased_quantity
    }

    /// The quantity of the message that created the batch.
    pub fn created_quantity(&self) -> u32 {
        self.created_quantity
    }

    pub fn allocations(&self) -> &[OrderLine] {
        &self.allocations
    }

    pub fn allocated_quantity(&self) -> i64 {
        self.allocations.iter().map(|l| i64::from(l.qty)).sum()
    }

    /// Negative while a quantity drop is being resolved, never afterwards.
    pub fn available_quantity(&self) -> i64 {
        i64::from(self.purchased_quantity) - self.allocated_quantity()
    }

    pub fn can_allocate(&self, line: &OrderLine) -> bool {
        self.sku == line.sku && self.available_quantity() >= i64::from(line.qty)
    }

    /// Whether a BatchCreated with this data is the one that created the
    /// batch, delivered again.
    fn created_by(&self, sku: &Sku, qty: u32, eta: Option<NaiveDate>) -> bool {
        &self.sku == sku && self.created_quantity == qty && self.eta == eta
    }
}

/// The aggregate: every batch of one SKU. All changes to allocations go
/// through it, and each change bumps `version_number` so that two concurrent
/// changes cannot both be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    sku: Sku,
    version_number: i64,
    /// In creation order, which breaks ties between equal ETAs.
    batches: Vec<Batch>,
    events: Vec<Event>,
}

impl Product {
    /// A product that has never been stored.
    pub fn new(sku: Sku) -> Self {
        Self::restore(sku, 0, Vec::new())
    }

    /// Rebuilds a stored product; `batches` must be in creation order.
    pub fn restore(sku: Sku, version_number: i64, batches: Vec<Batch>) -> Self {
        Self {
            sku,
            version_number,
            batches,
            events: Vec::new(),
        }
    }

    pub fn version_number(&self) -> i64 {
        self.version_number
    }

    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    pub fn batch(&self, reference: &BatchRef) -> Option<&Batch> {
        self.batches.iter().find(|b| &b.reference == reference)
    }

    /// Events recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Adds a batch. The message that created the batch, again, is a no-op
    /// (redelivery from the ERP), even after the batch's quantity was changed
    /// since; the same reference with other data is refused.
    pub fn add_batch(
        &mut self,
        reference: BatchRef,
        qty: u32,
        eta: Option<NaiveDate>,
    ) -> Result<(), DomainError> {
        if let Some(existing) = self.batch(&reference) {
            return if existing.created_by(&self.sku, qty, eta) {
                Ok(())
            } else {
                Err(DomainError::DuplicateBatch(reference))
            };
        }
        self.batches
            .push(Batch::new(reference, self.sku.clone(), qty, eta));
        self.version_number += 1;
        Ok(())
    }

    /// Where `(orderid, sku)` is allocated now, if anywhere.
    pub fn allocation_of(&self, orderid: &OrderId) -> Option<(&Batch, &OrderLine)> {
        self.batches.iter().find_map(|b| {
            b.allocations
                .iter()
                .find(|l| l.same_line(orderid, &self.sku))
                .map(|l| (b, l))
        })
    }

    /// Allocates the line to the first batch that can take it, warehouse stock
    /// first, then by earliest ETA, ties by creation order. Records `Allocated`,
    /// or `OutOfStock` (changing nothing) when no batch can take it. A line that
    /// is already allocated with the same quantity is left as it is.
    pub fn allocate(&mut self, line: OrderLine) -> Result<Option<BatchRef>, DomainError> {
        if line.sku != self.sku {
            // Handlers load the product by the line's SKU; this guards the invariant.
            return Err(DomainError::WrongSku {
                product_sku: self.sku.clone(),
                line_sku: line.sku,
            });
        }
        if let Some((_, existing)) = self.allocation_of(&line.orderid) {
            return if existing.qty == line.qty {
                Ok(None)
            } else {
                Err(DomainError::DuplicateLine {
                    orderid: line.orderid,
                    sku: line.sku,
                    allocated: existing.qty,
                    requested: line.qty,
                })
            };
        }
        let chosen = self
            .batches
            .iter()
            .enumerate()
            .filter(|(_, b)| b.can_allocate(&line))
            // `None` sorts before `Some`: warehouse stock first. min_by_key keeps
            // the first of equal keys, so ties go to the earliest created batch.
            .min_by_key(|(_, b)| b.eta)
            .map(|(i, _)| i);
        match chosen {
            Some(i) => {
                let batch = &mut self.batches[i];
                batch.allocations.push(line.clone());
                let batchref = batch.reference.clone();
                self.version_number += 1;
                self.events.push(Event::Allocated(Allocated {
                    orderid: line.orderid,
                    sku: line.sku,
                    qty: line.qty,
                    batchref: batchref.clone(),
                }));
                Ok(Some(batchref))
            }
            None => {
                self.events.push(Event::OutOfStock(OutOfStock {
                    sku: line.sku,
                    orderid: line.orderid,
                    qty: line.qty,
                }));
                Ok(None)
            }
        }
    }

    /// Sets a batch's purchased quantity. While the batch is over-allocated,
    /// frees its most recently allocated line and records `Deallocated`; the
    /// bus then allocates each freed line again.
    ///
    /// Returns `false` when the product has no batch with that reference.
    pub fn change_batch_quantity(&mut self, reference: &BatchRef, qty: u32) -> bool {
        let Some(batch) = self.batches.iter_mut().find(|b| &b.reference == reference) else {
            return false;
        };
        if batch.purchased_quantity == qty {
            return true;
        }
        batch.purchased_quantity = qty;
        let mut freed = Vec::new();
        while batch.available_quantity() < 0 {
            match batch.allocations.pop() {
                Some(line) => freed.push(line),
                None => break,
            }
        }
        self.version_number += 1;
        self.events.extend(freed.into_iter().map(|line| {
            Event::Deallocated(Deallocated {
                orderid: line.orderid,
                sku: line.sku,
                qty: line.qty,
            })
        }));
        true
    }
}
