//! Domain events: facts the `Product` aggregate records as it decides. The
//! message bus dispatches them to their handlers, which publish them through
//! the outbox and allocate freed lines again.

use super::names::{BatchRef, OrderId, Sku};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub orderid: OrderId,
    pub sku: Sku,
    pub qty: u32,
    pub batchref: BatchRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deallocated {
    pub orderid: OrderId,
    pub sku: Sku,
    pub qty: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfStock {
    pub sku: Sku,
    pub orderid: OrderId,
    pub qty: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Allocated(Allocated),
    Deallocated(Deallocated),
    OutOfStock(OutOfStock),
}

impl Event {
    /// The event's type name, as in the `ce_type` header (`allocation.<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Allocated(_) => "Allocated",
            Event::Deallocated(_) => "Deallocated",
            Event::OutOfStock(_) => "OutOfStock",
        }
    }

    /// The product the event is about: the outbound key and the unit of ordering.
    pub fn sku(&self) -> &Sku {
        match self {
            Event::Allocated(e) => &e.sku,
            Event::Deallocated(e) => &e.sku,
            Event::OutOfStock(e) => &e.sku,
        }
    }
}
