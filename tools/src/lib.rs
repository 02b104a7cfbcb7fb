//! Developer tools of allocation-worker, a crate of their own so that the
//! worker's binary carries only what the worker runs: a seeded stream of ERP
//! messages ([`generator`]) that `simulate` publishes and the benchmark
//! (`examples/bench.rs`) sends, and `watch`, the live summary of what the
//! worker decides; [`cli`] holds their flags.
//!
//! They depend on the worker library's configuration, adapters, command
//! line flags and command error, and nothing of the worker depends on them.

pub mod cli;
pub mod generator;
pub mod simulate;
pub mod watch;
