//! References not known yet (contract §5): a message naming a batch or SKU
//! that does not exist waits while the messages behind it flow, is applied
//! when its reference arrives, and is dead-lettered when the window closes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{check, check_eq, spawn, State};
use testkit::{on, unique, Record, TestEnv, DEADLINE};

/// Issue 3 item 2: a message naming a batch or SKU not known yet waits (and
/// the messages behind it flow), is applied once its reference arrives, and
/// is dead-lettered when the window closes without it.
#[tokio::test]
async fn unknown_references_wait_then_apply_or_dead_letter() {
    let _alone = testkit::alone::run_alone().await;
    const WINDOW: Duration = Duration::from_secs(6);
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "6s")]);
    let sku = unique("sku");
    let known = unique("batch-known");
    env.batch_created(&known, &sku, 10, None).await;
    env.wait_processed(1, DEADLINE).await;

    let early = unique("batch-early");
    let never = unique("batch-never");
    let ghost = unique("sku-never");
    let (ghost_order, known_order) = (unique("order-ghost"), unique("order-known"));
    // A quantity change before its batch, and behind it (same key, so same
    // partition) a change to a batch that exists.
    let waiting = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&early),
            &json!({"ref": early, "qty": 3}),
            &[],
        )
        .await;
    let early_at = Instant::now();
    let behind = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&early),
            &json!({"ref": known, "qty": 7}),
            &[],
        )
        .await;
    // An order for a SKU that never comes, and behind it one that can be served.
    let ghost_sent = env.allocation_required(&ghost_order, &ghost, 1, &[]).await;
    let ghost_at = Instant::now();
    let served = env
        .produce_json(
            &t.allocation_required,
            Some(&ghost),
            &json!({"orderid": known_order, "sku": sku, "qty": 2}),
            &[],
        )
        .await;
    // A quantity change of a batch that never comes.
    let never_sent = env
        .produce_json(
            &t.batch_quantity_changed,
            Some(&never),
            &json!({"batchref": never, "qty": 5}),
            &[],
        )
        .await;
    let never_at = Instant::now();
    check_eq!(
        env,
        (waiting.partition, ghost_sent.partition),
        (behind.partition, served.partition),
        "the messages behind share the waiting ones' partitions"
    );

    // Those behind flow while the first ones wait.
    env.wait_purchased(&known, 7, DEADLINE).await;
    env.eventually(
        "the order behind the unknown SKU allocated",
        DEADLINE,
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid = $1")
                .bind(&known_order)
                .fetch_one(&env.db)
                .await?;
            Ok::<_, sqlx::Error>((n == 1).then_some(()))
        },
    )
    .await;
    let flowing_after = early_at.elapsed();
    check!(
        env,
        flowing_after < Duration::from_secs(4),
        "the messages behind took {flowing_after:?}: they waited for the unknown ones"
    );
    check_eq!(
        env,
        env.purchased(&early).await,
        None,
        "the early batch does not exist yet"
    );
    check_eq!(
        env,
        env.processed().await,
        3,
        "processed: the known batch and the two messages behind; the waiting ones not yet"
    );
    check!(
        env,
        env.records_on(&t.dead_letter).is_empty(),
        "nothing dead-lettered yet"
    );

    // The batch arrives about 2 s after its quantity change (the scenario's
    // timing, not a wait for a result): applied then.
    tokio::time::sleep_until((early_at + Duration::from_secs(2)).into()).await;
    env.batch_created(&early, &sku, 10, None).await;
    let created_at = Instant::now();
    env.wait_purchased(&early, 3, DEADLINE).await;
    env.note(&format!(
        "the early quantity change applied {:?} after its batch arrived ({:?} after it was sent)",
        created_at.elapsed(),
        early_at.elapsed()
    ));

    // The two that never resolve: dead-lettered after the window, not before.
    let mut first_seen: [Option<Duration>; 2] = [None, None];
    let targets = [(&never_sent, never_at), (&ghost_sent, ghost_at)];
    let started = Instant::now();
    while first_seen.iter().any(Option::is_none) {
        let dead = env.records_on(&t.dead_letter);
        for (n, (sent, at)) in targets.iter().enumerate() {
            if first_seen[n].is_none()
                && dead.iter().any(|r| {
                    r.header("dlq.original.offset") == Some(sent.offset.to_string())
                        && r.header("dlq.original.partition") == Some(sent.partition.to_string())
                })
            {
                first_seen[n] = Some(at.elapsed());
            }
        }
        check!(
            env,
            started.elapsed() < DEADLINE,
            "dead letters not seen within {DEADLINE:?}: {first_seen:?}; seen: {:#?}",
            dead.iter().map(Record::summary).collect::<Vec<_>>()
        );
        // Poll interval of the deadline above, fine enough to time the window.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let [never_after, ghost_after] = first_seen.map(Option::unwrap);
    env.note(&format!(
        "dead-lettered after {never_after:?} (unknown batch) and {ghost_after:?} (unknown SKU); \
         window {WINDOW:?}"
    ));
    for (what, after) in [("unknown batch", never_after), ("unknown SKU", ghost_after)] {
        check!(
            env,
            after >= WINDOW,
            "{what} dead-lettered after {after:?}, before the {WINDOW:?} window"
        );
        check!(
            env,
            after < WINDOW + Duration::from_secs(6),
            "{what} dead-lettered only after {after:?}: the window is {WINDOW:?}"
        );
    }

    // Everything done: exactly those two dead letters, with their reasons.
    env.wait_processed(7, DEADLINE).await;
    let records = env.wait_outbox_published(DEADLINE).await;
    check_eq!(env, env.processed().await, 7, "processed messages");
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();
    let distinct: BTreeSet<(String, String)> = dead
        .iter()
        .map(|r| {
            (
                r.header("dlq.original.topic").unwrap_or_default(),
                r.header("dlq.original.offset").unwrap_or_default(),
            )
        })
        .collect();
    check_eq!(env, distinct.len(), 2, "two dead letters: {dead:#?}");
    let expected = [
        (
            &never_sent,
            &t.batch_quantity_changed,
            "unknown-batch",
            json!({"batchref": never, "qty": 5}),
            never.clone(),
        ),
        (
            &ghost_sent,
            &t.allocation_required,
            "unknown-sku",
            json!({"orderid": ghost_order, "sku": ghost, "qty": 1}),
            ghost.clone(),
        ),
    ];
    for (sent, topic, reason, value, key) in expected {
        let r = dead
            .iter()
            .find(|r| {
                r.header("dlq.original.topic").as_deref() == Some(topic.as_str())
                    && r.header("dlq.original.offset") == Some(sent.offset.to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for {topic}@{}", sent.offset));
        check_eq!(
            env,
            r.header("dlq.reason").as_deref(),
            Some(reason),
            "{}",
            r.summary()
        );
        check_eq!(
            env,
            r.header("dlq.original.partition"),
            Some(sent.partition.to_string()),
            "{}",
            r.summary()
        );
        check!(
            env,
            r.header("dlq.error").is_some_and(|e| !e.trim().is_empty()),
            "dlq.error says why: {}",
            r.summary()
        );
        check_eq!(env, r.json(), value, "original value kept: {}", r.summary());
        check_eq!(
            env,
            r.key_str(),
            Some(key),
            "original key kept: {}",
            r.summary()
        );
    }
    // The state: applied once each, the dead-lettered ones changed nothing.
    let state = State::read(&env).await;
    let mut batches = vec![
        (early.clone(), sku.clone(), 3, None),
        (known.clone(), sku.clone(), 7, None),
    ];
    batches.sort();
    check_eq!(env, state.batches, batches, "batches");
    check_eq!(
        env,
        state.allocations,
        vec![(known_order.clone(), sku.clone(), known.clone(), 2)],
        "allocations"
    );
    check!(
        env,
        on(&records, &t.allocated).all(|r| r.field("orderid") == known_order)
            && on(&records, &t.out_of_stock).next().is_none()
            && on(&records, &t.deallocated).next().is_none(),
        "the only decision: the order that could be served"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}
