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

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{random_hex, TestEnv};

/// Runs the binary with exactly `env` (and PATH), at most a minute.
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_allocation-worker"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait works").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("output is readable");
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

/// Exit code 2 and one stderr line naming `needle`.
fn assert_config_error(output: &Output, needle: &str) {
    let stderr = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not named in: {stderr}"
    );
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

/// The newest PostgreSQL server binaries the distribution installed.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no /usr/lib/postgresql/*/bin/initdb: the PostgreSQL server is needed; \
             run `source scripts/services.sh`"
        )
    })
}

/// A PostgreSQL cluster of this test only, with `ssl=on` and the
/// certificate in its directory (trust authentication on 127.0.0.1).
struct TlsPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl TlsPostgres {
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            // The server tools refuse to run as root.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it with the certificate files in `certs`.
    fn start(certs: &Path) -> Self {
        let dir = temp_dir("aw-tls-pg");
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0)
                == 0
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        for file in ["server.pem", "server.key"] {
            std::fs::copy(certs.join(file), dir.join(file)).expect("copy the certificate");
        }
        let pg = Self {
            dir,
            bin: pg_bin(),
            port,
            as_postgres,
        };
        {
            use std::os::unix::fs::PermissionsExt;
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(
                pg.dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod the key");
        }
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", pg.dir.display());
        }
        let data = pg.dir.join("data").display().to_string();
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
        );
        let options = format!(
            "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
             -c ssl_cert_file={dir}/server.pem -c ssl_key_file={dir}/server.key",
            pg.port,
            dir = pg.dir.display()
        );
        let log = pg.dir.join("server.log").display().to_string();
        pg.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        eprintln!(
            "[secrets] private PostgreSQL with TLS on 127.0.0.1:{}",
            pg.port
        );
        pg
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `migrate` over TLS with `verify-full`: it works when the server's CA is
/// `sslrootcert` or among the system roots, and fails clearly otherwise.
#[test]
fn postgres_tls_verifies_against_sslrootcert_and_the_system_roots() {
    let certs = temp_dir("aw-tls-certs");
    make_ca(&certs, "ca");
    make_ca(&certs, "other-ca");
    make_server_cert(&certs, "ca");
    let pg = TlsPostgres::start(&certs);
    let ca = certs.join("ca.pem").display().to_string();
    let other = certs.join("other-ca.pem").display().to_string();
    // An empty file of roots: what the system trusts, minus our CA.
    let none = write(&certs.join("no-roots.pem"), "");

    // sslrootcert, with the URL read from a file as a mounted Secret is.
    let url_file = write(
        &certs.join("database-url"),
        &format!(
            "{}\n",
            pg.url(&format!("sslmode=verify-full&sslrootcert={ca}"))
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
    let system = pg.url("sslmode=verify-full");
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
                    pg.url(&format!("sslmode=verify-full&sslrootcert={other}")),
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
