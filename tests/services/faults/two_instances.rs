//! Several instances in one consumer group (contract §6.7): rebalances while
//! the stream flows, a hand-over mid-batch and with messages waiting, and the
//! race of an allocation and a quantity change on two instances.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{json, Value};

use super::{assignment, check, check_eq, spawn, State, KAFKA_PROPERTIES, RECOVERY_DEADLINE};
use testkit::orders::{
    assert_allocated_once, create_stock, diff, orders_for, produce_orders, single_batch_model,
    Pacer,
};
use testkit::{
    distinct_ids, http_get, metrics_until, random_hex, sample_sum, unique, Delivered, TestEnv,
    WorkerProcess, DEADLINE, PARTITIONS,
};

/// The inbound partitions, as `topic/partition`.
fn inbound_partitions(env: &TestEnv) -> BTreeSet<String> {
    env.topics
        .inbound()
        .iter()
        .flat_map(|topic| (0..PARTITIONS).map(move |p| format!("{topic}/{p}")))
        .collect()
}

/// Waits until every worker holds some inbound partitions and together they
/// hold each exactly once; returns each worker's set.
pub(crate) async fn wait_shared(
    env: &TestEnv,
    workers: &[&WorkerProcess],
) -> Vec<BTreeSet<String>> {
    let all = inbound_partitions(env);
    env.eventually(
        &format!(
            "the inbound partitions shared among {} instances",
            workers.len()
        ),
        DEADLINE,
        || async {
            let sets: Vec<BTreeSet<String>> = workers.iter().map(|w| assignment(w)).collect();
            let held: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<String> = sets.iter().flatten().cloned().collect();
            let done = sets.iter().all(|s| !s.is_empty()) && held == all.len() && union == all;
            Ok::<_, String>(done.then_some(sets))
        },
    )
    .await
}

/// The first rebalance: a second instance joins beside `first`, and the two
/// share the inbound partitions; returns it and the partitions each holds.
async fn join_second(
    env: &TestEnv,
    first: &WorkerProcess,
    extra: &[(&str, &str)],
) -> (WorkerProcess, Vec<BTreeSet<String>>) {
    let second = spawn(env, extra);
    let shared = wait_shared(env, &[first, &second]).await;
    env.note(&format!(
        "shared after the join: first {} partitions, second {}",
        shared[0].len(),
        shared[1].len()
    ));
    (second, shared)
}

/// The second rebalance: the first instance stops (SIGTERM), leaves the
/// group cleanly and exits 0; returns how many orders were produced by then.
async fn stop_first(env: &TestEnv, first: &mut WorkerProcess, pacer: &Pacer) -> usize {
    let at = pacer.produced();
    let status = first.terminate(Duration::from_secs(30)).await;
    check!(
        env,
        status.success(),
        "first instance exit status: {status}"
    );
    env.note(&format!("first instance stopped with {at} orders produced"));
    at
}

/// Issue 3 item 5: two instances in one group, the second started mid-stream
/// and the first stopped later (two rebalances). Per SKU a warehouse batch
/// of 15 and a later shipment: the first 15 orders of each SKU, in partition
/// order, go to the warehouse, the rest to the shipment.
#[tokio::test]
async fn two_instances_and_two_rebalances_end_as_the_model_says() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 20;
    const PER_SKU: usize = 24;
    const WAREHOUSE: usize = 15;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut first = spawn(&env, &[]);
    let stock: Vec<(String, String, String)> = (0..SKUS)
        .map(|i| {
            (
                unique(&format!("sku{i}")),
                unique(&format!("wh{i}")),
                unique(&format!("ship{i}")),
            )
        })
        .collect();
    for (sku, wh, ship) in &stock {
        env.batch_created(wh, sku, WAREHOUSE as i64, None).await;
        env.batch_created(ship, sku, 1000, Some("2030-06-01")).await;
    }
    env.wait_processed((2 * SKUS) as i64, DEADLINE).await;
    let plain: Vec<(String, String)> = stock
        .iter()
        .map(|(s, w, _)| (s.clone(), w.clone()))
        .collect();
    let orders = orders_for(&plain, SKUS * PER_SKU);
    let pacer = Pacer::default();

    let producing = produce_orders(&env, &orders, 8, Duration::from_millis(100), &pacer);
    let rebalancing = async {
        env.wait_for("60 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 60
        })
        .await;
        let (second, _) = join_second(&env, &first, &[]).await;
        let seen = distinct_ids(&env.witness.snapshot(), &t.allocated).len();
        env.wait_for("40 more Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= seen + 40
        })
        .await;
        let at = stop_first(&env, &mut first, &pacer).await;
        check!(
            env,
            at < orders.len(),
            "meant to stop the first instance mid-stream, but all orders were produced"
        );
        second
    };
    let (delivered, mut second) = tokio::join!(producing, rebalancing);

    // The model: per SKU, orders in partition order.
    let mut per_sku: HashMap<&str, Vec<(Delivered, &str)>> = HashMap::new();
    for ((orderid, sku), d) in orders.iter().zip(&delivered) {
        per_sku.entry(sku).or_default().push((*d, orderid));
    }
    let mut expected = BTreeMap::new();
    for (sku, wh, ship) in &stock {
        let mut lines = per_sku.remove(sku.as_str()).unwrap_or_default();
        check!(
            env,
            lines
                .iter()
                .all(|(d, _)| d.partition == lines[0].0.partition),
            "orders of one SKU share a partition"
        );
        lines.sort_by_key(|(d, _)| d.offset);
        for (n, (_, orderid)) in lines.iter().enumerate() {
            let batch = if n < WAREHOUSE { wh } else { ship };
            expected.insert(orderid.to_string(), (sku.clone(), batch.clone()));
        }
    }
    assert_allocated_once(&env, &expected, (2 * SKUS + orders.len()) as i64, DEADLINE).await;
    second.assert_running();
    let held = assignment(&second);
    check_eq!(
        env,
        held,
        inbound_partitions(&env),
        "the second instance holds every partition after the first left"
    );
    drop(second);
    env.finish().await;
}

/// Issue 3 item 5, the race the reference loses: per SKU a batch of 5, then
/// at the same moment orders of 3 and 2 and a quantity change (to 2 or 4),
/// with two instances running, so the allocation and the change are often
/// handled by different instances at once. Every serial order of the three
/// messages (the two orders in partition order) ends the same: with 2, only
/// the order of 2 allocated; with 4, only the order of 3.
#[tokio::test]
async fn concurrent_allocation_and_quantity_change_on_two_instances_stay_serializable() {
    let _alone = testkit::alone::run_alone().await;
    const PAIRS: usize = 120;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let first = spawn(&env, &[]);
    let second = spawn(&env, &[]);
    let stock: Vec<(String, String)> = (0..PAIRS)
        .map(|i| (unique(&format!("sku{i}")), unique(&format!("batch{i}"))))
        .collect();
    let creates = stock
        .iter()
        .map(|(sku, batch)| env.batch_created(batch, sku, 5, None));
    futures::future::join_all(creates).await;
    env.wait_processed(PAIRS as i64, DEADLINE).await;
    let shared = wait_shared(&env, &[&first, &second]).await;

    let three: Vec<String> = (0..PAIRS)
        .map(|i| format!("o3-{i}-{}", random_hex(6)))
        .collect();
    let two: Vec<String> = (0..PAIRS)
        .map(|i| format!("o2-{i}-{}", random_hex(6)))
        .collect();
    let new_qty = |i: usize| if i % 2 == 0 { 2 } else { 4 };
    let sends = (0..PAIRS).map(|i| {
        let (sku, batch) = &stock[i];
        let (three, two, env, t) = (&three[i], &two[i], &env, &t);
        async move {
            let orders = async {
                let a = env.allocation_required(three, sku, 3, &[]).await;
                env.allocation_required(two, sku, 2, &[]).await;
                a
            };
            let value = json!({"ref": batch, "qty": new_qty(i)});
            let change = env.produce_json(&t.batch_quantity_changed, Some(batch), &value, &[]);
            futures::future::join(orders, change).await
        }
    });
    let delivered = futures::future::join_all(sends).await;
    let owner = |topic: &str, partition: i32| {
        let name = format!("{topic}/{partition}");
        shared.iter().position(|s| s.contains(&name))
    };
    let split = delivered
        .iter()
        .filter(|(a, q)| {
            owner(&t.allocation_required, a.partition)
                != owner(&t.batch_quantity_changed, q.partition)
        })
        .count();
    env.note(&format!(
        "{split} of {PAIRS} SKUs have their orders and their quantity change on different instances"
    ));
    check!(
        env,
        split > 0,
        "no SKU's orders and quantity change landed on different instances: the race was not run"
    );

    env.wait_processed((PAIRS * 4) as i64, DEADLINE).await;
    env.wait_outbox_published(DEADLINE).await;
    check_eq!(
        env,
        env.processed().await,
        (PAIRS * 4) as i64,
        "processed messages"
    );
    let mut retries = 0.0;
    for w in [&first, &second] {
        if let Some((200, m)) = http_get(w.http_addr, "/metrics").await {
            retries += sample_sum(&m, "allocation_optimistic_concurrency_retries_total");
        }
    }
    env.note(&format!(
        "optimistic-concurrency retries on both instances: {retries}"
    ));

    check_eq!(
        env,
        env.over_allocated().await,
        vec![],
        "over-allocated batches"
    );
    let state = State::read(&env).await;
    let mut want_batches: Vec<(String, String, i64, Option<String>)> = stock
        .iter()
        .enumerate()
        .map(|(i, (sku, batch))| (batch.clone(), sku.clone(), new_qty(i), None))
        .collect();
    want_batches.sort();
    check_eq!(env, state.batches, want_batches, "batch quantities");
    let mut want: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (i, (sku, batch)) in stock.iter().enumerate() {
        let allocated = if new_qty(i) == 2 { &two[i] } else { &three[i] };
        want.insert(allocated.clone(), (sku.clone(), batch.clone()));
    }
    let got: BTreeMap<String, (String, String)> = state
        .allocations
        .iter()
        .map(|(o, s, b, _)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check_eq!(
        env,
        state.allocations.len(),
        PAIRS,
        "allocation rows (one line each)"
    );
    check!(
        env,
        got == want,
        "allocations differ from every serial order: {:?}",
        diff(&want, &got)
    );
    let view: BTreeMap<String, (String, String)> = state
        .view
        .iter()
        .map(|(o, s, b)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check!(
        env,
        view == want,
        "allocations_view: {:?}",
        diff(&want, &view)
    );

    // Each order's last event, in decision (outbox) order, tells its fate.
    let events: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kind, payload FROM outbox WHERE kind <> 'DeadLetter' ORDER BY id")
            .fetch_all(&env.db)
            .await
            .expect("outbox");
    check_eq!(
        env,
        env.count("SELECT count(*) FROM outbox WHERE kind = 'DeadLetter'")
            .await,
        0,
        "dead letters"
    );
    let mut last: HashMap<String, String> = HashMap::new();
    for (kind, payload) in &events {
        let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let orderid = value["orderid"].as_str().unwrap_or_default().to_owned();
        last.insert(orderid, kind.clone());
    }
    for order in three.iter().chain(&two) {
        let fate = if want.contains_key(order) {
            "Allocated"
        } else {
            "OutOfStock"
        };
        check_eq!(
            env,
            last.get(order).map(String::as_str),
            Some(fate),
            "last event of {order}"
        );
    }
    drop(first);
    drop(second);
    env.finish().await;
}

/// Issue 12 item 5: two instances, and two rebalances (the second instance
/// joins, then the first stops) while one partition is mid-batch (its
/// product's row locked by another session, so its transaction waits) and
/// another has messages waiting for a product not known yet. The revoked
/// tasks finish or abandon their batch, drop their queues and waiting
/// messages, and commit what they stored before the partitions move. Counted
/// applications: each inbound message recorded once in processed_messages,
/// each order's Allocated stored once in the outbox and published under one
/// `ce_id`, and nothing lost.
#[tokio::test]
async fn a_hand_over_mid_batch_and_with_waiting_messages_applies_nothing_twice() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 12;
    const LATE_ORDERS: usize = 20;
    let env = TestEnv::new().await;
    let extra = [
        ("UNKNOWN_REFERENCE_TIMEOUT", "300s"),
        ("MAX_BATCH_MESSAGES", "10"),
    ];
    let mut first = spawn(&env, &extra);
    let mut stock = create_stock(&env, SKUS, 1000).await;
    let mut orders: Vec<(String, String)> = Vec::new();

    // Waiting: orders for a product not known yet.
    let late = unique("sku-late");
    let late_batch = unique("batch-late");
    for i in 0..LATE_ORDERS {
        let orderid = format!("late-{i}-{}", env.suffix);
        env.allocation_required(&orderid, &late, 1, &[]).await;
        orders.push((orderid, late.clone()));
    }
    metrics_until(&env, first.http_addr, "the late orders wait", |m| {
        sample_sum(m, "allocation_waiting_messages") >= LATE_ORDERS as f64
    })
    .await;

    // Mid-batch: a product's row locked, orders for it in flight.
    let locked = stock[0].0.clone();
    let session = env.lock_products(std::slice::from_ref(&locked)).await;
    let stuck: Vec<(String, String)> = (0..30)
        .map(|i| (format!("stuck-{i}-{}", env.suffix), locked.clone()))
        .collect();
    let pacer = Pacer::default();
    produce_orders(&env, &stuck, 30, Duration::ZERO, &pacer).await;
    orders.extend(stuck);
    env.wait_worker_on_a_lock().await;

    // Orders for the other products flow through both rebalances.
    let flowing = orders_for(&stock[1..], 240);
    orders.extend(flowing.iter().cloned());
    let producing = produce_orders(&env, &flowing, 8, Duration::from_millis(100), &pacer);
    let rebalancing = async {
        let mark = first.log_text().len();
        let (second, shared) = join_second(&env, &first, &extra).await;
        let abandoned = first.log_lines_after(mark, "abandoned, uncommitted");
        env.note(&format!(
            "first instance's hand-over: {} batch(es) abandoned",
            abandoned.len()
        ));
        check!(
            env,
            !abandoned.is_empty(),
            "the first instance did not abandon the batch stuck on the lock at the hand-over"
        );
        session.rollback().await.expect("release the lock");
        env.note("lock released");
        let kept = shared[0].clone();
        env.batch_created(&late_batch, &late, 1000, None).await;
        // The second rebalance once the late product is stored, so that the
        // orders waiting for it are released around the hand-over.
        env.wait_batch(&late_batch).await;
        env.note("the late product stored");
        stop_first(&env, &mut first, &pacer).await;
        (second, mark, kept)
    };
    let (_, (mut second, mark, kept)) = tokio::join!(producing, rebalancing);

    // After the hand-over, the first instance committed nothing on the
    // partitions it gave up (a revoked task used to go on with its queue
    // and waiting messages).
    let log = first.log_text();
    let after = log.get(mark..).unwrap_or_default();
    let revoked_at = after.find("partitions revoked");
    check!(
        env,
        revoked_at.is_some(),
        "the first instance logged no revocation"
    );
    let committed_after: Vec<&str> = after[revoked_at.unwrap_or(0)..]
        .lines()
        .filter(|l| l.contains("batch done"))
        .filter(|l| {
            let field = |name: &str| {
                l.split(&format!("{name}="))
                    .nth(1)
                    .and_then(|r| r.trim_start_matches('"').split(['"', ' ']).next())
            };
            match (field("topic"), field("partition")) {
                (Some(topic), Some(partition)) => !kept.contains(&format!("{topic}/{partition}")),
                _ => false,
            }
        })
        .collect();
    check!(
        env,
        committed_after.is_empty(),
        "the first instance committed batches of partitions it had handed over: \
         {committed_after:#?}"
    );

    stock.push((late.clone(), late_batch.clone()));
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + 1 + orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    second.assert_running();
    let all = inbound_partitions(&env);
    env.eventually(
        "the second instance holds every partition after the first left",
        DEADLINE,
        || async { Ok::<_, String>((assignment(&second) == all).then_some(())) },
    )
    .await;
    drop(second);
    env.finish().await;
}

/// Issue 22 finding 3: a rebalance with idle partitions hands over in well
/// under a second of the worker's own time. The first instance holds every
/// partition, with nothing to do; the second joins. What the join may take
/// is Tansu's (about half of `session.timeout.ms`, 1 s here) and the group
/// protocol's; a revocation that waited out its bound (5 s: the tasks woken
/// in the callback stranded on the blocked thread) showed as 6 s and more.
/// The bound asserted, 4 s, leaves CI its slack and still fails that.
#[tokio::test]
async fn an_idle_hand_over_takes_well_under_the_revocation_bound() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let mut first = spawn(&env, &[]);
    let all = inbound_partitions(&env);
    env.eventually(
        "the first instance holds every partition",
        DEADLINE,
        || async { Ok::<_, String>((assignment(&first) == all).then_some(())) },
    )
    .await;
    // A message through each inbound topic, so that every partition task
    // that exists is idle, not new.
    let (sku, batch) = (unique("sku"), unique("batch"));
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;

    let started = std::time::Instant::now();
    let second = spawn(&env, &[]);
    wait_shared(&env, &[&first, &second]).await;
    let took = started.elapsed();
    env.note(&format!("the hand-over to a second instance took {took:?}"));
    check!(
        env,
        took < Duration::from_secs(4),
        "the second instance got its partitions {took:?} after it started"
    );
    let waited = first.log_lines_after(0, "did not stop in time for the hand-over");
    check!(
        env,
        waited.is_empty(),
        "the first instance waited out its bound: {waited:#?}"
    );
    first.assert_running();
    drop(second);
    env.finish().await;
}

/// Two instances with the librdkafka `properties` of instance 0 and 1
/// (through `KAFKA_PROPERTIES`), a stream of orders, and a rolling restart:
/// each instance in turn stopped (SIGTERM) and started again with the same
/// properties, each join finished before the next stop (a member that
/// leaves before its join completes wedges a Tansu group). Every order is
/// allocated once, as the model says.
async fn rolling_restart(env: &TestEnv, properties: [String; 2]) {
    const SKUS: usize = 8;
    let props = |i: usize| [("KAFKA_PROPERTIES", properties[i].as_str())];
    let mut first = env.spawn_worker_with(&props(0));
    let stock = create_stock(env, SKUS, 1000).await;
    let mut second = env.spawn_worker_with(&props(1));
    wait_shared(env, &[&first, &second]).await;
    let orders = orders_for(&stock, 240);
    let pacer = Pacer::default();
    let producing = produce_orders(env, &orders, 8, Duration::from_millis(150), &pacer);
    let restarting = async {
        let status = first.terminate(Duration::from_secs(30)).await;
        check!(
            env,
            status.success(),
            "first instance exit status: {status}"
        );
        env.note(&format!(
            "first stopped with {} orders produced",
            pacer.produced()
        ));
        first = env.spawn_worker_with(&props(0));
        wait_shared(env, &[&first, &second]).await;
        env.note(&format!(
            "first back with {} orders produced",
            pacer.produced()
        ));
        let status = second.terminate(Duration::from_secs(30)).await;
        check!(
            env,
            status.success(),
            "second instance exit status: {status}"
        );
        second = env.spawn_worker_with(&props(1));
        wait_shared(env, &[&first, &second]).await;
        env.note(&format!(
            "second back with {} orders produced",
            pacer.produced()
        ));
    };
    tokio::join!(producing, restarting);
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        env,
        &expected,
        (SKUS + orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    first.assert_running();
    second.assert_running();
}

/// Issue 24 item 4: cooperative-sticky assignment (incremental assign and
/// unassign, done by rdkafka's rebalance handling; the worker's callbacks
/// see only the partitions that move) across a rolling restart.
#[tokio::test]
async fn cooperative_sticky_assignment_loses_nothing_across_a_rolling_restart() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let properties = format!("{KAFKA_PROPERTIES},partition.assignment.strategy=cooperative-sticky");
    rolling_restart(&env, [properties.clone(), properties]).await;
    env.finish().await;
}

/// Issue 24 item 4: static membership (`group.instance.id`, one per
/// instance, the same after its restart) across a rolling restart. Ignored
/// here: the Tansu broker of these tests never settles such a group (the
/// first member is revoked when the second joins and is never assigned
/// again; the second is assigned and revoked every 6 s; docs/design.md,
/// "Group membership"). Run it against Kafka with `--ignored`.
#[tokio::test]
#[ignore = "Tansu never settles a group with static members (docs/design.md, Group membership)"]
async fn static_membership_loses_nothing_across_a_rolling_restart() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let id = |i: usize| {
        format!(
            "{KAFKA_PROPERTIES},group.instance.id=worker-{i}-{}",
            env.suffix
        )
    };
    rolling_restart(&env, [id(0), id(1)]).await;
    env.finish().await;
}

/// Issue 22 finding 2: with several instances, a late reference is not
/// dead-lettered while another instance holds it unread. Two instances
/// share the partitions; the second is frozen (SIGSTOP, for less than the
/// session timeout, so the group does not move). A batch is then produced
/// to a partition of the batch topic the second holds, and an order for it
/// to a partition of the order topic the first holds. The first is caught
/// up on its own batch partitions, and its window used to run: the order
/// was dead-lettered `unknown-sku` after the 2 s window. Now it counts only
/// while the whole group has caught up: for three windows nothing is
/// dead-lettered, and once the second runs again the order is allocated.
#[tokio::test]
async fn a_late_reference_held_by_a_frozen_instance_is_not_dead_lettered() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let _alone = testkit::alone::run_alone().await;
    const WINDOW: Duration = Duration::from_secs(2);
    let env = TestEnv::new().await;
    let extra = [
        (
            "KAFKA_PROPERTIES",
            "session.timeout.ms=12000,heartbeat.interval.ms=1000",
        ),
        ("UNKNOWN_REFERENCE_TIMEOUT", "2s"),
    ];
    let first = env.spawn_worker_with(&extra);
    let mut second = env.spawn_worker_with(&extra);
    let shared = wait_shared(&env, &[&first, &second]).await;
    let pick = |held: &BTreeSet<String>, topic: &str| -> Option<i32> {
        held.iter()
            .find_map(|p| p.strip_prefix(&format!("{topic}/"))?.parse().ok())
    };
    let (bc, ar) = (
        env.topics.batch_created.clone(),
        env.topics.allocation_required.clone(),
    );
    let (Some(batch_partition), Some(order_partition)) =
        (pick(&shared[1], &bc), pick(&shared[0], &ar))
    else {
        panic!("no batch partition on the second or no order partition on the first: {shared:?}");
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .create()
        .expect("producer");
    let (sku, batch, orderid) = (unique("sku"), unique("batch"), unique("order"));

    let stop = |signal: &str, pid: i32| {
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    };
    stop("-STOP", second.pid());
    let frozen_at = std::time::Instant::now();
    let value = json!({"ref": batch, "sku": sku, "qty": 10}).to_string();
    producer
        .send(
            FutureRecord::to(&bc)
                .partition(batch_partition)
                .key(&sku)
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing the batch: {e}"));
    let value = json!({"orderid": orderid, "sku": sku, "qty": 1}).to_string();
    producer
        .send(
            FutureRecord::to(&ar)
                .partition(order_partition)
                .key(&sku)
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing the order: {e}"));
    // Three windows with the batch unread by the frozen instance: the order
    // waits, nothing is dead-lettered (polled until then).
    let mut letters = Vec::new();
    while frozen_at.elapsed() < 3 * WINDOW + Duration::from_secs(1) {
        letters = env.records_on(&env.topics.dead_letter);
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop("-CONT", second.pid());
    check!(
        env,
        letters.is_empty(),
        "dead-lettered while the reference sat unread on the frozen instance: {:?}",
        letters.iter().map(|r| r.summary()).collect::<Vec<_>>()
    );
    env.wait_for_count(
        "the order allocated once the second instance runs again",
        &env.topics.allocated,
        1,
        DEADLINE,
        |r| r.field("orderid") == orderid,
    )
    .await;
    check!(
        env,
        env.records_on(&env.topics.dead_letter).is_empty(),
        "a dead letter after all"
    );
    second.assert_running();
    drop(first);
    drop(second);
    env.finish().await;
}
