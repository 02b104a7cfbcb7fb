//! The engine: what runs the worker's loop. `worker` (the consumer loop),
//! `partition` (a partition's task), `processor` (a batch of Kafka messages
//! through the service layer), `tracker` (the waiting rule) and `window`
//! (the unknown-reference window's clock of usable time).

pub mod partition;
pub mod processor;
pub mod tracker;
pub mod window;
pub mod worker;
