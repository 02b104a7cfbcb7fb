//! Entrypoints: the command line and the worker loop.

pub mod cli;
pub mod generator;
pub mod replay;
pub mod simulate;
pub mod telemetry;
pub mod tracker;
pub mod watch;
pub mod window;
pub mod worker;
