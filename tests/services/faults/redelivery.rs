//! Redelivery and replay (contract §6.2): the same messages again, under the
//! same `ce_id` and on another partition, and the whole input again from
//! offset 0 after the group is rewound, change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use super::{check, check_eq, spawn, State};
use testkit::kafka::{committed_offsets, rewind_group};
use testkit::{
    metrics_until, random_hex, unique, Delivered, Record, TestEnv, WorkerProcess, DEADLINE,
};

/// Sum of `allocation_messages_consumed_total` over the topics, for one outcome.
fn consumed(metrics: &str, outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("allocation_messages_consumed_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls the worker's metrics until it reports `n` messages consumed with
/// that outcome, and no more; returns the exposition then.
async fn wait_consumed(env: &TestEnv, worker: &WorkerProcess, outcome: &str, n: usize) -> String {
    let what = format!("{} reports {n} messages consumed as {outcome}", worker.name);
    let metrics = metrics_until(env, worker.http_addr, &what, |m| {
        consumed(m, outcome) >= n as f64
    })
    .await;
    check_eq!(
        env,
        consumed(&metrics, outcome),
        n as f64,
        "messages consumed as {outcome}"
    );
    metrics
}

/// Issue 3 item 1: the same messages again (same `ce_id`, some on another
/// partition), then the whole input again from offset 0 after rewinding the
/// group: nothing is applied twice, no new event is decided.
#[tokio::test]
async fn redelivered_and_replayed_messages_change_nothing() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 6;
    const LINES: usize = 8;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[]);

    // (topic, partition) -> next offset, from the delivery reports.
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut note_delivery = |topic: &str, d: Delivered| {
        let end = ends.entry((topic.to_owned(), d.partition)).or_default();
        *end = (*end).max(d.offset + 1);
    };
    // Every message with a ce_id, to send again: (topic, key, value, ce_id).
    let mut with_ids: Vec<(String, String, Value, String)> = Vec::new();
    let skus: Vec<String> = (0..SKUS).map(|i| unique(&format!("sku{i}"))).collect();
    let warehouse: Vec<String> = (0..SKUS).map(|i| unique(&format!("wh{i}"))).collect();
    let shipment: Vec<String> = (0..SKUS).map(|i| unique(&format!("ship{i}"))).collect();

    // 1. Batches, without ce_id (their key is topic/partition/offset).
    for i in 0..SKUS {
        let d = env.batch_created(&warehouse[i], &skus[i], 20, None).await;
        note_delivery(&t.batch_created, d);
        let d = env
            .batch_created(&shipment[i], &skus[i], 100, Some("2030-01-01"))
            .await;
        note_delivery(&t.batch_created, d);
    }
    let mut originals = 2 * SKUS;
    env.wait_processed(originals as i64, DEADLINE).await;
    // 2. Order lines with a ce_id: 8 x 2 per SKU, all in the warehouse.
    for sku in &skus {
        for n in 0..LINES {
            let value = json!({"orderid": format!("o{n}-{}", random_hex(8)), "sku": sku, "qty": 2});
            let ce_id = format!("erp-{}", random_hex(24));
            let d = env
                .produce_json(
                    &t.allocation_required,
                    Some(sku),
                    &value,
                    &[("ce_id", &ce_id)],
                )
                .await;
            note_delivery(&t.allocation_required, d);
            with_ids.push((t.allocation_required.clone(), sku.clone(), value, ce_id));
        }
    }
    originals += SKUS * LINES;
    env.wait_processed(originals as i64, DEADLINE).await;
    // 3. The warehouse shrinks to 10: three lines each are deallocated and
    //    move to the shipment.
    for wh in &warehouse {
        let value = json!({"ref": wh, "qty": 10});
        let ce_id = format!("erp-{}", random_hex(24));
        let d = env
            .produce_json(
                &t.batch_quantity_changed,
                Some(wh),
                &value,
                &[("ce_id", &ce_id)],
            )
            .await;
        note_delivery(&t.batch_quantity_changed, d);
        with_ids.push((t.batch_quantity_changed.clone(), wh.clone(), value, ce_id));
    }
    originals += SKUS;
    env.wait_processed(originals as i64, DEADLINE).await;
    let records = env.wait_outbox_published(DEADLINE).await;
    check_eq!(
        env,
        env.count("SELECT count(*) FROM outbox WHERE kind = 'Deallocated'")
            .await,
        (SKUS * 3) as i64,
        "three lines deallocated per SKU"
    );
    check_eq!(
        env,
        env.count("SELECT count(*) FROM outbox WHERE kind = 'Allocated'")
            .await,
        (SKUS * (LINES + 3)) as i64,
        "every line allocated, three of them twice"
    );
    let before = State::read(&env).await;
    check_eq!(env, before.processed.len(), originals, "processed messages");
    let outbound_ids = |rs: &[Record]| -> BTreeSet<String> {
        rs.iter()
            .filter(|r| r.topic != t.dead_letter)
            .filter_map(Record::ce_id)
            .collect()
    };
    let ids_before = outbound_ids(&records);
    check_eq!(
        env,
        ids_before.len(),
        before.outbox.len(),
        "one distinct ce_id per outbox row on the topics"
    );

    // 4. Every message with a ce_id again: even ones under the same key (same
    //    partition, behind the original), odd ones under a new key.
    for (n, (topic, key, value, ce_id)) in with_ids.iter().enumerate() {
        let key = if n % 2 == 0 {
            key.clone()
        } else {
            unique("other-key")
        };
        let d = env
            .produce_json(topic, Some(&key), value, &[("ce_id", ce_id)])
            .await;
        note_delivery(topic, d);
    }
    let metrics = wait_consumed(&env, &worker, "duplicate", with_ids.len()).await;
    worker.assert_running();
    check_eq!(
        env,
        consumed(&metrics, "applied"),
        originals as f64,
        "messages applied by the first worker"
    );
    check_eq!(
        env,
        State::read(&env).await,
        before,
        "redelivered copies (same ce_id) changed nothing"
    );

    // 5. Replay: graceful stop, the group rewound to offset 0, a new worker.
    let status = worker.terminate(Duration::from_secs(30)).await;
    check!(env, status.success(), "exit status after SIGTERM: {status}");
    let at_stop = committed_offsets(&env, &env.topics.inbound()).unwrap_or_else(|e| panic!("{e}"));
    for (partition, end) in &ends {
        check_eq!(
            env,
            at_stop.get(partition).copied(),
            Some(*end),
            "committed offset of {partition:?} after a graceful stop (every message done)"
        );
    }
    rewind_group(&env, &env.topics.inbound()).await;
    let total: i64 = ends.values().sum();
    env.note(&format!(
        "group rewound to 0 on {} inbound partitions; {total} messages to replay",
        at_stop.len()
    ));
    let mut replay = spawn(&env, &[]);
    let metrics = wait_consumed(&env, &replay, "duplicate", total as usize).await;
    replay.assert_running();
    check_eq!(
        env,
        (
            consumed(&metrics, "applied"),
            consumed(&metrics, "dead_lettered")
        ),
        (0.0, 0.0),
        "the replay applies and dead-letters nothing"
    );
    check_eq!(
        env,
        State::read(&env).await,
        before,
        "the replay from offset 0 changed nothing"
    );
    // No new outbox row means nothing new can be published; and nothing new was.
    let after = outbound_ids(&env.witness.snapshot());
    check_eq!(
        env,
        after,
        ids_before,
        "distinct ce_ids on the outbound topics"
    );
    drop(replay);
    env.finish().await;
}
