//! [`TestEnv`]: a database, topics and consumer group of one test, the
//! services they are on, and the producer and witness that talk to the
//! worker through them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::{
    alone, containers, database, kafka, log_dir, random_hex, tail, test_name, worker_binary,
    Delivered, Record, Topics, Witness, WorkerProcess, DEADLINE, WORKER_KAFKA_PROPERTIES,
};

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
