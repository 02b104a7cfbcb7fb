//! The engine: what runs the worker's loop. `worker` (the consumer loop),
//! `partition` (a partition's task), `slots` (what the loop hands each task:
//! its queue, the memory bound, the running tasks a revocation stops),
//! `processor` (a batch of Kafka messages
//! through the service layer), `tracker` (the waiting rule) and `window`
//! (the unknown-reference window's clock of usable time).

pub mod partition;
pub mod processor;
pub mod slots;
pub mod tracker;
pub mod window;
pub mod worker;
