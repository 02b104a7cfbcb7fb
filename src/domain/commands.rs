//! Commands: what the outside world asks the allocation service to do. Each has
//! exactly one handler, and its failure is the failure of the message that
//! carried it.

use chrono::NaiveDate;

use super::names::{BatchRef, OrderId, Sku};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateBatch {
    pub reference: BatchRef,
    pub sku: Sku,
    pub qty: u32,
    /// `None` is warehouse stock, allocated before any shipment.
    pub eta: Option<NaiveDate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatchQuantity {
    pub reference: BatchRef,
    pub qty: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocate {
    pub orderid: OrderId,
    pub sku: Sku,
    pub qty: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateBatch(CreateBatch),
    ChangeBatchQuantity(ChangeBatchQuantity),
    Allocate(Allocate),
}

impl Command {
    /// A stable, low-cardinality name, used in logs and metric labels.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Command::CreateBatch(_) => "CreateBatch",
            Command::ChangeBatchQuantity(_) => "ChangeBatchQuantity",
            Command::Allocate(_) => "Allocate",
        }
    }
}
