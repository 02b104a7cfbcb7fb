//! The binary's command line (contract §7): a bad or missing setting stops it with
//! one line naming the setting and exit code 2, before it touches anything.

use std::process::Output;
use std::time::Duration;

use testkit::binary::{assert_config_error, run_binary};

/// Runs the binary with exactly `env`; a setting that was wrongly accepted
/// makes the worker run on, so it is stopped after 20 s.
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_binary(args, env, Duration::from_secs(20))
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
        ("TRANSACTION_TIMEOUT", "--transaction-timeout"),
        ("PARTITION_STALL_TIMEOUT", "--partition-stall-timeout"),
    ] {
        assert_config_error(&worker(&["run"], &[DB, KAFKA, (name, "a week")]), flag);
        // Zero would delete every record at once, fail every probe, or
        // give up every transaction.
        assert_config_error(&worker(&["run"], &[DB, KAFKA, (name, "0s")]), name);
    }
}

#[test]
fn the_read_model_settings_are_checked() {
    assert_config_error(
        &worker(
            &["run"],
            &[DB, KAFKA, ("READ_MODEL_ADDR", "not an address")],
        ),
        "--read-model-addr",
    );
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("READ_MODEL_MAX_CONNECTIONS", "0")]),
        "--read-model-max-connections",
    );
}

#[test]
fn the_product_cache_bound_is_checked() {
    for bad in ["0", "16385", "lots", "-1"] {
        assert_config_error(
            &worker(&["run"], &[DB, KAFKA, ("PRODUCT_CACHE_MIB", bad)]),
            "--product-cache-mib",
        );
    }
}

#[test]
fn rewind_offsets_refuses_a_group_id_among_the_properties() {
    // It would rewind another group than KAFKA_GROUP_ID names.
    assert_config_error(
        &worker(
            &["rewind-offsets"],
            &[DB, KAFKA, ("KAFKA_PROPERTIES", "group.id=someone-else")],
        ),
        "group.id",
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

/// Flags and environment variables of one invocation.
type Given = (Vec<String>, Vec<(String, String)>);

/// Each way of passing librdkafka properties: the list variable (one line,
/// or one property a line), a variable per property, and the flag.
fn property_ways(name: &str, value: &str) -> Vec<Given> {
    let variable = format!(
        "KAFKA_PROPERTY_{}",
        name.to_ascii_uppercase().replace('.', "_")
    );
    vec![
        (
            vec![],
            vec![("KAFKA_PROPERTIES".into(), format!("{name}={value}"))],
        ),
        (
            vec![],
            vec![(
                "KAFKA_PROPERTIES".into(),
                format!("session.timeout.ms=6000\n{name}={value}\n"),
            )],
        ),
        (vec![], vec![(variable, value.into())]),
        (
            vec!["--kafka-property".into(), format!("{name}={value}")],
            vec![],
        ),
        (
            vec![],
            vec![("KAFKA_PROPERTIES_FILE".into(), properties_file(name, value))],
        ),
    ]
}

/// A KAFKA_PROPERTIES_FILE holding `name=value`, as a mounted Secret would.
fn properties_file(name: &str, value: &str) -> String {
    let path =
        std::env::temp_dir().join(format!("aw-cli-{}-{name}.properties", std::process::id()));
    std::fs::write(&path, format!("# mounted secret\n{name}={value}\n"))
        .expect("write a properties file in the temporary directory");
    path.to_string_lossy().into_owned()
}

fn run_with(flags: &[String], vars: &[(String, String)]) -> Output {
    let mut args = vec!["run"];
    args.extend(flags.iter().map(String::as_str));
    let mut env = vec![DB, KAFKA];
    env.extend(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = worker(&args, &env);
    // The file made for this invocation (properties_file), read by now:
    // left behind, every run of the suite added a dozen to the temporary
    // directory.
    for (name, path) in vars {
        if name == "KAFKA_PROPERTIES_FILE" && path.contains("aw-cli-") {
            let _ = std::fs::remove_file(path);
        }
    }
    out
}

#[test]
fn the_properties_the_guarantees_rest_on_are_refused_however_given() {
    let refused = [
        ("enable.auto.offset.store", "true"),
        ("enable.auto.commit", "false"),
        ("auto.commit.enable", "false"),
        ("auto.commit.interval.ms", "0"),
        ("group.id", "another-group"),
        ("auto.offset.reset", "latest"),
        ("offset.store.method", "file"),
        ("enable.partition.eof", "true"),
        ("statistics.interval.ms", "0"),
        ("enable.idempotence", "false"),
        ("acks", "1"),
        ("request.required.acks", "0"),
    ];
    for (name, value) in refused {
        for (flags, vars) in property_ways(name, value) {
            let out = run_with(&flags, &vars);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_config_error(&out, &format!("{name} must"));
            assert!(stderr.contains("refused"), "{stderr}");
        }
    }
}

/// A value with commas reaches librdkafka whole, however it is given: the
/// property after it is the one librdkafka refuses (so the value with
/// commas was taken), and a bad flag inside the value is reported by
/// librdkafka against `debug`, not by the worker as a broken KEY=VALUE.
#[test]
fn values_with_commas_reach_librdkafka_whole() {
    let s = |v: &str| v.to_owned();
    let accepted_then_unknown: [Given; 3] = [
        (
            vec![],
            vec![(
                s("KAFKA_PROPERTIES"),
                s("# debug contexts, comma-separated\ndebug=broker,topic\nno.such.property=1"),
            )],
        ),
        (
            vec![],
            vec![
                (s("KAFKA_PROPERTY_DEBUG"), s("broker,topic")),
                (s("KAFKA_PROPERTY_NO_SUCH_PROPERTY"), s("1")),
            ],
        ),
        (
            vec![
                s("--kafka-property"),
                s("debug=broker,topic"),
                s("--kafka-property"),
                s("no.such.property=1"),
            ],
            vec![],
        ),
    ];
    for (flags, vars) in accepted_then_unknown {
        assert_config_error(&run_with(&flags, &vars), "no.such.property");
    }
    for (flags, vars) in property_ways("debug", "broker,no-such-context") {
        if vars
            .iter()
            .any(|(k, v)| k == "KAFKA_PROPERTIES" && !v.contains('\n'))
        {
            continue; // one line: comma-separated, as before
        }
        let out = run_with(&flags, &vars);
        assert_config_error(&out, "\"debug\"");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"),
            "the value was split"
        );
    }
}

#[test]
fn the_worker_s_own_values_of_guarded_properties_are_accepted() {
    // Accepted, then the unknown property after them stops the worker.
    let out = run_with(
        &[],
        &[(
            "KAFKA_PROPERTIES".into(),
            "enable.auto.offset.store=false,enable.auto.commit=true,auto.offset.reset=smallest,\
             acks=all,enable.idempotence=true,no.such.property=1"
                .into(),
        )],
    );
    assert_config_error(&out, "no.such.property");
}

#[test]
fn help_lists_every_command() {
    let out = worker(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("migrate"), "{help}");
    assert!(help.contains("outbox-quarantine"), "{help}");
}

/// The binary allocates with jemalloc, set to give freed pages back at once
/// and to keep one arena (src/main.rs): what bounds the worker's RSS after a
/// burst (BENCHMARKS.md, "The allocator"). jemalloc prints its settings at
/// exit when `MALLOC_CONF` asks for its statistics (only the general part,
/// which lists them); the C library's malloc prints nothing.
#[test]
fn the_binary_allocates_with_jemalloc_set_to_return_freed_pages_at_once() {
    let out = worker(
        &["--help"],
        &[("MALLOC_CONF", "stats_print:true,stats_print_opts:mdablxe")],
    );
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    for setting in [
        "opt.narenas: 1\n",
        "opt.dirty_decay_ms: 0 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(stats.contains(setting), "no {setting:?} in:\n{stats}");
    }
}

/// Every duration setting reads a bare number as seconds, as the README's
/// "`--duration 15`" does, and still takes humantime strings (the tools'
/// `simulate` and `watch` flags: tools/tests/simulate.rs).
#[test]
fn durations_are_seconds_when_bare_and_humantime_otherwise() {
    use allocation_worker::configuration::duration;
    use allocation_worker::entrypoints::cli::{Cli, CommandLine};
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
        "--idempotency-retention",
        "1209600",
        "--outbox-retention",
        "3600",
        "--health-poll-timeout",
        "90",
    ]);
    let CommandLine::Run(run) = cli.command else {
        panic!("not run")
    };
    assert_eq!(
        (
            run.unknown_reference_timeout,
            run.shutdown_timeout,
            run.idempotency_retention,
            run.outbox_retention,
            run.health_poll_timeout
        ),
        (
            Duration::from_secs(45),
            Duration::from_secs(20),
            Duration::from_secs(14 * 86_400),
            Duration::from_secs(3600),
            Duration::from_secs(90)
        )
    );
}

#[test]
fn a_bad_duration_is_a_setting_error() {
    assert_config_error(
        &worker(&["run"], &[DB, KAFKA, ("SHUTDOWN_TIMEOUT", "-3")]),
        "--shutdown-timeout",
    );
}

/// Issue 22 finding 8: `IDEMPOTENCY_RETENTION` not longer than what the
/// inbound topics can redeliver (their `retention.ms` plus `segment.ms`,
/// read from the broker) is refused at start: one line naming it, exit 2.
/// Topics of 1 h retention and 1 h segments redeliver for up to 2 h.
#[tokio::test]
async fn idempotency_retention_not_longer_than_the_topics_can_redeliver_is_refused() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let bootstrap = testkit::containers::shared_bootstrap_servers();
    let suffix = testkit::random_hex(10);
    let names: Vec<String> = [
        "erp.batch-created",
        "erp.batch-quantity-changed",
        "erp.allocation-required",
    ]
    .iter()
    .map(|t| format!("{t}.{suffix}"))
    .collect();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| {
            NewTopic::new(t, 1, TopicReplication::Fixed(1))
                .set("retention.ms", "3600000")
                .set("segment.ms", "3600000")
        })
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(20)));
    for created in admin
        .create_topics(&topics, &options)
        .await
        .expect("create topics")
    {
        created.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
    let vars = |retention: &'static str| {
        vec![
            DB,
            ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
            ("TOPIC_BATCH_CREATED", names[0].as_str()),
            ("TOPIC_BATCH_QUANTITY_CHANGED", names[1].as_str()),
            ("TOPIC_ALLOCATION_REQUIRED", names[2].as_str()),
            ("IDEMPOTENCY_RETENTION", retention),
            ("RUST_LOG", "warn"),
        ]
    };
    // Nothing else runs on this test's runtime: the binary is waited for
    // in place.
    let output = worker(&["run"], &vars("2h"));
    assert_config_error(&output, "IDEMPOTENCY_RETENTION");
}
