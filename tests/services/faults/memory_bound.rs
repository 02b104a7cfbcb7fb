//! The memory bound on inbound messages (issue 22 finding 5): a partition
//! stuck on a lock cannot take the whole bound from the others, and a
//! message too large for a partition's share is dead-lettered instead of
//! staying kept aside for ever.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{check, spawn};
use testkit::orders::{create_stock, orders_for, produce_orders, Pacer};
use testkit::{unique, TestEnv, DEADLINE};

/// Padded orders for the locked product: 40 MiB, more than the bound.
const PADDED: i64 = 40;

/// One product's row locked while 40 MiB of orders for it arrive (each
/// padded with a field the worker ignores to count 1 MiB), more than the
/// whole 32 MiB bound. Its partition's queue took all of the bound, and
/// every other partition stopped with it; with a share per partition, the
/// orders of the other partitions are answered during the lock.
#[tokio::test]
async fn a_partition_stuck_on_a_lock_cannot_hold_the_whole_memory_bound() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 9;
    let env = TestEnv::new().await;
    let worker = spawn(&env, &[("MAX_BATCH_MESSAGES", "10")]);
    let stock = create_stock(&env, SKUS, 1000).await;
    let mut partition_of = HashMap::new();
    for (sku, _) in &stock {
        let d = env.allocation_required(&unique("probe"), sku, 1, &[]).await;
        partition_of.insert(sku.clone(), d.partition);
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
        "SKUs on other partitions: {partition_of:?}"
    );

    let session = env.lock_products(std::slice::from_ref(&locked)).await;
    let mark = worker.log_text().len();
    // Each padded order counts exactly 1 MiB against the bound (its value,
    // its key and 256 bytes for the rest), so that 32 of them leave none of
    // it: not even room for a small order.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer");
    let topic = env.topics.allocation_required.clone();
    for i in 0..PADDED {
        let mut value = serde_json::json!({
            "orderid": format!("big-{i}-{}", env.suffix),
            "sku": locked,
            "qty": 1,
            "pad": "",
        })
        .to_string();
        let room = (1 << 20) - 256 - locked.len() - value.len();
        value = value.replace(r#""pad":"""#, &format!(r#""pad":"{}""#, "x".repeat(room)));
        producer
            .send(
                FutureRecord::to(&topic).key(&locked).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing a padded order: {e}"));
    }
    // The other partitions' orders only once the locked partition has
    // taken what it may of the bound and is paused (its queue holds 64
    // messages, more than are sent: only the memory bound pauses it).
    let ar = env.topics.allocation_required.clone();
    let paused = format!("partition={} pause=true", partition_of[&locked]);
    env.eventually(
        "the locked partition paused by the memory bound",
        DEADLINE,
        || {
            let lines = worker.log_lines_after(mark, "partition fetch paused/resumed");
            let found = lines.iter().any(|l| l.contains(&ar) && l.contains(&paused));
            async move { Ok::<_, String>(found.then_some(())) }
        },
    )
    .await;
    let locked_at = Instant::now();
    let free_orders = orders_for(&free, 40);
    produce_orders(&env, &free_orders, 40, Duration::ZERO, &Pacer::default()).await;
    let free_ids: Vec<String> = free_orders.iter().map(|(o, _)| o.clone()).collect();
    let answered = env
        .eventually(
            "the other partitions' orders answered during the lock",
            DEADLINE,
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
    env.note(&format!("answered {answered:?} into the lock"));
    session.rollback().await.expect("release the lock");
    // Everything of the locked product applies once the lock is gone.
    env.eventually("the padded orders allocated", DEADLINE, || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM allocations WHERE orderid LIKE 'big-%'")
                .fetch_one(&env.db)
                .await?;
        Ok::<_, sqlx::Error>((n == PADDED).then_some(()))
    })
    .await;
    drop(worker);
    env.finish().await;
}

/// A message larger than a partition's share of the bound (8 MiB) is
/// dead-lettered `invalid-message`, saying why, and the messages behind it
/// on its partition flow. (A message as large as the whole bound used to
/// stay kept aside for as long as any other message held a byte of it.)
#[tokio::test]
async fn a_message_too_large_for_the_memory_bound_is_dead_lettered() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let worker = spawn(&env, &[]);
    let (sku, batch) = (unique("sku"), unique("batch"));
    env.batch_created(&batch, &sku, 100, None).await;
    env.wait_batch(&batch).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer");
    let value = serde_json::json!({
        "orderid": unique("huge"),
        "sku": sku,
        "qty": 1,
        "pad": "x".repeat(9 * 1024 * 1024),
    })
    .to_string();
    let topic = env.topics.allocation_required.clone();
    producer
        .send(
            FutureRecord::to(&topic).key(&sku).payload(&value),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing the huge message: {e}"));
    let behind = unique("behind");
    env.allocation_required(&behind, &sku, 1, &[]).await;
    let letters = env
        .wait_for_count(
            "the huge message dead-lettered",
            &env.topics.dead_letter,
            1,
            DEADLINE,
            |_| true,
        )
        .await;
    check!(
        env,
        letters[0].header("dlq.reason").as_deref() == Some("invalid-message")
            && letters[0]
                .header("dlq.error")
                .is_some_and(|e| e.contains("too large")),
        "{}",
        letters[0].summary()
    );
    env.wait_for_count(
        "the order behind it allocated",
        &env.topics.allocated,
        1,
        DEADLINE,
        |r| r.field("orderid") == behind,
    )
    .await;
    drop(worker);
    env.finish().await;
}
