//! End-to-end tests: the real `allocation-worker` binary against PostgreSQL and
//! Kafka, driven only through Kafka topics (contract §3–§6), with assertions on
//! the outbound topics and the database rows.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`), or,
//! without their variables, a Docker engine (containers per test, see
//! tests/support/src/containers.rs).
//! Run with `cargo test --test services end_to_end:: -- --test-threads=2`.
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use testkit::{check, check_eq};

use serde_json::json;

use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::{
    distinct_ids, http_get, http_until, on, random_hex, sample, unique, Delivered, Record, TestEnv,
    DEADLINE,
};

// ------------------------------------------------------------------ helpers

/// A W3C `traceparent` with random ids.
fn traceparent() -> String {
    format!("00-{}-{}-01", random_hex(32), random_hex(16))
}

/// The CloudEvents Kafka binding (binary mode) of contract §4, and the key.
fn assert_cloudevent(env: &TestEnv, r: &Record, ce_type: &str, sku: &str) {
    check_eq!(
        env,
        r.key_str(),
        Some(sku.to_owned()),
        "key of {}",
        r.summary()
    );
    for name in [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "content-type",
    ] {
        check_eq!(
            env,
            r.header_count(name),
            1,
            "header {name} once in {}",
            r.summary()
        );
    }
    check_eq!(
        env,
        r.header("ce_specversion").as_deref(),
        Some("1.0"),
        "{}",
        r.summary()
    );
    check_eq!(
        env,
        r.header("ce_type").as_deref(),
        Some(ce_type),
        "{}",
        r.summary()
    );
    check_eq!(
        env,
        r.header("content-type").as_deref(),
        Some("application/json"),
        "{}",
        r.summary()
    );
    check!(
        env,
        r.header("ce_id").is_some_and(|v| !v.trim().is_empty()),
        "empty ce_id in {}",
        r.summary()
    );
    check!(
        env,
        r.header("ce_source").is_some_and(|v| !v.trim().is_empty()),
        "empty ce_source in {}",
        r.summary()
    );
    let time = r.header("ce_time").unwrap_or_default();
    check!(
        env,
        chrono::DateTime::parse_from_rfc3339(&time).is_ok(),
        "ce_time {time:?} is not RFC 3339 in {}",
        r.summary()
    );
}

async fn view_rows(env: &TestEnv, orderid: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT sku, batchref FROM allocations_view WHERE orderid = $1 ORDER BY sku")
        .bind(orderid)
        .fetch_all(&env.db)
        .await
        .expect("query allocations_view")
}

async fn outbox_count(env: &TestEnv, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE kind = $1")
        .bind(kind)
        .fetch_one(&env.db)
        .await
        .expect("query outbox")
}

// -------------------------------------------------------------------- tests

/// cosmicpython's `test_change_batch_quantity_leading_to_reallocation`.
#[tokio::test]
async fn allocates_and_reallocates_like_the_reference() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker();
    let sku = unique("sku");
    let (earlier, later) = (unique("batch-old"), unique("batch-newer"));
    let order = unique("order");

    env.batch_created(&earlier, &sku, 10, Some("2011-01-01"))
        .await;
    env.batch_created(&later, &sku, 10, Some("2011-01-02"))
        .await;
    let trace1 = traceparent();
    env.allocation_required(&order, &sku, 10, &[("traceparent", &trace1)])
        .await;

    let allocated = env
        .wait_for_count(
            "Allocated to the earlier batch",
            &env.topics.allocated,
            1,
            DEADLINE,
            |r| r.field("orderid") == order,
        )
        .await;
    worker.assert_running();
    let first = &allocated[0];
    check_eq!(
        env,
        first.json(),
        json!({"orderid": order, "sku": sku, "qty": 10, "batchref": earlier}),
        "Allocated value: {}",
        first.summary()
    );
    assert_cloudevent(&env, first, "allocation.Allocated", &sku);
    check_eq!(
        env,
        first.header("traceparent"),
        Some(trace1.clone()),
        "traceparent carried: {}",
        first.summary()
    );
    check_eq!(
        env,
        view_rows(&env, &order).await,
        vec![(sku.clone(), earlier.clone())],
        "allocations_view after allocation"
    );

    // Change quantity on the allocated batch so it's less than our order.
    let trace2 = traceparent();
    env.produce_json(
        &env.topics.batch_quantity_changed,
        Some(&earlier),
        &json!({"batchref": earlier, "qty": 5}),
        &[("traceparent", &trace2)],
    )
    .await;

    let records = env
        .wait_for(
            "Deallocated, then Allocated to the later batch",
            DEADLINE,
            |rs| {
                on(rs, &env.topics.deallocated).any(|r| r.field("orderid") == order)
                    && on(rs, &env.topics.allocated)
                        .any(|r| r.field("orderid") == order && r.field("batchref") == later)
            },
        )
        .await;
    let deallocated: Vec<&Record> = on(&records, &env.topics.deallocated).collect();
    check_eq!(
        env,
        deallocated.len(),
        1,
        "one Deallocated: {deallocated:#?}"
    );
    let d = deallocated[0];
    check_eq!(
        env,
        d.json(),
        json!({"orderid": order, "sku": sku, "qty": 10}),
        "Deallocated value: {}",
        d.summary()
    );
    assert_cloudevent(&env, d, "allocation.Deallocated", &sku);
    check_eq!(
        env,
        d.header("traceparent"),
        Some(trace2.clone()),
        "{}",
        d.summary()
    );

    let allocated: Vec<&Record> = on(&records, &env.topics.allocated).collect();
    check_eq!(env, allocated.len(), 2, "two Allocated: {allocated:#?}");
    let again = allocated
        .iter()
        .find(|r| r.field("batchref") == later)
        .unwrap();
    check_eq!(
        env,
        again.json(),
        json!({"orderid": order, "sku": sku, "qty": 10, "batchref": later}),
        "reallocation value: {}",
        again.summary()
    );
    assert_cloudevent(&env, again, "allocation.Allocated", &sku);
    check_eq!(
        env,
        again.header("traceparent"),
        Some(trace2.clone()),
        "{}",
        again.summary()
    );
    let ids: HashSet<String> = [first, d, *again]
        .iter()
        .filter_map(|r| r.ce_id())
        .collect();
    check_eq!(env, ids.len(), 3, "three events, three distinct ce_id");
    check!(
        env,
        on(&records, &env.topics.out_of_stock).next().is_none(),
        "no OutOfStock expected"
    );

    // State.
    check_eq!(
        env,
        view_rows(&env, &order).await,
        vec![(sku.clone(), later.clone())],
        "allocations_view after reallocation"
    );
    check_eq!(
        env,
        env.allocation_rows(&order, &sku).await,
        vec![(later.clone(), 10)],
        "allocation rows after reallocation"
    );
    let purchased: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reference, purchased_quantity FROM batches WHERE sku = $1 ORDER BY reference",
    )
    .bind(&sku)
    .fetch_all(&env.db)
    .await
    .unwrap();
    let expected: Vec<(String, i64)> = {
        let mut v = vec![(earlier.clone(), 5), (later.clone(), 10)];
        v.sort();
        v
    };
    check_eq!(env, purchased, expected, "batch quantities");

    worker.assert_running();
    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn reports_out_of_stock() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker();
    let sku = unique("sku");
    let batch = unique("batch");
    let (big, marker) = (unique("order-big"), unique("order-fits"));

    env.batch_created(&batch, &sku, 5, None).await;
    env.wait_batch(&batch).await;
    env.allocation_required(&big, &sku, 10, &[]).await;
    // Same SKU, same partition, after it: once its Allocated is out, anything
    // the first order caused on the allocated topic would be out too.
    env.allocation_required(&marker, &sku, 5, &[]).await;

    let records = env
        .wait_for(
            "OutOfStock for the big order and Allocated for the marker",
            DEADLINE,
            |rs| {
                on(rs, &env.topics.out_of_stock).any(|r| r.field("orderid") == big)
                    && on(rs, &env.topics.allocated).any(|r| r.field("orderid") == marker)
            },
        )
        .await;
    worker.assert_running();
    let oos: Vec<&Record> = on(&records, &env.topics.out_of_stock).collect();
    check_eq!(env, oos.len(), 1, "one OutOfStock: {oos:#?}");
    check_eq!(
        env,
        oos[0].json(),
        json!({"sku": sku, "orderid": big, "qty": 10}),
        "OutOfStock value: {}",
        oos[0].summary()
    );
    assert_cloudevent(&env, oos[0], "allocation.OutOfStock", &sku);
    check!(
        env,
        !on(&records, &env.topics.allocated).any(|r| r.field("orderid") == big),
        "the big order must not be allocated: {:#?}",
        on(&records, &env.topics.allocated).collect::<Vec<_>>()
    );

    check_eq!(
        env,
        env.allocation_rows(&big, &sku).await,
        vec![],
        "no allocation row"
    );
    check_eq!(
        env,
        view_rows(&env, &big).await,
        vec![],
        "no allocations_view row"
    );
    check_eq!(
        env,
        env.allocation_rows(&marker, &sku).await,
        vec![(batch.clone(), 5)],
        "the order that fits is allocated"
    );

    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn dead_letters_a_malformed_message_and_carries_on() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker();
    let t = env.topics.clone();
    let sku = unique("sku");
    let batch = unique("batch");
    let (good, negative, line) = (
        unique("order-good"),
        unique("order-neg"),
        unique("order-line"),
    );
    let mut produced = 0;

    env.batch_created(&batch, &sku, 100, None).await;
    produced += 1;
    env.wait_batch(&batch).await;

    // 1. Not JSON, with its own key and a custom header.
    let raw_key = unique("raw-key");
    let malformed = env
        .produce_raw(
            &t.allocation_required,
            Some(&raw_key),
            b"{not json",
            &[("x-custom", "kept"), ("traceparent", &traceparent())],
        )
        .await;
    // ... and a valid message after it.
    env.allocation_required(&good, &sku, 1, &[]).await;
    // 2. Invalid: qty must be >= 1.
    let invalid = env.allocation_required(&negative, &sku, -1, &[]).await;
    // 3. The same batch again: identical is a no-op, different is rejected.
    env.batch_created(&batch, &sku, 100, None).await;
    let dup_batch = env.batch_created(&batch, &sku, 50, None).await;
    // 4. The same line again: same qty is a no-op, different qty is rejected.
    env.allocation_required(&line, &sku, 2, &[]).await;
    env.allocation_required(&line, &sku, 2, &[]).await;
    let dup_line = env.allocation_required(&line, &sku, 3, &[]).await;
    produced += 8;

    let expected: [(&str, &str, Delivered); 4] = [
        ("malformed-json", t.allocation_required.as_str(), malformed),
        ("invalid-message", t.allocation_required.as_str(), invalid),
        ("duplicate-batch", t.batch_created.as_str(), dup_batch),
        ("duplicate-line", t.allocation_required.as_str(), dup_line),
    ];
    let records = env
        .wait_for("4 dead letters and 2 allocations", DEADLINE, |rs| {
            on(rs, &t.dead_letter).count() >= 4
                && on(rs, &t.allocated).any(|r| r.field("orderid") == good)
                && on(rs, &t.allocated).any(|r| r.field("orderid") == line)
        })
        .await;
    worker.assert_running();
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();

    for (reason, topic, delivered) in &expected {
        let found: Vec<&&Record> = dead
            .iter()
            .filter(|r| {
                r.header("dlq.original.topic").as_deref() == Some(*topic)
                    && r.header("dlq.original.partition") == Some(delivered.partition.to_string())
                    && r.header("dlq.original.offset") == Some(delivered.offset.to_string())
            })
            .collect();
        check_eq!(
            env,
            found.len(),
            1,
            "one dead letter for {reason} ({topic}[{}]@{}); dead letters: {dead:#?}",
            delivered.partition,
            delivered.offset
        );
        let r = found[0];
        check_eq!(
            env,
            r.header("dlq.reason").as_deref(),
            Some(*reason),
            "{}",
            r.summary()
        );
        check!(
            env,
            r.header("dlq.error").is_some_and(|e| !e.trim().is_empty()),
            "dlq.error must say why: {}",
            r.summary()
        );
        for name in [
            "dlq.reason",
            "dlq.error",
            "dlq.original.topic",
            "dlq.original.partition",
            "dlq.original.offset",
        ] {
            check_eq!(
                env,
                r.header_count(name),
                1,
                "header {name} once in {}",
                r.summary()
            );
        }
    }

    // The malformed one comes back byte for byte, with its key and headers.
    let m = dead
        .iter()
        .find(|r| r.header("dlq.reason").as_deref() == Some("malformed-json"))
        .unwrap();
    check_eq!(
        env,
        m.key_str(),
        Some(raw_key.clone()),
        "original key: {}",
        m.summary()
    );
    check_eq!(
        env,
        m.value.as_deref(),
        Some(&b"{not json"[..]),
        "original value: {}",
        m.summary()
    );
    check_eq!(
        env,
        m.header("x-custom").as_deref(),
        Some("kept"),
        "original header: {}",
        m.summary()
    );
    check!(
        env,
        m.header("traceparent").is_some(),
        "original traceparent kept: {}",
        m.summary()
    );
    // The others keep their original values too.
    let d = dead
        .iter()
        .find(|r| r.header("dlq.reason").as_deref() == Some("duplicate-batch"))
        .unwrap();
    check_eq!(
        env,
        d.json(),
        json!({"ref": batch, "sku": sku, "qty": 50, "eta": null}),
        "duplicate-batch value: {}",
        d.summary()
    );
    check_eq!(
        env,
        d.key_str(),
        Some(sku.clone()),
        "duplicate-batch key: {}",
        d.summary()
    );
    let l = dead
        .iter()
        .find(|r| r.header("dlq.reason").as_deref() == Some("duplicate-line"))
        .unwrap();
    check_eq!(
        env,
        l.json(),
        json!({"orderid": line, "sku": sku, "qty": 3}),
        "duplicate-line value: {}",
        l.summary()
    );

    // Everything processed; nothing else was published.
    env.wait_processed(produced, DEADLINE).await;
    let records = env.wait_outbox_published(DEADLINE).await;
    check_eq!(
        env,
        outbox_count(&env, "DeadLetter").await,
        4,
        "dead letters in the outbox"
    );
    let dead_letters: Vec<&Record> = on(&records, &t.dead_letter).collect();
    check_eq!(
        env,
        dead_letters.len(),
        4,
        "dead letters on the topic: {dead_letters:#?}"
    );
    let allocated: Vec<(String, String)> = on(&records, &t.allocated)
        .map(|r| (r.field("orderid"), r.field("batchref")))
        .collect();
    let mut want = vec![(good.clone(), batch.clone()), (line.clone(), batch.clone())];
    want.sort();
    let mut got = allocated.clone();
    got.sort();
    check_eq!(env, got, want, "exactly one Allocated per valid order line");

    // State: the valid messages applied, the rejected ones changed nothing.
    check_eq!(
        env,
        env.allocation_rows(&good, &sku).await,
        vec![(batch.clone(), 1)],
        "good order"
    );
    check_eq!(
        env,
        env.allocation_rows(&line, &sku).await,
        vec![(batch.clone(), 2)],
        "first qty kept"
    );
    check_eq!(
        env,
        env.allocation_rows(&negative, &sku).await,
        vec![],
        "invalid order not applied"
    );
    let purchased: i64 =
        sqlx::query_scalar("SELECT purchased_quantity FROM batches WHERE reference = $1")
            .bind(&batch)
            .fetch_one(&env.db)
            .await
            .unwrap();
    check_eq!(env, purchased, 100, "the duplicate batch changed nothing");

    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn redelivered_message_is_not_applied_twice() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker();
    let sku = unique("sku");
    let batch = unique("batch");
    let order = unique("order");
    let ce_id = format!("erp-{}", random_hex(24));
    let other_key = unique("other-key");

    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    // The ERP publishes the same message (same ce_id) twice in a row, and once
    // more under another key (so possibly to another partition).
    env.allocation_required(&order, &sku, 1, &[("ce_id", &ce_id)])
        .await;
    env.allocation_required(&order, &sku, 1, &[("ce_id", &ce_id)])
        .await;
    let value = json!({"orderid": order, "sku": sku, "qty": 1});
    env.produce_json(
        &env.topics.allocation_required,
        Some(&other_key),
        &value,
        &[("ce_id", &ce_id)],
    )
    .await;
    // Markers behind each copy, in the same partitions: once their events are
    // out, the copies were handled.
    let (marker1, marker2) = (unique("marker"), unique("marker"));
    env.allocation_required(&marker1, &sku, 1, &[]).await;
    env.produce_json(
        &env.topics.allocation_required,
        Some(&other_key),
        &json!({"orderid": marker2, "sku": sku, "qty": 1}),
        &[],
    )
    .await;

    env.wait_for("Allocated for both markers", DEADLINE, |rs| {
        on(rs, &env.topics.allocated).any(|r| r.field("orderid") == marker1)
            && on(rs, &env.topics.allocated).any(|r| r.field("orderid") == marker2)
    })
    .await;
    worker.assert_running();
    let records = env.wait_outbox_published(DEADLINE).await;

    let for_order: Vec<&Record> = on(&records, &env.topics.allocated)
        .filter(|r| r.field("orderid") == order)
        .collect();
    check_eq!(
        env,
        for_order.len(),
        1,
        "one Allocated for the order: {for_order:#?}"
    );
    check_eq!(
        env,
        on(&records, &env.topics.allocated).count(),
        3,
        "Allocated events: order + 2 markers"
    );
    check!(
        env,
        on(&records, &env.topics.dead_letter).next().is_none(),
        "a redelivery is not a dead letter"
    );
    check_eq!(
        env,
        env.allocation_rows(&order, &sku).await,
        vec![(batch.clone(), 1)],
        "one allocation"
    );
    check_eq!(
        env,
        outbox_count(&env, "Allocated").await,
        3,
        "Allocated rows in the outbox"
    );
    let allocated_total: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(qty), 0)::BIGINT FROM allocations")
            .fetch_one(&env.db)
            .await
            .unwrap();
    check_eq!(
        env,
        allocated_total,
        3,
        "allocated quantity: order + 2 markers"
    );

    drop(worker);
    env.finish().await;
}

// ------------------------------------------------------- restart mid-stream

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: nothing gets to finish.
    Kill,
    /// SIGTERM: must finish in-flight work and exit 0 in time.
    Term,
}

/// (message_key, ce_id header) of an outbox row.
type OutboxHeaders = (Option<Vec<u8>>, Option<Vec<u8>>);

const SKUS: usize = 10;
const ORDERS: usize = 400;
const STOP_AFTER: usize = 100;
const BATCH_QTY: i64 = 1000;

async fn restart_mid_stream(stop: Stop) {
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = env.spawn_worker();
    let stock = create_stock(&env, SKUS, BATCH_QTY).await;
    let orders = orders_for(&stock, ORDERS);

    // Produce the orders at a steady pace (~3 s in all) while, at the same
    // time, stopping the worker once STOP_AFTER decisions are out, and starting
    // a new one (same group, same database).
    let pacer = Pacer::default();
    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(30), &pacer);
    let restarting = async {
        env.wait_for(&format!("{STOP_AFTER} Allocated events"), DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= STOP_AFTER
        })
        .await;
        worker.assert_running();
        let seen = distinct_ids(&env.witness.snapshot(), &t.allocated).len();
        let at = pacer.produced();
        match stop {
            Stop::Kill => worker.kill().await,
            Stop::Term => {
                let started = Instant::now();
                let status = worker.terminate(Duration::from_secs(30)).await;
                check!(env, status.success(), "exit status after SIGTERM: {status}");
                let unsent = env.count("SELECT count(*) FROM outbox_pending").await;
                env.note(&format!(
                    "graceful stop took {:?}; outbox rows left unsent: {unsent}",
                    started.elapsed()
                ));
                check_eq!(
                    env,
                    unsent,
                    0,
                    "after a graceful stop every committed decision is published"
                );
            }
        }
        env.note(&format!(
            "{stop:?} with {seen} distinct Allocated seen and {at} orders produced"
        ));
        check!(
            env,
            seen < ORDERS && at < ORDERS,
            "the worker was meant to be stopped mid-stream, but {seen} of {ORDERS} decisions \
             were out and {at} orders produced"
        );
        env.spawn_worker()
    };
    let (_, mut second) = tokio::join!(producing, restarting);

    // --- every order once by ce_id, to its SKU's batch, in the events and in
    // the database; the read model agrees.
    let expected = single_batch_model(&stock, &orders);
    let records = assert_allocated_once(&env, &expected, (SKUS + ORDERS) as i64, DEADLINE).await;
    second.assert_running();

    // --- per SKU, events come out in the order they were decided (outbox id).
    let rows: Vec<OutboxHeaders> = sqlx::query_as(
        "SELECT message_key, \
                (SELECT value FROM outbox_headers(headers) WHERE name = 'ce_id') \
         FROM outbox WHERE kind = 'Allocated' ORDER BY id",
    )
    .fetch_all(&env.db)
    .await
    .unwrap();
    let mut decided_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, id) in rows {
        let key = String::from_utf8_lossy(&key.unwrap_or_default()).into_owned();
        let id = String::from_utf8_lossy(&id.unwrap_or_default()).into_owned();
        decided_order.entry(key).or_default().push(id);
    }
    let mut published_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first_seen = HashSet::new();
    for r in on(&records, &t.allocated) {
        let id = r.ce_id().unwrap_or_default();
        if first_seen.insert(id.clone()) {
            published_order
                .entry(r.key_str().unwrap_or_default())
                .or_default()
                .push(id);
        }
    }
    for (sku, ids) in &decided_order {
        check!(
            env,
            published_order.get(sku) == Some(ids),
            "events of {sku} published out of decision order"
        );
    }

    drop(second);
    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn restart_mid_stream_loses_nothing_and_applies_nothing_twice() {
    restart_mid_stream(Stop::Kill).await;
}

#[tokio::test]
async fn graceful_shutdown_mid_stream_loses_nothing_and_applies_nothing_twice() {
    restart_mid_stream(Stop::Term).await;
}

/// Decisions committed while no relay ran (as after a crash between commit and
/// publish) are published by the next worker, in decision order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_left_unsent_are_published_after_a_restart() {
    use allocation_worker::adapters::inbound::InboundMessage;
    use allocation_worker::adapters::postgres::pool::MIGRATOR;
    use allocation_worker::engine::processor::Processor;
    use allocation_worker::service_layer::chunk::Outcome;

    let env = TestEnv::new().await;
    let t = &env.topics;
    MIGRATOR.run(&env.db).await.expect("migrations apply");
    let topics = allocation_worker::adapters::kafka::Topics {
        batch_created: t.batch_created.clone(),
        batch_quantity_changed: t.batch_quantity_changed.clone(),
        allocation_required: t.allocation_required.clone(),
        allocated: t.allocated.clone(),
        deallocated: t.deallocated.clone(),
        out_of_stock: t.out_of_stock.clone(),
        dead_letter: t.dead_letter.clone(),
    };
    let metrics = allocation_worker::adapters::metrics::Metrics::new().expect("metrics register");
    let processor = Processor::new(env.db.clone(), topics, Default::default(), metrics.into());
    let sku = unique("SKU");
    let orders: Vec<String> = (0..5).map(|i| format!("{}-{i}", unique("o"))).collect();
    let mut inputs = vec![(
        t.batch_created.clone(),
        json!({"ref": unique("b"), "sku": sku, "qty": 100}),
    )];
    inputs.extend(orders.iter().map(|o| {
        (
            t.allocation_required.clone(),
            json!({"orderid": o, "sku": sku, "qty": 1}),
        )
    }));
    for (offset, (topic, value)) in inputs.into_iter().enumerate() {
        let message = InboundMessage {
            topic,
            partition: 0,
            offset: offset as i64,
            key: None,
            payload: Some(value.to_string().into_bytes()),
            headers: vec![],
        };
        let outcome = processor
            .process_one(&message, false)
            .await
            .expect("database is up");
        check_eq!(env, outcome, Outcome::Applied, "offset {offset}");
    }
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_pending")
        .fetch_one(&env.db)
        .await
        .unwrap();
    check_eq!(env, unsent, 5, "decisions waiting in the outbox");

    let worker = env.spawn_worker();
    let records = env
        .wait_for_count("5 Allocated", &t.allocated, 5, DEADLINE, |_| true)
        .await;
    let published: Vec<String> = records.iter().map(|r| r.field("orderid")).collect();
    check_eq!(env, published, orders, "published in decision order");
    env.eventually("the outbox is marked sent", DEADLINE, || async {
        let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_pending")
            .fetch_one(&env.db)
            .await?;
        Ok::<_, sqlx::Error>((unsent == 0).then_some(()))
    })
    .await;
    drop(worker);
    env.finish().await;
}

// ------------------------------------------------------------------ HTTP

#[tokio::test]
async fn serves_health_metrics_and_the_read_model_over_http() {
    let env = TestEnv::new().await;
    // A secret passed through to librdkafka must never reach the logs.
    let secret = format!("secret-{}", random_hex(12));
    let properties = format!(
        "{},sasl.password={secret}",
        testkit::WORKER_KAFKA_PROPERTIES
    );
    let worker = env.spawn_worker_with(&[("KAFKA_PROPERTIES", &properties)]);
    let addr = worker.http_addr;
    http_until(&env, addr, "/healthz", 200).await;

    let t = env.topics.clone();
    let sku = unique("SKU");
    let batch = unique("b");
    let order = unique("o");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    env.allocation_required(&order, &sku, 3, &[]).await;
    env.produce_raw(&t.allocation_required, Some("k"), b"{not json", &[])
        .await;
    env.wait_outbox_published(DEADLINE).await;
    env.wait_for("the Allocated event and the dead letter", DEADLINE, |rs| {
        rs.iter().any(|r| r.topic == t.allocated) && rs.iter().any(|r| r.topic == t.dead_letter)
    })
    .await;

    http_until(&env, addr, "/readyz", 200).await;
    let body = http_until(&env, addr, &format!("/allocations/{order}"), 200).await;
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    check_eq!(
        env,
        view,
        json!([{"sku": sku, "batchref": batch}]),
        "read model"
    );
    http_until(&env, addr, "/allocations/no-such-order", 404).await;

    // Counters and gauges moved as the traffic says; lag comes with the
    // consumer's statistics, every 5 s.
    let metrics = env
        .eventually("metrics reflect the traffic", DEADLINE, || async {
            let Some((200, m)) = http_get(addr, "/metrics").await else {
                return Ok::<_, String>(None);
            };
            let done = sample(&m, "allocation_outbox_backlog_events", "") == Some(0.0)
                && m.contains("allocation_consumer_lag_messages{");
            Ok(done.then_some(m))
        })
        .await;
    let expect = |name: &str, labels: &str, want: f64| {
        let got = sample(&metrics, name, labels);
        check_eq!(env, got, Some(want), "{name}{{{labels}}} in\n{metrics}");
    };
    let consumed = |topic: &str, outcome: &str| format!("outcome=\"{outcome}\",topic=\"{topic}\"");
    expect(
        "allocation_messages_consumed_total",
        &consumed(&t.batch_created, "applied"),
        1.0,
    );
    expect(
        "allocation_messages_consumed_total",
        &consumed(&t.allocation_required, "applied"),
        1.0,
    );
    expect(
        "allocation_messages_consumed_total",
        &consumed(&t.allocation_required, "dead_lettered"),
        1.0,
    );
    expect(
        "allocation_messages_consumed_total",
        &consumed(&t.allocation_required, "duplicate"),
        0.0,
    );
    expect(
        "allocation_events_published_total",
        "event_type=\"Allocated\"",
        1.0,
    );
    expect(
        "allocation_events_published_total",
        "event_type=\"OutOfStock\"",
        0.0,
    );
    expect(
        "allocation_events_published_total",
        "event_type=\"DeadLetter\"",
        1.0,
    );
    expect(
        "allocation_dead_letters_total",
        "reason=\"malformed-json\"",
        1.0,
    );
    expect(
        "allocation_dead_letters_total",
        "reason=\"unknown-sku\"",
        0.0,
    );
    expect(
        "allocation_message_handling_duration_seconds_count",
        "message_type=\"AllocationRequired\"",
        2.0,
    );
    expect("allocation_outbox_oldest_unsent_age_seconds", "", 0.0);
    expect("allocation_ready", "", 1.0);
    check!(
        env,
        sample(&metrics, "process_resident_memory_bytes", "").is_some_and(|v| v > 0.0),
        "process metrics in\n{metrics}"
    );

    // The exposition is valid for Prometheus's own checker.
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut promtool = promtool.expect(
        "promtool is needed to check the metrics: apt-get install prometheus (scripts/test.sh installs it)",
    );
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().expect("piped stdin");
        stdin
            .write_all(metrics.as_bytes())
            .expect("promtool reads the metrics");
    }
    let checked = promtool.wait_with_output().expect("promtool runs");
    check!(
        env,
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let log = std::fs::read_to_string(&worker.log).expect("the worker log is readable");
    // Lines starting with "# " are the harness's own record of the settings.
    let leaked: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("# ") && l.contains(&secret))
        .collect();
    check!(
        env,
        leaked.is_empty(),
        "the secret is in the log: {leaked:?}"
    );
    drop(worker);
    env.finish().await;
}

#[tokio::test]
async fn is_alive_but_not_ready_while_the_database_is_unreachable() {
    let env = TestEnv::new().await;
    // Nothing listens on port 1: the worker waits for the database to migrate.
    let mut worker =
        env.spawn_worker_with(&[("DATABASE_URL", "postgres://allocation:x@127.0.0.1:1/none")]);
    let addr = worker.http_addr;
    http_until(&env, addr, "/healthz", 200).await;
    let body = http_until(&env, addr, "/readyz", 503).await;
    check!(env, body.contains("database"), "readyz says why: {body}");
    let metrics = http_until(&env, addr, "/metrics", 200).await;
    check_eq!(
        env,
        sample(&metrics, "allocation_ready", ""),
        Some(0.0),
        "allocation_ready"
    );
    worker.assert_running();
    let status = worker.terminate(Duration::from_secs(30)).await;
    check!(
        env,
        status.success(),
        "SIGTERM while waiting for the database exits 0: {status}"
    );
    env.finish().await;
}

// ------------------------------------------------ connections and time bounds

/// Products on every inbound partition, each with a batch, so that orders for
/// them keep every partition busy once their rows are locked.
async fn a_product_per_partition(env: &TestEnv) -> Vec<String> {
    let mut by_partition: BTreeMap<i32, String> = BTreeMap::new();
    while by_partition.len() < testkit::PARTITIONS as usize {
        let sku = unique("SKU");
        let batch = unique("b");
        let delivered = env.batch_created(&batch, &sku, 100, None).await;
        env.wait_batch(&batch).await;
        by_partition.entry(delivered.partition).or_insert(sku);
    }
    by_partition.into_values().collect()
}

/// With every partition busy (each one's product locked by another session),
/// the worker's pool keeps room for the probes: /readyz stays 200.
#[tokio::test]
async fn readyz_stays_ready_with_every_partition_busy() {
    let env = TestEnv::new().await;
    // Four connections: one for the partitions, three for the relay and probes.
    let worker = env.spawn_worker_with(&[("DATABASE_MAX_CONNECTIONS", "4")]);
    let addr = worker.http_addr;
    let skus = a_product_per_partition(&env).await;
    http_until(&env, addr, "/readyz", 200).await;

    let holder = env.lock_products(&skus).await;
    for (i, sku) in skus.iter().enumerate() {
        for n in 0..3 {
            env.allocation_required(&format!("o-{i}-{n}-{}", random_hex(6)), sku, 1, &[])
                .await;
        }
    }
    env.wait_worker_on_a_lock().await;
    // Well within lock_timeout (10 s): the partitions stay stuck throughout.
    let until = Instant::now() + Duration::from_secs(6);
    let mut answers = 0;
    while Instant::now() < until {
        let answer = http_get(addr, "/readyz").await;
        check!(
            env,
            matches!(answer, Some((200, _))),
            "/readyz with every partition busy: {answer:?}"
        );
        answers += 1;
        // The probes' pace over the observed 6 s, not a wait for a result.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check!(env, answers > 10, "only {answers} probes answered");
    holder.commit().await.expect("release the locks");
    env.wait_for_count(
        "every order allocated",
        &env.topics.allocated.clone(),
        skus.len() * 3,
        DEADLINE,
        |_| true,
    )
    .await;
    drop(worker);
    env.finish().await;
}

/// SIGTERM while a partition's transaction waits on a row lock that is never
/// released: the worker gives it up and exits 0 within SHUTDOWN_TIMEOUT.
#[tokio::test]
async fn sigterm_while_a_transaction_waits_on_a_lock_exits_0_in_time() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker_with(&[("SHUTDOWN_TIMEOUT", "4s")]);
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;

    let holder = env.lock_products(std::slice::from_ref(&sku)).await;
    env.allocation_required(&unique("o"), &sku, 1, &[]).await;
    env.wait_worker_on_a_lock().await;
    let started = Instant::now();
    worker.sigterm();
    // SHUTDOWN_TIMEOUT, plus the second the runtime gives its blocking
    // threads, plus process exit.
    let status = worker.wait_exit(Duration::from_secs(4 + 2)).await;
    let elapsed = started.elapsed();
    check!(
        env,
        status.is_some_and(|s| s.success()),
        "exit within SHUTDOWN_TIMEOUT with status 0: {status:?} after {elapsed:?}"
    );
    drop(holder);
    env.finish().await;
}

// ------------------------------------------------------------ compression

/// Inbound messages compressed with every codec a Kafka producer can use are
/// read like any other (the contract's inbound messages): a batch and an
/// order per codec, each produced by a producer of its own with that
/// `compression.codec`, all applied.
#[tokio::test]
async fn reads_messages_compressed_with_every_codec() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker();
    let t = env.topics.clone();
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let mut orders = Vec::new();
    for codec in codecs {
        let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.bootstrap_servers)
            .set("compression.codec", codec)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()
            .unwrap_or_else(|e| panic!("a producer with compression.codec={codec}: {e}"));
        let sku = unique(&format!("SKU-{codec}"));
        let batch = unique(&format!("b-{codec}"));
        let order = unique(&format!("o-{codec}"));
        // Values long and repetitive enough that every codec compresses them.
        let padding = "x".repeat(2000);
        let created = json!({"ref": batch, "sku": sku, "qty": 10, "padding": padding});
        let required = json!({"orderid": order, "sku": sku, "qty": 2, "padding": padding});
        for (topic, value) in [
            (&t.batch_created, created),
            (&t.allocation_required, required),
        ] {
            env.produce_record_via(
                &producer,
                topic,
                Some(sku.as_bytes()),
                Some(value.to_string().as_bytes()),
                &[],
            )
            .await;
        }
        orders.push((codec, order, batch));
    }
    let allocated = env
        .wait_for_count(
            "an Allocated event per codec",
            &t.allocated,
            codecs.len(),
            DEADLINE,
            |_| true,
        )
        .await;
    for (codec, order, batch) in &orders {
        let event = allocated.iter().find(|r| &r.field("orderid") == order);
        check!(
            env,
            event.is_some(),
            "no Allocated event for the {codec} order"
        );
        check_eq!(
            env,
            event.map(|r| r.field("batchref")),
            Some(batch.clone()),
            "the {codec} order's batch"
        );
    }
    check_eq!(env, env.records_on(&t.dead_letter).len(), 0, "dead letters");
    drop(worker);
    env.finish().await;
}

/// CRC-32C (Castagnoli), the checksum of a Kafka record batch.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ if crc & 1 == 1 { 0x82F6_3B78 } else { 0 };
        }
    }
    !crc
}

/// Produces, with a raw Produce request (v3), one record batch marked as
/// zstd-compressed whose data is not zstd: a well-formed batch, with a right
/// CRC, that no consumer can decompress. Returns the broker's error code.
async fn produce_undecodable_batch(bootstrap: &str, topic: &str, partition: i32) -> i16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let now = chrono::Utc::now().timestamp_millis();
    let data = b"\x28\xb5\x2f\xfd not zstd at all";
    let mut after_crc = Vec::new();
    after_crc.extend(4i16.to_be_bytes()); // attributes: zstd
    after_crc.extend(0i32.to_be_bytes()); // last offset delta
    after_crc.extend(now.to_be_bytes());
    after_crc.extend(now.to_be_bytes());
    after_crc.extend((-1i64).to_be_bytes()); // producer id
    after_crc.extend((-1i16).to_be_bytes()); // producer epoch
    after_crc.extend((-1i32).to_be_bytes()); // base sequence
    after_crc.extend(1i32.to_be_bytes()); // one record
    after_crc.extend(data);
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset
    batch.extend((4 + 1 + 4 + after_crc.len() as i32).to_be_bytes());
    batch.extend(0i32.to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&after_crc).to_be_bytes());
    batch.extend(&after_crc);

    let string = |s: &str| {
        let mut out = (s.len() as i16).to_be_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    };
    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // Produce
    request.extend(3i16.to_be_bytes()); // v3
    request.extend(1i32.to_be_bytes()); // correlation id
    request.extend(string("e2e-raw"));
    request.extend((-1i16).to_be_bytes()); // no transactional id
    request.extend((-1i16).to_be_bytes()); // acks all
    request.extend(10_000i32.to_be_bytes());
    request.extend(1i32.to_be_bytes());
    request.extend(string(topic));
    request.extend(1i32.to_be_bytes());
    request.extend(partition.to_be_bytes());
    request.extend((batch.len() as i32).to_be_bytes());
    request.extend(&batch);

    let address = bootstrap.split(',').next().expect("a bootstrap server");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the broker");
    stream
        .write_all(&(request.len() as i32).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&request).await.unwrap();
    let size = stream.read_i32().await.expect("a Produce response") as usize;
    let mut response = vec![0; size];
    stream.read_exact(&mut response).await.unwrap();
    // correlation id, topics (1), name, partitions (1), partition, error code
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    i16::from_be_bytes([response[at], response[at + 1]])
}

/// A message set no consumer can decode is never skipped, nor silently
/// stalled on: its partition stays at it, the worker counts it as an
/// undecodable consumer error at every poll (the metric the alert reads),
/// and the other partitions keep flowing.
#[tokio::test]
async fn an_undecodable_message_set_is_counted_and_the_other_partitions_flow() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker();
    let addr = worker.http_addr;
    let t = env.topics.clone();
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 100, None).await;
    env.wait_batch(&batch).await;

    let error = produce_undecodable_batch(&env.bootstrap_servers, &t.allocation_required, 0).await;
    check_eq!(env, error, 0, "the broker took the batch");
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .create()
        .expect("a test producer");
    let behind = unique("o-behind");
    let elsewhere = unique("o-elsewhere");
    for (orderid, partition) in [(&behind, 0), (&elsewhere, 1)] {
        let value = json!({"orderid": orderid, "sku": sku, "qty": 1}).to_string();
        producer
            .send(
                rdkafka::producer::FutureRecord::<str, str>::to(&t.allocation_required)
                    .partition(partition)
                    .key(&sku)
                    .payload(&value),
                Duration::from_secs(20),
            )
            .await
            .expect("produced");
    }

    env.wait_for(
        "the order on the other partition allocated",
        DEADLINE,
        |rs| {
            rs.iter()
                .any(|r| r.topic == t.allocated && r.field("orderid") == elsewhere)
        },
    )
    .await;
    // Reported again at every poll: the partition stays at the batch.
    env.eventually(
        "the undecodable batch reported three times",
        DEADLINE,
        || async {
            Ok::<_, String>(match http_get(addr, "/metrics").await {
                Some((200, body)) => sample(
                    &body,
                    "allocation_kafka_consumer_errors_total",
                    "kind=\"undecodable\"",
                )
                .filter(|n| *n >= 3.0),
                _ => None,
            })
        },
    )
    .await;
    // Not skipped: the order behind it on its partition is not handled.
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid = $1")
        .bind(&behind)
        .fetch_one(&env.db)
        .await
        .unwrap();
    check_eq!(env, handled, 0, "the order behind the undecodable batch");
    check!(
        env,
        !env.records_on(&t.allocated)
            .iter()
            .any(|r| r.field("orderid") == behind),
        "the order behind the undecodable batch was allocated: it was skipped"
    );
    drop(worker);
    env.finish().await;
}
