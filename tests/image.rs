//! The worker's container image under test, not the host binary: the image
//! `scripts/images.sh` builds (`TEST_WORKER_IMAGE`, default
//! `allocation-worker:local`), run by the testcontainers crate against
//! PostgreSQL and Kafka (containers too when `DATABASE_URL` /
//! `KAFKA_BOOTSTRAP_SERVERS` are not set, see tests/common/containers.rs).
//!
//! The worker container shares the host's network: the broker advertises a
//! host address (127.0.0.1:<mapped port>), which every client, the worker
//! included, must be able to reach.
//!
//! Needs a Docker engine and the image: `scripts/images.sh`, then
//! `cargo test --features image-tests --test image`. Worker logs: `target/e2e-logs/<test>-w<n>.log`.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use testcontainers::core::logs::LogFrame;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use common::containers::{free_port, image_ref};
use common::{http_until, metrics_until, on, sample, unique, Record, TestEnv, DEADLINE};

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
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", format, image])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the docker client: {e}"));
    assert!(
        out.status.success(),
        "docker image inspect {image}: {}\nBuild it with scripts/images.sh (or set TEST_WORKER_IMAGE).",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
