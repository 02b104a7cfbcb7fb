//! Entrypoints: the command line, the worker loop (with the tracker of
//! messages waiting for a reference and the window of usable time they wait
//! in), `replay-dead-letters`, and the logs and traces of it all.

pub mod cli;
pub mod replay;
pub mod telemetry;
pub mod tracker;
pub mod window;
pub mod worker;
