//! Messages that name a SKU or batch not known yet (docs/design.md, "Late
//! references"), end to end with the real binary, broker and database: they
//! wait, and so do the later messages of their partition that name the same
//! SKU or batch, so that each SKU's and each batch's messages apply in
//! partition order; the window after which they are dead-lettered counts only
//! usable time.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Run with `cargo test --test services waiting:: -- --nocapture`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use testkit::{check, check_eq};

use serde_json::json;

use testkit::{
    metrics_until, sample_sum, samples, unique, Delivered, TestEnv, WorkerProcess, DEADLINE,
};

/// Polls the worker's metrics until `done(waiting messages, oldest age)`,
/// both over all partitions (a partition with nothing waiting has no series).
async fn wait_waiting<F>(env: &TestEnv, worker: &WorkerProcess, what: &str, done: F) -> (f64, f64)
where
    F: Fn(f64, f64) -> bool,
{
    let waiting = |text: &str| {
        let n = sample_sum(text, "allocation_waiting_messages");
        let age = samples(text, "allocation_waiting_oldest_age_seconds")
            .into_iter()
            .fold(0.0, f64::max);
        (n, age)
    };
    let text = metrics_until(env, worker.http_addr, what, |text| {
        let (n, age) = waiting(text);
        done(n, age)
    })
    .await;
    waiting(&text)
}

async fn allocated_orders(env: &TestEnv, sku: &str) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT orderid FROM allocations WHERE sku = $1")
        .bind(sku)
        .fetch_all(&env.db)
        .await
        .expect("query allocations")
        .into_iter()
        .collect()
}

/// A worker that is already consuming: it has applied one message.
async fn consuming_worker(env: &TestEnv, extra: &[(&str, &str)]) -> WorkerProcess {
    let worker = env.spawn_worker_with(extra);
    env.batch_created(&unique("warm"), &unique("warm-sku"), 1, None)
        .await;
    env.wait_processed(1, DEADLINE).await;
    worker
}

/// Orders for a product not known yet, then the product with just enough
/// stock for them, then more orders at once: the first orders get the stock,
/// the later ones are out of stock. Before per-key waiting, the later orders
/// went past the waiting ones as soon as the product existed.
#[tokio::test]
async fn orders_waiting_for_their_product_get_the_stock_first() {
    const FIRST: usize = 40;
    const LATER: usize = 40;
    let env = TestEnv::new().await;
    // A long window: nothing here may be dead-lettered.
    let mut worker = consuming_worker(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "120s")]).await;
    let sku = unique("sku-late");
    let mut first = BTreeSet::new();
    let mut partition = None;
    for i in 0..FIRST {
        let orderid = format!("first-{i}-{}", env.suffix);
        let d = env.allocation_required(&orderid, &sku, 1, &[]).await;
        assert!(partition.is_none_or(|p| p == d.partition), "one partition");
        partition = Some(d.partition);
        first.insert(orderid);
    }
    let (n, _) = wait_waiting(&env, &worker, "the first orders wait", |n, _| {
        n >= FIRST as f64
    })
    .await;
    check_eq!(env, n, FIRST as f64, "waiting messages");
    // The product, then at once the later orders: they reach the worker
    // while the first ones still wait, or just after the product is stored.
    let topic = env.topics.allocation_required.clone();
    let value = |orderid: &str| json!({"orderid": orderid, "sku": sku, "qty": 1});
    let later: Vec<String> = (0..LATER)
        .map(|i| format!("later-{i}-{}", env.suffix))
        .collect();
    env.batch_created(&unique("batch"), &sku, FIRST as i64, None)
        .await;
    let values: Vec<serde_json::Value> = later.iter().map(|o| value(o)).collect();
    let sends = values
        .iter()
        .map(|v| env.produce_json(&topic, Some(&sku), v, &[]));
    let delivered: Vec<Delivered> = futures::future::join_all(sends).await;
    check!(
        env,
        delivered.windows(2).all(|w| w[0].offset < w[1].offset),
        "later orders in order: {delivered:?}"
    );
    env.wait_processed((1 + FIRST + 1 + LATER) as i64, DEADLINE)
        .await;
    let allocated = allocated_orders(&env, &sku).await;
    check_eq!(
        env,
        allocated,
        first,
        "the first orders, and only they, got the stock"
    );
    wait_waiting(&env, &worker, "nothing waits", |n, age| {
        n == 0.0 && age == 0.0
    })
    .await;
    check!(
        env,
        env.records_on(&env.topics.dead_letter).is_empty(),
        "no dead letter"
    );
    let out_of_stock = env
        .wait_for_count(
            "an OutOfStock for each later order",
            &env.topics.out_of_stock,
            LATER,
            DEADLINE,
            |r| r.field("sku") == sku,
        )
        .await;
    let reported: BTreeSet<String> = out_of_stock.iter().map(|r| r.field("orderid")).collect();
    check_eq!(
        env,
        reported,
        later.iter().cloned().collect::<BTreeSet<_>>(),
        "out of stock: the later orders"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// Two quantity changes of a batch, published in order around the batch's
/// creation (the first before it, the second after): the second wins. Five
/// batches at once, on several partitions.
#[tokio::test]
async fn the_later_of_two_quantity_changes_around_a_creation_wins() {
    const BATCHES: usize = 5;
    let env = TestEnv::new().await;
    let mut worker = consuming_worker(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "120s")]).await;
    let sku = unique("sku");
    let refs: Vec<String> = (0..BATCHES).map(|_| unique("batch")).collect();
    let topic = env.topics.batch_quantity_changed.clone();
    for r in &refs {
        env.produce_json(&topic, Some(r), &json!({"ref": r, "qty": 5}), &[])
            .await;
    }
    wait_waiting(&env, &worker, "the first changes wait", |n, _| {
        n >= BATCHES as f64
    })
    .await;
    for r in &refs {
        env.batch_created(r, &sku, 10, None).await;
        env.produce_json(&topic, Some(r), &json!({"ref": r, "qty": 8}), &[])
            .await;
    }
    env.wait_processed((1 + 3 * BATCHES) as i64, DEADLINE).await;
    for r in &refs {
        check_eq!(
            env,
            env.purchased(r).await,
            Some(8),
            "batch {r}: the later change wins"
        );
    }
    check_eq!(
        env,
        env.processed().await,
        (1 + 3 * BATCHES) as i64,
        "processed"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// A reference that never comes: the order waits (the gauges say so), and
/// is dead-lettered once the window has passed, not before; then nothing
/// waits.
#[tokio::test]
async fn a_reference_that_never_comes_is_dead_lettered_after_the_window() {
    const WINDOW: Duration = Duration::from_secs(3);
    let env = TestEnv::new().await;
    let mut worker = consuming_worker(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "3s")]).await;
    let ghost = unique("sku-never");
    let sent = env
        .allocation_required(&unique("order"), &ghost, 1, &[])
        .await;
    let sent_at = Instant::now();
    let (_, age) = wait_waiting(&env, &worker, "the order waits for a while", |n, age| {
        n == 1.0 && age >= 1.0
    })
    .await;
    check!(env, (1.0..3.5).contains(&age), "oldest waiting age {age}");
    let dead = env
        .wait_for_count(
            "the dead letter",
            &env.topics.dead_letter,
            1,
            DEADLINE,
            |_| true,
        )
        .await;
    let after = sent_at.elapsed();
    check_eq!(
        env,
        dead[0].header("dlq.original.offset"),
        Some(sent.offset.to_string()),
        "{}",
        dead[0].summary()
    );
    check_eq!(
        env,
        dead[0].header("dlq.reason").as_deref(),
        Some("unknown-sku"),
        "{}",
        dead[0].summary()
    );
    check!(
        env,
        after >= WINDOW,
        "dead-lettered after {after:?}, before the window"
    );
    check!(
        env,
        after < WINDOW + Duration::from_secs(5),
        "dead-lettered only after {after:?}; window {WINDOW:?}"
    );
    env.note(&format!(
        "dead-lettered {after:?} after it was sent; window {WINDOW:?}"
    ));
    wait_waiting(&env, &worker, "nothing waits", |n, age| {
        n == 0.0 && age == 0.0
    })
    .await;
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// A first start over a backlog that takes longer than the window to read:
/// orders at the start of their topic name a SKU whose batch comes at the
/// end of a long batch topic. They are not dead-lettered; they are applied
/// once the batch is read. Behind them, an order for a SKU that never comes
/// is dead-lettered once the worker has caught up and the window has passed.
#[tokio::test]
async fn a_first_start_over_a_long_backlog_dead_letters_no_late_reference() {
    // The backlog must take several windows to read, whatever the machine:
    // one message per transaction, about 2.7 ms each here, so 3,000 filler
    // batches take about 8 s against a window of 1 s (1,500 against 2 s left
    // the orders waiting 3.7 s on CI, under the 4 s this test requires).
    const WINDOW: Duration = Duration::from_secs(1);
    const FILLER: usize = 3000;
    let env = TestEnv::new().await;
    let sku = unique("sku-late");
    let late_batch = unique("batch-late");
    let orders: Vec<String> = (0..5)
        .map(|i| format!("early-{i}-{}", env.suffix))
        .collect();
    for o in &orders {
        env.allocation_required(o, &sku, 1, &[]).await;
    }
    let ghost = unique("sku-never");
    env.allocation_required(&unique("order-ghost"), &ghost, 1, &[])
        .await;
    // The backlog: many batches of other SKUs, then the one the orders need.
    let topic = env.topics.batch_created.clone();
    let filler_sku = unique("filler");
    let (env_ref, topic_ref) = (&env, &topic);
    for chunk in (0..FILLER).collect::<Vec<_>>().chunks(500) {
        let sends = chunk.iter().map(|i| {
            let (env, topic) = (env_ref, topic_ref);
            let value =
                json!({"ref": format!("filler-{i}-{}", env.suffix), "sku": filler_sku, "qty": 1});
            async move {
                env.produce_json(topic, Some(&format!("k{i}")), &value, &[])
                    .await
            }
        });
        futures::future::join_all(sends).await;
    }
    env.batch_created(&late_batch, &sku, 10, None).await;
    env.note("backlog produced; starting the worker");

    // One message per transaction, so that the backlog takes a while.
    let started = Instant::now();
    let mut worker = env.spawn_worker_with(&[
        ("UNKNOWN_REFERENCE_TIMEOUT", "1s"),
        ("MAX_BATCH_MESSAGES", "1"),
    ]);
    // The orders are read at once, long before their batch: they wait.
    wait_waiting(
        &env,
        &worker,
        "the early orders and the ghost wait",
        |n, _| n >= (orders.len() + 1) as f64,
    )
    .await;
    let waiting_since = Instant::now();
    // Errors are "not yet": the worker may not have migrated yet.
    env.eventually(
        "the late batch stored",
        Duration::from_secs(180),
        || async {
            let found: Option<i64> =
                sqlx::query_scalar("SELECT purchased_quantity FROM batches WHERE reference = $1")
                    .bind(&late_batch)
                    .fetch_optional(&env.db)
                    .await?;
            Ok::<_, sqlx::Error>(found.map(|_| ()))
        },
    )
    .await;
    let read_in = started.elapsed();
    let waited = waiting_since.elapsed();
    check!(
        env,
        waited > WINDOW * 2,
        "the orders waited {waited:?} for their batch, not longer than the {WINDOW:?} \
         window: the test proves nothing"
    );
    env.wait_processed((orders.len() + 1 + FILLER + 1) as i64, DEADLINE)
        .await;
    check_eq!(
        env,
        allocated_orders(&env, &sku).await,
        orders.iter().cloned().collect::<BTreeSet<_>>(),
        "the early orders applied once their batch was read"
    );
    let dead = env
        .wait_for_count(
            "the ghost's dead letter",
            &env.topics.dead_letter,
            1,
            DEADLINE,
            |_| true,
        )
        .await;
    check_eq!(
        env,
        dead.len(),
        1,
        "only the ghost dead-lettered: {dead:#?}"
    );
    check_eq!(
        env,
        dead[0].json()["sku"].as_str(),
        Some(ghost.as_str()),
        "{}",
        dead[0].summary()
    );
    env.note(&format!(
        "backlog read in {read_in:?}; the orders waited {waited:?} for their batch; \
         window {WINDOW:?}"
    ));
    worker.assert_running();
    drop(worker);
    env.finish().await;
}

/// A member of the worker's group that reads nothing: it holds partitions,
/// as an instance that lags or is restarting does, and never commits. Its
/// thread polls (to stay in the group) until it is dropped.
struct IdleMember {
    consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleMember {
    fn join(env: &TestEnv) -> Self {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.bootstrap_servers)
            .set("group.id", &env.group_id)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create()
            .expect("the idle member");
        consumer
            .subscribe(&env.topics.inbound())
            .expect("subscribe the idle member");
        let consumer = std::sync::Arc::new(consumer);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let consumer = std::sync::Arc::clone(&consumer);
            let stop = std::sync::Arc::clone(&stop);
            move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // What it is given is dropped at once: read, never handled.
                    let _ = consumer.poll(Duration::from_millis(100));
                }
            }
        });
        Self {
            consumer,
            stop,
            thread: Some(thread),
        }
    }

    /// Its partitions of `topic`, once it holds some.
    fn partitions(&self, topic: &str) -> Vec<i32> {
        use rdkafka::consumer::Consumer;
        self.consumer
            .assignment()
            .map(|a| {
                a.elements_for_topic(topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Leaves the group (after its join completed: one that leaves during
    /// its join wedges the broker's group here).
    fn leave(mut self) {
        use rdkafka::consumer::Consumer;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the idle member's thread");
        }
        self.consumer.unsubscribe();
    }
}

/// Produces `value` to `partition` of `topic`, keyed `key`.
async fn produce_to(
    env: &TestEnv,
    topic: &str,
    partition: i32,
    key: &str,
    value: &serde_json::Value,
) {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .create()
        .expect("a producer");
    let payload = value.to_string();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(&payload),
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}/{partition}: {e}"));
}

/// Issue 22, finding 2 (contract §5, several instances): the window counts
/// only while the whole group has caught up on the batch topic. Another
/// member holds some of its partitions and reads nothing (an instance that
/// lags, or restarts); the batch of a SKU is on one of those, and an order
/// for it on a partition the worker holds. The worker keeps the order
/// waiting for three windows, although its own partitions are all read;
/// once the other member leaves, the worker reads the batch and allocates
/// the order. Before, the worker counted itself caught up and dead-lettered
/// the order after one window.
#[tokio::test]
async fn a_batch_another_member_has_not_read_turns_no_order_into_a_dead_letter() {
    const WINDOW: Duration = Duration::from_secs(3);
    let env = TestEnv::new().await;
    let mut worker = consuming_worker(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "3s")]).await;
    let member = IdleMember::join(&env);
    let (batches, orders) = env
        .eventually("the idle member holds partitions", DEADLINE, || async {
            let b = member.partitions(&env.topics.batch_created);
            let o = member.partitions(&env.topics.allocation_required);
            Ok::<_, String>((!b.is_empty()).then_some((b, o)))
        })
        .await;
    // The worker has finished its own join too before anything else.
    testkit::http_until(&env, worker.http_addr, "/readyz", 200).await;
    let theirs = batches[0];
    let mine = (0..testkit::PARTITIONS)
        .find(|p| !orders.contains(p))
        .expect("the worker holds a partition of the order topic");
    env.note(&format!(
        "idle member holds batch partitions {batches:?} and order partitions {orders:?}"
    ));

    let sku = unique("sku-late");
    let order = unique("order");
    produce_to(
        &env,
        &env.topics.batch_created,
        theirs,
        &sku,
        &json!({"ref": unique("b"), "sku": sku, "qty": 5, "eta": null}),
    )
    .await;
    produce_to(
        &env,
        &env.topics.allocation_required,
        mine,
        &sku,
        &json!({"orderid": order, "sku": sku, "qty": 1}),
    )
    .await;
    wait_waiting(&env, &worker, "the order waits", |n, _| n == 1.0).await;
    let since = Instant::now();
    while since.elapsed() < 3 * WINDOW {
        check!(
            env,
            env.records_on(&env.topics.dead_letter).is_empty(),
            "dead-lettered {:?} in, while another member had not read the batch",
            since.elapsed()
        );
        // Poll interval of the three windows watched above.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    member.leave();
    env.wait_for("the order allocated", DEADLINE, |r| {
        r.iter()
            .any(|r| r.topic == env.topics.allocated && r.value_str().contains(order.as_str()))
    })
    .await;
    check!(
        env,
        env.records_on(&env.topics.dead_letter).is_empty(),
        "nothing dead-lettered"
    );
    worker.assert_running();
    drop(worker);
    env.finish().await;
}
