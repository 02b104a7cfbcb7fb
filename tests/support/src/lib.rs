//! End-to-end test harness, in the style of *Zero To Production*'s `spawn_app`:
//! every test gets its own database and its own topics, starts the real
//! `allocation-worker` binary against them, and talks to it only through Kafka
//! (plus reading PostgreSQL rows to assert on state).
//!
//! - [`TestEnv::new`] creates a database `aw_test_<hex>` on the server of
//!   `DATABASE_URL`, seven topics with a random suffix (3 partitions each), a
//!   random consumer group, a producer and a [`Witness`] that reads every
//!   outbound topic from the beginning.
//! - [`TestEnv::spawn_worker`] starts the binary; its output goes to
//!   `target/e2e-logs/<test>-w<n>.log`. The returned [`WorkerProcess`] is
//!   SIGKILLed when dropped.
//! - Nothing sleeps to pass: every wait polls with a deadline and fails with
//!   what it saw and where the worker logs are.
//!
//! What allocation-worker's test crates share, one concern a file:
//! - `env`: [`TestEnv`] itself, and the records it can produce;
//! - `topics`: the seven topic names of one test ([`Topics`]);
//! - `records`: what is read from a topic ([`Record`]) and what was produced
//!   ([`Delivered`]);
//! - `witness`: the [`Witness`];
//! - `worker`: the binary under test, its logs and a running
//!   [`WorkerProcess`];
//! - [`alone`]: the tests that run alone;
//! - [`fakes`], [`relay_fakes`]: the in-memory repository of the unit tests,
//!   and the store and broker of the relay's simulation;
//! - [`containers`]: PostgreSQL and Kafka in containers when no services are
//!   given;
//! - [`private_services`]: a Tansu broker and a PostgreSQL cluster of one test
//!   alone, for the tests that freeze or stop them;
//! - [`database`]: creating and dropping test databases, and the rows and
//!   counts assertions read;
//! - [`kafka`]: creating topics, reading one to its end, the group's offsets;
//! - [`http`]: the worker's HTTP surface and its metrics;
//! - [`orders`]: a stream of orders over known stock, and the check that
//!   each was allocated once as the model says;
//! - [`model`]: the sequential model of a SKU's messages and the events it
//!   decides, which the crash and three-instance tests compare with;
//! - [`binary`]: the binary's commands that end by themselves.
//!
//! This file keeps what every test uses: the deadlines, unique names and the
//! `check!`/`check_eq!` macros, which name the worker logs when they fail.

pub mod alone;
pub mod binary;
pub mod containers;
pub mod database;
mod env;
pub mod fakes;
pub mod http;
pub mod kafka;
pub mod model;
pub mod orders;
pub mod private_services;
mod records;
pub mod relay_fakes;
mod topics;
mod witness;
mod worker;

pub use env::{RawHeader, TestEnv};
pub use http::{http_get, http_until, http_until_ok, metrics_until, sample, sample_sum, samples};
pub use records::{distinct_ids, on, Delivered, Record};
pub use topics::Topics;
pub use witness::Witness;
pub use worker::{log_dir, repo_root, tail, test_name, worker_binary, WorkerProcess};

use std::fmt::Write as _;
use std::time::Duration;

/// Default deadline of every wait.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Partitions of every test topic.
pub const PARTITIONS: i32 = 3;

/// Kafka client properties of the worker under test: Tansu takes about half of
/// `session.timeout.ms` to complete a group join, so keep it short.
pub const WORKER_KAFKA_PROPERTIES: &str = "session.timeout.ms=6000,heartbeat.interval.ms=1000";

/// A random lowercase hex string of `n` characters.
pub fn random_hex(n: usize) -> String {
    let mut s = String::with_capacity(n + 16);
    while s.len() < n {
        write!(s, "{:016x}", rand::random::<u64>()).unwrap();
    }
    s.truncate(n);
    s
}

/// A unique name with a readable prefix, e.g. `sku-3fa9c2d1`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex(8))
}

/// `assert!` that names the worker logs when it fails.
#[macro_export]
macro_rules! check {
    ($env:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            panic!("{}\nworker logs: {}", format!($($arg)+), $env.log_paths());
        }
    };
}

/// `assert_eq!` that names the worker logs when it fails.
#[macro_export]
macro_rules! check_eq {
    ($env:expr, $left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    panic!(
                        "{}\n  left: {:?}\n right: {:?}\nworker logs: {}",
                        format!($($arg)+), left, right, $env.log_paths()
                    );
                }
            }
        }
    };
}
