//! Entrypoints: the command line, `replay-dead-letters`, `outbox-quarantine`, the logs and traces
//! of it all, and the worker loop: `worker` (the consumer loop), `partition`
//! (a partition's task), `processor` (a batch of Kafka messages through the
//! service layer), `tracker` (the waiting rule) and `window` (the
//! unknown-reference window's clock of usable time).

pub mod cli;
pub mod partition;
pub mod processor;
pub mod quarantine;
pub mod replay;
pub mod rewind;
pub mod telemetry;
pub mod tracker;
pub mod window;
pub mod worker;
