//! Fault tests (contract §5–§6): the real `allocation-worker` binary under
//! redelivery and replay, unknown references, a frozen broker, a stopped
//! database, several instances in one consumer group, a locked product, and a
//! bounded graceful shutdown. Each test talks to the worker only through
//! Kafka, HTTP and its log, and asserts on the outbound topics and the
//! database rows.
//!
//! One file per fault:
//! - `redelivery.rs`: the same messages again, and a replay from offset 0;
//! - `unknown_references.rs`: messages that name what does not exist yet;
//! - `broker_outage.rs`: the broker frozen mid-stream;
//! - `database_outage.rs`: PostgreSQL stopped mid-stream, and for a minute
//!   while messages wait for their references;
//! - `two_instances.rs`: two instances in one group, their rebalances and
//!   hand-overs, and their concurrent decisions on one product;
//! - `three_instances.rs`: three instances in one group, one killed and
//!   restarted, one frozen past the session timeout, mid-stream;
//! - `memory_bound.rs`: the memory bound under a stuck partition and a huge message;
//! - `slow_partition.rs`: a product row locked for longer than the poll interval;
//! - `shutdown.rs`: SIGTERM mid-stream with a message stuck;
//! - `task_failure.rs`: a partition task that panics.
//!
//! The outage tests freeze or stop services of their own (a private Tansu
//! broker, a private PostgreSQL cluster), never the shared ones that other
//! tests use.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Run with `cargo test --test services faults:: -- --nocapture`; they run
//! alone (testkit's `alone`), whatever the thread count.
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure);
//! the private broker's and database's logs are kept beside them.

mod broker_outage;
mod database_outage;
mod memory_bound;
mod redelivery;
mod shutdown;
mod slow_partition;
mod task_failure;
mod three_instances;
mod two_instances;
mod unknown_references;

use std::collections::BTreeSet;

// The macros, for every fault file (`use super::{check, ...}`).
use std::time::Duration;
use testkit::{check, check_eq};

use testkit::{TestEnv, WorkerProcess};

/// Kafka properties of every worker here: Tansu completes a group join in
/// about half of `session.timeout.ms`, and these tests rebalance a lot.
const KAFKA_PROPERTIES: &str = "session.timeout.ms=2000,heartbeat.interval.ms=500";

/// How long an outage is held.
const OUTAGE: Duration = Duration::from_secs(20);

/// Deadline of waits that span an outage and the recovery after it.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);

/// A worker of this test with [`KAFKA_PROPERTIES`] and `extra` settings.
fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut vars = vec![("KAFKA_PROPERTIES", KAFKA_PROPERTIES)];
    vars.extend_from_slice(extra);
    env.spawn_worker_with(&vars)
}

/// Everything the worker decides, read back from the database: two equal
/// snapshots mean nothing was applied in between.
#[derive(Debug, PartialEq, Eq)]
struct State {
    products: Vec<(String, i64)>,
    batches: Vec<(String, String, i64, Option<String>)>,
    allocations: Vec<(String, String, String, i64)>,
    view: Vec<(String, String, String)>,
    processed: Vec<String>,
    outbox: Vec<(i64, String, Option<Vec<u8>>, bool)>,
}

impl State {
    async fn read(env: &TestEnv) -> Self {
        let db = &env.db;
        Self {
            products: sqlx::query_as("SELECT sku, version_number FROM products ORDER BY sku")
                .fetch_all(db)
                .await
                .expect("products"),
            batches: sqlx::query_as(
                "SELECT reference, sku, purchased_quantity, eta::text FROM batches \
                 ORDER BY reference",
            )
            .fetch_all(db)
            .await
            .expect("batches"),
            allocations: sqlx::query_as(
                "SELECT a.orderid, a.sku, b.reference, a.qty FROM allocations a \
                 JOIN batches b ON b.id = a.batch_id ORDER BY a.orderid, a.sku",
            )
            .fetch_all(db)
            .await
            .expect("allocations"),
            view: sqlx::query_as(
                "SELECT orderid, sku, batchref FROM allocations_view ORDER BY orderid, sku",
            )
            .fetch_all(db)
            .await
            .expect("allocations_view"),
            processed: sqlx::query_scalar(
                "SELECT idempotency_key FROM processed_messages ORDER BY idempotency_key",
            )
            .fetch_all(db)
            .await
            .expect("processed_messages"),
            outbox: sqlx::query_as(
                "SELECT id, kind, payload, id NOT IN (SELECT id FROM outbox_pending) FROM outbox ORDER BY id",
            )
            .fetch_all(db)
            .await
            .expect("outbox"),
        }
    }
}

/// The inbound partitions a worker holds now, from its "partitions assigned"
/// and "partitions revoked" log lines.
fn assignment(worker: &WorkerProcess) -> BTreeSet<String> {
    let mut current = BTreeSet::new();
    for line in worker.log_text().lines() {
        let assigned = line.contains("partitions assigned");
        if !assigned && !line.contains("partitions revoked") {
            continue;
        }
        let Some(start) = line.find("partitions=[") else {
            continue;
        };
        let rest = &line[start + "partitions=[".len()..];
        let list = &rest[..rest.find(']').unwrap_or(rest.len())];
        let names = list
            .split(", ")
            .map(|p| p.trim_matches('"').to_owned())
            .filter(|p| !p.is_empty());
        if assigned {
            current.extend(names);
        } else {
            for name in names {
                current.remove(&name);
            }
        }
    }
    current
}
