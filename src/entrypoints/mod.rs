//! Entrypoints: the command line and the worker loop.

pub mod cli;
pub mod telemetry;
pub mod worker;
