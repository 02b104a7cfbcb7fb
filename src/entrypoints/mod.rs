//! Entrypoints: the command line and its tools, and the worker loop:
//! `worker` (the consumer loop), `partition` (a partition's task),
//! `processor` (a batch of Kafka messages through the service layer),
//! `tracker` (the waiting rule) and `window` (the unknown-reference window).

pub mod cli;
pub mod generator;
pub mod partition;
pub mod processor;
pub mod replay;
pub mod simulate;
pub mod telemetry;
pub mod tracker;
pub mod watch;
pub mod window;
pub mod worker;
