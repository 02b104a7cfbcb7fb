//! The benchmark of BENCHMARKS.md: runs the real `allocation-worker run`
//! binary against a fresh database and fresh topics, feeds it the standard
//! benchmark workload through Kafka, and measures throughput, CPU, peak RSS
//! and end-to-end latency; then checks the end state.
//!
//! Run it with `scripts/bench.sh [--small]` (which starts the services and
//! builds the release binary), or directly:
//!
//! ```text
//! source scripts/services.sh up
//! cargo build --release
//! cargo run --release --example bench -- [--small] [--seed N] [--keep]
//! ```
//!
//! Environment: `DATABASE_URL` (the role needs CREATEDB),
//! `KAFKA_BOOTSTRAP_SERVERS`, and `WORKER_BIN` (default
//! `<target>/release/allocation-worker`).
//!
//! The workload is the generator's phased form (`src/tools/generator/`,
//! the `tools` feature), seeded by `--seed`; it is the stream this program
//! drew with its own splitmix64 before, message for message:
//!
//! 1. stock: N SKUs × 3 batches (one warehouse batch without eta, two dated
//!    shipments), purchased quantity uniform in 50..=120;
//! 2. allocations: M one-line orders, SKU uniform, qty uniform in 1..=4;
//! 3. quantity changes: K BatchQuantityChanged, each lowering a uniformly
//!    chosen batch by 5..=15 (not below 0).
//!
//! Phases are sent one after the other: a phase is produced as fast as the
//! producer can, and the next one starts once the worker has processed every
//! message and published every outbound event of the previous one. A phase
//! lasts from its first produced message to the last of (outbound event marked
//! sent, inbound message recorded as processed), both read from the database;
//! "overall" is the total of the three phases' messages over the sum of their
//! durations (the polling gap between phases is not counted).
//!
//! Then the latency run: fresh stock (same shape, other SKUs), then
//! AllocationRequired at a steady offered rate; latency = Kafka timestamp of
//! the outbound event (set by the worker's producer when it publishes) minus
//! the wall-clock time the inbound message was handed to the producer,
//! matched by orderid.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use allocation_worker::adapters::inbound::InboundKind;
use allocation_worker::tools::generator::{GeneratedMessage, Phase, Workload, WorkloadSettings};

const PARTITIONS: i32 = 3;
/// The worker's extra librdkafka settings. A short session timeout makes the
/// group join quick. `fetch.wait.max.ms=10`: Tansu does not answer a pending
/// fetch when data arrives, only when the wait runs out (measured: a message
/// waits up to `fetch.wait.max.ms` to be delivered), so librdkafka's 500 ms
/// default would dominate the latency run. Kafka answers as soon as data
/// arrives, where the setting only changes how often an idle consumer polls.
/// `BENCH_KAFKA_PROPERTIES` appends more.
const KAFKA_PROPERTIES: &str =
    "session.timeout.ms=6000,heartbeat.interval.ms=1000,fetch.wait.max.ms=10";

type Error = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Error>;

fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(msg.into().into())
}

// ------------------------------------------------------------------ settings

struct Sizes {
    skus: usize,
    allocations: usize,
    changes: usize,
    latency_secs: u64,
    latency_rate: u64,
}

const FULL: Sizes = Sizes {
    skus: 200,
    allocations: 20_000,
    changes: 2_000,
    latency_secs: 10,
    latency_rate: 1_000,
};

const SMALL: Sizes = Sizes {
    skus: 20,
    allocations: 500,
    changes: 50,
    latency_secs: 3,
    latency_rate: 100,
};

struct Args {
    small: bool,
    seed: u64,
    keep: bool,
    latency_rate: Option<u64>,
    latency_secs: Option<u64>,
    /// `--retention D`: both retentions set to `D` (e.g. `3s`), so that the
    /// retention task deletes while the phases run.
    retention: Option<String>,
    /// `--backlog N`: before the phases, N idempotency records and N
    /// published outbox rows dated an hour ago, so that a retention shorter
    /// than that has rows to delete all through the phases.
    backlog: i64,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        small: false,
        seed: 42,
        keep: false,
        latency_rate: None,
        latency_secs: None,
        retention: None,
        backlog: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--small" => args.small = true,
            "--keep" => args.keep = true,
            "--seed" => {
                args.seed = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seed needs an integer")?
            }
            "--latency-rate" => {
                args.latency_rate = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&r| r > 0)
                        .ok_or("--latency-rate needs a positive integer (msg/s)")?,
                )
            }
            "--latency-secs" => {
                args.latency_secs = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&r| r > 0)
                        .ok_or("--latency-secs needs a positive integer")?,
                )
            }
            "--retention" => {
                args.retention = Some(
                    it.next()
                        .filter(|d| !d.is_empty())
                        .ok_or("--retention needs a duration such as 3s")?,
                )
            }
            "--backlog" => {
                args.backlog = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n| n >= 0)
                    .ok_or("--backlog needs a row count")?
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench [--small] [--seed N] [--keep] [--latency-rate MSG_PER_S] [--latency-secs S] [--retention DURATION] [--backlog ROWS]"
                );
                std::process::exit(0);
            }
            other => return fail(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

// ------------------------------------------------------------------ workload

/// Salt of the warm-up message's seed, so that it is no message of the run.
const WARM_UP_SALT: u64 = 0x5741_524d;

/// One message to send, and the orderid of an AllocationRequired (to match
/// its decision).
struct Msg {
    kind: InboundKind,
    key: String,
    value: Vec<u8>,
    orderid: Option<String>,
}

impl From<GeneratedMessage> for Msg {
    fn from(m: GeneratedMessage) -> Self {
        let orderid = serde_json::from_slice::<serde_json::Value>(&m.value)
            .ok()
            .and_then(|v| v.get("orderid")?.as_str().map(str::to_owned));
        Msg {
            kind: m.topic_kind,
            key: m.key,
            value: m.value,
            orderid,
        }
    }
}

/// The next `n` messages of `workload`.
fn take(workload: &mut Workload, n: usize) -> Vec<Msg> {
    workload.by_ref().take(n).map(Msg::from).collect()
}

// --------------------------------------------------------------- environment

struct Topics {
    batch_created: String,
    quantity_changed: String,
    allocation_required: String,
    allocated: String,
    deallocated: String,
    out_of_stock: String,
    dead_letter: String,
}

impl Topics {
    fn new(suffix: &str) -> Self {
        Self {
            batch_created: format!("erp.batch-created.{suffix}"),
            quantity_changed: format!("erp.batch-quantity-changed.{suffix}"),
            allocation_required: format!("erp.allocation-required.{suffix}"),
            allocated: format!("allocation.allocated.{suffix}"),
            deallocated: format!("allocation.deallocated.{suffix}"),
            out_of_stock: format!("allocation.out-of-stock.{suffix}"),
            dead_letter: format!("allocation.dead-letter.{suffix}"),
        }
    }
    fn all(&self) -> [&str; 7] {
        [
            &self.batch_created,
            &self.quantity_changed,
            &self.allocation_required,
            &self.allocated,
            &self.deallocated,
            &self.out_of_stock,
            &self.dead_letter,
        ]
    }
    fn of(&self, kind: InboundKind) -> &str {
        match kind {
            InboundKind::BatchCreated => &self.batch_created,
            InboundKind::BatchQuantityChanged => &self.quantity_changed,
            InboundKind::AllocationRequired => &self.allocation_required,
        }
    }
}

fn required_env(name: &str) -> Res<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => fail(format!(
            "{name} is not set; run `source scripts/services.sh up` first (scripts/bench.sh does)"
        )),
    }
}

fn random_hex() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let rest = &base[scheme_end..];
    let authority = rest.find('/').map_or(rest, |i| &rest[..i]);
    let mut out = format!("{}{}/{}", &base[..scheme_end], authority, db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn worker_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("WORKER_BIN") {
        if !bin.is_empty() {
            return PathBuf::from(bin);
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release").join("allocation-worker")
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32, tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" closing the command name: state is field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // utime is field 14, stime 15; f[0] is field 3.
    (ticks(11) + ticks(12)) / tck
}

/// A `VmXXX:` line of /proc/<pid>/status, in KiB.
fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The status of `GET http://{addr}{path}`, `None` when nobody answers
/// within 2 s.
async fn http_status(addr: &str, path: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

/// `--backlog`: rows that retention may delete while the phases run, an hour
/// old. Outbox rows below every pending one count as published; their kind
/// is no event's, so nothing reads them as one. Their sizes are those of an
/// event's key, value and headers.
async fn fill_backlog(db: &PgPool, rows: i64) -> Res<()> {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO processed_messages (idempotency_key, processed_at) \
         SELECT 'bench-backlog-' || n, now() - interval '1 hour' FROM generate_series(1, $1) n",
    )
    .bind(rows)
    .execute(db)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (kind, message_key, payload, headers, created_at) \
         SELECT 'BenchBacklog', convert_to('sku-' || n, 'UTF8'), \
                convert_to(repeat('p', 90), 'UTF8'), convert_to(repeat('h', 230), 'UTF8'), \
                now() - interval '1 hour' \
         FROM generate_series(1, $1) n",
    )
    .bind(rows)
    .execute(db)
    .await?;
    sqlx::query("VACUUM ANALYZE processed_messages")
        .execute(db)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(db).await?;
    eprintln!(
        "backlog: {rows} idempotency records and {rows} outbox rows an hour old, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Rows of `--backlog` still there: with `--retention`, more than none at
/// the end of the phases means retention was deleting all through them.
async fn backlog_left(db: &PgPool) -> Res<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM processed_messages WHERE idempotency_key LIKE 'bench-backlog-%'), \
                (SELECT count(*) FROM outbox WHERE kind = 'BenchBacklog')",
    )
    .fetch_one(db)
    .await?)
}

/// `GET path` on the worker's HTTP address: the body, if the status is 200.
async fn http_body(addr: &str, path: &str) -> Res<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await?
        .error_for_status()?;
    Ok(response.text().await?)
}

/// Idempotency records retention has deleted so far, from the worker's
/// `allocation_retention_removed_rows_total{table="processed_messages"}`.
/// With `--retention`, "every message processed" is the rows left plus the
/// rows removed. Read before counting the rows, so that a delete between the
/// two reads can only make the sum short (one more poll), never early.
async fn idempotency_rows_removed(http_addr: &str) -> Res<i64> {
    let body = http_body(http_addr, "/metrics").await?;
    let value = body
        .lines()
        .find(|l| {
            l.starts_with("allocation_retention_removed_rows_total{")
                && l.contains("table=\"processed_messages\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .ok_or("no allocation_retention_removed_rows_total for processed_messages")?;
    Ok(value.parse::<f64>()? as i64)
}

// ------------------------------------------------------------------ witness

/// First outbound event (Allocated or OutOfStock) per latency-run orderid:
/// its Kafka timestamp in ms.
type Seen = Arc<Mutex<HashMap<String, i64>>>;

fn start_witness(
    bootstrap: &str,
    topics: &[&str],
    prefix: String,
    stop: Arc<AtomicBool>,
) -> Res<(Seen, std::thread::JoinHandle<()>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("aw-bench-witness-{}", random_hex()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set(
            "fetch.wait.max.ms",
            std::env::var("BENCH_WITNESS_WAIT_MS").unwrap_or("10".into()),
        )
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let handle = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let Some(payload) = m.payload() else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                continue;
            };
            let Some(orderid) = v.get("orderid").and_then(|o| o.as_str()) else {
                continue;
            };
            if !orderid.starts_with(&prefix) {
                continue;
            }
            let is_decision = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "ce_type")
                        .and_then(|h| h.value.map(|v| v.to_vec()))
                })
                .map(|t| t != b"allocation.Deallocated")
                .unwrap_or(true);
            if !is_decision {
                continue;
            }
            let ts = m.timestamp().to_millis().unwrap_or(0);
            out.lock().unwrap().entry(orderid.to_owned()).or_insert(ts);
        }
    });
    Ok((seen, handle))
}

// ------------------------------------------------------------------ the run

struct Bench {
    topics: Topics,
    producer: FutureProducer,
    db: PgPool,
    pid: u32,
    tck: f64,
    produced: usize,
    seq: u64,
    suffix: String,
    /// With `--retention`: the worker's HTTP address, to read how many
    /// idempotency records retention removed.
    retention_metrics: Option<String>,
    /// Rows of `--backlog`: every one is either still in processed_messages
    /// or counted as removed, so it is taken off their sum.
    backlog: i64,
}

struct PhaseResult {
    name: &'static str,
    messages: usize,
    secs: f64,
    cpu: f64,
}

impl Bench {
    /// Hands one message to the producer; returns its delivery future.
    fn send(&mut self, m: &Msg) -> Res<rdkafka::producer::DeliveryFuture> {
        self.seq += 1;
        let ce_id = format!("bench-{}-{}", self.suffix, self.seq);
        let mut record = FutureRecord::to(self.topics.of(m.kind))
            .key(m.key.as_str())
            .payload(m.value.as_slice())
            .headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(ce_id.as_bytes()),
            }));
        loop {
            match self.producer.send_result(record) {
                Ok(d) => {
                    self.produced += 1;
                    return Ok(d);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return fail(format!("produce: {e}")),
            }
        }
    }

    async fn await_deliveries(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> Res<()> {
        let mut all: FuturesUnordered<_> = deliveries.into_iter().collect();
        while let Some(d) = all.next().await {
            match d {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return fail(format!("delivery failed: {e}")),
                Err(_) => return fail("producer went away"),
            }
        }
        Ok(())
    }

    /// Polls until every produced message is processed and every outbox row
    /// sent; prints progress every 2 s.
    async fn wait_done(&self, what: &str, timeout: Duration) -> Res<()> {
        let started = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let removed = match &self.retention_metrics {
                Some(http_addr) => idempotency_rows_removed(http_addr).await?,
                None => 0,
            };
            let (processed, unsent): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM processed_messages), \
                        (SELECT count(*) FROM outbox_pending)",
            )
            .fetch_one(&self.db)
            .await?;
            let processed = processed + removed - self.backlog;
            if processed as usize >= self.produced && unsent == 0 {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return fail(format!(
                    "{what}: not done after {timeout:?}: processed {processed}/{}, unsent outbox {unsent}",
                    self.produced
                ));
            }
            if last_print.elapsed() >= Duration::from_secs(2) {
                eprintln!(
                    "  [{what}] +{:.0}s processed {processed}/{}, unsent outbox rows {unsent}",
                    started.elapsed().as_secs_f64(),
                    self.produced
                );
                last_print = Instant::now();
            }
            // The durations come from the database's timestamps, not from
            // when this poll notices the end, so it can be sparse: counting
            // every 50 ms took a few per cent of a core from PostgreSQL.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Last moment anything happened in the database: an inbound message
    /// recorded, or an outbound event marked sent (µs since the epoch).
    async fn last_activity(&self) -> Res<i64> {
        let (p, s): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT (SELECT max(processed_at) FROM processed_messages), \
                    (SELECT marked_at FROM outbox_relay)",
        )
        .fetch_one(&self.db)
        .await?;
        let t = p.max(s).ok_or("no activity recorded")?;
        Ok(t.timestamp_micros())
    }

    async fn phase(&mut self, name: &'static str, msgs: &[Msg]) -> Res<PhaseResult> {
        eprintln!("phase {name}: producing {} messages", msgs.len());
        let cpu0 = cpu_seconds(self.pid, self.tck);
        let t0 = now_micros();
        let mut deliveries = Vec::with_capacity(msgs.len());
        for m in msgs {
            deliveries.push(self.send(m)?);
        }
        Self::await_deliveries(deliveries).await?;
        let timeout = Duration::from_secs(120 + msgs.len() as u64 / 20);
        self.wait_done(name, timeout).await?;
        let t1 = self.last_activity().await?;
        let cpu = cpu_seconds(self.pid, self.tck) - cpu0;
        let secs = (t1 - t0).max(1) as f64 / 1e6;
        let r = PhaseResult {
            name,
            messages: msgs.len(),
            secs,
            cpu,
        };
        eprintln!(
            "phase {name}: {} msgs in {:.2}s = {:.0} msg/s, CPU {:.2}s ({:.3} s per 1000 msgs)",
            r.messages,
            r.secs,
            r.messages as f64 / r.secs,
            r.cpu,
            r.cpu * 1000.0 / r.messages as f64
        );
        Ok(r)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench: ERROR: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Res<bool> {
    let args = parse_args()?;
    let mut sizes = if args.small { SMALL } else { FULL };
    sizes.latency_rate = args.latency_rate.unwrap_or(sizes.latency_rate);
    sizes.latency_secs = args.latency_secs.unwrap_or(sizes.latency_secs);
    let database_url = required_env("DATABASE_URL")?;
    let bootstrap = required_env("KAFKA_BOOTSTRAP_SERVERS")?;
    let bin = worker_bin();
    if !bin.is_file() {
        return fail(format!(
            "worker binary {} not found; run `cargo build --release` or set WORKER_BIN",
            bin.display()
        ));
    }
    let suffix = random_hex();
    let mode = if args.small { "small" } else { "full" };
    eprintln!(
        "bench ({mode}, seed {}): {} SKUs x 3 batches, {} allocations, {} quantity changes; \
         latency run {} s at {} msg/s; worker {}",
        args.seed,
        sizes.skus,
        sizes.allocations,
        sizes.changes,
        sizes.latency_secs,
        sizes.latency_rate,
        bin.display()
    );

    // Database.
    let db_name = format!("aw_bench_{suffix}");
    let mut admin = PgConnection::connect(&database_url).await?;
    sqlx::query(&format!(r#"CREATE DATABASE "{db_name}""#))
        .execute(&mut admin)
        .await?;
    let _ = admin.close().await;
    let worker_db_url = with_database(&database_url, &db_name);

    // Topics.
    let topics = Topics::new(&suffix);
    let kafka_admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .all()
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for r in tokio::time::timeout(
        Duration::from_secs(30),
        kafka_admin.create_topics(
            &new_topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        ),
    )
    .await
    .map_err(|_| "creating topics timed out")??
    {
        if let Err((t, code)) = r {
            return fail(format!("creating topic {t}: {code}"));
        }
    }
    eprintln!("database {db_name}, topics *.{suffix} (3 partitions each)");

    // Worker.
    let log_dir = bin
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("bench-logs"))
        .unwrap_or_else(|| PathBuf::from("bench-logs"));
    std::fs::create_dir_all(&log_dir)?;
    let log = log_dir.join(format!("worker-{suffix}.log"));
    let log_file = std::fs::File::create(&log)?;
    let http_addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let mut command = tokio::process::Command::new(&bin);
    command
        .arg("run")
        .env("DATABASE_URL", &worker_db_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("KAFKA_GROUP_ID", format!("aw-bench-{suffix}"))
        .env(
            "KAFKA_PROPERTIES",
            match std::env::var("BENCH_KAFKA_PROPERTIES") {
                Ok(extra) if !extra.is_empty() => format!("{KAFKA_PROPERTIES},{extra}"),
                _ => KAFKA_PROPERTIES.to_owned(),
            },
        )
        .env("HTTP_ADDR", &http_addr)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or("info".into()),
        )
        .env("LOG_FORMAT", "text")
        .env("TOPIC_BATCH_CREATED", &topics.batch_created)
        .env("TOPIC_BATCH_QUANTITY_CHANGED", &topics.quantity_changed)
        .env("TOPIC_ALLOCATION_REQUIRED", &topics.allocation_required)
        .env("TOPIC_ALLOCATED", &topics.allocated)
        .env("TOPIC_DEALLOCATED", &topics.deallocated)
        .env("TOPIC_OUT_OF_STOCK", &topics.out_of_stock)
        .env("TOPIC_DEAD_LETTER", &topics.dead_letter)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    if let Some(retention) = &args.retention {
        command
            .env("IDEMPOTENCY_RETENTION", retention)
            .env("OUTBOX_RETENTION", retention);
    }
    let mut child = command.spawn()?;
    let pid = child.id().ok_or("worker has no pid")?;
    eprintln!("worker pid {pid}, HTTP {http_addr}, log {}", log.display());

    let outcome = drive(
        &args,
        &sizes,
        &suffix,
        &topics,
        &bootstrap,
        &worker_db_url,
        pid,
        &http_addr,
        &mut child,
    )
    .await;

    // Stop the worker whatever happened.
    if child.try_wait()?.is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(status) => eprintln!("worker stopped: {:?}", status?),
            Err(_) => {
                eprintln!("worker did not stop within 30 s after SIGTERM; killing it");
                child.kill().await?;
            }
        }
    }

    let ok = match &outcome {
        Ok(ok) => *ok,
        Err(e) => {
            eprintln!("bench: ERROR: {e}");
            false
        }
    };
    if ok && !args.keep {
        let mut admin = PgConnection::connect(&database_url).await?;
        let _ = sqlx::query(&format!(
            r#"DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)"#
        ))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            kafka_admin.delete_topics(&topics.all(), &AdminOptions::new()),
        )
        .await;
        eprintln!("dropped database {db_name} and topics *.{suffix}");
    } else {
        eprintln!(
            "kept database {db_name}, topics *.{suffix} and log {} for inspection",
            log.display()
        );
    }
    Ok(ok)
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &Args,
    sizes: &Sizes,
    suffix: &str,
    topics: &Topics,
    bootstrap: &str,
    worker_db_url: &str,
    pid: u32,
    http_addr: &str,
    child: &mut tokio::process::Child,
) -> Res<bool> {
    // Ready?
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return fail(format!("worker exited before ready: {status}"));
        }
        if http_status(http_addr, "/readyz").await == Some(200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return fail("worker not ready (/readyz) after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("worker ready after {:.1}s", started.elapsed().as_secs_f64());

    let options = PgConnectOptions::from_str(worker_db_url)?;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?;
    let lat_prefix = format!("lat-{suffix}-");
    let mut bench = Bench {
        topics: Topics::new(suffix),
        producer,
        db,
        pid,
        tck: clk_tck(),
        produced: 0,
        seq: 0,
        suffix: suffix.to_owned(),
        retention_metrics: args.retention.as_ref().map(|_| http_addr.to_owned()),
        backlog: args.backlog,
    };
    if args.backlog > 0 {
        fill_backlog(&bench.db, args.backlog).await?;
    }

    // Warm-up: one batch, so the consumer group has its partitions before
    // anything is timed (Tansu takes seconds to complete a join).
    let mut warm = Workload::new(WorkloadSettings::phased(
        args.seed ^ WARM_UP_SALT,
        1,
        vec![Phase::Stock {
            prefix: "warmup".into(),
        }],
    ));
    let d = bench.send(&take(&mut warm, 1)[0])?;
    Bench::await_deliveries(vec![d]).await?;
    bench.wait_done("warm-up", Duration::from_secs(90)).await?;
    eprintln!(
        "warm-up processed after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The standard workload, then the latency run's: one seeded stream.
    let n_lat = (sizes.latency_secs * sizes.latency_rate) as usize;
    let mut phases = Phase::benchmark(sizes.allocations as u64, sizes.changes as u64);
    phases.push(Phase::Stock {
        prefix: "lat".into(),
    });
    phases.push(Phase::Allocations {
        orderid_prefix: lat_prefix.clone(),
        count: n_lat as u64,
    });
    let mut workload = Workload::new(WorkloadSettings::phased(
        args.seed,
        sizes.skus as u32,
        phases,
    ));
    let stock_len = sizes.skus * 3;
    let stock_msgs = take(&mut workload, stock_len);
    let alloc_msgs = take(&mut workload, sizes.allocations);
    let change_msgs = take(&mut workload, sizes.changes);
    let lat_stock_msgs = take(&mut workload, stock_len);
    let lat_msgs = take(&mut workload, n_lat);
    let phases = vec![
        bench.phase("stock", &stock_msgs).await?,
        bench.phase("allocations", &alloc_msgs).await?,
        bench.phase("quantity-changes", &change_msgs).await?,
    ];
    if args.backlog > 0 {
        let (processed, outbox) = backlog_left(&bench.db).await?;
        eprintln!(
            "backlog left after the phases: {processed} idempotency records, {outbox} outbox rows"
        );
    }

    // Latency run: fresh stock, then a steady offered load.
    eprintln!("latency run: publishing its stock");
    let mut ds = Vec::new();
    for m in &lat_stock_msgs {
        ds.push(bench.send(m)?);
    }
    Bench::await_deliveries(ds).await?;
    bench
        .wait_done("latency stock", Duration::from_secs(300))
        .await?;
    eprintln!(
        "latency run: {n_lat} AllocationRequired at {} msg/s",
        sizes.latency_rate
    );
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(n_lat);
    let mut ds = Vec::with_capacity(n_lat);
    let cpu_lat0 = cpu_seconds(pid, bench.tck);
    let t0 = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / sizes.latency_rate as f64);
    for (i, m) in lat_msgs.iter().enumerate() {
        let due = t0 + interval * i as u32;
        if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        sent_at.insert(m.orderid.clone().unwrap(), now_micros());
        ds.push(bench.send(m)?);
        if i > 0 && i % sizes.latency_rate as usize == 0 {
            eprintln!("  [latency] {i}/{n_lat} sent");
        }
    }
    let offered_secs = t0.elapsed().as_secs_f64();
    Bench::await_deliveries(ds).await?;
    eprintln!(
        "latency run: all inbound messages acknowledged by the broker at +{:.1}s",
        t0.elapsed().as_secs_f64()
    );
    bench.wait_done("latency", Duration::from_secs(300)).await?;
    eprintln!(
        "latency run: everything processed and published at +{:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let cpu_lat = cpu_seconds(pid, bench.tck) - cpu_lat0;
    // The outbound events are read back only now: a consumer reading them
    // during the run would load the broker on this shared machine (Tansu
    // spends about a third of a core serving 1,000 events a second to a
    // consumer), and their Kafka timestamps were fixed when published.
    let stop_witness = Arc::new(AtomicBool::new(false));
    let (seen, witness) = start_witness(
        bootstrap,
        &[&topics.allocated, &topics.out_of_stock, &topics.deallocated],
        lat_prefix.clone(),
        stop_witness.clone(),
    )?;
    let wait_from = Instant::now();
    while seen.lock().unwrap().len() < n_lat && wait_from.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_map = seen.lock().unwrap().clone();
    stop_witness.store(true, Ordering::Relaxed);
    let _ = witness.join();

    // Resources, read before the worker is stopped.
    let hwm_kib = vm_kib(pid, "VmHWM:");
    let rss_kib = vm_kib(pid, "VmRSS:");
    let cpu_total = cpu_seconds(pid, bench.tck);

    let mut lat_pub: Vec<f64> = Vec::with_capacity(n_lat);
    for (orderid, sent) in &sent_at {
        if let Some(ts_ms) = seen_map.get(orderid) {
            lat_pub.push((*ts_ms * 1000 - sent) as f64 / 1000.0);
        }
    }
    lat_pub.sort_by(f64::total_cmp);

    // End-state checks.
    let mut problems: Vec<String> = Vec::new();
    let removed = match &bench.retention_metrics {
        Some(http_addr) => idempotency_rows_removed(http_addr).await?,
        None => 0,
    };
    let processed: i64 = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_messages")
        .fetch_one(&bench.db)
        .await?
        + removed
        - bench.backlog;
    if processed as usize != bench.produced {
        problems.push(format!(
            "processed_messages {processed} != produced {}",
            bench.produced
        ));
    }
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_pending")
        .fetch_one(&bench.db)
        .await?;
    if unsent != 0 {
        problems.push(format!("{unsent} outbox rows not sent"));
    }
    let over: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT b.reference, b.purchased_quantity, COALESCE(SUM(a.qty), 0)::BIGINT \
         FROM batches b LEFT JOIN allocations a ON a.batch_id = b.id \
         GROUP BY b.id HAVING COALESCE(SUM(a.qty), 0) > b.purchased_quantity",
    )
    .fetch_all(&bench.db)
    .await?;
    if !over.is_empty() {
        problems.push(format!(
            "{} over-allocated batches, e.g. {:?}",
            over.len(),
            &over[..over.len().min(3)]
        ));
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE kind = 'DeadLetter'")
        .fetch_one(&bench.db)
        .await?;
    // Retention deletes published outbox rows, dead letters and events
    // alike: what is left cannot account for every line.
    let check_outbox = args.retention.is_none();
    if !check_outbox {
        eprintln!("end state: --retention removed published outbox rows; events and dead letters not checked");
    }
    if check_outbox && dead != 0 {
        problems.push(format!(
            "{dead} dead letters (every message is well-formed)"
        ));
    }
    // The read model, which the HTTP endpoint serves; one line per order here.
    let allocated: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT orderid, batchref FROM allocations_view")
            .fetch_all(&bench.db)
            .await?
            .into_iter()
            .collect();
    // The last decision about each line, in outbox (= decision) order.
    let events: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT kind, p->>'orderid', p->>'batchref' \
         FROM (SELECT id, kind, convert_from(payload, 'UTF8')::json AS p FROM outbox \
               WHERE kind NOT IN ('DeadLetter', 'BenchBacklog')) e ORDER BY id",
    )
    .fetch_all(&bench.db)
    .await?;
    let mut last: HashMap<String, (String, Option<String>)> = HashMap::new();
    let (mut n_alloc_ev, mut n_dealloc_ev, mut n_oos_ev) = (0, 0, 0);
    for (kind, orderid, batchref) in events {
        match kind.as_str() {
            "Allocated" => n_alloc_ev += 1,
            "Deallocated" => n_dealloc_ev += 1,
            _ => n_oos_ev += 1,
        }
        last.insert(orderid, (kind, batchref));
    }
    let mut unaccounted = Vec::new();
    let all_orders = alloc_msgs.iter().chain(lat_msgs.iter());
    let mut n_orders = 0;
    for m in all_orders {
        n_orders += 1;
        let orderid = m.orderid.as_ref().unwrap();
        let ok = match last.get(orderid) {
            Some((kind, batchref)) if kind == "Allocated" => {
                batchref.is_some() && allocated.get(orderid) == batchref.as_ref()
            }
            Some((kind, _)) if kind == "OutOfStock" => !allocated.contains_key(orderid),
            _ => false,
        };
        if !ok {
            unaccounted.push(orderid.clone());
        }
    }
    if check_outbox && !unaccounted.is_empty() {
        problems.push(format!(
            "{} of {n_orders} AllocationRequired not accounted for (last event Allocated and \
             allocations_view at its batch, or last event OutOfStock and no row), e.g. {:?}",
            unaccounted.len(),
            &unaccounted[..unaccounted.len().min(5)]
        ));
    }
    if lat_pub.len() != n_lat {
        problems.push(format!(
            "latency run: the witness saw a decision for {} of {n_lat} lines",
            lat_pub.len()
        ));
    }

    // Report.
    let total_msgs: usize = phases.iter().map(|p| p.messages).sum();
    let total_secs: f64 = phases.iter().map(|p| p.secs).sum();
    let total_cpu: f64 = phases.iter().map(|p| p.cpu).sum();
    let mode = if args.small { "small" } else { "full" };
    println!();
    println!(
        "== allocation-worker benchmark ({mode}, seed {}) ==",
        args.seed
    );
    println!(
        "{:<18} {:>8} {:>9} {:>10} {:>12}",
        "phase", "msgs", "secs", "msg/s", "CPU s/1000"
    );
    for p in &phases {
        println!(
            "{:<18} {:>8} {:>9.2} {:>10.0} {:>12.3}",
            p.name,
            p.messages,
            p.secs,
            p.messages as f64 / p.secs,
            p.cpu * 1000.0 / p.messages as f64
        );
    }
    println!(
        "{:<18} {:>8} {:>9.2} {:>10.0} {:>12.3}",
        "overall",
        total_msgs,
        total_secs,
        total_msgs as f64 / total_secs,
        total_cpu * 1000.0 / total_msgs as f64
    );
    println!(
        "latency run: {n_lat} AllocationRequired offered at {} msg/s over {offered_secs:.1}s; \
         CPU {:.3} s/1000 msgs",
        sizes.latency_rate,
        cpu_lat * 1000.0 / n_lat as f64
    );
    println!(
        "  end-to-end (outbound Kafka timestamp - inbound produce), ms: p50 {:.1}  p99 {:.1}  max {:.1}",
        percentile(&lat_pub, 50.0),
        percentile(&lat_pub, 99.0),
        lat_pub.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "worker: peak RSS (VmHWM) {:.1} MiB, RSS at end {:.1} MiB, CPU total {:.2} s",
        hwm_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        cpu_total
    );
    println!(
        "end state: produced {} (incl. 1 warm-up), processed {processed}, outbound events: \
         {n_alloc_ev} Allocated, {n_dealloc_ev} Deallocated, {n_oos_ev} OutOfStock; \
         {} lines allocated at the end",
        bench.produced,
        allocated.len()
    );
    if problems.is_empty() {
        println!(
            "end state: OK (no over-allocation, every line accounted for, processed == produced)"
        );
        Ok(true)
    } else {
        for p in &problems {
            println!("end state: FAIL: {p}");
        }
        Ok(false)
    }
}
