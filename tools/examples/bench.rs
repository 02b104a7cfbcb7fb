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
//! cargo build --release --bin allocation-worker
//! cargo run --release -p allocation-tools --example bench -- [--small] [--seed N] [--keep]
//! ```
//!
//! Environment: `DATABASE_URL` (the role needs CREATEDB),
//! `KAFKA_BOOTSTRAP_SERVERS`, and `WORKER_BIN` (default
//! `<target>/release/allocation-worker`).
//!
//! The workload is the generator's phased form (`tools/src/generator/`),
//! seeded by `--seed`; it is the stream this program
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

use allocation_tools::generator::{GeneratedMessage, Phase, Workload, WorkloadSettings};
use allocation_worker::adapters::inbound::InboundKind;

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
    /// `--products N`: catalogue width, the SKUs the standard workload (or
    /// the soak's stream) spreads over.
    products: Option<usize>,
    /// `--history N`: before the timed phases, every product gets N
    /// allocation lines, made by the worker from AllocationRequired messages.
    history: u64,
    /// `--soak-rate R`: instead of the phases, a steady R msg/s of the
    /// generator's steady stream for `--soak-duration`.
    soak_rate: Option<u64>,
    soak_duration: Duration,
    /// Seconds between two soak reports (60; shorter only for smoke runs).
    soak_report_secs: u64,
    /// The soak fails when the worker's peak RSS exceeds this.
    rss_limit_mib: f64,
    /// `--analyze`: the tables are vacuumed and analysed after each untimed
    /// load (the stock, the history), as autovacuum would within a minute
    /// ([`Bench::analyze`]). For `--products` and `--history`, whose
    /// targets describe a database that has been that size for a while.
    analyze: bool,
}

/// `90`, `90s`, `30m`, `2h`.
fn parse_duration(s: &str) -> Option<Duration> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
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
        products: None,
        history: 0,
        soak_rate: None,
        soak_duration: Duration::from_secs(30 * 60),
        soak_report_secs: 60,
        rss_limit_mib: 64.0,
        analyze: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--small" => args.small = true,
            "--keep" => args.keep = true,
            "--analyze" => args.analyze = true,
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
            "--products" => {
                args.products = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("--products needs a positive integer")?,
                )
            }
            "--history" => {
                args.history = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--history needs a line count per product")?
            }
            "--soak-rate" => {
                args.soak_rate = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&r| r > 0)
                        .ok_or("--soak-rate needs a positive integer (msg/s)")?,
                )
            }
            "--soak-duration" => {
                args.soak_duration = it
                    .next()
                    .as_deref()
                    .and_then(parse_duration)
                    .ok_or("--soak-duration needs a duration such as 90s, 30m or 2h")?
            }
            "--soak-report-secs" => {
                args.soak_report_secs = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&r| r > 0)
                    .ok_or("--soak-report-secs needs a positive integer")?
            }
            "--rss-limit-mib" => {
                args.rss_limit_mib = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&r: &f64| r > 0.0)
                    .ok_or("--rss-limit-mib needs a positive number")?
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench [--small] [--seed N] [--keep] [--latency-rate MSG_PER_S] [--latency-secs S] [--retention DURATION] [--backlog ROWS] [--products N] [--history LINES_PER_PRODUCT] [--analyze] [--soak-rate MSG_PER_S [--soak-duration 30m] [--soak-report-secs 60] [--rss-limit-mib 64]]"
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
    /// The order line (orderid and SKU, see [`line_key`]): an order of the
    /// steady stream has several lines under one orderid.
    line: Option<String>,
}

/// What names one order line in the inbound message and in its decision.
fn line_key(orderid: &str, sku: &str) -> String {
    format!("{orderid}\u{1}{sku}")
}

impl From<GeneratedMessage> for Msg {
    fn from(m: GeneratedMessage) -> Self {
        let v = serde_json::from_slice::<serde_json::Value>(&m.value).ok();
        let field = |name: &str| {
            v.as_ref()
                .and_then(|v| v.get(name)?.as_str().map(str::to_owned))
        };
        let orderid = field("orderid");
        let line = orderid
            .as_deref()
            .zip(field("sku"))
            .map(|(o, s)| line_key(o, &s));
        Msg {
            kind: m.topic_kind,
            key: m.key,
            value: m.value,
            orderid,
            line,
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
    // The workspace's target directory: this package is `tools/` in it.
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
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

// ------------------------------------------------------- CPU of each process

/// CPU seconds (utime + stime) of the worker, of PostgreSQL and of the
/// broker, each measured on its own, so that a figure says which one limits.
#[derive(Clone, Copy, Default, Debug)]
struct Cpu {
    worker: f64,
    postgres: f64,
    broker: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            worker: self.worker - o.worker,
            postgres: self.postgres - o.postgres,
            broker: self.broker - o.broker,
        }
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            worker: self.worker + o.worker,
            postgres: self.postgres + o.postgres,
            broker: self.broker + o.broker,
        }
    }
}

impl Cpu {
    /// Milliseconds of CPU per 1,000 messages of each process.
    fn per_1000(self, messages: usize) -> Cpu {
        let k = 1e6 / messages.max(1) as f64;
        Cpu {
            worker: self.worker * k,
            postgres: self.postgres * k,
            broker: self.broker * k,
        }
    }
}

/// The pid listening on TCP `port` on this machine: its listening socket's
/// inode from /proc/net/tcp{,6}, then the process holding that inode.
/// PostgreSQL's backends close the postmaster's listening sockets when they
/// fork, so for PostgreSQL's port this is the postmaster.
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 10); 0A = LISTEN.
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The port of a `host:port` (the first of a comma-separated list) or of a
/// URL's authority.
fn port_of(address: &str, default: u16) -> u16 {
    let first = address.split(',').next().unwrap_or("");
    let authority = first.split_once("://").map_or(first, |(_, r)| r);
    let authority = authority.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, r)| r);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// Samples the CPU of the worker, PostgreSQL and the broker.
///
/// PostgreSQL is the postmaster (the process listening on the database's
/// port) and those of its children that work for this run: the backends
/// and autovacuum workers of the bench's database (their process title
/// names it) and the shared writers (checkpointer, background writer,
/// walwriter). Backends of other databases on the same server (other
/// people's tests) are left out. A process is followed from one sample to
/// the next by pid, so a short-lived one (an autovacuum worker) counts for
/// what it used between the samples it was seen in; a background thread
/// samples every 500 ms, so little is lost.
struct CpuMeter {
    worker: u32,
    postmaster: Option<u32>,
    broker: Option<u32>,
    db_name: String,
    /// `BENCH_BROKER_DATABASE`: the database a broker with PostgreSQL
    /// storage keeps its log in (scripts/long-run-broker.sh prints it).
    broker_db: Option<String>,
    tck: f64,
    state: Mutex<MeterState>,
}

#[derive(Default)]
struct MeterState {
    /// Last CPU seen per (process class, pid).
    last: HashMap<(u8, u32), f64>,
    totals: Cpu,
    started: bool,
}

const PG_SHARED: [&str; 3] = ["checkpointer", "background writer", "walwriter"];

impl CpuMeter {
    fn new(worker: u32, postmaster: Option<u32>, broker: Option<u32>, db_name: &str) -> Self {
        CpuMeter {
            worker,
            postmaster,
            broker,
            db_name: db_name.to_owned(),
            broker_db: std::env::var("BENCH_BROKER_DATABASE")
                .ok()
                .filter(|d| !d.is_empty()),
            tck: clk_tck(),
            state: Mutex::new(MeterState::default()),
        }
    }

    /// The PostgreSQL processes of this run (see the type's comment), as
    /// (class, pid): 1 for PostgreSQL, 2 for the backends of a broker that
    /// stores its log in PostgreSQL (`BENCH_BROKER_DATABASE`), which are the
    /// broker's cost.
    fn postgres_pids(&self) -> Vec<(u8, u32)> {
        let Some(postmaster) = self.postmaster else {
            return Vec::new();
        };
        let mut pids = vec![(1, postmaster)];
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            // f[0] is field 3 (state), f[1] field 4 (ppid).
            let ppid = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(postmaster) {
                continue;
            }
            let title = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let title = String::from_utf8_lossy(&title).replace('\0', " ");
            let names = |db: &str| title.split_whitespace().any(|t| t == db);
            if names(&self.db_name) || PG_SHARED.iter().any(|k| title.contains(k)) {
                pids.push((1, pid));
            } else if self.broker_db.as_deref().is_some_and(names) {
                pids.push((2, pid));
            }
        }
        pids
    }

    /// Samples every process now; returns the totals since the first sample.
    fn sample(&self) -> Cpu {
        let mut seen: Vec<((u8, u32), f64)> =
            vec![((0, self.worker), cpu_seconds(self.worker, self.tck))];
        if let Some(b) = self.broker {
            seen.push(((2, b), cpu_seconds(b, self.tck)));
        }
        for (class, pid) in self.postgres_pids() {
            seen.push(((class, pid), cpu_seconds(pid, self.tck)));
        }
        let mut state = self.state.lock().unwrap();
        let started = state.started;
        let mut last = HashMap::with_capacity(seen.len());
        for (key, cpu) in seen {
            // A process first seen after the first sample started after it:
            // all its CPU is this run's.
            let before = match state.last.get(&key) {
                Some(&c) => c,
                None if started => 0.0,
                None => cpu,
            };
            let delta = (cpu - before).max(0.0);
            match key.0 {
                0 => state.totals.worker += delta,
                1 => state.totals.postgres += delta,
                _ => state.totals.broker += delta,
            }
            last.insert(key, cpu);
        }
        state.last = last;
        state.started = true;
        state.totals
    }

    fn describe(&self) -> String {
        let pid = |p: Option<u32>| p.map_or("not found".to_owned(), |p| format!("pid {p}"));
        format!(
            "CPU measured separately: worker pid {}, PostgreSQL postmaster {} (with its processes for database {}), broker {}{}",
            self.worker,
            pid(self.postmaster),
            self.db_name,
            pid(self.broker),
            self.broker_db
                .as_ref()
                .map_or(String::new(), |d| format!(" (with PostgreSQL's backends for database {d})"))
        )
    }
}

/// Samples `meter` every 500 ms until `stop`.
fn start_meter(meter: Arc<CpuMeter>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            meter.sample();
            std::thread::sleep(Duration::from_millis(500));
        }
    })
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

/// First outbound event (Allocated or OutOfStock) per order line
/// ([`line_key`]) of the latency run or the soak: its Kafka timestamp in ms.
type Seen = Arc<Mutex<HashMap<String, i64>>>;

fn start_witness(
    bootstrap: &str,
    default_wait_ms: &str,
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
            std::env::var("BENCH_WITNESS_WAIT_MS").unwrap_or(default_wait_ms.into()),
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
            let sku = v.get("sku").and_then(|s| s.as_str()).unwrap_or("");
            let ts = m.timestamp().to_millis().unwrap_or(0);
            out.lock()
                .unwrap()
                .entry(line_key(orderid, sku))
                .or_insert(ts);
        }
    });
    Ok((seen, handle))
}

// ------------------------------------------------------------------ the run

struct Bench {
    topics: Topics,
    producer: FutureProducer,
    db: PgPool,
    meter: Arc<CpuMeter>,
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
    cpu: Cpu,
}

impl Bench {
    /// With `--analyze`, vacuums and analyses the bench's database,
    /// untimed, after a load that filled it in seconds. A database that
    /// grows as a business does is vacuumed and analysed by autovacuum as
    /// it goes; one filled in a second is not until autovacuum's next
    /// visit, up to `autovacuum_naptime` (a minute) later. Meanwhile each
    /// of the worker's connections keeps the generic plans PostgreSQL made
    /// for its statements while the tables were nearly empty (with 20,000
    /// products, a sequential scan of `products` in every transaction), and
    /// a run's figures depend on whether the visit falls inside it
    /// (BENCHMARKS.md, "Bursts were plans made on empty tables"). Not the
    /// default: tables analysed while small, which then grow fast (a
    /// fresh database's idempotency keys and outbox in the timed phases),
    /// give the opposite plans; the fresh database of the standard
    /// workload is measured as it is.
    async fn analyze(&self, after: &str, analyze: bool) -> Res<()> {
        if !analyze {
            return Ok(());
        }
        let t0 = Instant::now();
        sqlx::query("VACUUM (ANALYZE)").execute(&self.db).await?;
        eprintln!(
            "{after}: tables vacuumed and analysed in {:.2}s, untimed (as autovacuum would within a minute)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

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
        self.wait_done_every(what, timeout, Duration::from_secs(2))
            .await
    }

    /// [`Self::wait_done`], printing progress every `every`.
    async fn wait_done_every(&self, what: &str, timeout: Duration, every: Duration) -> Res<()> {
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
            if last_print.elapsed() >= every {
                eprintln!(
                    "  [{what}] +{:.0}s processed {processed}/{}, unsent outbox rows {unsent}",
                    started.elapsed().as_secs_f64(),
                    self.produced
                );
                last_print = Instant::now();
            }
            // The durations come from the database's timestamps, not from
            // when this poll notices the end, so it can be sparse: counting
            // every 50 ms took a few per cent of a core from PostgreSQL. With
            // a long history the count itself costs, so poll less often.
            let pause = if self.produced > 200_000 { 1000 } else { 250 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
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

    /// `--history N`: every product of `skus` gets a warehouse batch of
    /// exactly N units, then N one-unit AllocationRequired, produced in bulk
    /// and processed by the worker, so that each product carries N
    /// allocation lines made as production makes them. The batch is then
    /// full, so the timed phases allocate from their own batches as they do
    /// on a fresh database: only the history behind each product differs.
    /// Messages of one SKU share a partition, so each batch is created
    /// before its lines arrive.
    async fn history(&mut self, skus: &[String], per_product: u64) -> Res<PhaseResult> {
        let width = skus.len() as u64;
        let total = width * per_product;
        eprintln!(
            "history: {per_product} allocation lines for each of {width} products \
             ({total} AllocationRequired), through the worker"
        );
        let cpu0 = self.meter.sample();
        let t0 = now_micros();
        let mut ds = Vec::with_capacity(skus.len());
        for (i, sku) in skus.iter().enumerate() {
            let value = serde_json::json!({
                "ref": format!("hist-batch-{i:05}"),
                "sku": sku,
                "qty": per_product,
                "eta": null,
            });
            ds.push(self.send(&Msg {
                kind: InboundKind::BatchCreated,
                key: sku.clone(),
                value: serde_json::to_vec(&value)?,
                orderid: None,
                line: None,
            })?);
        }
        Self::await_deliveries(ds).await?;
        // Two chunks in flight: the producer keeps busy while the previous
        // chunk's acknowledgements are awaited, and the bench's memory stays
        // bounded whatever N is.
        const CHUNK: u64 = 20_000;
        let mut in_flight: Option<Vec<rdkafka::producer::DeliveryFuture>> = None;
        let mut next_print = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while n < total {
            let end = (n + CHUNK).min(total);
            let mut ds = Vec::with_capacity((end - n) as usize);
            for j in n..end {
                let i = (j % width) as usize;
                let sku = &skus[i];
                let value = serde_json::json!({
                    "orderid": format!("hist-{i:05}-{:06}", j / width),
                    "sku": sku,
                    "qty": 1,
                });
                ds.push(self.send(&Msg {
                    kind: InboundKind::AllocationRequired,
                    key: sku.clone(),
                    value: serde_json::to_vec(&value)?,
                    orderid: None,
                    line: None,
                })?);
            }
            if let Some(previous) = in_flight.replace(ds) {
                Self::await_deliveries(previous).await?;
            }
            n = end;
            if Instant::now() >= next_print {
                eprintln!("  [history] produced {n}/{total}");
                next_print = Instant::now() + Duration::from_secs(10);
            }
        }
        if let Some(last) = in_flight {
            Self::await_deliveries(last).await?;
        }
        // The worker slows as history grows (the point of measuring it), so
        // the deadline allows 100 msg/s.
        let timeout = Duration::from_secs(600 + total / 100);
        self.wait_done_every("history", timeout, Duration::from_secs(10))
            .await?;
        let t1 = self.last_activity().await?;
        let r = PhaseResult {
            name: "history",
            messages: (total + width) as usize,
            secs: (t1 - t0).max(1) as f64 / 1e6,
            cpu: self.meter.sample() - cpu0,
        };
        let k = r.cpu.per_1000(r.messages);
        eprintln!(
            "history: {} msgs in {:.1}s = {:.0} msg/s; CPU ms per 1000 msgs: worker {:.1}, PostgreSQL {:.1}, broker {:.1}",
            r.messages,
            r.secs,
            r.messages as f64 / r.secs,
            k.worker,
            k.postgres,
            k.broker
        );
        Ok(r)
    }

    async fn phase(&mut self, name: &'static str, msgs: &[Msg]) -> Res<PhaseResult> {
        eprintln!("phase {name}: producing {} messages", msgs.len());
        let cpu0 = self.meter.sample();
        let t0 = now_micros();
        let mut deliveries = Vec::with_capacity(msgs.len());
        for m in msgs {
            deliveries.push(self.send(m)?);
        }
        Self::await_deliveries(deliveries).await?;
        let timeout = Duration::from_secs(120 + msgs.len() as u64 / 20);
        self.wait_done(name, timeout).await?;
        let t1 = self.last_activity().await?;
        let cpu = self.meter.sample() - cpu0;
        let secs = (t1 - t0).max(1) as f64 / 1e6;
        let r = PhaseResult {
            name,
            messages: msgs.len(),
            secs,
            cpu,
        };
        let k = r.cpu.per_1000(r.messages);
        eprintln!(
            "phase {name}: {} msgs in {:.2}s = {:.0} msg/s; CPU ms per 1000 msgs: worker {:.1}, PostgreSQL {:.1}, broker {:.1}",
            r.messages,
            r.secs,
            r.messages as f64 / r.secs,
            k.worker,
            k.postgres,
            k.broker
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

/// Sets the flag when dropped, so that a sampling thread stops however the
/// run ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The SKUs a stock's batches are of, in order.
fn skus_of(stock: &[Msg]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    stock
        .iter()
        .filter(|m| m.kind == InboundKind::BatchCreated && seen.insert(m.key.clone()))
        .map(|m| m.key.clone())
        .collect()
}

/// The slope of the least-squares line through `(x, y)`; NaN with fewer
/// than two distinct x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx > 0.0 {
        sxy / sxx
    } else {
        f64::NAN
    }
}

/// One report of the soak.
struct SoakRow {
    /// End of the window, hours since the soak began.
    at_h: f64,
    rate: f64,
    latencies: usize,
    p50: f64,
    p99: f64,
    rss_mib: f64,
    /// CPU ms per 1,000 messages processed in the window.
    cpu: Cpu,
}

/// The soak: the generator's steady stream (stock, then order lines with
/// restocks, quantity drops and a few out-of-stock bulk orders) over
/// `--products` SKUs (2,000 by default), offered at `rate` msg/s for
/// `--soak-duration`. Every `--soak-report-secs` (60) it prints the window's
/// processed msg/s, the p50/p99 of the order lines sent in it (outbound
/// Kafka timestamp − inbound produce; a line is counted once its decision is
/// read, so a line sent in the last 5 s of a window counts in the next),
/// the worker's RSS, and CPU per 1,000 messages of the worker, PostgreSQL
/// and the broker. At the end: the slope per hour of a least-squares fit of
/// RSS, CPU per message and p99, and whether the worker's peak RSS stayed
/// under `--rss-limit-mib`.
async fn soak(bench: &mut Bench, args: &Args, rate: u64, bootstrap: &str, pid: u32) -> Res<bool> {
    let products = args.products.unwrap_or(2_000);
    let mut workload = Workload::new(WorkloadSettings::steady(args.seed, products as u32));
    let stock_len = workload.settings().stock_len() as usize;
    let stock = take(&mut workload, stock_len);
    if args.history > 0 {
        bench.history(&skus_of(&stock), args.history).await?;
    }
    eprintln!("soak: publishing the stock of {products} products ({stock_len} batches)");
    let mut ds = Vec::with_capacity(stock.len());
    for m in &stock {
        ds.push(bench.send(m)?);
    }
    Bench::await_deliveries(ds).await?;
    bench
        .wait_done(
            "soak stock",
            Duration::from_secs(600 + stock_len as u64 / 100),
        )
        .await?;
    bench.analyze("soak stock", args.analyze).await?;

    // The witness reads the decisions all through the soak. Their Kafka
    // timestamps are set when the worker publishes them, so a long fetch
    // wait (500 ms, light on the broker) delays the reading, not the figure.
    let stop_witness = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let (seen, witness) = start_witness(
        bootstrap,
        "500",
        &[
            &bench.topics.allocated,
            &bench.topics.out_of_stock,
            &bench.topics.deallocated,
        ],
        format!("order-S{}-", args.seed),
        stop_witness.0.clone(),
    )?;

    let duration = args.soak_duration;
    let every = Duration::from_secs(args.soak_report_secs);
    let total_due = (duration.as_secs_f64() * rate as f64) as u64;
    eprintln!(
        "soak: {rate} msg/s offered for {}s over {products} products, a report every {}s",
        duration.as_secs(),
        every.as_secs()
    );
    println!("CPU: milliseconds of CPU per 1,000 messages processed in the window, each process on its own");
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8}",
        "minute", "msg/s", "lines", "p50 ms", "p99 ms", "RSS MiB", "worker", "postgres", "broker"
    );
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut pending = Vec::new();
    let mut sent_at: HashMap<String, i64> = HashMap::new();
    let mut rows: Vec<SoakRow> = Vec::new();
    let mut lost = 0usize;
    let t0 = Instant::now();
    let mut window_start = t0;
    let mut window_wall: DateTime<Utc> = Utc::now();
    let mut cpu_prev = bench.meter.sample();
    let mut next_report = t0 + every;
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        let elapsed = now - t0;
        let due = ((elapsed.as_secs_f64() * rate as f64) as u64).min(total_due);
        while sent < due {
            let m = Msg::from(workload.next().ok_or("the steady stream ended")?);
            if let Some(line) = &m.line {
                sent_at.insert(line.clone(), now_micros());
            }
            pending.push(bench.send(&m)?);
            sent += 1;
        }
        if pending.len() >= 500 {
            let batch = std::mem::take(&mut pending);
            let failures = failures.clone();
            tokio::spawn(async move {
                if let Err(e) = Bench::await_deliveries(batch).await {
                    eprintln!("soak: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        if now >= next_report {
            let wall = Utc::now();
            let processed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM processed_messages \
                 WHERE processed_at >= $1 AND processed_at < $2",
            )
            .bind(window_wall)
            .bind(wall)
            .fetch_one(&bench.db)
            .await?;
            let cpu_now = bench.meter.sample();
            let cpu = (cpu_now - cpu_prev).per_1000(processed as usize);
            cpu_prev = cpu_now;
            let cutoff = now_micros() - 5_000_000;
            let mut lat = Vec::new();
            {
                let mut seen = seen.lock().unwrap();
                sent_at.retain(|line, at| {
                    if *at >= cutoff {
                        return true;
                    }
                    if let Some(ts) = seen.remove(line) {
                        lat.push((ts * 1000 - *at) as f64 / 1000.0);
                        false
                    } else if *at < cutoff - 300_000_000 {
                        // No decision read within 5 minutes.
                        lost += 1;
                        false
                    } else {
                        true
                    }
                });
                // Decisions nobody waits for (a line allocated again after a
                // quantity drop) are let go after 5 minutes.
                let old = now_micros() / 1000 - 300_000;
                seen.retain(|_, ts| *ts >= old);
            }
            lat.sort_by(f64::total_cmp);
            let row = SoakRow {
                at_h: (now - t0).as_secs_f64() / 3600.0,
                rate: processed as f64 / (now - window_start).as_secs_f64(),
                latencies: lat.len(),
                p50: percentile(&lat, 50.0),
                p99: percentile(&lat, 99.0),
                rss_mib: vm_kib(pid, "VmRSS:") as f64 / 1024.0,
                cpu,
            };
            println!(
                "{:>8.1} {:>8.0} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>9.1} {:>8.1}",
                row.at_h * 60.0,
                row.rate,
                row.latencies,
                row.p50,
                row.p99,
                row.rss_mib,
                row.cpu.worker,
                row.cpu.postgres,
                row.cpu.broker
            );
            rows.push(row);
            window_start = now;
            window_wall = wall;
            next_report += every;
        }
        if elapsed >= duration && next_report > t0 + duration {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Bench::await_deliveries(pending).await?;
    bench
        .wait_done("soak end", Duration::from_secs(600))
        .await?;
    // The decisions of the last lines: read them before judging what was lost.
    let wait_from = Instant::now();
    loop {
        {
            let mut seen = seen.lock().unwrap();
            sent_at.retain(|line, _| seen.remove(line).is_none());
        }
        if sent_at.is_empty() || wait_from.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lost += sent_at.len();
    drop(stop_witness);
    let _ = witness.join();

    let hwm_mib = vm_kib(pid, "VmHWM:") as f64 / 1024.0;
    let fit = |f: &dyn Fn(&SoakRow) -> f64| {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.at_h, f(r)))
            .filter(|p| p.1.is_finite())
            .collect();
        slope(&points)
    };
    println!();
    println!(
        "== soak: {rate} msg/s offered for {}s over {products} products (seed {}, history {} lines per product) ==",
        duration.as_secs(),
        args.seed,
        args.history
    );
    println!(
        "slope per hour of the linear fit over {} reports: RSS {:+.2} MiB/h; CPU ms per 1000 msgs: \
         worker {:+.2}/h, postgres {:+.2}/h, worker+postgres {:+.2}/h, broker {:+.2}/h; p99 {:+.2} ms/h",
        rows.len(),
        fit(&|r| r.rss_mib),
        fit(&|r| r.cpu.worker),
        fit(&|r| r.cpu.postgres),
        fit(&|r| r.cpu.worker + r.cpu.postgres),
        fit(&|r| r.cpu.broker),
        fit(&|r| r.p99)
    );
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        println!(
            "first report -> last: RSS {:.1} -> {:.1} MiB; CPU ms per 1000 msgs worker+postgres \
             {:.1} -> {:.1}, broker {:.1} -> {:.1}; p99 {:.1} -> {:.1} ms",
            a.rss_mib,
            b.rss_mib,
            a.cpu.worker + a.cpu.postgres,
            b.cpu.worker + b.cpu.postgres,
            a.cpu.broker,
            b.cpu.broker,
            a.p99,
            b.p99
        );
    }
    let rss_max = rows.iter().map(|r| r.rss_mib).fold(0.0, f64::max);
    let rss_ok = hwm_mib <= args.rss_limit_mib;
    println!(
        "worker RSS: highest report {rss_max:.1} MiB, peak (VmHWM) {hwm_mib:.1} MiB: {} the limit of {} MiB",
        if rss_ok { "under" } else { "OVER" },
        args.rss_limit_mib
    );

    let mut problems = Vec::new();
    if !rss_ok {
        problems.push(format!(
            "peak RSS {hwm_mib:.1} MiB over {} MiB",
            args.rss_limit_mib
        ));
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        problems.push(format!("{failed} groups of deliveries failed"));
    }
    if lost > 0 {
        problems.push(format!("{lost} order lines without a decision read"));
    }
    let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
        .fetch_one(&bench.db)
        .await?;
    if processed as usize != bench.produced {
        problems.push(format!(
            "processed_messages {processed} != produced {}",
            bench.produced
        ));
    }
    let over: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT b.id FROM batches b JOIN allocations a ON a.batch_id = b.id \
         GROUP BY b.id HAVING SUM(a.qty) > max(b.purchased_quantity)) o",
    )
    .fetch_one(&bench.db)
    .await?;
    if over > 0 {
        problems.push(format!("{over} over-allocated batches"));
    }
    println!(
        "end state: produced {} (incl. 1 warm-up), processed {processed}",
        bench.produced
    );
    if problems.is_empty() {
        println!("soak: OK");
        Ok(true)
    } else {
        for p in &problems {
            println!("soak: FAIL: {p}");
        }
        Ok(false)
    }
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
    if let Some(products) = args.products {
        sizes.skus = products;
    }
    let database_url = required_env("DATABASE_URL")?;
    let bootstrap = required_env("KAFKA_BOOTSTRAP_SERVERS")?;
    let bin = worker_bin();
    if !bin.is_file() {
        return fail(format!(
            "worker binary {} not found; run `cargo build --release --bin allocation-worker` or set WORKER_BIN",
            bin.display()
        ));
    }
    let suffix = random_hex();
    let mode = if args.small { "small" } else { "full" };
    if let Some(rate) = args.soak_rate {
        eprintln!(
            "bench (soak, seed {}): {} SKUs of the steady stream at {rate} msg/s for {} s, \
             history {} lines per product; worker {}",
            args.seed,
            args.products.unwrap_or(2_000),
            args.soak_duration.as_secs(),
            args.history,
            bin.display()
        );
    } else {
        eprintln!(
            "bench ({mode}, seed {}): {} SKUs x 3 batches, {} allocations, {} quantity changes; \
             history {} lines per product; latency run {} s at {} msg/s; worker {}",
            args.seed,
            sizes.skus,
            sizes.allocations,
            sizes.changes,
            args.history,
            sizes.latency_secs,
            sizes.latency_rate,
            bin.display()
        );
    }

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
    let meter = Arc::new(CpuMeter::new(
        pid,
        listener_pid(port_of(worker_db_url, 5432)),
        listener_pid(port_of(bootstrap, 9092)),
        &format!("aw_bench_{suffix}"),
    ));
    eprintln!("{}", meter.describe());
    let stop_meter = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let meter_thread = start_meter(meter.clone(), stop_meter.0.clone());
    let mut bench = Bench {
        topics: Topics::new(suffix),
        producer,
        db,
        meter: meter.clone(),
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

    if let Some(rate) = args.soak_rate {
        let ok = soak(&mut bench, args, rate, bootstrap, pid).await;
        stop_meter.0.store(true, Ordering::Relaxed);
        let _ = meter_thread.join();
        return ok;
    }

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
    let history = if args.history > 0 {
        let history = bench.history(&skus_of(&stock_msgs), args.history).await?;
        bench.analyze("history", args.analyze).await?;
        Some(history)
    } else {
        None
    };
    let stock = bench.phase("stock", &stock_msgs).await?;
    bench.analyze("stock", args.analyze).await?;
    let phases = vec![
        stock,
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
    bench.analyze("latency run's stock", args.analyze).await?;
    eprintln!(
        "latency run: {n_lat} AllocationRequired at {} msg/s",
        sizes.latency_rate
    );
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(n_lat);
    let mut ds = Vec::with_capacity(n_lat);
    let cpu_lat0 = bench.meter.sample();
    let t0 = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / sizes.latency_rate as f64);
    for (i, m) in lat_msgs.iter().enumerate() {
        let due = t0 + interval * i as u32;
        if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        sent_at.insert(m.line.clone().unwrap(), now_micros());
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
    let cpu_lat = bench.meter.sample() - cpu_lat0;
    // The outbound events are read back only now: a consumer reading them
    // during the run would load the broker on this shared machine (Tansu
    // spends about a third of a core serving 1,000 events a second to a
    // consumer), and their Kafka timestamps were fixed when published.
    let stop_witness = Arc::new(AtomicBool::new(false));
    let (seen, witness) = start_witness(
        bootstrap,
        "10",
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
    let cpu_total = bench.meter.sample();
    stop_meter.0.store(true, Ordering::Relaxed);
    let _ = meter_thread.join();

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
    let allocated: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT orderid, batchref FROM allocations_view WHERE orderid NOT LIKE 'hist-%'",
    )
    .fetch_all(&bench.db)
    .await?
    .into_iter()
    .collect();
    // The last decision about each line, in outbox (= decision) order.
    let events: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT kind, p->>'orderid', p->>'batchref' \
         FROM (SELECT id, kind, convert_from(payload, 'UTF8')::json AS p FROM outbox \
               WHERE kind NOT IN ('DeadLetter', 'BenchBacklog')) e \
         WHERE p->>'orderid' NOT LIKE 'hist-%' ORDER BY id",
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
    let total_cpu = phases.iter().fold(Cpu::default(), |a, p| a + p.cpu);
    let mode = if args.small { "small" } else { "full" };
    println!();
    println!(
        "== allocation-worker benchmark ({mode}, seed {}, {} products, history {} lines per product) ==",
        args.seed, sizes.skus, args.history
    );
    println!("CPU: milliseconds of CPU per 1,000 messages, of each process on its own");
    println!(
        "{:<18} {:>8} {:>9} {:>10} {:>8} {:>9} {:>8} {:>10}",
        "phase", "msgs", "secs", "msg/s", "worker", "postgres", "broker", "wrk+pg"
    );
    let row = |name: &str, messages: usize, secs: f64, cpu: Cpu| {
        let k = cpu.per_1000(messages);
        println!(
            "{:<18} {:>8} {:>9.2} {:>10.0} {:>8.1} {:>9.1} {:>8.1} {:>10.1}",
            name,
            messages,
            secs,
            messages as f64 / secs,
            k.worker,
            k.postgres,
            k.broker,
            k.worker + k.postgres
        );
    };
    if let Some(h) = &history {
        row("(history)", h.messages, h.secs, h.cpu);
    }
    for p in &phases {
        row(p.name, p.messages, p.secs, p.cpu);
    }
    row("overall", total_msgs, total_secs, total_cpu);
    let k = cpu_lat.per_1000(n_lat);
    println!(
        "latency run: {n_lat} AllocationRequired offered at {} msg/s over {offered_secs:.1}s; \
         CPU ms per 1000 msgs: worker {:.1}, postgres {:.1}, broker {:.1}",
        sizes.latency_rate, k.worker, k.postgres, k.broker
    );
    println!(
        "  end-to-end (outbound Kafka timestamp - inbound produce), ms: p50 {:.1}  p99 {:.1}  max {:.1}",
        percentile(&lat_pub, 50.0),
        percentile(&lat_pub, 99.0),
        lat_pub.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "worker: peak RSS (VmHWM) {:.1} MiB, RSS at end {:.1} MiB; CPU s over the whole run: \
         worker {:.2}, postgres {:.2}, broker {:.2}",
        hwm_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        cpu_total.worker,
        cpu_total.postgres,
        cpu_total.broker
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
