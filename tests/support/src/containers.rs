//! PostgreSQL and a Kafka broker in containers, for a test that was given no
//! `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS`, through the testcontainers crate.
//!
//! Each variable that is set wins (the services-script path: `source
//! scripts/services.sh`); each one that is not gets a container of this test
//! alone, removed when the test's [`super::TestEnv`] is dropped.
//!
//! Images (nothing is pulled when they are present locally):
//! - `TEST_POSTGRES_IMAGE`, default `postgres:15-bookworm`: anything that
//!   honours `POSTGRES_USER` / `POSTGRES_PASSWORD` / `POSTGRES_DB` like the
//!   official image (CI: `allocation-worker-postgres:local`).
//! - `TEST_KAFKA_IMAGE`, default `apache/kafka:3.9.0`, configured through its
//!   `KAFKA_*` variables; an image whose name contains `tansu` is run as a
//!   Tansu broker instead (CI: `allocation-worker-tansu:local`).
//!
//! Kafka clients connect to the address the broker advertises, so the broker
//! must advertise the port the host sees: a free host port is chosen first and
//! mapped explicitly, and the broker is told to advertise it.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use sqlx::{Connection, PgConnection};
use testcontainers::core::{ContainerPort, IntoContainerPort};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

pub const DEFAULT_POSTGRES_IMAGE: &str = "postgres:15-bookworm";
pub const DEFAULT_KAFKA_IMAGE: &str = "apache/kafka:3.9.0";

/// How long a container may take to accept connections.
const STARTUP: Duration = Duration::from_secs(120);

/// The containers of one test; dropping it removes them.
#[derive(Default)]
pub struct ServiceContainers {
    pub postgres: Option<ContainerAsync<GenericImage>>,
    pub kafka: Option<ContainerAsync<GenericImage>>,
}

/// `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` from the environment, or of
/// containers started for them.
pub async fn services() -> (String, String, ServiceContainers) {
    let mut containers = ServiceContainers::default();
    let database_url = match set_var("DATABASE_URL") {
        Some(url) => url,
        None => {
            let (url, container) = start_postgres().await;
            containers.postgres = Some(container);
            url
        }
    };
    let bootstrap = match set_var("KAFKA_BOOTSTRAP_SERVERS") {
        Some(servers) => servers,
        None => {
            let (servers, container) = start_kafka().await;
            containers.kafka = Some(container);
            servers
        }
    };
    (database_url, bootstrap, containers)
}

fn set_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `name:tag` split at the tag's colon (not a registry's port).
pub fn image_ref(reference: &str) -> (String, String) {
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (reference.to_owned(), "latest".to_owned()),
    }
}

/// A free TCP port on the host, for a mapping that must be known in advance.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn no_container(what: &str, image: &str, variable: &str, error: impl std::fmt::Display) -> ! {
    panic!(
        "{variable} is not set, so the test starts {what} in a container ({image}), \
         and that failed: {error}.\n\
         Either start the services and export their settings (`source scripts/services.sh`), \
         or run a Docker engine with that image available (`scripts/images.sh` builds local \
         stand-ins; set {variable_image} to choose another image).",
        variable_image = if what == "PostgreSQL" {
            "TEST_POSTGRES_IMAGE"
        } else {
            "TEST_KAFKA_IMAGE"
        }
    )
}

async fn start_postgres() -> (String, ContainerAsync<GenericImage>) {
    let image = postgres_image();
    let (name, tag) = image_ref(&image);
    let mut request = GenericImage::new(name, tag)
        .with_exposed_port(5432.tcp())
        .with_label("allocation-worker.test", "postgres");
    for (k, v) in POSTGRES_ENV {
        request = request.with_env_var(k, v);
    }
    let container = request
        .start()
        .await
        .unwrap_or_else(|e| no_container("PostgreSQL", &image, "DATABASE_URL", e));
    let host = container.get_host().await.expect("container host");
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .expect("PostgreSQL's mapped port");
    let url = format!("postgres://allocation:allocation@{host}:{port}/allocation?sslmode=disable");
    // The official image runs its init scripts on a socket-only server first:
    // a real login over TCP is the readiness check.
    let started = Instant::now();
    if let Err(e) = postgres_login(&url, STARTUP).await {
        panic!(
            "PostgreSQL container {} ({image}) did not accept a login within {STARTUP:?}: {e}",
            container.id()
        );
    }
    eprintln!(
        "[containers] PostgreSQL {image} at {host}:{port} ready in {:?}",
        started.elapsed()
    );
    (url, container)
}

async fn start_kafka() -> (String, ContainerAsync<GenericImage>) {
    let image = kafka_image();
    let (name, tag) = image_ref(&image);
    let port = free_port();
    let advertised = format!("127.0.0.1:{port}");
    let mut request = GenericImage::new(name.clone(), tag)
        .with_exposed_port(9092.tcp())
        .with_mapped_port(port, ContainerPort::Tcp(9092))
        .with_label("allocation-worker.test", "kafka");
    let (command, environment) = kafka_settings(&name, &advertised);
    for (k, v) in environment {
        request = request.with_env_var(k, v);
    }
    let request = match command {
        Some(command) => request.with_cmd(command),
        None => request,
    };
    let container = request
        .start()
        .await
        .unwrap_or_else(|e| no_container("Kafka", &image, "KAFKA_BOOTSTRAP_SERVERS", e));
    // A metadata round trip through the advertised address is the readiness
    // check (an open port is not: Docker's proxy accepts before the broker).
    let started = Instant::now();
    if let Err(e) = kafka_metadata(&advertised, STARTUP).await {
        panic!(
            "Kafka container {} ({image}) did not answer metadata requests on {advertised} \
             within {STARTUP:?}: {e}",
            container.id()
        );
    }
    eprintln!(
        "[containers] Kafka {image} at {advertised} ready in {:?}",
        started.elapsed()
    );
    (advertised, container)
}

// ------------------------------------------------- one per test process

/// Containers shared by every test of the process, removed when it exits.
/// How a broker image (`name`, without its tag) listens on 9092 and
/// advertises `advertised` (host:port): the command to give it (None: the
/// image's own) and its environment. Tansu is told on its command line;
/// apache/kafka, a single KRaft node, by its KAFKA_* variables (setting any
/// of them replaces its defaults, so all of them).
pub fn kafka_settings(
    name: &str,
    advertised: &str,
) -> (Option<Vec<String>>, Vec<(&'static str, String)>) {
    if name.contains("tansu") {
        let command = [
            "broker",
            "--listener-url",
            "tcp://0.0.0.0:9092",
            "--advertised-listener-url",
            &format!("tcp://{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ];
        return (Some(command.map(str::to_owned).to_vec()), Vec::new());
    }
    let environment = [
        ("KAFKA_NODE_ID", "1".to_owned()),
        ("KAFKA_PROCESS_ROLES", "broker,controller".to_owned()),
        (
            "KAFKA_LISTENERS",
            "PLAINTEXT://0.0.0.0:9092,CONTROLLER://0.0.0.0:9093".to_owned(),
        ),
        (
            "KAFKA_ADVERTISED_LISTENERS",
            format!("PLAINTEXT://{advertised}"),
        ),
        ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".to_owned()),
        (
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_owned(),
        ),
        (
            "KAFKA_CONTROLLER_QUORUM_VOTERS",
            "1@localhost:9093".to_owned(),
        ),
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1".to_owned()),
        (
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
            "1".to_owned(),
        ),
        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1".to_owned()),
        ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".to_owned()),
    ];
    (None, environment.to_vec())
}

/// The environment of a PostgreSQL server image (the official image's
/// variables, which the local stand-in reads too): role, password and
/// database `allocation`.
pub const POSTGRES_ENV: [(&str, &str); 3] = [
    ("POSTGRES_USER", "allocation"),
    ("POSTGRES_PASSWORD", "allocation"),
    ("POSTGRES_DB", "allocation"),
];

/// The image of PostgreSQL containers: TEST_POSTGRES_IMAGE, or the official one.
pub fn postgres_image() -> String {
    set_var("TEST_POSTGRES_IMAGE").unwrap_or_else(|| DEFAULT_POSTGRES_IMAGE.into())
}

/// The image of broker containers: TEST_KAFKA_IMAGE, or the official one.
pub fn kafka_image() -> String {
    set_var("TEST_KAFKA_IMAGE").unwrap_or_else(|| DEFAULT_KAFKA_IMAGE.into())
}

/// Polls until a login to `url` succeeds, for at most `within`; the last
/// error otherwise. A started server container takes a moment to listen.
pub async fn postgres_login(url: &str, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match PgConnection::connect(url).await {
            Ok(connection) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Err(e) if started.elapsed() > within => return Err(e.to_string()),
            // Poll interval of the deadline above.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Polls until the broker at `bootstrap` answers a metadata request that
/// names a broker, for at most `within`; the last error otherwise.
pub async fn kafka_metadata(bootstrap: &str, within: Duration) -> Result<(), String> {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let started = Instant::now();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .map_err(|e| e.to_string())?;
        let mut last = String::new();
        while started.elapsed() < within {
            match producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
            {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                Ok(_) => last = "no broker in the metadata".into(),
                Err(e) => last = e.to_string(),
            }
            // Poll interval of the deadline above.
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    })
    .await
    .map_err(|e| format!("the metadata probe panicked: {e}"))?
}

static SHARED_DATABASE_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static SHARED_BOOTSTRAP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static AT_EXIT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `DATABASE_URL`, or the URL of a PostgreSQL container shared by the tests
/// of this process: for tests that only need a server to make databases on.
pub fn shared_database_url() -> String {
    if let Some(url) = set_var("DATABASE_URL") {
        return url;
    }
    SHARED_DATABASE_URL
        .get_or_init(|| shared(start_postgres))
        .clone()
}

/// `KAFKA_BOOTSTRAP_SERVERS`, or those of a broker container shared by the
/// tests of this process.
pub fn shared_bootstrap_servers() -> String {
    if let Some(servers) = set_var("KAFKA_BOOTSTRAP_SERVERS") {
        return servers;
    }
    SHARED_BOOTSTRAP.get_or_init(|| shared(start_kafka)).clone()
}

/// Starts a container on a runtime of its own (each `#[tokio::test]` has its
/// own, which ends with the test), and removes it when the process exits:
/// the test harness ends with `exit`, which runs `atexit` handlers, not
/// destructors of statics.
fn shared<F, Fut>(start: F) -> String
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (String, ContainerAsync<GenericImage>)>,
{
    let (address, id) = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to start a container on");
        runtime.block_on(async move {
            let (address, container) = start().await;
            let id = container.id().to_owned();
            // Its drop would remove it on this runtime, which ends here.
            std::mem::forget(container);
            (address, id)
        })
    })
    .join()
    .unwrap_or_else(|_| panic!("starting a shared container failed (see above)"));
    let mut ids = AT_EXIT.lock().unwrap();
    if ids.is_empty() {
        extern "C" fn remove_shared_containers() {
            let ids = AT_EXIT.lock().map(|ids| ids.clone()).unwrap_or_default();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "--force", "--volumes"])
                    .args(&ids)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        // SAFETY: registers a plain function with no arguments, as atexit wants.
        unsafe { nix::libc::atexit(remove_shared_containers) };
    }
    ids.push(id);
    address
}
