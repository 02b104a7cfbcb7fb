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
//! Beside it, one concern a file:
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

pub mod alone;
pub mod binary;
pub mod containers;
pub mod database;
pub mod fakes;
pub mod http;
pub mod kafka;
pub mod model;
pub mod orders;
pub mod private_services;
pub mod relay_fakes;

pub use http::{http_get, http_until, http_until_ok, metrics_until, sample, sample_sum, samples};

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

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

// ------------------------------------------------------------------- topics

/// The seven topic names of one test.
#[derive(Debug, Clone)]
pub struct Topics {
    pub batch_created: String,
    pub batch_quantity_changed: String,
    pub allocation_required: String,
    pub allocated: String,
    pub deallocated: String,
    pub out_of_stock: String,
    pub dead_letter: String,
}

impl Topics {
    fn with_suffix(suffix: &str) -> Self {
        Self {
            batch_created: format!("erp.batch-created.{suffix}"),
            batch_quantity_changed: format!("erp.batch-quantity-changed.{suffix}"),
            allocation_required: format!("erp.allocation-required.{suffix}"),
            allocated: format!("allocation.allocated.{suffix}"),
            deallocated: format!("allocation.deallocated.{suffix}"),
            out_of_stock: format!("allocation.out-of-stock.{suffix}"),
            dead_letter: format!("allocation.dead-letter.{suffix}"),
        }
    }

    pub fn all(&self) -> [&str; 7] {
        [
            &self.batch_created,
            &self.batch_quantity_changed,
            &self.allocation_required,
            &self.allocated,
            &self.deallocated,
            &self.out_of_stock,
            &self.dead_letter,
        ]
    }

    /// What the worker consumes.
    pub fn inbound(&self) -> [&str; 3] {
        [
            &self.batch_created,
            &self.batch_quantity_changed,
            &self.allocation_required,
        ]
    }

    /// What the worker publishes to: what the witness reads.
    pub fn outbound(&self) -> [&str; 4] {
        [
            &self.allocated,
            &self.deallocated,
            &self.out_of_stock,
            &self.dead_letter,
        ]
    }

    fn worker_env(&self) -> [(&'static str, &str); 7] {
        [
            ("TOPIC_BATCH_CREATED", &self.batch_created),
            ("TOPIC_BATCH_QUANTITY_CHANGED", &self.batch_quantity_changed),
            ("TOPIC_ALLOCATION_REQUIRED", &self.allocation_required),
            ("TOPIC_ALLOCATED", &self.allocated),
            ("TOPIC_DEALLOCATED", &self.deallocated),
            ("TOPIC_OUT_OF_STOCK", &self.out_of_stock),
            ("TOPIC_DEAD_LETTER", &self.dead_letter),
        ]
    }
}

// ------------------------------------------------------------------ records

/// One record read back from Kafka, owned (no borrowed message outlives a poll).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// `None` is a header with a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    fn from_message<M: Message>(m: &M) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The first header of that name, as (lossy) UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }

    /// How many headers have that name.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }

    /// The value as JSON, `Value::Null` if it is not JSON.
    pub fn json(&self) -> Value {
        self.value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or(Value::Null)
    }

    /// A JSON string field of the value, "" if absent.
    pub fn field(&self, name: &str) -> String {
        match self.json().get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }

    pub fn ce_id(&self) -> Option<String> {
        self.header("ce_id")
    }

    /// One line for failure messages.
    pub fn summary(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| {
                format!(
                    "{n}={}",
                    String::from_utf8_lossy(v.as_deref().unwrap_or_default())
                )
            })
            .collect();
        format!(
            "{}[{}]@{} key={:?} value={} headers={{{}}}",
            self.topic,
            self.partition,
            self.offset,
            self.key_str(),
            self.value_str(),
            headers.join(", ")
        )
    }
}

/// The records of one topic.
pub fn on<'a>(records: &'a [Record], topic: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
    records.iter().filter(move |r| r.topic == topic)
}

/// The distinct `ce_id`s on one topic.
pub fn distinct_ids(records: &[Record], topic: &str) -> HashSet<String> {
    on(records, topic).filter_map(Record::ce_id).collect()
}

/// Where the producer put a message, from its delivery report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

// ------------------------------------------------------------------ witness

/// Reads every partition of the outbound topics from the beginning, on its own
/// thread, without a consumer group (plain `assign`), and keeps every record
/// in arrival order.
pub struct Witness {
    records: Arc<Mutex<Vec<Record>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Witness {
    fn start(bootstrap: &str, topics: &[&str]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            // Required by librdkafka, never used to join: no subscribe().
            .set("group.id", format!("aw-test-witness-{}", random_hex(12)))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("witness consumer");
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..PARTITIONS {
                tpl.add_partition_offset(topic, partition, Offset::Beginning)
                    .expect("witness partition");
            }
        }
        consumer.assign(&tpl).expect("witness assign");
        drop(tpl);

        let records = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (records, errors, stop) = (records.clone(), errors.clone(), stop.clone());
            std::thread::Builder::new()
                .name("e2e-witness".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Copy out at once: the borrowed message dies in this scope.
                        match consumer.poll(Duration::from_millis(100)) {
                            None => {}
                            Some(Ok(m)) => records.lock().unwrap().push(Record::from_message(&m)),
                            Some(Err(e)) => errors.lock().unwrap().push(e.to_string()),
                        }
                    }
                    drop(consumer);
                })
                .expect("witness thread")
        };
        Self {
            records,
            errors,
            stop,
            thread: Some(thread),
        }
    }

    /// Everything seen so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------- worker

/// A running `allocation-worker run`. SIGKILLed when dropped.
pub struct WorkerProcess {
    pub name: String,
    pub log: PathBuf,
    pub http_addr: SocketAddr,
    child: tokio::process::Child,
    status: Option<ExitStatus>,
}

impl WorkerProcess {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("worker pid (already reaped)") as i32
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.status.is_some() {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on worker");
        }
        self.status
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(status) = tokio::time::timeout(timeout, self.child.wait()).await {
                self.status = Some(status.expect("wait on worker"));
            }
        }
        self.status
    }

    /// SIGTERM, then waits up to `timeout` for the exit. Panics (after a
    /// SIGKILL) when it does not exit in time.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        self.sigterm();
        match self.wait_exit(timeout).await {
            Some(status) => {
                eprintln!(
                    "[e2e] {} exited after SIGTERM in {:?}: {status}",
                    self.name,
                    started.elapsed()
                );
                status
            }
            None => {
                self.kill().await;
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM (SIGKILLed it); log: {}",
                    self.name,
                    self.log.display()
                );
            }
        }
    }

    /// SIGKILL, and reap it.
    pub async fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.start_kill();
            self.status = Some(self.child.wait().await.expect("wait on killed worker"));
            eprintln!("[e2e] {} SIGKILLed", self.name);
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's lines after byte `from` (an earlier `log_text().len()`)
    /// that contain `needle`.
    pub fn log_lines_after(&self, from: usize, needle: &str) -> Vec<String> {
        self.log_text()
            .get(from..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Panics if the worker has exited (e.g. crashed on start-up).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exited() {
            panic!(
                "{} exited unexpectedly with {status}; log: {}\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            // kill_on_drop is set too; this makes it synchronous and explicit.
            let _ = self.child.start_kill();
        }
    }
}

/// The last `lines` lines of a file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

// --------------------------------------------------------------------- env

/// One test's isolated world: database, topics, group, producer, witness.
pub struct TestEnv {
    /// The test's name (from its thread), used to name log files.
    pub name: String,
    pub suffix: String,
    pub topics: Topics,
    pub group_id: String,
    pub db_name: String,
    /// URL of the test database, as given to the worker.
    pub database_url: String,
    /// Pool on the test database, for row assertions.
    pub db: PgPool,
    pub bootstrap_servers: String,
    pub admin_database_url: String,
    producer: FutureProducer,
    pub witness: Witness,
    logs: Arc<Mutex<Vec<PathBuf>>>,
    spawned: AtomicUsize,
    started: Instant,
    /// PostgreSQL and Kafka containers started for this test when no
    /// `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` was given; removed on drop.
    /// Last, so every client above is closed before they go.
    containers: containers::ServiceContainers,
    /// This test's turn among those that run alone ([`alone`]); last, so
    /// that it ends after everything above is released.
    _turn: Option<tokio::sync::RwLockReadGuard<'static, ()>>,
}

/// The repository's root (this crate is `tests/support` in it).
pub fn repo_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().and_then(Path::parent).unwrap_or(manifest)
}

/// The `allocation-worker` binary of the running test's build. A test
/// executable is `<target>/<profile>/deps/<test>-<hash>`, and cargo builds
/// the package's binary into `<target>/<profile>` before it runs an
/// integration test (`CARGO_BIN_EXE_*`, which says the same, exists only in
/// the test crates, not in this library).
pub fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps", exe.display()));
    let binary = profile.join(format!("allocation-worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} not found: run the tests with cargo test",
        binary.display()
    );
    binary
}

/// Directory of the worker logs: `<target>/e2e-logs`.
pub fn log_dir() -> PathBuf {
    // <target>/<profile>/allocation-worker
    let binary = worker_binary();
    let target = binary
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("e2e-logs")
}

/// The running test's name (from its thread), usable in a file name.
pub fn test_name() -> String {
    let name = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| n.rsplit("::").next().unwrap_or(n).to_owned())
        .unwrap_or_else(|| "e2e".to_owned());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl TestEnv {
    /// On the services of `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`; each
    /// that is not set is a container of this test's own (see [`containers`]).
    pub async fn new() -> Self {
        let turn = alone::shared_turn().await;
        let (database_url, bootstrap_servers, containers) = containers::services().await;
        let mut env = Self::build(&database_url, &bootstrap_servers, turn).await;
        env.containers = containers;
        env
    }

    /// Like [`TestEnv::new`], but on the given PostgreSQL server and Kafka
    /// bootstrap servers instead of `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`:
    /// for fault tests that stop or freeze a service of their own, which the
    /// shared services must never be. `database_url` is an admin URL (its
    /// role needs CREATEDB), as `DATABASE_URL` is for `new`.
    pub async fn with_services(database_url: &str, bootstrap_servers: &str) -> Self {
        let turn = alone::shared_turn().await;
        Self::build(database_url, bootstrap_servers, turn).await
    }

    async fn build(
        database_url: &str,
        bootstrap_servers: &str,
        turn: Option<tokio::sync::RwLockReadGuard<'static, ()>>,
    ) -> Self {
        let started = Instant::now();
        let database_url = database_url.to_owned();
        let bootstrap_servers = bootstrap_servers.to_owned();
        let suffix = random_hex(10);
        let name = test_name();

        // Database.
        let db_name = format!("aw_test_{suffix}");
        database::create_database(&database_url, &db_name).await;
        let test_url = database::with_database(&database_url, &db_name);
        let options = PgConnectOptions::from_str(&database_url)
            .expect("DATABASE_URL")
            .database(&db_name);
        let db = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .expect("pool on the test database");

        // Topics.
        let topics = Topics::with_suffix(&suffix);
        kafka::create_topics(&bootstrap_servers, &topics.all()).await;

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap_servers)
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "20000")
            .create()
            .expect("test producer");
        let witness = Witness::start(&bootstrap_servers, &topics.outbound());

        let env = Self {
            name,
            group_id: format!("aw-test-{suffix}"),
            suffix,
            topics,
            db_name,
            database_url: test_url,
            db,
            bootstrap_servers,
            admin_database_url: database_url,
            producer,
            witness,
            logs: Arc::new(Mutex::new(Vec::new())),
            spawned: AtomicUsize::new(0),
            started,
            containers: containers::ServiceContainers::default(),
            _turn: turn,
        };
        env.note(&format!(
            "env ready in {:?}: db {} topics *.{} group {}",
            started.elapsed(),
            env.db_name,
            env.suffix,
            env.group_id
        ));
        env
    }

    /// A timestamped line on the test's output.
    pub fn note(&self, what: &str) {
        eprintln!(
            "[e2e {} +{:.1}s] {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Every worker log of this test so far, for failure messages.
    pub fn log_paths(&self) -> String {
        let logs = self.logs.lock().unwrap();
        if logs.is_empty() {
            "(no worker started)".to_owned()
        } else {
            logs.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// Starts `allocation-worker run` against this test's database and topics.
    /// The next worker's name and its log file (named in failure messages).
    pub fn new_worker_log(&self) -> (String, PathBuf) {
        let n = self.spawned.fetch_add(1, Ordering::SeqCst) + 1;
        let dir = log_dir();
        std::fs::create_dir_all(&dir).expect("create the e2e log directory");
        let log = dir.join(format!("{}-w{n}.log", self.name));
        self.logs.lock().unwrap().push(log.clone());
        (format!("worker-{n}"), log)
    }

    /// The environment of a worker of this test listening on `http_addr`,
    /// `extra_env` overriding the defaults.
    pub fn worker_settings(
        &self,
        http_addr: SocketAddr,
        extra_env: &[(&str, &str)],
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in [
            ("DATABASE_URL", self.database_url.as_str()),
            ("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap_servers),
            ("KAFKA_GROUP_ID", &self.group_id),
            ("KAFKA_PROPERTIES", WORKER_KAFKA_PROPERTIES),
            ("RUST_LOG", "info,allocation_worker=debug"),
            ("RUST_BACKTRACE", "1"),
            ("LOG_FORMAT", "text"),
        ] {
            env.insert(k.into(), v.into());
        }
        env.insert("HTTP_ADDR".into(), http_addr.to_string());
        for (k, v) in self.topics.worker_env() {
            env.insert(k.into(), v.into());
        }
        for (k, v) in extra_env {
            env.insert((*k).into(), (*v).into());
        }
        env
    }

    pub fn spawn_worker(&self) -> WorkerProcess {
        self.spawn_worker_with(&[])
    }

    /// Same, with extra environment variables (they override the defaults).
    pub fn spawn_worker_with(&self, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let (worker_name, log) = self.new_worker_log();
        let mut file = File::create(&log).expect("create the worker log");
        // A free port for HTTP, so that parallel tests do not collide.
        let http_addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port");
        let env = self.worker_settings(http_addr, extra_env);
        writeln!(
            file,
            "# e2e {} {worker_name}: {} run",
            self.name,
            worker_binary().display()
        )
        .unwrap();
        for (k, v) in &env {
            writeln!(file, "# {k}={v}").unwrap();
        }
        file.flush().unwrap();
        let stderr = file.try_clone().expect("clone the log file handle");

        let mut command = tokio::process::Command::new(worker_binary());
        command
            .arg("run")
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        let child = command.spawn().expect("spawn allocation-worker");
        self.note(&format!(
            "{worker_name} started (pid {:?}), log {}",
            child.id(),
            log.display()
        ));
        WorkerProcess {
            name: worker_name,
            log,
            http_addr,
            child,
            status: None,
        }
    }

    // ------------------------------------------------------------ producing

    /// Produces raw bytes and waits for the delivery report.
    pub async fn produce_raw(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Delivered {
        let headers = headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).payload(value).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send(record, Duration::from_secs(20)).await {
            Ok(d) => Delivered {
                partition: d.partition,
                offset: d.offset,
            },
            Err((e, _)) => panic!("producing to {topic}: {e}"),
        }
    }

    /// Produces a JSON value and waits for the delivery report.
    pub async fn produce_json(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &Value,
        headers: &[(&str, &str)],
    ) -> Delivered {
        self.produce_raw(topic, key, value.to_string().as_bytes(), headers)
            .await
    }

    /// BatchCreated, keyed by SKU like the ERP does. `eta` "YYYY-MM-DD" or None.
    pub async fn batch_created(
        &self,
        reference: &str,
        sku: &str,
        qty: i64,
        eta: Option<&str>,
    ) -> Delivered {
        let value = serde_json::json!({"ref": reference, "sku": sku, "qty": qty, "eta": eta});
        let topic = self.topics.batch_created.clone();
        self.produce_json(&topic, Some(sku), &value, &[]).await
    }

    /// AllocationRequired, keyed by SKU.
    pub async fn allocation_required(
        &self,
        orderid: &str,
        sku: &str,
        qty: i64,
        headers: &[(&str, &str)],
    ) -> Delivered {
        let value = serde_json::json!({"orderid": orderid, "sku": sku, "qty": qty});
        let topic = self.topics.allocation_required.clone();
        self.produce_json(&topic, Some(sku), &value, headers).await
    }

    // -------------------------------------------------------------- waiting

    /// Polls the witness until `done(records)` holds; returns the records then.
    /// Fails after `timeout` listing what was seen and where the logs are.
    pub async fn wait_for<F>(&self, what: &str, timeout: Duration, mut done: F) -> Vec<Record>
    where
        F: FnMut(&[Record]) -> bool,
    {
        let started = Instant::now();
        loop {
            let records = self.witness.snapshot();
            if done(&records) {
                self.note(&format!("saw {what} after {:?}", started.elapsed()));
                return records;
            }
            if started.elapsed() >= timeout {
                let mut seen = String::new();
                let skip = records.len().saturating_sub(60);
                if skip > 0 {
                    writeln!(seen, "  ... {skip} earlier records not shown").unwrap();
                }
                for r in &records[skip..] {
                    writeln!(seen, "  {}", r.summary()).unwrap();
                }
                let errors = self.witness.errors();
                panic!(
                    "timed out after {timeout:?} waiting for {what}.\n\
                     The witness saw {} record(s):\n{seen}witness errors: {errors:?}\n\
                     worker logs: {}",
                    records.len(),
                    self.log_paths()
                );
            }
            // Poll interval of the deadline above.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` records are on `topic` that match `filter`;
    /// returns those records.
    pub async fn wait_for_count<F>(
        &self,
        what: &str,
        topic: &str,
        n: usize,
        timeout: Duration,
        filter: F,
    ) -> Vec<Record>
    where
        F: Fn(&Record) -> bool,
    {
        let records = self
            .wait_for(what, timeout, |rs| {
                rs.iter().filter(|r| r.topic == topic && filter(r)).count() >= n
            })
            .await;
        records
            .into_iter()
            .filter(|r| r.topic == topic && filter(r))
            .collect()
    }

    /// Records seen so far on `topic`.
    pub fn records_on(&self, topic: &str) -> Vec<Record> {
        self.witness
            .snapshot()
            .into_iter()
            .filter(|r| r.topic == topic)
            .collect()
    }

    /// Polls `probe` (typically a database query) until it returns `Some`.
    /// Errors count as "not yet" (the worker may not have migrated yet).
    pub async fn eventually<T, E, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        E: std::fmt::Display,
    {
        let started = Instant::now();
        loop {
            let last = match probe().await {
                Ok(Some(value)) => {
                    self.note(&format!("{what} after {:?}", started.elapsed()));
                    return value;
                }
                Ok(None) => "not yet".to_owned(),
                Err(e) => format!("error: {e}"),
            };
            if started.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting until {what} (last probe: {last}); \
                     worker logs: {}",
                    self.log_paths()
                );
            }
            // Poll interval of the deadline above.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the batch row exists, so that what follows is not deferred.
    pub async fn wait_batch(&self, reference: &str) {
        let db = self.db.clone();
        let reference = reference.to_owned();
        self.eventually(&format!("batch {reference} stored"), DEADLINE, move || {
            let (db, reference) = (db.clone(), reference.clone());
            async move {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM batches WHERE reference = $1")
                        .bind(&reference)
                        .fetch_optional(&db)
                        .await?;
                Ok::<_, sqlx::Error>(found.map(|_| ()))
            }
        })
        .await
    }

    /// Polls until the worker has recorded `n` processed messages (applied,
    /// ignored as no-ops, or dead-lettered).
    pub async fn wait_processed(&self, n: i64, timeout: Duration) {
        let db = self.db.clone();
        self.eventually(&format!("{n} messages processed"), timeout, move || {
            let db = db.clone();
            async move {
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
                    .fetch_one(&db)
                    .await?;
                Ok::<_, sqlx::Error>((count >= n).then_some(()))
            }
        })
        .await
    }

    /// Drops the test database and topics. Call at the end of a passing test,
    /// after dropping its workers; a failing test leaves them for inspection.
    pub async fn finish(mut self) {
        self.witness.stop();
        self.db.close().await;
        if let Err(e) = database::drop_database(&self.admin_database_url, &self.db_name).await {
            self.note(&format!("could not drop {}: {e}", self.db_name));
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap_servers)
            .create();
        if let Ok(admin) = admin {
            let topics = self.topics.all();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                admin.delete_topics(&topics, &AdminOptions::new()),
            )
            .await;
        }
        self.note("finished; database and topics dropped");
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs.lock().unwrap().clone();
            eprintln!(
                "\n[e2e {}] FAILED. database {} and topics *.{} kept for inspection.",
                self.name, self.db_name, self.suffix
            );
            for log in logs {
                eprintln!(
                    "---- last lines of {} ----\n{}\n----",
                    log.display(),
                    tail(&log, 30)
                );
            }
        }
    }
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

// ------------------------------------------------------------- raw records

/// A header to produce: its name as bytes (Kafka does not require UTF-8) and
/// its value, `None` for a null value.
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

impl TestEnv {
    /// Produces any record and waits for the delivery report: `value` `None`
    /// is a record with no value (a tombstone), the key may be any bytes, and
    /// so may header names and values.
    pub async fn produce_record(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[RawHeader<'_>],
    ) -> Delivered {
        self.produce_record_via(&self.producer, topic, key, value, headers)
            .await
    }

    /// A producer for records larger than librdkafka's default limit
    /// (`message.max.bytes`, 1 000 000 bytes), which the broker may accept.
    pub fn large_record_producer(&self, max_bytes: usize) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", max_bytes.to_string())
            .create()
            .expect("large-record test producer")
    }

    /// [`Self::produce_record`] through another producer.
    pub async fn produce_record_via(
        &self,
        producer: &FutureProducer,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[RawHeader<'_>],
    ) -> Delivered {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len().max(1));
        for (name, value) in headers {
            owned = match std::str::from_utf8(name) {
                Ok(name) => owned.insert(Header {
                    key: name,
                    value: *value,
                }),
                Err(_) => add_raw_header(owned, name, *value),
            };
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(d) => Delivered {
                partition: d.partition,
                offset: d.offset,
            },
            Err((e, _)) => panic!("producing to {topic}: {e}"),
        }
    }
}

/// Adds a header whose name is not UTF-8, which rdkafka's safe API cannot
/// express (`Header::key` is a `&str`), through librdkafka itself.
fn add_raw_header(headers: OwnedHeaders, name: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    // `as_borrowed` is the native `rd_kafka_headers_t` pointer, cast.
    let native = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
        as *mut rdkafka::bindings::rd_kafka_headers_t;
    let (value_ptr, value_len) = match value {
        Some(v) => (v.as_ptr().cast::<std::ffi::c_void>(), v.len() as isize),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `native` is the live, writable headers list owned by `headers`;
    // librdkafka copies name and value (lengths given, no terminator needed).
    let err = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            native,
            name.as_ptr().cast::<std::ffi::c_char>(),
            name.len() as isize,
            value_ptr,
            value_len,
        )
    };
    assert_eq!(
        err,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
        "rd_kafka_header_add"
    );
    headers
}
