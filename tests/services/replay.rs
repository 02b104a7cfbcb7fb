//! `allocation-worker replay-dead-letters` (README "Operating it"): the real
//! binary against the real broker and database.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure).

use std::process::{Output, Stdio};
use std::time::Duration;
use testkit::{check, check_eq};

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use testkit::kafka::read_to_end;
use testkit::{http_get, random_hex, sample, unique, Record, TestEnv, DEADLINE};

// ------------------------------------------------------------------ helpers

/// Runs `allocation-worker replay-dead-letters ARGS` against the test's broker
/// and dead-letter topic; fails if it does not exit within a minute.
async fn replay(env: &TestEnv, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_allocation-worker"));
    command
        .arg("replay-dead-letters")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KAFKA_BOOTSTRAP_SERVERS", &env.bootstrap_servers)
        .env("TOPIC_DEAD_LETTER", &env.topics.dead_letter)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn replay-dead-letters");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("replay-dead-letters {args:?} did not exit within 60s"))
        .expect("replay-dead-letters output");
    env.note(&format!(
        "replay-dead-letters {args:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ));
    output
}

/// Stdout of a successful run, as lines.
fn succeeded(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "replay-dead-letters failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The listed letters' positions (`topic/partition/offset`), in order.
fn listed(lines: &[String], dead_letter_topic: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("{dead_letter_topic}/")))
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// Everything on `topic` now (see [`read_to_end`]).
async fn read_all(env: &TestEnv, topic: &str) -> Vec<Record> {
    let bootstrap = env.bootstrap_servers.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_to_end(&bootstrap, &topic))
        .await
        .expect("reader thread")
}

// -------------------------------------------------------------------- tests

/// A line dead-lettered as unknown-sku, its product created later: the dry
/// run lists it and sends nothing; the replay allocates it once; a second
/// replay of the same letter is recognised by its `ce_id` and applies nothing.
#[tokio::test]
async fn an_unknown_sku_letter_replayed_after_its_product_exists_is_allocated_once() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_with(&[("UNKNOWN_REFERENCE_TIMEOUT", "1s")]);
    let (ar, dlq) = (
        env.topics.allocation_required.clone(),
        env.topics.dead_letter.clone(),
    );

    let sku = unique("sku");
    let orderid = unique("order");
    let traceparent = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    let erp_ce_id = unique("erp");
    env.allocation_required(
        &orderid,
        &sku,
        3,
        &[("ce_id", &erp_ce_id), ("traceparent", &traceparent)],
    )
    .await;
    // Another letter, of another reason, that --reason leaves alone.
    env.produce_raw(&env.topics.batch_created, Some(&sku), b"{not json", &[])
        .await;
    let letters = env
        .wait_for_count("both dead letters", &dlq, 2, DEADLINE, |_| true)
        .await;
    let letter = letters
        .iter()
        .find(|r| r.header("dlq.reason").as_deref() == Some("unknown-sku"))
        .unwrap_or_else(|| panic!("no unknown-sku letter among {letters:?}"));
    let position = format!("{dlq}/{}/{}", letter.partition, letter.offset);

    // The dry run lists the one letter and sends nothing.
    let lines = succeeded(&replay(&env, &["--reason", "unknown-sku", "--dry-run"]).await);
    check_eq!(
        env,
        listed(&lines, &dlq),
        vec![position.clone()],
        "listed: {lines:?}"
    );
    let line = &lines[0];
    for part in ["unknown-sku", &format!("{ar}/"), &sku] {
        check!(
            env,
            line.contains(part),
            "{part:?} not in the listed line {line:?}"
        );
    }
    check!(
        env,
        lines.last().is_some_and(|l| l.ends_with("sent 0")),
        "last line of the dry run: {lines:?}"
    );
    let inbound = read_all(&env, &ar).await;
    check_eq!(
        env,
        inbound.len(),
        1,
        "the dry run sent something: {inbound:?}"
    );

    // The product arrives; the replay allocates the line.
    let batch = unique("batch");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    let lines = succeeded(&replay(&env, &["--reason", "unknown-sku"]).await);
    check_eq!(
        env,
        listed(&lines, &dlq),
        vec![position.clone()],
        "{lines:?}"
    );
    check!(
        env,
        lines.last().is_some_and(|l| l.starts_with("sent 1 of 1 ")),
        "last line: {lines:?}"
    );
    env.wait_for_count(
        "the replayed line allocated",
        &env.topics.allocated,
        1,
        DEADLINE,
        |r| r.field("orderid") == orderid,
    )
    .await;

    // Replayed again: recognised as handled, applied nothing.
    let lines = succeeded(&replay(&env, &["--reason", "unknown-sku"]).await);
    check!(
        env,
        lines.last().is_some_and(|l| l.starts_with("sent 1 of 1 ")),
        "last line: {lines:?}"
    );
    let (topic, addr) = (ar.clone(), worker.http_addr);
    env.eventually("the second replay counted as a duplicate", DEADLINE, || {
        let topic = topic.clone();
        async move {
            let text = http_get(addr, "/metrics")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default();
            let labels = format!(r#"outcome="duplicate",topic="{topic}""#);
            match sample(&text, "allocation_messages_consumed_total", &labels) {
                Some(n) if n >= 1.0 => Ok(Some(())),
                _ => Err(text
                    .lines()
                    .filter(|l| l.starts_with("allocation_messages_consumed_total"))
                    .collect::<Vec<_>>()
                    .join("; ")),
            }
        }
    })
    .await;
    let allocated: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE kind = 'Allocated'")
        .fetch_one(&env.db)
        .await
        .expect("count Allocated rows");
    check_eq!(env, allocated, 1, "Allocated events decided");
    let view: Vec<(String, String)> =
        sqlx::query_as("SELECT sku, batchref FROM allocations_view WHERE orderid = $1")
            .bind(&orderid)
            .fetch_all(&env.db)
            .await
            .expect("query allocations_view");
    check_eq!(env, view, vec![(sku.clone(), batch.clone())], "read model");

    // What went back to the ERP topic: the original, then the same replay
    // twice, without dlq.* headers, with one ce_id and the letter's position.
    let inbound = read_all(&env, &ar).await;
    check_eq!(env, inbound.len(), 3, "records on {ar}: {inbound:?}");
    let replays: Vec<&Record> = inbound
        .iter()
        .filter(|r| r.header("replayed-from").is_some())
        .collect();
    check_eq!(env, replays.len(), 2, "replays on {ar}: {inbound:?}");
    let original = inbound
        .iter()
        .find(|r| r.header("replayed-from").is_none())
        .expect("the original message");
    for r in &replays {
        check_eq!(
            env,
            r.header("replayed-from"),
            Some(position.clone()),
            "{r:?}"
        );
        check_eq!(env, &r.key, &original.key, "key of {r:?}");
        check_eq!(env, &r.value, &original.value, "value of {r:?}");
        check_eq!(env, r.partition, original.partition, "partition of {r:?}");
        check_eq!(
            env,
            r.header("traceparent"),
            Some(traceparent.clone()),
            "{r:?}"
        );
        check!(
            env,
            r.headers.iter().all(|(n, _)| !n.starts_with("dlq.")),
            "dlq headers left on {r:?}"
        );
        check_eq!(
            env,
            r.headers.iter().filter(|(n, _)| n == "ce_id").count(),
            1,
            "{r:?}"
        );
    }
    check_eq!(
        env,
        replays[0].header("ce_id"),
        replays[1].header("ce_id"),
        "one ce_id"
    );
    check!(
        env,
        replays[0].header("ce_id") != Some(erp_ce_id.clone()),
        "the replay kept the ce_id already recorded as handled: {:?}",
        replays[0]
    );

    drop(worker);
    env.finish().await;
}

/// Letters made by hand on the dead-letter topic, with known timestamps:
/// `--topic`, `--since` and `--until` select among them, and only what is
/// selected is sent.
#[tokio::test]
async fn selects_letters_by_original_topic_and_time() {
    let env = TestEnv::new().await;
    let dlq = env.topics.dead_letter.clone();
    let (bc, ar) = (
        env.topics.batch_created.clone(),
        env.topics.allocation_required.clone(),
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .set("acks", "all")
        .create()
        .expect("producer");
    let at = |text: &str| -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("a time")
            .with_timezone(&Utc)
    };
    // (original topic, dead-lettered at); all in partition 0, in this order.
    let letters = [
        (&bc, at("2026-01-01T10:00:00Z")),
        (&ar, at("2026-01-02T10:00:00Z")),
        (&bc, at("2026-01-03T10:00:00Z")),
    ];
    let mut positions = Vec::new();
    for (n, (topic, time)) in letters.iter().enumerate() {
        let n = n.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "dlq.reason",
                value: Some("malformed-json"),
            })
            .insert(Header {
                key: "dlq.error",
                value: Some("expected value"),
            })
            .insert(Header {
                key: "dlq.original.topic",
                value: Some(topic.as_str()),
            })
            .insert(Header {
                key: "dlq.original.partition",
                value: Some("0"),
            })
            .insert(Header {
                key: "dlq.original.offset",
                value: Some(&n),
            })
            .insert(Header {
                key: "n",
                value: Some(&n),
            });
        let record = FutureRecord::to(&dlq)
            .partition(0)
            .key("k")
            .payload("{}")
            .timestamp(time.timestamp_millis())
            .headers(headers);
        let delivered = producer
            .send(record, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing a letter: {e}"));
        positions.push(format!(
            "{dlq}/{}/{}",
            delivered.partition, delivered.offset
        ));
    }
    let select = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            listed(
                &succeeded(&replay(env, args).await),
                &env.topics.dead_letter,
            )
        }
    };

    check_eq!(env, select(&["--dry-run"]).await, positions, "no filter");
    let by_topic = ["--dry-run", "--topic", bc.as_str()];
    let lines = succeeded(&replay(&env, &by_topic).await);
    check_eq!(
        env,
        listed(&lines, &dlq),
        vec![positions[0].clone(), positions[2].clone()],
        "--topic {bc}"
    );
    check_eq!(
        env,
        select(&["--dry-run", "--since", "2026-01-02"]).await,
        positions[1..].to_vec(),
        "--since a date"
    );
    check_eq!(
        env,
        select(&["--dry-run", "--until", "2026-01-02T10:00:00Z"]).await,
        positions[..1].to_vec(),
        "--until is exclusive"
    );
    check_eq!(
        env,
        select(&[
            "--dry-run",
            "--since",
            "2026-01-02T10:00:00Z",
            "--until",
            "2026-01-03"
        ])
        .await,
        positions[1..2].to_vec(),
        "--since is inclusive"
    );
    check_eq!(
        env,
        select(&["--dry-run", "--reason", "unknown-batch"]).await,
        Vec::<String>::new(),
        "--reason"
    );

    // Sent for real: only the letters selected reach their topics.
    let args = ["--topic", bc.as_str(), "--since", "2026-01-02"];
    let lines = succeeded(&replay(&env, &args).await);
    check!(
        env,
        lines.last().is_some_and(|l| l.starts_with("sent 1 of 1 ")),
        "{lines:?}"
    );
    let on_bc = read_all(&env, &bc).await;
    let on_ar = read_all(&env, &ar).await;
    check_eq!(env, on_ar.len(), 0, "nothing for {ar}: {on_ar:?}");
    check_eq!(env, on_bc.len(), 1, "one replay on {bc}: {on_bc:?}");
    check_eq!(
        env,
        on_bc[0].header("n").as_deref(),
        Some("2"),
        "{:?}",
        on_bc[0]
    );
    check_eq!(
        env,
        on_bc[0].header("replayed-from"),
        Some(positions[2].clone()),
        "{:?}",
        on_bc[0]
    );
    check_eq!(env, on_bc[0].partition, 0, "back to its partition");
    check_eq!(env, on_bc[0].offset, 0, "{:?}", on_bc[0]);

    env.finish().await;
}

/// `allocation_messages_consumed_total` of `topic`, by outcome, as the
/// worker reports it now (0 for an outcome it does not report).
async fn consumed(addr: std::net::SocketAddr, topic: &str, outcome: &str) -> f64 {
    let text = http_get(addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let labels = format!(r#"outcome="{outcome}",topic="{topic}""#);
    sample(&text, "allocation_messages_consumed_total", &labels).unwrap_or(0.0)
}

/// Waits until the worker has finished `n` messages of `topic`, whatever
/// became of them.
async fn wait_consumed(env: &TestEnv, addr: std::net::SocketAddr, topic: &str, n: f64) {
    let topic = topic.to_owned();
    env.eventually(
        &format!("{n} messages of {topic} finished"),
        DEADLINE,
        || {
            let topic = topic.clone();
            async move {
                let mut done = 0.0;
                for outcome in ["applied", "duplicate", "dead_lettered", "superseded"] {
                    done += consumed(addr, &topic, outcome).await;
                }
                Ok::<_, String>((done >= n).then_some(()))
            }
        },
    )
    .await;
}

/// A dead letter made by hand, as the worker writes them.
fn letter_headers<'a>(
    reason: &'a str,
    topic: &'a str,
    partition: &'a str,
    offset: &'a str,
) -> [(&'a str, &'a str); 5] {
    [
        ("dlq.reason", reason),
        ("dlq.error", "made by the test"),
        ("dlq.original.topic", topic),
        ("dlq.original.partition", partition),
        ("dlq.original.offset", offset),
    ]
}

/// At-least-once publishing can put one dead letter in the dead-letter topic
/// twice. Both copies are replayed (nothing tells them apart but their
/// position); the message is applied once, the other copy recognised by the
/// `ce_id` derived from the original message.
#[tokio::test]
async fn a_letter_in_the_dead_letter_topic_twice_is_applied_once() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker();
    let (ar, dlq) = (
        env.topics.allocation_required.clone(),
        env.topics.dead_letter.clone(),
    );
    let (sku, batch, orderid) = (unique("sku"), unique("batch"), unique("order"));
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;

    // The same letter twice, of a message without a ce_id: its original
    // position identifies it.
    let value = serde_json::json!({"orderid": orderid, "sku": sku, "qty": 2}).to_string();
    let headers = letter_headers("unknown-sku", &ar, "0", "7");
    for _ in 0..2 {
        env.produce_raw(&dlq, Some(&sku), value.as_bytes(), &headers)
            .await;
    }
    let lines = succeeded(&replay(&env, &[]).await);
    check!(
        env,
        lines.last().is_some_and(|l| l.starts_with("sent 2 of 2 ")),
        "last line: {lines:?}"
    );
    wait_consumed(&env, worker.http_addr, &ar, 2.0).await;
    let applied = consumed(worker.http_addr, &ar, "applied").await;
    let duplicate = consumed(worker.http_addr, &ar, "duplicate").await;
    check_eq!(
        env,
        (applied, duplicate),
        (1.0, 1.0),
        "(applied, duplicate) of the two copies"
    );
    let replays = read_all(&env, &ar).await;
    check_eq!(env, replays.len(), 2, "{replays:?}");
    check_eq!(
        env,
        replays[0].header("ce_id"),
        replays[1].header("ce_id"),
        "one ce_id for both copies"
    );
    check_eq!(
        env,
        replays[0].header("replay.original-position"),
        Some(format!("{ar}/0/7")),
        "{:?}",
        replays[0]
    );

    drop(worker);
    env.finish().await;
}

/// A quantity change dead-lettered (its batch came late), then a later
/// change applied: replaying the first must not overwrite the second. The
/// replay is recognised as older than the change applied since, by the
/// position it was first read at, and counted as superseded.
#[tokio::test]
async fn a_replayed_quantity_change_never_overwrites_a_later_one() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_with(&[("UNKNOWN_REFERENCE_TIMEOUT", "1s")]);
    let (bqc, dlq) = (
        env.topics.batch_quantity_changed.clone(),
        env.topics.dead_letter.clone(),
    );
    let (sku, batch) = (unique("sku"), unique("batch"));
    // Keyed by batch like the ERP: every change lands on one partition.
    let change = |qty: i64| serde_json::json!({"ref": batch, "qty": qty}).to_string();
    let first = env
        .produce_raw(&bqc, Some(&batch), change(50).as_bytes(), &[])
        .await;
    env.wait_for_count("the change to 50 dead-lettered", &dlq, 1, DEADLINE, |r| {
        r.header("dlq.reason").as_deref() == Some("unknown-batch")
    })
    .await;
    env.batch_created(&batch, &sku, 100, None).await;
    env.wait_purchased(&batch, 100, DEADLINE).await;
    let second = env
        .produce_raw(&bqc, Some(&batch), change(30).as_bytes(), &[])
        .await;
    check_eq!(env, first.partition, second.partition, "one partition");
    env.wait_purchased(&batch, 30, DEADLINE).await;

    let lines = succeeded(&replay(&env, &["--reason", "unknown-batch"]).await);
    check!(
        env,
        lines.last().is_some_and(|l| l.starts_with("sent 1 of 1 ")),
        "last line: {lines:?}"
    );
    // The dead letter, the change to 30, and the replay.
    wait_consumed(&env, worker.http_addr, &bqc, 3.0).await;
    check_eq!(
        env,
        env.purchased(&batch).await,
        Some(30),
        "the later change stands"
    );
    check_eq!(
        env,
        consumed(worker.http_addr, &bqc, "superseded").await,
        1.0,
        "the replay counted as superseded"
    );

    // Replayed again: recognised by its ce_id, applied nothing either.
    succeeded(&replay(&env, &["--reason", "unknown-batch"]).await);
    wait_consumed(&env, worker.http_addr, &bqc, 4.0).await;
    check_eq!(
        env,
        env.purchased(&batch).await,
        Some(30),
        "after two replays"
    );

    drop(worker);
    env.finish().await;
}

/// A bad setting is one line naming it, exit code 2, before anything is read.
#[test]
fn bad_settings_are_one_line_and_exit_2() {
    for (args, needle) in [
        (&["--reason", "unknown-thing"][..], "--reason"),
        (&["--since", "last tuesday"][..], "--since"),
        (&["--until", "2026-13-01"][..], "--until"),
        (
            &["--since", "2026-01-02", "--until", "2026-01-01"][..],
            "--since",
        ),
        (&["--topic", "no spaces"][..], "--topic"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_allocation-worker"))
            .arg("replay-dead-letters")
            .args(args)
            .env_clear()
            .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {stderr}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: {needle} not named in {stderr}"
        );
    }
}
