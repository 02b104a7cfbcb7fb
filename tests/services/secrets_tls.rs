//! Secrets from files and TLS to PostgreSQL (README "Configuration"):
//!
//! - `DATABASE_URL_FILE` and `KAFKA_PROPERTIES_FILE` are read as mounted
//!   Kubernetes Secrets are: the URL trimmed, properties one a line.
//! - PostgreSQL TLS verifies the server's certificate against the system's CA
//!   roots (here made to hold a CA of the test through `SSL_CERT_FILE`, which
//!   the system-roots loader honours) or against `sslrootcert`: a private
//!   cluster with `ssl=on` and a certificate signed by a CA made in the test
//!   (with the `openssl` command).
//!
//! Needs the PostgreSQL server binaries (`source scripts/services.sh`) and
//! `openssl`; the file-settings test needs Kafka too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sqlx::Connection;
use testkit::binary::{assert_config_error, run_binary};
use testkit::private_services::PrivatePostgres;
use testkit::{random_hex, TestEnv};

/// Runs the binary with exactly `env` (and PATH), at most a minute; its
/// output goes to the test's.
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let output = run_binary(args, env, Duration::from_secs(60));
    eprintln!(
        "[secrets] {args:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", random_hex(8)));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.display().to_string()
}

// ------------------------------------------------------------ file settings

#[test]
fn database_url_file_is_read_trimmed_and_excludes_database_url() {
    let dir = temp_dir("aw-secrets");
    let kafka = ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");
    let both = write(&dir.join("both"), "postgres://u:secret@127.0.0.1:1/db\n");
    assert_config_error(
        &worker(
            &["migrate"],
            &[
                ("DATABASE_URL", "postgres://u:secret@127.0.0.1:1/db"),
                ("DATABASE_URL_FILE", &both),
            ],
        ),
        "DATABASE_URL_FILE",
    );
    let missing = dir.join("missing").display().to_string();
    let out = worker(&["run"], &[kafka, ("DATABASE_URL_FILE", &missing)]);
    assert_config_error(&out, "DATABASE_URL_FILE");
    assert!(
        stderr(&out).contains(&missing),
        "the path is named: {}",
        stderr(&out)
    );
    let blank = write(&dir.join("blank"), " \n");
    assert_config_error(
        &worker(&["migrate"], &[("DATABASE_URL_FILE", &blank)]),
        "DATABASE_URL_FILE",
    );
    let mysql = write(&dir.join("mysql"), "mysql://u:secret@h/db\n");
    let out = worker(&["migrate"], &[("DATABASE_URL_FILE", &mysql)]);
    assert_config_error(&out, "DATABASE_URL_FILE");
    assert!(!stderr(&out).contains("secret"), "{}", stderr(&out));
    assert_config_error(&worker(&["migrate"], &[]), "DATABASE_URL");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_kafka_properties_file_is_a_setting_error() {
    let dir = temp_dir("aw-secrets");
    let base = [
        ("DATABASE_URL", "postgres://u:p@127.0.0.1:1/db"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ];
    let run = |file: &str| {
        let mut env = base.to_vec();
        env.push(("KAFKA_PROPERTIES_FILE", file));
        worker(&["run"], &env)
    };
    let missing = dir.join("missing").display().to_string();
    assert_config_error(&run(&missing), "KAFKA_PROPERTIES_FILE");
    let no_equals = write(&dir.join("no-equals"), "# SASL\nsasl.password\n");
    let out = run(&no_equals);
    assert_config_error(&out, "KAFKA_PROPERTIES_FILE");
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
    // An unknown property reaches librdkafka, which refuses it.
    let unknown = write(&dir.join("unknown"), "no.such.property=1\n");
    let out = run(&unknown);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no.such.property"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file's properties are applied: here its `bootstrap.servers` (a
/// property like any other, applied last) replaces an unreachable one.
#[tokio::test]
async fn kafka_properties_file_is_applied() {
    let env = TestEnv::new().await;
    let dir = temp_dir("aw-secrets");
    let file = write(
        &dir.join("kafka.properties"),
        &format!(
            "# mounted from a Secret\r\n\n  bootstrap.servers = {}  \r\nclient.id=a,b\n",
            env.bootstrap_servers
        ),
    );
    let out = worker(
        &["replay-dead-letters", "--dry-run"],
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
            ("KAFKA_PROPERTIES_FILE", &file),
            ("TOPIC_DEAD_LETTER", &env.topics.dead_letter),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sent 0"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    env.finish().await;
}

// ---------------------------------------------------------------- TLS

/// Runs `openssl ARGS` in `dir`; fails with its output.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl is needed to make test certificates: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN=allocation-worker test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `server.pem` / `server.key` for 127.0.0.1 and localhost, signed by `ca`.
fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    write(
        &dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// `migrate` over TLS with `verify-full`: it works when the server's CA is
/// `sslrootcert` or among the system roots, and fails clearly otherwise.
#[tokio::test]
async fn postgres_tls_verifies_against_sslrootcert_and_the_system_roots() {
    let certs = temp_dir("aw-tls-certs");
    make_ca(&certs, "ca");
    make_ca(&certs, "other-ca");
    make_server_cert(&certs, "ca");
    // A cluster of this test with `ssl=on` and the certificate in its data
    // directory (trust authentication on 127.0.0.1).
    let pg = PrivatePostgres::start_with(
        &[&certs.join("server.pem"), &certs.join("server.key")],
        &[
            "ssl=on",
            "ssl_cert_file=server.pem",
            "ssl_key_file=server.key",
        ],
    )
    .await;
    let url = |query: &str| pg.url("postgres", "postgres", query);
    let ca = certs.join("ca.pem").display().to_string();
    let other = certs.join("other-ca.pem").display().to_string();
    // An empty file of roots: what the system trusts, minus our CA.
    let none = write(&certs.join("no-roots.pem"), "");

    // sslrootcert, with the URL read from a file as a mounted Secret is.
    let url_file = write(
        &certs.join("database-url"),
        &format!(
            "{}\n",
            url(&format!("sslmode=verify-full&sslrootcert={ca}"))
        ),
    );
    let out = worker(
        &["migrate"],
        &[("DATABASE_URL_FILE", &url_file), ("SSL_CERT_FILE", &none)],
    );
    assert!(
        out.status.success(),
        "verify-full with sslrootcert: {}",
        stderr(&out)
    );

    // The system's roots: SSL_CERT_FILE names the bundle they are read from.
    let system = url("sslmode=verify-full");
    let out = worker(
        &["migrate"],
        &[("DATABASE_URL", &system), ("SSL_CERT_FILE", &ca)],
    );
    assert!(
        out.status.success(),
        "verify-full with system roots: {}",
        stderr(&out)
    );

    // Not trusted: another CA as sslrootcert, or no root that signed it.
    for (what, env) in [
        (
            "another CA",
            vec![
                (
                    "DATABASE_URL",
                    url(&format!("sslmode=verify-full&sslrootcert={other}")),
                ),
                ("SSL_CERT_FILE", none.clone()),
            ],
        ),
        (
            "no root",
            vec![
                ("DATABASE_URL", system.clone()),
                ("SSL_CERT_FILE", none.clone()),
            ],
        ),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = worker(&["migrate"], &env);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(
            text.contains("certificate") || text.contains("UnknownIssuer"),
            "{what}: the failure names the certificate: {text}"
        );
    }
    drop(pg);
    let _ = std::fs::remove_dir_all(&certs);
}

// ------------------------------------------------------- least privilege

/// Runs `deploy/postgres/roles.sql` with psql as the cluster's superuser,
/// on `database`.
fn apply_roles(pg: &PrivatePostgres, database: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/postgres/roles.sql");
    let output = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&script)
        .arg(pg.url("postgres", database, ""))
        .output()
        .expect("run psql (scripts/services.sh installs PostgreSQL's client)");
    assert!(
        output.status.success(),
        "roles.sql: {}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
}

/// The least-privilege guide, run as written (deploy/README.md, "Database
/// roles"): `roles.sql` makes a migration role that owns the schema and a
/// runtime role with rows and sequences only. `migrate` runs as the
/// migration role; the worker runs as the runtime role with
/// SKIP_MIGRATIONS: it is ready, allocates, dead-letters and publishes, and
/// the same role is refused a new table and a write to `_sqlx_migrations`.
#[tokio::test]
async fn the_worker_runs_under_the_runtime_role_the_guide_makes() {
    let pg = PrivatePostgres::start().await;
    let bootstrap = testkit::containers::shared_bootstrap_servers();
    let env = TestEnv::with_services(&pg.admin_url(), &bootstrap).await;
    apply_roles(&pg, &env.db_name);
    let migrator_url = pg.url("allocation_migrator", &env.db_name, "");
    let runtime_url = pg.url("allocation_runtime", &env.db_name, "");

    let migrate = worker(&["migrate"], &[("DATABASE_URL", migrator_url.as_str())]);
    assert!(
        migrate.status.success(),
        "migrate as the migration role: {}",
        stderr(&migrate)
    );
    // Once more after the first migrate, as the guide says.
    apply_roles(&pg, &env.db_name);

    let mut running = env.spawn_worker_with(&[
        ("DATABASE_URL", runtime_url.as_str()),
        ("SKIP_MIGRATIONS", "true"),
    ]);
    testkit::http_until(&env, running.http_addr, "/readyz", 200).await;
    let sku = testkit::unique("SKU");
    let batch = testkit::unique("b");
    let order = testkit::unique("o");
    // No env.wait_batch: the test's own role (the database's owner) is
    // granted nothing on the migration role's tables; an order line that
    // comes first waits for its batch anyway.
    env.batch_created(&batch, &sku, 5, None).await;
    env.allocation_required(&order, &sku, 2, &[]).await;
    env.produce_raw(
        &env.topics.allocation_required,
        Some("k"),
        b"{not json",
        &[],
    )
    .await;
    let t = env.topics.clone();
    env.wait_for(
        "the Allocated event and the dead letter",
        testkit::DEADLINE,
        |r| {
            r.iter()
                .any(|r| r.topic == t.allocated && r.value_str().contains(order.as_str()))
                && r.iter().any(|r| r.topic == t.dead_letter)
        },
    )
    .await;
    running.assert_running();

    let mut runtime = sqlx::PgConnection::connect(&runtime_url)
        .await
        .expect("connect as the runtime role");
    for refused in [
        "CREATE TABLE not_yours (id BIGINT)",
        "DELETE FROM _sqlx_migrations",
    ] {
        let error = sqlx::query(refused)
            .execute(&mut runtime)
            .await
            .expect_err(&format!("the runtime role must not: {refused}"));
        let code = error
            .as_database_error()
            .and_then(|e| e.code().map(|c| c.into_owned()));
        assert_eq!(code.as_deref(), Some("42501"), "{refused}: {error}");
    }
    let _ = runtime.close().await;
    running.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}
