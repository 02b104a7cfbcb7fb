//! The HTTP surface (contract §7) against the real router, served on a real
//! socket, with PostgreSQL at DATABASE_URL: a malformed request is the
//! client's error. Whatever the path, percent-escapes or headers, the answer
//! is never a 5xx while the database is fine; ids that cannot be an orderid
//! (empty, NUL, more than 255 characters, not UTF-8) are 400.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use allocation_worker::adapters::health::Health;
use allocation_worker::adapters::metrics::Metrics;
use allocation_worker::adapters::postgres::pool::MIGRATOR;
use allocation_worker::entrypoints::http::{router, HttpState};

/// The router on a free port, over a migrated database of its own holding
/// one allocation (`order-1` → `LAMP`/`b1`), dropped at the end.
struct Server {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    admin_url: String,
    db_name: String,
}

impl Server {
    fn start() -> Self {
        let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!("DATABASE_URL is not set; run `source scripts/services.sh` first")
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let db_name = format!("aw_test_http_{:016x}", rand::random::<u64>());
        let addr = runtime.block_on(async {
            let mut admin = PgConnection::connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
            sqlx::query(&format!(r#"CREATE DATABASE "{db_name}""#))
                .execute(&mut admin)
                .await
                .expect("CREATE DATABASE (the role needs CREATEDB)");
            let _ = admin.close().await;
            let options = PgConnectOptions::from_str(&admin_url)
                .expect("DATABASE_URL")
                .database(&db_name);
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .expect("pool on the test database");
            MIGRATOR.run(&pool).await.expect("migrations");
            sqlx::raw_sql(
                "INSERT INTO products (sku, version_number) VALUES ('LAMP', 1);
                 INSERT INTO batches (reference, sku, purchased_quantity, eta)
                     VALUES ('b1', 'LAMP', 10, NULL);
                 INSERT INTO allocations (batch_id, orderid, sku, qty)
                     SELECT id, 'order-1', 'LAMP', 1 FROM batches WHERE reference = 'b1';",
            )
            .execute(&pool)
            .await
            .expect("a product, its batch and one allocation");
            let state = HttpState {
                read_pool: pool.clone(),
                partition_stall_timeout: std::time::Duration::from_secs(60),
                pool,
                metrics: Arc::new(Metrics::new().expect("metrics")),
                health: Arc::new(Health {
                    consumer_running: AtomicBool::new(true),
                    consumer_assigned: AtomicBool::new(true),
                    ..Health::default()
                }),
                health_poll_timeout: std::time::Duration::from_secs(300),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a free port");
            let addr = listener.local_addr().expect("bound address");
            tokio::spawn(async move { axum::serve(listener, router(state)).await });
            addr
        });
        Self {
            runtime,
            addr,
            admin_url,
            db_name,
        }
    }

    /// Sends `head` (request line and headers, without the final blank
    /// line) and returns the status code of the answer.
    fn status(&self, head: &[u8]) -> u16 {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut request = head.to_vec();
        request.extend_from_slice(b"\r\nHost: test\r\nConnection: close\r\n\r\n");
        // The server may answer (431, 400) and close before it has read a
        // huge request: a failed write is then not an error of the test.
        let _ = stream.write_all(&request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let line = answer.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        line.strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no HTTP answer to {:?}: {:?}",
                    String::from_utf8_lossy(&head[..head.len().min(200)]),
                    String::from_utf8_lossy(&answer)
                )
            })
    }

    fn get(&self, target: &str) -> u16 {
        self.status(format!("GET {target} HTTP/1.1").as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let (admin_url, db_name) = (self.admin_url.clone(), self.db_name.clone());
        self.runtime.block_on(async move {
            if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&format!(
                    r#"DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)"#
                ))
                .execute(&mut admin)
                .await;
            }
        });
    }
}

/// Every byte as a percent-escape: the path then carries any byte value,
/// NUL and invalid UTF-8 included, in a request line HTTP allows.
fn escaped(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

#[test]
fn malformed_ids_are_400_and_nothing_is_a_server_error() {
    let server = Server::start();

    // The read model itself works: a known id, an unknown one.
    assert_eq!(server.get("/allocations/order-1"), 200);
    assert_eq!(server.get("/allocations/order-2"), 404);
    assert_eq!(server.get("/readyz"), 200, "the database is fine");

    // The cases the contract names.
    for (target, expected) in [
        ("/allocations/%00".to_owned(), 400),
        ("/allocations/order%00-1".to_owned(), 400),
        ("/allocations/".to_owned(), 400),
        (format!("/allocations/{}", "x".repeat(256)), 400),
        (format!("/allocations/{}", "x".repeat(255)), 404),
        (format!("/allocations/{}", "%C3%A9".repeat(255)), 404),
        (format!("/allocations/{}", "%C3%A9".repeat(256)), 400),
        ("/allocations/%FF".to_owned(), 400),
        ("/allocations/%C3%28".to_owned(), 400),
        ("/allocations/%ED%A0%80".to_owned(), 400),
        ("/allocations/unknown-order".to_owned(), 404),
        ("/allocations/a%2Fb".to_owned(), 404),
        ("/nowhere".to_owned(), 404),
    ] {
        assert_eq!(server.get(&target), expected, "GET {target}");
    }
    // Huge headers: refused by the HTTP layer (431), not a crash.
    let huge = format!("GET /healthz HTTP/1.1\r\nX-Big: {}", "a".repeat(1 << 20));
    let status = server.status(huge.as_bytes());
    assert!((400..500).contains(&status), "huge header: {status}");

    // Anything: random bytes as the id, random paths, many or long headers.
    let id = prop::collection::vec(any::<u8>(), 0..600);
    let path = prop_oneof![
        id.clone()
            .prop_map(|b| format!("/allocations/{}", escaped(&b))),
        "[a-zA-Z0-9._~-]{0,300}".prop_map(|s| format!("/allocations/{s}")),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| format!("/{}", escaped(&b))),
        Just("/metrics".to_owned()),
        Just("/healthz".to_owned()),
        Just("/readyz".to_owned()),
        "[a-z/%0-9A-F]{0,80}".prop_map(|s| format!("/{s}")),
    ];
    let method = prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]);
    let headers = prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,30}", 0usize..20_000), 0..8);
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(method, path, headers), |(method, path, headers)| {
            let mut head = format!("{method} {path} HTTP/1.1");
            for (name, len) in &headers {
                head.push_str(&format!("\r\nX-{name}: {}", "v".repeat(*len)));
            }
            let status = server.status(head.as_bytes());
            prop_assert!(status < 500, "{method} {path}: {status}");
            if method == "GET" && path.starts_with("/allocations/") {
                prop_assert!(
                    matches!(status, 200 | 400 | 404 | 431),
                    "{method} {path}: {status}"
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.get("/readyz"), 200, "the database is still fine");
}
