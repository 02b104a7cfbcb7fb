//! Entrypoints: how the world reaches the worker. The command line, which
//! reads flags and environment variables into the configuration and runs a
//! command (`runner`: how a binary runs one), and the HTTP server (health,
//! metrics, the read model).

pub mod cli;
pub mod http;
pub mod runner;
