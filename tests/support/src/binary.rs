//! The binaries' commands that end by themselves (`migrate`, any command
//! refusing a setting, and the tools' `simulate` and `watch`), run with
//! exactly the environment a test gives: nothing of the test's own leaks in
//! but PATH.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `allocation-worker ARGS` with exactly `env` (and PATH); stdout and stderr
/// piped, stdin closed.
pub fn spawn_binary(args: &[&str], env: &[(&str, &str)]) -> Child {
    spawn_program(&super::worker_binary(), args, env)
}

/// `PROGRAM ARGS` as [`spawn_binary`] runs the worker: for a binary of
/// another package (the tools' `CARGO_BIN_EXE_allocation-tools`).
pub fn spawn_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().expect("the binary runs")
}

/// Waits for `child` at most `limit`, then kills it: its output, and whether
/// it ended by itself. Its output must fit the pipes meanwhile (64 KiB each),
/// as a command's summary does.
pub fn output_within(mut child: Child, limit: Duration) -> (Output, bool) {
    let deadline = Instant::now() + limit;
    let mut ended = true;
    while child.try_wait().expect("wait on the binary").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            ended = false;
            break;
        }
        // Poll interval of the deadline above.
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("the binary's output");
    (output, ended)
}

/// Runs `allocation-worker ARGS` with exactly `env` (and PATH) to its end.
/// One still running after `limit` is killed, so that an assertion on its
/// exit status fails: a setting wrongly accepted makes the worker run on.
pub fn run_binary(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    output_within(spawn_binary(args, env), limit).0
}

/// Exit code 2 and a single stderr line that names `needle`: how a bad or
/// missing setting stops the binary (contract §7).
pub fn assert_config_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not named in: {stderr}"
    );
}
