//! The binary's command line (SPEC §7): a bad or missing setting stops it with
//! one line naming the setting and exit code 2, before it touches anything.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_allocation-worker"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // A setting that was wrongly accepted makes the worker run for ever:
    // stop it after a deadline, so the assertion on its exit code fails.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait works").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().expect("output is readable")
}

/// Asserts exit code 2 and a single stderr line that mentions `needle`.
fn assert_config_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not named in: {stderr}"
    );
}

const DB: (&str, &str) = ("DATABASE_URL", "postgres://u:secret@127.0.0.1:1/db");
const KAFKA: (&str, &str) = ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");

#[test]
fn missing_settings_are_named() {
    assert_config_error(&worker(&["run"], &[KAFKA]), "DATABASE_URL");
    assert_config_error(&worker(&["run"], &[DB]), "KAFKA_BOOTSTRAP_SERVERS");
    assert_config_error(&worker(&["migrate"], &[]), "DATABASE_URL");
}

#[test]
fn invalid_settings_are_named_without_echoing_secrets() {
    let out = worker(
        &["run"],
        &[("DATABASE_URL", "mysql://u:secret@h/db"), KAFKA],
    );
    assert_config_error(&out, "DATABASE_URL");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("secret"));
    assert_config_error(
        &worker(
            &["run"],
            &[DB, KAFKA, ("UNKNOWN_REFERENCE_TIMEOUT", "soon")],
        ),
        "--unknown-reference-timeout",
    );
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("LOG_FORMAT", "xml")]),
        "--log-format",
    );
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("TOPIC_ALLOCATED", "no spaces")]),
        "TOPIC_ALLOCATED",
    );
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("KAFKA_PROPERTIES", "novalue")]),
        "KAFKA_PROPERTIES",
    );
}

#[test]
fn retention_and_health_settings_are_checked() {
    for (name, flag) in [
        ("IDEMPOTENCY_RETENTION", "--idempotency-retention"),
        ("OUTBOX_RETENTION", "--outbox-retention"),
        ("HEALTH_POLL_TIMEOUT", "--health-poll-timeout"),
    ] {
        assert_config_error(&worker(&["run"], &[DB, KAFKA, (name, "a week")]), flag);
        // Zero would delete every record at once, or fail every probe.
        assert_config_error(&worker(&["run"], &[DB, KAFKA, (name, "0s")]), name);
    }
}

#[test]
fn an_unknown_librdkafka_property_is_a_setting_error() {
    let out = worker(
        &["run"],
        &[DB, KAFKA, ("KAFKA_PROPERTIES", "no.such.property=1")],
    );
    assert_config_error(&out, "KAFKA_PROPERTIES");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no.such.property"));
}

#[test]
fn help_lists_every_command() {
    let out = worker(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("migrate"), "{help}");
}
