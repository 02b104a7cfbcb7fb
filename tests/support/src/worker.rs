//! The worker binary under test: where it is, where its logs go, and a
//! running process of it ([`WorkerProcess`]), killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

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

/// A running `allocation-worker run`. SIGKILLed when dropped.
pub struct WorkerProcess {
    pub name: String,
    pub log: PathBuf,
    pub http_addr: SocketAddr,
    pub(crate) child: tokio::process::Child,
    pub(crate) status: Option<ExitStatus>,
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
