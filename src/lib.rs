//! allocation-worker: a Kafka worker that allocates ERP order lines to stock in
//! PostgreSQL and publishes what it decided (see `README.md` and `docs/contract.md`).
//!
//! # Layout
//!
//! Layers as in cosmicpython; dependencies point inward only.
//!
//! - [`domain`]: `Product`, `Batch`, `OrderLine`, commands and events. Pure
//!   Rust: imports nothing else of this crate and no I/O, async, sqlx or rdkafka.
//! - [`service_layer`]: the message bus, the handlers, the batch processor
//!   (the one place where a transaction begins and ends) and the
//!   unit-of-work traits. Imports only `domain`.
//! - [`adapters`]: PostgreSQL repository and unit of work, the outbox and its
//!   relay, Kafka decoding, consumer and producer. Implements `service_layer`'s
//!   traits; never imports `configuration`, `engine` or `entrypoints`.
//! - [`configuration`]: the validated settings of `run` and `migrate`
//!   (`RunSettings`, `DatabaseSettings`, `WorkerSettings`) and the rules
//!   every command's settings are checked by; no clap. The settings of an
//!   adapter (`KafkaSettings`, `RetentionSettings`) and of an operation
//!   live beside what they set. Imports only the adapters' settings types.
//! - [`engine`]: the worker loop, which feeds each partition's messages to
//!   the batch processor of the service layer, and what it needs to wait
//!   for late references.
//! - [`operations`]: the operator's commands besides `run` and `migrate`.
//! - [`telemetry`]: the logs and traces of every command.
//! - [`entrypoints`]: the command line, which builds the configuration from
//!   flags and environment variables, and the HTTP server.
//! - [`bootstrap`]: builds the pieces from the configuration and wires them;
//!   never imports the command line.
//! - [`command_error`]: the error of the commands besides `run` and
//!   `migrate`, and its exit code.
//!
//! The developer tools (`simulate`, `watch`, the generator and the
//! benchmark) are a crate of their own in this workspace, `tools/`
//! (`allocation-tools`), built on the public items of this one.
//!
//! # What is public
//!
//! The modules are public because three other crates reach into them: the
//! binary (`src/main.rs`: the command line, `bootstrap`, `operations`,
//! `telemetry`), the developer tools (`tools/`: the clients, topic readers
//! and settings they share with the worker), and the test crates (`tests/`:
//! the engine's simulation drives `engine::worker::Worker` on fakes of the
//! `adapters::consumer` and `service_layer` traits; the adapter tests drive
//! `adapters::postgres` and `adapters::relay` directly; the unit tests drive
//! `domain` and `service_layer`). Within a module an item is `pub` only when
//! one of them uses it, `pub(crate)` otherwise.

/// The crate version this binary was built as.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from (`git rev-parse --short HEAD`
/// by build.rs), `ALLOCATION_WORKER_REVISION` when set at build time (Docker
/// builds have no `.git`), else `unknown`.
pub const REVISION: &str = env!("ALLOCATION_WORKER_REVISION");

pub mod adapters;
pub mod bootstrap;
pub mod command_error;
pub mod configuration;
pub mod domain;
pub mod engine;
pub mod entrypoints;
pub mod operations;
pub mod service_layer;
pub mod telemetry;
