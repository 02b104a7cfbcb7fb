//! A bounded graceful shutdown (contract §6.6): SIGTERM mid-stream with one
//! message stuck on a row lock, and a restart that applies nothing twice.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{check, check_eq, spawn};
use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::{distinct_ids, unique, TestEnv, DEADLINE};

/// Issue 3 item 6: SIGTERM mid-stream with SHUTDOWN_TIMEOUT=5s, while one
/// partition's message cannot finish (the test holds the row lock of its
/// product, so its commit waits), exits 0 within the bound. A message parked
/// on an unknown batch survives the stop (its offset was not committed past),
/// and the restart applies nothing twice.
#[tokio::test]
async fn sigterm_mid_stream_exits_in_bound_and_the_restart_applies_nothing_twice() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 10;
    const ORDERS: usize = 400;
    const BOUND: Duration = Duration::from_secs(10);
    let settings = [
        ("SHUTDOWN_TIMEOUT", "5s"),
        ("UNKNOWN_REFERENCE_TIMEOUT", "60s"),
    ];
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &settings);
    let stock = create_stock(&env, SKUS, 1000).await;
    // A quantity change of a batch that comes only after the restart.
    let (late_sku, late_batch) = (unique("sku-late"), unique("batch-late"));
    env.produce_json(
        &t.batch_quantity_changed,
        Some(&late_batch),
        &json!({"ref": late_batch, "qty": 7}),
        &[],
    )
    .await;
    let orders = orders_for(&stock, ORDERS);
    let pacer = Pacer::default();

    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(40), &pacer);
    let stopping = async {
        env.wait_for("100 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 100
        })
        .await;
        // Stall one SKU: its next order's commit waits for this lock.
        let blocker = env.lock_products(std::slice::from_ref(&stock[0].0)).await;
        env.wait_worker_on_a_lock().await;
        worker.assert_running();
        let at = pacer.produced();
        let asked = Instant::now();
        worker.sigterm();
        let status = worker.wait_exit(BOUND + Duration::from_secs(20)).await;
        let took = asked.elapsed();
        if status.is_none() {
            worker.kill().await;
        }
        blocker.rollback().await.expect("release the lock");
        env.note(&format!(
            "SIGTERM with {at} orders produced and one message stuck: {status:?} after {took:?}"
        ));
        check!(
            env,
            status.is_some(),
            "no exit within {:?} of SIGTERM with a message stuck (SIGKILLed it); log: {}",
            BOUND + Duration::from_secs(20),
            worker.log.display()
        );
        check!(
            env,
            status.is_some_and(|s| s.success()),
            "exit status after SIGTERM: {status:?}"
        );
        check!(
            env,
            took <= BOUND,
            "SIGTERM took {took:?} with SHUTDOWN_TIMEOUT=5s"
        );
        check!(
            env,
            at < ORDERS,
            "meant to stop mid-stream, but all {ORDERS} orders were produced"
        );
        let unsent = env.count("SELECT count(*) FROM outbox_pending").await;
        check_eq!(
            env,
            unsent,
            0,
            "a graceful stop publishes every committed decision"
        );
        check_eq!(
            env,
            env.purchased(&late_batch).await,
            None,
            "the late batch does not exist yet"
        );
        spawn(&env, &settings)
    };
    let (_, mut restarted) = tokio::join!(producing, stopping);

    // The batch arrives: the change parked before the stop is applied now.
    env.batch_created(&late_batch, &late_sku, 10, None).await;
    env.wait_purchased(&late_batch, 7, DEADLINE).await;
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(&env, &expected, (SKUS + ORDERS + 2) as i64, DEADLINE).await;
    restarted.assert_running();
    drop(restarted);
    env.finish().await;
}
