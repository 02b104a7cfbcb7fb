//! A slow partition (contract §6.7): one product's row locked for longer than
//! `max.poll.interval.ms` holds up only its own partition.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{assignment, check, check_eq, spawn, RECOVERY_DEADLINE};
use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::{unique, TestEnv, DEADLINE};

/// Issue 12 item 4: one product's row locked by another session for longer
/// than `max.poll.interval.ms`, while orders flow for it and for products on
/// the other partitions. The other partitions' orders are answered during
/// the lock; the member stays in its group (no rebalance, same partitions,
/// no poll-interval warning); afterwards the end state equals the model's.
#[tokio::test]
async fn a_locked_product_holds_up_only_its_own_partition() {
    let _alone = testkit::alone::run_alone().await;
    const LOCK: Duration = Duration::from_secs(15);
    const SKUS: usize = 12;
    let env = TestEnv::new().await;
    // Small batches so that the locked partition's queue fills at once;
    // librdkafka wants max.poll.interval.ms >= session.timeout.ms.
    let mut worker = spawn(
        &env,
        &[
            (
                "KAFKA_PROPERTIES",
                "session.timeout.ms=2000,heartbeat.interval.ms=500,max.poll.interval.ms=4000",
            ),
            ("MAX_BATCH_MESSAGES", "10"),
        ],
    );
    let stock = create_stock(&env, SKUS, 1000).await;
    // Each SKU's partition of the order topic, from a first order.
    let mut partition_of = HashMap::new();
    let mut all_orders = Vec::new();
    for (sku, _) in &stock {
        let orderid = unique("probe");
        let d = env.allocation_required(&orderid, sku, 1, &[]).await;
        partition_of.insert(sku.clone(), d.partition);
        all_orders.push((orderid, sku.clone()));
    }
    env.wait_processed(2 * SKUS as i64, DEADLINE).await;
    let locked = stock[0].0.clone();
    let free: Vec<(String, String)> = stock
        .iter()
        .filter(|(s, _)| partition_of[s] != partition_of[&locked])
        .cloned()
        .collect();
    check!(
        env,
        !free.is_empty(),
        "some SKUs on other partitions than the locked one: {partition_of:?}"
    );
    let assigned_before = assignment(&worker);
    let mark = worker.log_text().len();

    let session = env.lock_products(std::slice::from_ref(&locked)).await;
    let locked_at = Instant::now();
    env.note(&format!("product {locked} locked"));
    // Far more orders for the locked product than its partition's queue
    // holds, then orders for the products on the other partitions.
    let blocked: Vec<(String, String)> = (0..300)
        .map(|i| (format!("locked-{i}-{}", env.suffix), locked.clone()))
        .collect();
    let pacer = Pacer::default();
    produce_orders(&env, &blocked, 100, Duration::ZERO, &pacer).await;
    let free_orders = orders_for(&free, 200);
    produce_orders(&env, &free_orders, 100, Duration::ZERO, &pacer).await;
    let free_ids: Vec<String> = free_orders.iter().map(|(o, _)| o.clone()).collect();
    let answered = env
        .eventually(
            "the other partitions' orders answered during the lock",
            LOCK,
            || async {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid = ANY($1)")
                        .bind(&free_ids)
                        .fetch_one(&env.db)
                        .await?;
                Ok::<_, sqlx::Error>((n == free_ids.len() as i64).then_some(locked_at.elapsed()))
            },
        )
        .await;
    env.note(&format!(
        "{} orders of other partitions answered {answered:?} into the lock",
        free_ids.len()
    ));
    // The lock is held for LOCK (the scenario); the worker must stay up.
    while locked_at.elapsed() < LOCK {
        worker.assert_running();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let applied_locked: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE sku = $1")
        .bind(&locked)
        .fetch_one(&env.db)
        .await
        .expect("count the locked product's allocations");
    check_eq!(
        env,
        applied_locked,
        1,
        "only the probe of the locked product applied during the lock"
    );
    session.rollback().await.expect("release the lock");
    env.note(&format!("lock released after {:?}", locked_at.elapsed()));

    all_orders.extend(blocked);
    all_orders.extend(free_orders);
    let expected = single_batch_model(&stock, &all_orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + all_orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    let rebalances: Vec<String> = ["partitions revoked", "partitions assigned", "poll interval"]
        .iter()
        .flat_map(|needle| worker.log_lines_after(mark, needle))
        .collect();
    check!(
        env,
        rebalances.is_empty(),
        "the member left or rejoined its group: {rebalances:#?}"
    );
    check_eq!(
        env,
        assignment(&worker),
        assigned_before,
        "the partitions held"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}
