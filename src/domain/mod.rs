//! The allocation domain: the `Product` aggregate, its batches and order lines,
//! and the commands and events that cross its boundary. Pure Rust: no I/O, no
//! async, no database or Kafka types, so every rule here is tested in memory.

pub mod commands;
pub mod events;
pub mod model;
pub mod names;

pub use commands::Command;
pub use events::Event;
pub use model::{Batch, Change, DomainError, OrderLine, Product};
pub use names::{BatchRef, InvalidName, OrderId, Sku};
