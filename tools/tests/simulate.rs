//! `allocation-tools simulate` and `watch`: the generated stream is
//! deterministic, decodes as the ERP's messages (but for the deliberately
//! malformed ones) and hangs together; and, against the real broker at
//! KAFKA_BOOTSTRAP_SERVERS, the binary publishes exactly that stream, and the
//! summary's totals are what is on the topics, in its stable line format.
//! Only the tools' binary runs here, never the worker's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;

use allocation_worker::adapters::inbound::{decode, InboundKind};
use allocation_worker::domain::{
    BatchRef, Command as DomainCommand, Event, OrderLine, Product, Sku,
};

use allocation_tools::cli::{parse_malformed, MalformedArg};
use allocation_tools::generator::{GeneratedMessage, Malformed, Workload, WorkloadSettings};
use allocation_tools::watch::{parse_gauges, plain_line, Gauges, Totals};

use testkit::binary::{assert_config_error, output_within, spawn_program};
use testkit::kafka::{create_topics, read_to_end};
use testkit::random_hex;

fn stream(settings: WorkloadSettings, n: usize) -> Vec<GeneratedMessage> {
    Workload::new(settings).take(n).collect()
}

fn json(m: &GeneratedMessage) -> Value {
    serde_json::from_slice(&m.value).unwrap_or(Value::Null)
}

fn field(m: &GeneratedMessage, name: &str) -> String {
    json(m)[name].as_str().unwrap_or_default().to_owned()
}

// ------------------------------------------------------------- the stream

#[test]
fn the_same_seed_gives_the_same_stream_and_another_seed_another() {
    let a = stream(WorkloadSettings::steady(42, 20), 3_000);
    let b = stream(WorkloadSettings::steady(42, 20), 3_000);
    assert_eq!(a, b);
    let c = stream(WorkloadSettings::steady(43, 20), 3_000);
    assert_eq!(a.len(), c.len());
    assert!(a.iter().zip(&c).all(|(a, c)| a.ce_id != c.ce_id));
    let a_values: HashSet<_> = a.iter().map(|m| &m.value).collect();
    assert!(
        c.iter().all(|m| !a_values.contains(&m.value)),
        "another seed names other products, batches and orders"
    );
    let ids: HashSet<_> = a.iter().map(|m| &m.ce_id).collect();
    assert_eq!(ids.len(), a.len(), "ce_id is unique within a stream");
    assert!(a.iter().enumerate().all(|(i, m)| m.seq == i as u64));
    // Same settings and malformed messages too.
    let mut s = WorkloadSettings::steady(7, 5);
    s.malformed = Malformed::Fraction(0.05);
    assert_eq!(stream(s.clone(), 2_000), stream(s, 2_000));
}

#[test]
fn messages_decode_and_are_keyed_as_the_erp_does() {
    let mut settings = WorkloadSettings::steady(42, 20);
    settings.malformed = Malformed::Fraction(0.02);
    let messages = stream(settings, 6_000);
    let mut kinds: HashMap<InboundKind, usize> = HashMap::new();
    let (mut malformed, mut warehouse, mut dated) = (0, 0, 0);
    for m in &messages {
        let decoded = decode(m.topic_kind, Some(&m.value));
        if m.malformed {
            malformed += 1;
            assert!(decoded.is_err(), "meant to be malformed: {m:?}");
            continue;
        }
        let command = decoded.unwrap_or_else(|e| {
            panic!(
                "{e}: {:?} {}",
                m.topic_kind,
                String::from_utf8_lossy(&m.value)
            )
        });
        *kinds.entry(m.topic_kind).or_default() += 1;
        match command {
            DomainCommand::CreateBatch(c) => {
                assert_eq!(m.topic_kind, InboundKind::BatchCreated);
                assert_eq!(m.key, c.sku.as_str(), "keyed by SKU");
                if c.eta.is_some() {
                    dated += 1;
                } else {
                    warehouse += 1;
                }
            }
            DomainCommand::ChangeBatchQuantity(c) => {
                assert_eq!(m.topic_kind, InboundKind::BatchQuantityChanged);
                assert_eq!(m.key, c.reference.as_str(), "keyed by batch ref");
            }
            DomainCommand::Allocate(c) => {
                assert_eq!(m.topic_kind, InboundKind::AllocationRequired);
                assert_eq!(m.key, c.sku.as_str(), "keyed by SKU");
            }
        }
    }
    assert_eq!(warehouse, 20, "one warehouse batch per SKU");
    assert!(dated >= 40, "dated shipments and restocks: {dated}");
    assert!(kinds[&InboundKind::BatchQuantityChanged] > 50, "{kinds:?}");
    assert!(kinds[&InboundKind::AllocationRequired] > 5_000, "{kinds:?}");
    assert!((60..=180).contains(&malformed), "about 2%: {malformed}");
}

#[test]
fn the_stream_hangs_together() {
    let messages = stream(WorkloadSettings::steady(9, 20), 10_000);
    // Stock first: 20 SKUs × 3 batches.
    assert!(messages[..60]
        .iter()
        .all(|m| m.topic_kind == InboundKind::BatchCreated));
    let mut skus = HashSet::new();
    let mut batches = HashSet::new();
    let mut lines = HashSet::new();
    let mut demand: BTreeMap<String, u64> = BTreeMap::new();
    for m in &messages {
        match m.topic_kind {
            InboundKind::BatchCreated => {
                skus.insert(field(m, "sku"));
                assert!(batches.insert(field(m, "ref")), "batch refs are unique");
            }
            InboundKind::BatchQuantityChanged => {
                assert!(batches.contains(&field(m, "ref")), "a known batch: {m:?}");
            }
            InboundKind::AllocationRequired => {
                let sku = field(m, "sku");
                assert!(skus.contains(&sku), "a known SKU: {m:?}");
                assert!(
                    lines.insert((field(m, "orderid"), sku.clone())),
                    "an order line is never repeated (no duplicate-line)"
                );
                *demand.entry(sku).or_default() += json(m)["qty"].as_u64().unwrap();
            }
        }
    }
    // Some SKUs are much more popular than others (they run out of stock).
    let most = demand.values().max().unwrap();
    let least = demand.values().min().unwrap();
    assert!(most > &(least * 5), "popularity is skewed: {demand:?}");
    // Orders of several lines exist.
    let mut per_order: HashMap<String, usize> = HashMap::new();
    for (orderid, _) in &lines {
        *per_order.entry(orderid.clone()).or_default() += 1;
    }
    assert!(per_order.values().any(|&n| n >= 2));
}

/// Applies `messages` with the domain model as the worker's handlers do
/// (a freed line is allocated again at once) and counts the outbound events
/// by type.
fn decided_events(messages: &[GeneratedMessage]) -> BTreeMap<&'static str, u64> {
    let mut products: HashMap<Sku, Product> = HashMap::new();
    let mut product_of_batch: HashMap<BatchRef, Sku> = HashMap::new();
    let mut counts = BTreeMap::new();
    for m in messages {
        let Ok(command) = decode(m.topic_kind, Some(&m.value)) else {
            continue;
        };
        let product = match command {
            DomainCommand::CreateBatch(c) => {
                let product = products
                    .entry(c.sku.clone())
                    .or_insert_with(|| Product::new(c.sku.clone()));
                product_of_batch.insert(c.reference.clone(), c.sku.clone());
                product
                    .add_batch(c.reference, c.qty, c.eta)
                    .expect("no duplicate batch");
                product
            }
            DomainCommand::ChangeBatchQuantity(c) => {
                let product = products
                    .get_mut(&product_of_batch[&c.reference])
                    .expect("a known batch");
                product.change_batch_quantity(&c.reference, c.qty);
                product
            }
            DomainCommand::Allocate(c) => {
                let product = products.get_mut(&c.sku).expect("a known SKU");
                product
                    .allocate(OrderLine {
                        orderid: c.orderid,
                        sku: c.sku,
                        qty: c.qty,
                    })
                    .expect("no duplicate line");
                product
            }
        };
        let mut events: std::collections::VecDeque<Event> = product.take_events().into();
        while let Some(event) = events.pop_front() {
            *counts.entry(event.name()).or_default() += 1;
            if let Event::Deallocated(freed) = event {
                product
                    .allocate(OrderLine {
                        orderid: freed.orderid,
                        sku: freed.sku,
                        qty: freed.qty,
                    })
                    .expect("a freed line is not allocated");
                events.extend(product.take_events());
            }
        }
    }
    counts
}

/// A newcomer's first `allocation-tools simulate`, with every default,
/// shows all three outbound event types.
#[test]
fn the_default_minute_yields_allocated_deallocated_and_out_of_stock() {
    use allocation_tools::cli::{Cli, Command};
    use clap::Parser;

    let cli = Cli::try_parse_from([
        "allocation-tools",
        "simulate",
        "--kafka-bootstrap-servers",
        "127.0.0.1:1",
    ])
    .expect("the defaults parse");
    let Command::Simulate(args) = cli.command else {
        panic!("not simulate")
    };
    let settings = args.settings().expect("the defaults are valid");
    let total = settings.total.expect("the default run ends");
    assert_eq!(total, 3_000, "50 messages/s for 60 s");
    let messages: Vec<_> = Workload::new(settings.workload)
        .take(total as usize)
        .collect();
    let counts = decided_events(&messages);
    for event in ["Allocated", "Deallocated", "OutOfStock"] {
        assert!(
            counts.get(event).copied().unwrap_or(0) > 0,
            "no {event} in the default minute: {counts:?}"
        );
    }
    // Mostly allocations: out-of-stock is the exception a newcomer should
    // see, not the rule.
    assert!(
        counts["Allocated"] > 10 * counts["OutOfStock"],
        "{counts:?}"
    );

    // Not a lucky seed: any other `--seed` shows the three too.
    for seed in 1..=10 {
        let mut workload = WorkloadSettings::steady(seed, 20);
        workload.malformed = Malformed::None;
        let messages: Vec<_> = Workload::new(workload).take(total as usize).collect();
        let counts = decided_events(&messages);
        assert_eq!(counts.len(), 3, "seed {seed}: {counts:?}");
    }
}

#[test]
fn malformed_messages_come_on_top_of_the_same_stream() {
    let plain = WorkloadSettings::steady(5, 4);
    let mut with = plain.clone();
    with.malformed = Malformed::Count {
        count: 3,
        over: 100,
    };
    let a = stream(plain, 200);
    let b = stream(with, 203);
    assert_eq!(b.iter().filter(|m| m.malformed).count(), 3);
    assert!(
        b[..12].iter().all(|m| !m.malformed),
        "not in the stock phase"
    );
    let well_formed: Vec<_> = b
        .iter()
        .filter(|m| !m.malformed)
        .map(|m| &m.value)
        .collect();
    let a_values: Vec<_> = a.iter().map(|m| &m.value).collect();
    assert_eq!(
        well_formed, a_values,
        "the well-formed messages do not change"
    );
}

#[test]
fn the_benchmark_workload_is_stock_then_allocations_then_quantity_changes() {
    let messages: Vec<_> = Workload::new(WorkloadSettings::benchmark(1, 50, 500, 40)).collect();
    assert_eq!(messages.len(), 150 + 500 + 40, "a finite stream");
    let kinds: Vec<_> = messages.iter().map(|m| m.topic_kind).collect();
    assert!(kinds[..150].iter().all(|k| *k == InboundKind::BatchCreated));
    assert!(kinds[150..650]
        .iter()
        .all(|k| *k == InboundKind::AllocationRequired));
    assert!(kinds[650..]
        .iter()
        .all(|k| *k == InboundKind::BatchQuantityChanged));
    assert!(messages
        .iter()
        .all(|m| decode(m.topic_kind, Some(&m.value)).is_ok()));
}

#[test]
fn flags_and_formats() {
    assert_eq!(parse_malformed("5"), Ok(MalformedArg::Count(5)));
    assert_eq!(parse_malformed("0.01"), Ok(MalformedArg::Fraction(0.01)));
    assert_eq!(parse_malformed("2%"), Ok(MalformedArg::Fraction(0.02)));
    assert!(parse_malformed("1.5").is_err());
    assert!(parse_malformed("-1").is_err());
    assert!(parse_malformed("some").is_err());

    let line = plain_line(
        Duration::from_millis(10_400),
        Totals {
            allocated: 123,
            deallocated: 4,
            out_of_stock: 2,
            dead_letters: 1,
        },
        [12.4, 0.4, 0.25, 0.0],
        Some(Gauges { lag: 5, backlog: 0 }),
        None,
    );
    assert_eq!(
        line,
        "t=10s allocated=123 (+12.4/s) deallocated=4 (+0.4/s) out_of_stock=2 (+0.2/s) \
         dead_letters=1 (+0.0/s) lag=5 backlog=0"
    );
    let line = plain_line(Duration::ZERO, Totals::default(), [0.0; 4], None, Some(9));
    assert!(line.ends_with(" lag=? backlog=? sent=9"), "{line}");

    let metrics = "# HELP allocation_consumer_lag_messages lag\n\
        # TYPE allocation_consumer_lag_messages gauge\n\
        allocation_consumer_lag_messages{partition=\"0\",topic=\"erp.a}b\"} 3\n\
        allocation_consumer_lag_messages{partition=\"1\",topic=\"erp.a\"} 4\n\
        allocation_consumer_lag_messages_other 100\n\
        allocation_outbox_backlog_events 2\n\
        allocation_outbox_backlog_events_total 99\n";
    assert_eq!(parse_gauges(metrics), Ok(Gauges { lag: 7, backlog: 2 }));
    assert!(parse_gauges("up 1\n").is_err());
}

/// The tools' durations read a bare number as seconds, as the README's
/// "`--duration 15`" does (the rule, `configuration::duration`, is the
/// worker's: tests/services/cli.rs).
#[test]
fn the_tools_durations_are_seconds_when_bare() {
    use allocation_tools::cli::{Cli, Command};
    use clap::Parser;

    let parse = |args: &[&str]| {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {}", e.render()))
    };
    let bootstrap = ["--kafka-bootstrap-servers", "127.0.0.1:1"];
    let cli = parse(
        &[
            &["allocation-tools", "simulate", "--duration", "15"][..],
            &bootstrap,
        ]
        .concat(),
    );
    let Command::Simulate(simulate) = cli.command else {
        panic!("not simulate")
    };
    assert_eq!(simulate.duration, Duration::from_secs(15));
    assert_eq!(simulate.summary.until_idle, None);

    let cli = parse(
        &[
            &[
                "allocation-tools",
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
    let Command::Watch(watch) = cli.command else {
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
}

// ------------------------------------------------------------- end to end

/// KAFKA_BOOTSTRAP_SERVERS, or a broker container of this test process.
fn bootstrap_servers() -> String {
    testkit::containers::shared_bootstrap_servers()
}

/// One record as read back: (topic, key, value, ce_id header).
type Seen = (String, String, Vec<u8>, Option<String>);

/// Everything on `topics` now, one reader thread per topic (see
/// [`read_to_end`]).
fn read_all(bootstrap: &str, topics: &[&str]) -> Vec<Seen> {
    std::thread::scope(|scope| {
        let readers: Vec<_> = topics
            .iter()
            .map(|topic| scope.spawn(move || read_to_end(bootstrap, topic)))
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().expect("reader thread"))
            .map(|r| {
                let (key, ce_id) = (r.key_str().unwrap_or_default(), r.ce_id());
                (r.topic, key, r.value.unwrap_or_default(), ce_id)
            })
            .collect()
    })
}

/// Runs `allocation-tools` with `args` and `env` (warnings only on stderr).
/// Cargo builds this package's binary before its integration tests; nothing
/// here runs the worker's.
fn spawn(args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    let mut vars: Vec<(&str, &str)> = vec![("RUST_LOG", "warn")];
    vars.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    spawn_program(
        std::path::Path::new(env!("CARGO_BIN_EXE_allocation-tools")),
        args,
        &vars,
    )
}

/// Its output once it ended by itself with success, within `limit`.
fn finish(child: std::process::Child, what: &str, limit: Duration) -> Output {
    let (out, ended) = output_within(child, limit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        ended,
        "{what} still running after {limit:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "{what} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    out
}

/// A summary line parsed strictly: totals, gauges (None for `?`) and `sent`.
#[derive(Debug, PartialEq)]
struct Line {
    t: u64,
    totals: [u64; 4],
    gauges: Option<(i64, i64)>,
    sent: Option<u64>,
}

fn parse_line(line: &str) -> Option<Line> {
    let tokens: Vec<&str> = line.split(' ').collect();
    if !(11..=12).contains(&tokens.len()) {
        return None;
    }
    let t = tokens[0]
        .strip_prefix("t=")?
        .strip_suffix('s')?
        .parse()
        .ok()?;
    let mut totals = [0; 4];
    let names = ["allocated", "deallocated", "out_of_stock", "dead_letters"];
    for (i, name) in names.iter().enumerate() {
        let value = tokens[1 + 2 * i].strip_prefix(name)?.strip_prefix('=')?;
        totals[i] = value.parse().ok()?;
        let rate = tokens[2 + 2 * i].strip_prefix("(+")?.strip_suffix("/s)")?;
        let (whole, decimal) = rate.split_once('.')?;
        if whole.parse::<u64>().is_err() || decimal.len() != 1 || decimal.parse::<u8>().is_err() {
            return None;
        }
    }
    let lag = tokens[9].strip_prefix("lag=")?;
    let backlog = tokens[10].strip_prefix("backlog=")?;
    let gauges = if lag == "?" && backlog == "?" {
        None
    } else {
        Some((lag.parse().ok()?, backlog.parse().ok()?))
    };
    let sent = match tokens.get(11) {
        Some(token) => Some(token.strip_prefix("sent=")?.parse().ok()?),
        None => None,
    };
    Some(Line {
        t,
        totals,
        gauges,
        sent,
    })
}

fn summary_lines(stdout: &[u8]) -> Vec<Line> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with("t="))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("not in the stable format: {l:?}")))
        .collect()
}

/// Serves a fixed /metrics page (chunked, as a streaming server would) for
/// ever, on a free port.
fn fake_metrics(page: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buffer = [0; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let (a, b) = page.split_at(page.len() / 2);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
                 {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
        }
    });
    port
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A bad setting stops the tools' binary as it stops the worker's: one
/// line naming it, exit code 2.
#[test]
fn a_bad_duration_is_a_setting_error() {
    let child = spawn(
        &["simulate", "--duration", "soon"],
        &[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1".into())],
    );
    let (output, _) = output_within(child, Duration::from_secs(20));
    assert_config_error(&output, "--duration");
}

#[test]
fn simulate_publishes_the_stream_and_watch_counts_what_is_on_the_topics() {
    let started = Instant::now();
    let bootstrap = bootstrap_servers();
    let suffix = random_hex(16);
    let names = [
        ("TOPIC_BATCH_CREATED", "erp.batch-created"),
        ("TOPIC_BATCH_QUANTITY_CHANGED", "erp.batch-quantity-changed"),
        ("TOPIC_ALLOCATION_REQUIRED", "erp.allocation-required"),
        ("TOPIC_ALLOCATED", "allocation.allocated"),
        ("TOPIC_DEALLOCATED", "allocation.deallocated"),
        ("TOPIC_OUT_OF_STOCK", "allocation.out-of-stock"),
        ("TOPIC_DEAD_LETTER", "allocation.dead-letter"),
    ];
    let topics: Vec<String> = names
        .iter()
        .map(|(_, t)| format!("{t}.sim-{suffix}"))
        .collect();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    futures::executor::block_on(create_topics(&bootstrap, &topic_refs));
    let mut env: Vec<(&str, String)> = names
        .iter()
        .zip(&topics)
        .map(|((var, _), topic)| (*var, topic.clone()))
        .collect();
    env.push(("KAFKA_BOOTSTRAP_SERVERS", bootstrap.clone()));

    // What the worker would have published: synthetic records, before
    // `simulate --watch` starts (it reads from the end: it must not count them).
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "1")
        .create()
        .expect("producer");
    for (topic, n) in topics[3..].iter().zip([11, 4, 3, 2]) {
        for i in 0..n {
            let key = format!("SKU-{i}");
            producer
                .send(BaseRecord::to(topic).key(&key).payload("{}"))
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
    }
    producer.flush(Duration::from_secs(20)).expect("flush");
    drop(producer);

    let metrics_port = fake_metrics(
        "# TYPE allocation_consumer_lag_messages gauge\n\
         allocation_consumer_lag_messages{partition=\"0\",topic=\"erp.batch-created\"} 5\n\
         allocation_consumer_lag_messages{partition=\"2\",topic=\"erp.allocation-required\"} 2\n\
         # TYPE allocation_outbox_backlog_events gauge\n\
         allocation_outbox_backlog_events 3\n",
    );
    let unreachable = format!("http://127.0.0.1:{}/metrics", closed_port());
    let simulate = spawn(
        &[
            "simulate",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--skus",
            "5",
            "--seed",
            "7",
            "--malformed",
            "3",
            "--watch",
            "--interval",
            "1s",
            "--until-idle",
            "1s",
            "--metrics-url",
            &unreachable,
        ],
        &env,
    );
    let fake_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let watch = spawn(
        &[
            "watch",
            "--from-beginning",
            "--interval",
            "1s",
            "--until-idle",
            "1s",
            "--metrics-url",
            &fake_url,
        ],
        &env,
    );
    let watch = finish(watch, "watch", Duration::from_secs(25));
    let simulate = finish(simulate, "simulate", Duration::from_secs(25));

    // The inbound topics hold exactly the generated stream.
    let mut settings = WorkloadSettings::steady(7, 5);
    settings.malformed = Malformed::Count {
        count: 3,
        over: 400 - 15,
    };
    let expected: Vec<Seen> = stream(settings, 400)
        .into_iter()
        .map(|m| {
            let topic = match m.topic_kind {
                InboundKind::BatchCreated => &topics[0],
                InboundKind::BatchQuantityChanged => &topics[1],
                InboundKind::AllocationRequired => &topics[2],
            };
            (topic.clone(), m.key, m.value, Some(m.ce_id))
        })
        .collect();
    let inbound = read_all(&bootstrap, &topic_refs[..3]);
    let mut on_topics = inbound.clone();
    let mut expected_sorted = expected.clone();
    on_topics.sort();
    expected_sorted.sort();
    assert!(
        on_topics == expected_sorted,
        "the inbound topics hold {} records, not the {} generated ones",
        on_topics.len(),
        expected.len()
    );
    // Per partition, in the order generated (one key, one partition).
    let by_key = |records: &[Seen]| {
        let mut map: BTreeMap<(String, String), Vec<Option<String>>> = BTreeMap::new();
        for (topic, key, _, ce_id) in records {
            map.entry((topic.clone(), key.clone()))
                .or_default()
                .push(ce_id.clone());
        }
        map
    };
    assert_eq!(by_key(&inbound), by_key(&expected));

    let simulate_out = String::from_utf8_lossy(&simulate.stdout);
    let simulate_err = String::from_utf8_lossy(&simulate.stderr);
    assert!(
        simulate_out
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("published 400 messages in "),
        "{simulate_out}"
    );
    assert!(
        simulate_out.contains("; 3 of them malformed"),
        "{simulate_out}"
    );
    let lines = summary_lines(&simulate.stdout);
    let last = lines.last().expect("summary lines");
    assert_eq!(
        (last.totals, last.gauges, last.sent),
        ([0; 4], None, Some(400)),
        "from the end: the earlier records are not counted; metrics unreachable\n{simulate_out}"
    );
    assert!(
        simulate_err.contains("cannot read http://127.0.0.1:"),
        "the unreachable /metrics is told: {simulate_err}"
    );

    // The summary's totals are what is on the topics.
    let outbound = read_all(&bootstrap, &topic_refs[3..]);
    let count = |t: &str| outbound.iter().filter(|r| r.0 == t).count() as u64;
    let on_topics = [
        count(&topics[3]),
        count(&topics[4]),
        count(&topics[5]),
        count(&topics[6]),
    ];
    assert_eq!(on_topics, [11, 4, 3, 2]);
    let watch_out = String::from_utf8_lossy(&watch.stdout);
    let lines = summary_lines(&watch.stdout);
    assert!(
        !lines.is_empty() && lines.len() == watch_out.lines().count(),
        "stdout holds summary lines only:\n{watch_out}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last.totals, on_topics, "{watch_out}");
    assert_eq!(last.gauges, Some((7, 3)), "lag summed over partitions");
    assert_eq!(last.sent, None);
    assert!(lines.windows(2).all(|w| w[0].t <= w[1].t));
    eprintln!("end to end in {:?}", started.elapsed());
}
