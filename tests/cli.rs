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

/// Every duration setting reads a bare number as seconds, as the README's
/// "`--duration 15`" does, and still takes humantime strings.
#[test]
fn durations_are_seconds_when_bare_and_humantime_otherwise() {
    use allocation_worker::entrypoints::cli::{duration, Cli, CommandLine};
    use clap::Parser;

    for (text, expected) in [
        ("15", Duration::from_secs(15)),
        ("0", Duration::ZERO),
        ("2.5", Duration::from_millis(2500)),
        (" 30 ", Duration::from_secs(30)),
        ("15s", Duration::from_secs(15)),
        ("2m", Duration::from_secs(120)),
        ("1h 30m", Duration::from_secs(5400)),
        ("7d", Duration::from_secs(7 * 86_400)),
        ("250ms", Duration::from_millis(250)),
    ] {
        assert_eq!(duration(text), Ok(expected), "{text:?}");
    }
    for bad in ["", "soon", "-5", "1.2.3", ".", "15 parsecs", "1e400"] {
        assert!(duration(bad).is_err(), "{bad:?} was accepted");
    }

    let parse = |args: &[&str]| {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {}", e.render()))
    };
    let bootstrap = ["--kafka-bootstrap-servers", "127.0.0.1:1"];
    let cli = parse(
        &[
            &["allocation-worker", "simulate", "--duration", "15"][..],
            &bootstrap,
        ]
        .concat(),
    );
    let CommandLine::Simulate(simulate) = cli.command else {
        panic!("not simulate")
    };
    assert_eq!(simulate.duration, Duration::from_secs(15));
    assert_eq!(simulate.summary.until_idle, None);

    let cli = parse(
        &[
            &[
                "allocation-worker",
                "watch",
                "--interval",
                "2",
                "--exit-after",
                "30",
                "--until-idle",
                "4",
            ][..],
            &bootstrap,
        ]
        .concat(),
    );
    let CommandLine::Watch(watch) = cli.command else {
        panic!("not watch")
    };
    assert_eq!(
        (
            watch.summary.interval,
            watch.summary.exit_after,
            watch.summary.until_idle
        ),
        (
            Duration::from_secs(2),
            Some(Duration::from_secs(30)),
            Some(Duration::from_secs(4))
        )
    );

    let cli = parse(&[
        "allocation-worker",
        "run",
        "--database-url",
        "postgres://u:p@127.0.0.1:1/db",
        "--kafka-bootstrap-servers",
        "127.0.0.1:1",
        "--unknown-reference-timeout",
        "45",
        "--shutdown-timeout",
        "20",
    ]);
    let CommandLine::Run(run) = cli.command else {
        panic!("not run")
    };
    assert_eq!(
        (run.unknown_reference_timeout, run.shutdown_timeout),
        (Duration::from_secs(45), Duration::from_secs(20))
    );
}

#[test]
fn a_bad_duration_is_a_setting_error() {
    assert_config_error(
        &worker(&["simulate", "--duration", "soon"], &[KAFKA]),
        "--duration",
    );
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("SHUTDOWN_TIMEOUT", "-3")]),
        "--shutdown-timeout",
    );
}
