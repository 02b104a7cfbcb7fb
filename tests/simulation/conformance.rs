//! The fakes must not hide what the real ones do: the same small scripts run
//! on the engine's fakes ([`crate::engine::run_script`]) and on the real
//! binary, broker and PostgreSQL (the end-to-end harness), and a subscriber
//! sees the same on both: per SKU and outbound topic the same events in the
//! same order, the same dead letters with the same reasons, the same
//! allocations. Needs the services of `DATABASE_URL` and
//! `KAFKA_BOOTSTRAP_SERVERS`, like every end-to-end test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;

use crate::engine::{run_script, Observed, ScriptMessage, ScriptTopic};
use testkit::{on, TestEnv, DEADLINE, PARTITIONS};

fn message(kind: ScriptTopic, key: &str, value: serde_json::Value, ce_id: &str) -> ScriptMessage {
    ScriptMessage {
        kind,
        key: key.to_owned(),
        value: value.to_string().into_bytes(),
        ce_id: ce_id.to_owned(),
    }
}

fn batch(reference: &str, sku: &str, qty: u32, eta: Option<&str>, ce_id: &str) -> ScriptMessage {
    message(
        ScriptTopic::BatchCreated,
        sku,
        json!({"ref": reference, "sku": sku, "qty": qty, "eta": eta}),
        ce_id,
    )
}

fn line(orderid: &str, sku: &str, qty: u32, ce_id: &str) -> ScriptMessage {
    message(
        ScriptTopic::AllocationRequired,
        sku,
        json!({"orderid": orderid, "sku": sku, "qty": qty}),
        ce_id,
    )
}

fn change(reference: &str, qty: u32, ce_id: &str) -> ScriptMessage {
    message(
        ScriptTopic::QuantityChanged,
        reference,
        json!({"ref": reference, "qty": qty}),
        ce_id,
    )
}

/// Stock, order lines (allocated, out of stock, sent twice, a duplicate
/// line, one malformed), a late reference, an unknown batch and a quantity
/// drop that deallocates and reallocates: a phase at a time.
fn script(tag: &str) -> Vec<Vec<ScriptMessage>> {
    let id = |n: &str| format!("{tag}-{n}");
    let (a, b, c) = (id("SKU-A"), id("SKU-B"), id("SKU-C"));
    vec![
        vec![
            batch(&id("B-a"), &a, 10, None, &id("1")),
            batch(&id("B-b"), &a, 5, Some("2027-01-10"), &id("2")),
            batch(&id("B-c"), &b, 3, None, &id("3")),
        ],
        vec![
            line(&id("o1"), &a, 4, &id("4")),
            line(&id("o2"), &a, 8, &id("5")),
            line(&id("o3"), &b, 3, &id("6")),
            line(&id("o4"), &b, 1, &id("7")),
            // Sent again by the ERP: the same ce_id.
            line(&id("o3"), &b, 3, &id("6")),
            // The same line with another quantity: refused.
            line(&id("o1"), &a, 5, &id("8")),
            message(
                ScriptTopic::AllocationRequired,
                &a,
                json!("not an object"),
                &id("9"),
            ),
            // SKU-C's stock comes after its first line.
            line(&id("o6"), &c, 2, &id("10")),
            batch(&id("B-d"), &c, 5, None, &id("11")),
            // A batch that never comes.
            change(&id("B-none"), 3, &id("12")),
        ],
        vec![change(&id("B-a"), 2, &id("13"))],
    ]
}

/// What the real worker published, read by the harness's witness.
fn observed_on_kafka(env: &TestEnv, records: &[testkit::Record]) -> Observed {
    let mut observed = Observed::default();
    for (topic, kind) in [
        (&env.topics.allocated, "allocated"),
        (&env.topics.deallocated, "deallocated"),
        (&env.topics.out_of_stock, "out-of-stock"),
    ] {
        // Each event once (at-least-once may repeat one), in partition order.
        let mut seen = BTreeSet::new();
        for r in on(records, topic) {
            if !seen.insert(r.ce_id()) {
                continue;
            }
            let line = match kind {
                "allocated" => format!(
                    "{} {} {}",
                    r.field("orderid"),
                    r.field("qty"),
                    r.field("batchref")
                ),
                _ => format!("{} {}", r.field("orderid"), r.field("qty")),
            };
            observed.event(&r.field("sku"), kind, line);
        }
    }
    for r in on(records, &env.topics.dead_letter) {
        if let (Some(ce_id), Some(reason)) = (r.ce_id(), r.header("dlq.reason")) {
            observed.dead_letters.insert(ce_id, reason);
        }
    }
    observed
}

#[tokio::test]
async fn the_fakes_and_the_real_broker_and_database_see_the_same_run() {
    // A short window, on both sides, so that the unknown batch is
    // dead-lettered soon.
    let window = Duration::from_secs(3);
    let env = TestEnv::new().await;
    let tag = env
        .topics
        .batch_created
        .rsplit('.')
        .next()
        .unwrap_or("t")
        .to_owned();
    let phases = script(&tag);
    // The fakes run on a runtime of their own (paused time), off this one.
    let fake = {
        let phases = phases.clone();
        tokio::task::spawn_blocking(move || run_script(&phases, PARTITIONS, window))
            .await
            .expect("the fakes' run")
    };

    let mut worker = env.spawn_worker_with(&[("UNKNOWN_REFERENCE_TIMEOUT", "3s")]);
    let mut distinct = BTreeSet::new();
    for phase in &phases {
        for m in phase {
            let topic = match m.kind {
                ScriptTopic::BatchCreated => env.topics.batch_created.clone(),
                ScriptTopic::QuantityChanged => env.topics.batch_quantity_changed.clone(),
                ScriptTopic::AllocationRequired => env.topics.allocation_required.clone(),
            };
            env.produce_raw(&topic, Some(&m.key), &m.value, &[("ce_id", &m.ce_id)])
                .await;
            distinct.insert(m.ce_id.clone());
        }
        env.wait_processed(distinct.len() as i64, DEADLINE).await;
    }
    // Everything the fakes published, published for real (and no more, as
    // compared below).
    let expected_events: usize = fake.events.values().map(Vec::len).sum();
    let expected_letters = fake.dead_letters.len();
    let records = env
        .wait_for("every event and dead letter", DEADLINE, |records| {
            let o = observed_on_kafka(&env, records);
            o.events.values().map(Vec::len).sum::<usize>() >= expected_events
                && o.dead_letters.len() >= expected_letters
        })
        .await;
    let mut real = observed_on_kafka(&env, &records);
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT orderid, sku, batchref FROM allocations_view")
            .fetch_all(&env.db)
            .await
            .expect("the read model");
    real.allocations = rows.into_iter().collect();
    worker.terminate(Duration::from_secs(30)).await;

    let by_sku = |o: &Observed| -> BTreeMap<(String, String), Vec<String>> { o.events.clone() };
    assert_eq!(
        by_sku(&fake),
        by_sku(&real),
        "events per SKU and topic: fakes (left), real (right)"
    );
    assert_eq!(
        fake.dead_letters, real.dead_letters,
        "dead letters: fakes (left), real (right)"
    );
    assert_eq!(
        fake.allocations, real.allocations,
        "allocations: fakes (left), real (right)"
    );
    // The script reaches what it is for, on both.
    assert!(fake.dead_letters.values().any(|r| r == "duplicate-line"));
    assert!(fake.dead_letters.values().any(|r| r == "unknown-batch"));
    assert!(fake
        .dead_letters
        .values()
        .any(|r| r == "invalid-message" || r == "malformed-json"));
    assert!(fake.events.keys().any(|(_, kind)| kind == "deallocated"));
    env.finish().await;
}
