//! The worker's container image under test, not the host binary: the image
//! `scripts/images.sh` builds (`TEST_WORKER_IMAGE`, default
//! `allocation-worker:local`), run by the testcontainers crate against
//! PostgreSQL and Kafka (containers too when `DATABASE_URL` /
//! `KAFKA_BOOTSTRAP_SERVERS` are not set, see tests/support/src/containers.rs).
//!
//! In the first tests the worker container shares the host's network: the
//! broker advertises a host address (127.0.0.1:<mapped port>), which every
//! client, the worker included, must be able to reach. The network-cut tests
//! at the end put it on networks of their own instead.
//!
//! Needs a Docker engine and the image: `scripts/images.sh`, then
//! `cargo test --test docker` (`cargo test` alone leaves this target out).
//! Worker logs: `target/e2e-logs/<test>-w<n>.log`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{check, check_eq};

use serde_json::json;
use testcontainers::core::logs::LogFrame;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use testkit::containers::{free_port, image_ref};
use testkit::{http_until, metrics_until, on, sample, unique, Record, TestEnv, DEADLINE};

/// `docker stop`'s grace period in these tests, and the bound on a clean exit:
/// the worker's own drain bound (SHUTDOWN_TIMEOUT, 20 s by default) fits in it.
const GRACE: Duration = Duration::from_secs(30);

fn worker_image() -> String {
    std::env::var("TEST_WORKER_IMAGE")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "allocation-worker:local".into())
}

/// `docker image inspect -f FORMAT IMAGE`, trimmed.
fn inspect(image: &str, format: &str) -> String {
    docker(&["image", "inspect", "-f", format, image]).unwrap_or_else(|e| {
        panic!("{e}\nBuild it with scripts/images.sh (or set TEST_WORKER_IMAGE).")
    })
}

/// The worker image, started with `args` (none: the image's CMD), the test's
/// settings, HTTP on 127.0.0.1:<free port> of the shared host network, and its
/// output appended to a log file of the test.
async fn start_worker(
    env: &TestEnv,
    args: &[&str],
) -> (ContainerAsync<GenericImage>, SocketAddr, std::path::PathBuf) {
    let image = worker_image();
    let (name, tag) = image_ref(&image);
    let (worker_name, log) = env.new_worker_log();
    let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let settings = env.worker_settings(http_addr, &[]);
    let mut file = std::fs::File::create(&log).expect("create the worker log");
    writeln!(
        file,
        "# e2e {} {worker_name}: image {image} {args:?}",
        env.name
    )
    .unwrap();
    for (k, v) in &settings {
        writeln!(file, "# {k}={v}").unwrap();
    }
    let file = Arc::new(Mutex::new(file));
    let mut request = GenericImage::new(name, tag)
        .with_network("host")
        .with_label("allocation-worker.test", "worker")
        .with_log_consumer(move |frame: &LogFrame| {
            let _ = file.lock().unwrap().write_all(frame.bytes());
        });
    for (k, v) in settings {
        request = request.with_env_var(k, v);
    }
    if !args.is_empty() {
        request = request.with_cmd(args.iter().copied());
    }
    let container = request.start().await.unwrap_or_else(|e| {
        panic!(
            "starting the worker image {image}: {e}\n\
             Build it with scripts/images.sh (or set TEST_WORKER_IMAGE)."
        )
    });
    env.note(&format!(
        "{worker_name}: container {} of {image}, HTTP {http_addr}, log {}",
        container.id(),
        log.display()
    ));
    (container, http_addr, log)
}

/// The image is what the Dockerfile promises: the binary as entrypoint, `run`
/// as the default command, a numeric non-root user.
#[test]
fn the_image_runs_the_worker_as_non_root() {
    let image = worker_image();
    assert_eq!(
        inspect(&image, "{{json .Config.Entrypoint}}"),
        r#"["allocation-worker"]"#
    );
    assert_eq!(inspect(&image, "{{json .Config.Cmd}}"), r#"["run"]"#);
    let user = inspect(&image, "{{.Config.User}}");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "the image's user must be a numeric non-root uid, not {user:?}"
    );
}

/// `docker run IMAGE migrate` applies the migrations and exits 0.
#[tokio::test]
async fn migrate_in_the_image_exits_0() {
    let env = TestEnv::new().await;
    let (worker, _, log) = start_worker(&env, &["migrate"]).await;
    let started = Instant::now();
    let code = loop {
        if let Some(code) = worker.exit_code().await.expect("the container's state") {
            break code;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "`migrate` still running after {DEADLINE:?}; log: {}",
            log.display()
        );
        // Poll interval of the deadline above.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 0, "`migrate` exit code; log: {}", log.display());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('batches', 'allocations_view')",
    )
    .fetch_one(&env.db)
    .await
    .expect("count the migrated tables");
    assert_eq!(tables, 2, "migrated tables; log: {}", log.display());
    drop(worker);
    env.finish().await;
}

/// The reference scenario, a malformed message dead-lettered while the next is
/// applied, /metrics from the container, and `docker stop` exiting 0 in time.
#[tokio::test]
async fn the_image_allocates_dead_letters_serves_metrics_and_stops_cleanly() {
    let env = TestEnv::new().await;
    let (worker, http, log) = start_worker(&env, &[]).await;
    let t = env.topics.clone();
    http_until(&env, http, "/readyz", 200).await;

    // cosmicpython's change_batch_quantity_leading_to_reallocation.
    let sku = unique("sku");
    let (earlier, later) = (unique("batch-old"), unique("batch-newer"));
    let order = unique("order");
    env.batch_created(&earlier, &sku, 10, Some("2011-01-01"))
        .await;
    env.batch_created(&later, &sku, 10, Some("2011-01-02"))
        .await;
    env.allocation_required(&order, &sku, 10, &[]).await;
    env.wait_for_count(
        "Allocated to the earlier batch",
        &t.allocated,
        1,
        DEADLINE,
        |r| r.field("orderid") == order && r.field("batchref") == earlier,
    )
    .await;
    env.produce_json(
        &t.batch_quantity_changed,
        Some(&earlier),
        &json!({"batchref": earlier, "qty": 5}),
        &[],
    )
    .await;
    let records = env
        .wait_for(
            "Deallocated, then Allocated to the later batch",
            DEADLINE,
            |rs| {
                on(rs, &t.deallocated).any(|r| r.field("orderid") == order)
                    && on(rs, &t.allocated)
                        .any(|r| r.field("orderid") == order && r.field("batchref") == later)
            },
        )
        .await;
    check_eq!(
        env,
        on(&records, &t.deallocated)
            .map(Record::json)
            .collect::<Vec<_>>(),
        vec![json!({"orderid": order, "sku": sku, "qty": 10})],
        "one Deallocated"
    );
    let view: Vec<(String, String)> =
        sqlx::query_as("SELECT sku, batchref FROM allocations_view WHERE orderid = $1")
            .bind(&order)
            .fetch_all(&env.db)
            .await
            .expect("read allocations_view");
    check_eq!(
        env,
        view,
        vec![(sku.clone(), later.clone())],
        "allocations_view"
    );

    // Not JSON, then a valid line behind it on the same SKU.
    let next = unique("order-next");
    let malformed = env
        .produce_raw(&t.allocation_required, Some(&sku), b"{not json", &[])
        .await;
    env.allocation_required(&next, &sku, 1, &[]).await;
    let records = env
        .wait_for(
            "the dead letter and the next line allocated",
            DEADLINE,
            |rs| {
                on(rs, &t.dead_letter).next().is_some()
                    && on(rs, &t.allocated).any(|r| r.field("orderid") == next)
            },
        )
        .await;
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();
    check_eq!(env, dead.len(), 1, "one dead letter: {dead:#?}");
    check_eq!(
        env,
        dead[0].header("dlq.reason").as_deref(),
        Some("malformed-json"),
        "{}",
        dead[0].summary()
    );
    check_eq!(
        env,
        (
            dead[0].header("dlq.original.partition"),
            dead[0].header("dlq.original.offset")
        ),
        (
            Some(malformed.partition.to_string()),
            Some(malformed.offset.to_string())
        ),
        "the dead letter's origin: {}",
        dead[0].summary()
    );
    check_eq!(
        env,
        dead[0].value.as_deref(),
        Some(&b"{not json"[..]),
        "value kept"
    );

    // Prometheus' view, from the container.
    let metrics = metrics_until(&env, http, "the dead letter counted", |body| {
        sample(
            body,
            "allocation_dead_letters_total",
            r#"reason="malformed-json""#,
        ) == Some(1.0)
    })
    .await;
    check!(
        env,
        metrics.contains("allocation_build_info{"),
        "allocation_build_info in /metrics:\n{metrics}"
    );
    check!(
        env,
        metrics.contains("allocation_messages_consumed_total{"),
        "allocation_messages_consumed_total in /metrics:\n{metrics}"
    );

    // `docker stop`: SIGTERM, then SIGKILL after the grace period.
    let stopping = Instant::now();
    worker
        .stop_with_timeout(Some(GRACE.as_secs() as i32))
        .await
        .expect("docker stop");
    let took = stopping.elapsed();
    let code = worker.exit_code().await.expect("the container's state");
    env.note(&format!("docker stop took {took:?}, exit code {code:?}"));
    check_eq!(
        env,
        code,
        Some(0),
        "exit code after docker stop (log: {})",
        log.display()
    );
    check!(
        env,
        took < GRACE,
        "docker stop took {took:?}, the grace period is {GRACE:?}"
    );
    drop(worker);
    env.finish().await;
}

// ---------------------------------------------------------------------------
// Real network faults (contract §6.5): the worker's container cut off from
// PostgreSQL, or from the broker, by `docker network disconnect`. Where the
// fault tests freeze or stop a process, this takes the route away: packets
// to the other side go nowhere, the sockets the worker holds stay open, and
// nothing tells it the peer is gone.
//
// Three networks of the test's own, each with a subnet it picks so that
// every container has a fixed address: `db` (PostgreSQL and the worker),
// `kafka` (the broker and the worker) and `http` (the worker, whose HTTP the
// test probes there). The host reaches each container at its address, as
// Linux routes to its bridges, so the broker advertises one address that
// the test and the worker can both use. The cut network is connected again
// with the worker's address of before, as a partition heals.
// ---------------------------------------------------------------------------

/// The network cuts run one at a time: each times a 20 s outage.
static CUTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the worker is cut off.
const CUT: Duration = Duration::from_secs(20);

/// Deadline of waits that span the cut and the recovery after it.
const RECOVERY: Duration = Duration::from_secs(120);

/// Kafka properties of the worker under the cut: a short session, so that a
/// member the broker lost rejoins in seconds (Tansu completes a join in
/// about half of `session.timeout.ms`).
const CUT_KAFKA_PROPERTIES: &str = "session.timeout.ms=6000,heartbeat.interval.ms=1000";

/// TRANSACTION_TIMEOUT of the worker cut off from PostgreSQL: well within
/// [`CUT`].
const TRANSACTION_TIMEOUT: &str = "5s";

/// `docker ARGS`: its output, trimmed, or what it said on stderr.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run the docker client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A bridge network of the test, removed when dropped.
struct Network {
    name: String,
    /// The first three octets of its /24.
    prefix: String,
}

impl Network {
    /// A network on a free /24 of 10.160.0.0–10.223.255.0, picked at random
    /// and picked again while Docker says it overlaps another.
    fn create(role: &str) -> Self {
        let name = unique(&format!("aw-cut-{role}"));
        let mut last = String::new();
        for _ in 0..20 {
            let seed = u32::from_str_radix(&testkit::random_hex(4), 16).unwrap_or(0);
            let prefix = format!("10.{}.{}", 160 + (seed >> 8) % 64, seed & 0xff);
            match docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &format!("{prefix}.0/24"),
                "--label",
                "allocation-worker.test=network-cut",
                &name,
            ]) {
                Ok(_) => return Self { name, prefix },
                Err(e) => last = e,
            }
        }
        panic!(
            "cannot create the docker network {name}: {last}\n\
             The network-cut tests need a Docker engine (scripts/images.sh starts one)."
        );
    }

    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// A container of the test, removed with its volumes when dropped; its
/// output follows into a log file while it exists.
struct Container {
    id: String,
    name: String,
    logs: Option<std::process::Child>,
}

impl Container {
    /// `docker create` on `network` at `ip`, then `also` connected (each
    /// network with its address), then started, so that its first
    /// connection attempts find every route in place. Never pulls.
    fn start(
        name: &str,
        image: &str,
        network: (&Network, &str),
        also: &[(&Network, &str)],
        environment: &[(String, String)],
        command: &[String],
        log: &std::path::Path,
    ) -> Self {
        let mut args: Vec<String> = [
            "create",
            "--pull",
            "never",
            "--name",
            name,
            "--label",
            "allocation-worker.test=network-cut",
            "--network",
            &network.0.name,
            "--ip",
            network.1,
        ]
        .map(str::to_owned)
        .to_vec();
        for (k, v) in environment {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(image.to_owned());
        args.extend(command.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&args).unwrap_or_else(|e| {
            panic!("{e}\nThe image must be here (scripts/images.sh builds the local ones).")
        });
        let mut container = Self {
            id,
            name: name.to_owned(),
            logs: None,
        };
        for (net, ip) in also {
            container.connect(net, ip);
        }
        docker(&["start", &container.id]).unwrap_or_else(|e| panic!("{e}"));
        let file = std::fs::File::create(log).expect("create the container's log");
        let logs = Command::new("docker")
            .args(["logs", "--follow", &container.id])
            .stdout(file.try_clone().expect("the container's log"))
            .stderr(file)
            .spawn()
            .expect("docker logs --follow");
        container.logs = Some(logs);
        container
    }

    fn connect(&self, network: &Network, ip: &str) {
        docker(&["network", "connect", "--ip", ip, &network.name, &self.id])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn disconnect(&self, network: &Network) {
        docker(&["network", "disconnect", &network.name, &self.id])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The exit code once the container has stopped; None while it runs.
    fn exit_code(&self) -> Option<i64> {
        let state = docker(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.ExitCode}}",
            &self.id,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match state.split_once(' ') {
            Some(("false", code)) => code.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", "--volumes", &self.id]);
        if let Some(mut logs) = self.logs.take() {
            let _ = logs.kill();
            let _ = logs.wait();
        }
    }
}

/// Which side the worker is cut off from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Database,
    Broker,
}

/// The worker image on three networks of its own with PostgreSQL and the
/// broker (containers of TEST_POSTGRES_IMAGE and TEST_KAFKA_IMAGE), order
/// lines streaming in, and the worker cut off from `side` for [`CUT`]
/// mid-stream. It reports not-ready, resumes by itself once connected
/// again, and loses nothing: every order allocated exactly once, where the
/// model says, in the events and in the database; then `docker stop`
/// exits 0.
async fn cut_off_from(side: Side) {
    use testkit::containers::{
        kafka_image, kafka_metadata, kafka_settings, postgres_image, postgres_login, POSTGRES_ENV,
    };
    use testkit::orders::{
        assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
    };

    let _one_at_a_time = CUTS.lock().await;
    const SKUS: usize = 5;
    const ORDERS: usize = 400;
    let (db_net, kafka_net, http_net) = (
        Network::create("db"),
        Network::create("kafka"),
        Network::create("http"),
    );
    let tag = testkit::random_hex(8);
    let log_dir = testkit::log_dir();
    std::fs::create_dir_all(&log_dir).expect("create the e2e log directory");
    let test = testkit::test_name();

    let postgres_ip = db_net.ip(10);
    let _postgres = Container::start(
        &format!("aw-cut-postgres-{tag}"),
        &postgres_image(),
        (&db_net, &postgres_ip),
        &[],
        &POSTGRES_ENV.map(|(k, v)| (k.to_owned(), v.to_owned())),
        &[],
        &log_dir.join(format!("{test}-postgres.log")),
    );
    let kafka_ip = kafka_net.ip(10);
    let bootstrap = format!("{kafka_ip}:9092");
    let image = kafka_image();
    let (command, environment) = kafka_settings(&image_ref(&image).0, &bootstrap);
    let _kafka = Container::start(
        &format!("aw-cut-kafka-{tag}"),
        &image,
        (&kafka_net, &kafka_ip),
        &[],
        &environment
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<Vec<_>>(),
        &command.unwrap_or_default(),
        &log_dir.join(format!("{test}-kafka.log")),
    );
    let admin_url =
        format!("postgres://allocation:allocation@{postgres_ip}:5432/allocation?sslmode=disable");
    postgres_login(&admin_url, RECOVERY)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {postgres_ip}: {e}"));
    kafka_metadata(&bootstrap, RECOVERY)
        .await
        .unwrap_or_else(|e| panic!("the broker at {bootstrap}: {e}"));

    let env = TestEnv::with_services(&admin_url, &bootstrap).await;
    let t = env.topics.clone();
    let (worker_name, log) = env.new_worker_log();
    let http: SocketAddr = format!("{}:9464", http_net.ip(20)).parse().unwrap();
    let mut extra = vec![
        ("KAFKA_PROPERTIES", CUT_KAFKA_PROPERTIES),
        ("SHUTDOWN_TIMEOUT", "10s"),
    ];
    if side == Side::Database {
        // Short, so that the cut outlasts it: the worker must give up the
        // transactions the cut left hanging, not wait for TCP.
        extra.push(("TRANSACTION_TIMEOUT", TRANSACTION_TIMEOUT));
    }
    let settings: Vec<(String, String)> = env
        .worker_settings("0.0.0.0:9464".parse().unwrap(), &extra)
        .into_iter()
        .collect();
    let worker = Container::start(
        &format!("aw-cut-worker-{tag}"),
        &worker_image(),
        (&http_net, &http_net.ip(20)),
        &[(&db_net, &db_net.ip(20)), (&kafka_net, &kafka_net.ip(20))],
        &settings,
        &[],
        &log,
    );
    env.note(&format!(
        "{worker_name}: container {} ({}) of {}, HTTP {http}, log {}",
        worker.name,
        &worker.id[..12],
        worker_image(),
        log.display()
    ));

    let stock = create_stock(&env, SKUS, 1000).await;
    http_until(&env, http, "/readyz", 200).await;
    let orders = orders_for(&stock, ORDERS);
    let pacer = Pacer::default();
    let (cut_net, worker_ip) = match side {
        Side::Database => (&db_net, db_net.ip(20)),
        Side::Broker => (&kafka_net, kafka_net.ip(20)),
    };

    // The ERP goes on publishing through the cut: ~8 s of orders.
    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(200), &pacer);
    let cut = async {
        env.wait_for("50 Allocated events", DEADLINE, |rs| {
            testkit::distinct_ids(rs, &t.allocated).len() >= 50
        })
        .await;
        worker.disconnect(cut_net);
        let cut_at = Instant::now();
        env.note(&format!(
            "worker cut off from the {side:?} ({}): {} orders produced",
            cut_net.name,
            pacer.produced()
        ));
        check!(
            env,
            pacer.produced() < ORDERS,
            "meant to cut mid-stream, but all {ORDERS} orders were produced"
        );
        // /readyz probed all through the cut (the scenario's length is CUT).
        let mut answers: Vec<(u16, String)> = Vec::new();
        while cut_at.elapsed() < CUT {
            check!(
                env,
                worker.exit_code().is_none(),
                "the worker exited during the cut"
            );
            if let Some((status, body)) = testkit::http_get(http, "/readyz").await {
                answers.push((status, body.trim().to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        worker.connect(cut_net, &worker_ip);
        let healed_at = Instant::now();
        let first_503 = answers.iter().position(|(s, _)| *s == 503);
        env.note(&format!(
            "connected again after {:?}; /readyz during the cut: {} answers, first 503 at answer {first_503:?}: {:?}",
            cut_at.elapsed(),
            answers.len(),
            answers.iter().find(|(s, _)| *s == 503)
        ));
        let Some(first_503) = first_503 else {
            panic!(
                "/readyz never said 503 while the worker was cut off from the {side:?}: {answers:?}\nworker log: {}",
                log.display()
            );
        };
        if side == Side::Database {
            // Once it has noticed, it says not-ready until the route is back.
            check!(
                env,
                answers[first_503..].iter().all(|(s, _)| *s == 503),
                "/readyz said 200 again while still cut off from the database: {answers:?}"
            );
            check!(
                env,
                answers[first_503].1.contains("database"),
                "/readyz says why: {:?}",
                answers[first_503]
            );
        }
        http_until(&env, http, "/readyz", 200).await;
        env.note(&format!(
            "ready again {:?} after the cut healed",
            healed_at.elapsed()
        ));
        healed_at
    };
    let (delivered, healed_at) = tokio::join!(producing, cut);
    check_eq!(env, delivered.len(), ORDERS, "orders delivered");

    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(&env, &expected, (SKUS + ORDERS) as i64, RECOVERY).await;
    env.note(&format!(
        "every order allocated once, {:?} after the cut healed",
        healed_at.elapsed()
    ));

    if side == Side::Database {
        // Cut off, the transactions in hand neither failed nor ended: the
        // worker gave them up at TRANSACTION_TIMEOUT and backed off, instead
        // of waiting for TCP to retransmit once the route was back.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let gave_up = text
            .lines()
            .filter(|l| l.contains("backing off") && l.contains("TRANSACTION_TIMEOUT"))
            .count();
        env.note(&format!(
            "{gave_up} attempt(s) given up at TRANSACTION_TIMEOUT={TRANSACTION_TIMEOUT}"
        ));
        check!(
            env,
            gave_up > 0,
            "no transaction given up at TRANSACTION_TIMEOUT={TRANSACTION_TIMEOUT} during a {CUT:?} cut; log: {}",
            log.display()
        );
        check!(
            env,
            text.contains("database reachable again; resumed"),
            "the log does not say the worker resumed; log: {}",
            log.display()
        );
    }

    // `docker stop` after all that: a clean exit within the grace period.
    let stopping = Instant::now();
    docker(&["stop", "--time", &GRACE.as_secs().to_string(), &worker.id])
        .unwrap_or_else(|e| panic!("{e}"));
    let took = stopping.elapsed();
    check_eq!(
        env,
        worker.exit_code(),
        Some(0),
        "exit code after docker stop (took {took:?})"
    );
    check!(env, took < GRACE, "docker stop took {took:?}");
    drop(worker);
    env.finish().await;
}

/// Issue 14 item 5: cut off from PostgreSQL for 20 s mid-stream.
#[tokio::test]
async fn cut_off_from_the_database_by_the_network_it_recovers_and_loses_nothing() {
    cut_off_from(Side::Database).await;
}

/// Issue 14 item 5: cut off from the broker for 20 s mid-stream.
#[tokio::test]
async fn cut_off_from_the_broker_by_the_network_it_recovers_and_loses_nothing() {
    cut_off_from(Side::Broker).await;
}
