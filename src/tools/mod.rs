//! Developer tools, behind the `tools` cargo feature (on by default): a
//! seeded stream of ERP messages ([`generator`]) that `simulate` publishes
//! and the benchmark (`examples/bench.rs`) sends, and `watch`, the live
//! summary of what the worker decides. None of the worker's code imports
//! them: `cargo build --no-default-features` makes a binary without
//! `simulate` and `watch`.
//!
//! They depend on the configuration and the adapters, never on the command
//! line, which builds their settings.

pub mod generator;
pub mod simulate;
pub mod watch;
