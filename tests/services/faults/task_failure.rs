//! A partition task that ends without a revocation (issue 22 finding 7): a
//! panic, caused by the debug builds' test hook
//! (`ALLOCATION_WORKER_TEST_PANIC_AT`). Its partition is read again from
//! the last offset the task stored, so nothing it held is skipped.

use std::time::Duration;

use super::{check, spawn};
use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::{TestEnv, DEADLINE};

/// The task of the partition that reaches offset 3 of the orders' topic
/// panics once, mid-stream, with batches of two: its batch and its queue
/// are lost with it. A fresh task used to take the partition's next
/// messages and store offsets past them, so those orders were never
/// allocated; now the partition is read again and every order is allocated
/// once.
#[tokio::test]
async fn a_partition_task_that_panics_restarts_from_its_last_stored_offset() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let panic_at = format!("{}:3", env.topics.allocation_required);
    let worker = spawn(
        &env,
        &[
            ("ALLOCATION_WORKER_TEST_PANIC_AT", panic_at.as_str()),
            ("MAX_BATCH_MESSAGES", "2"),
        ],
    );
    let stock = create_stock(&env, 6, 1000).await;
    let orders = orders_for(&stock, 60);
    let pacer = Pacer::default();
    produce_orders(&env, &orders, 3, Duration::from_millis(30), &pacer).await;
    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        &env,
        &expected,
        (stock.len() + orders.len()) as i64,
        DEADLINE,
    )
    .await;
    let restarted = worker.log_lines_after(0, "partition task ended unexpectedly");
    check!(
        env,
        !restarted.is_empty(),
        "the test hook's panic did not happen (no restart logged)"
    );
    drop(worker);
    env.finish().await;
}

/// The task of a batch-created partition panics once. What it held counted
/// as references not handled yet, which stops the unknown-reference window
/// until they are: a failed task must not leave them counted for ever. An
/// order for a SKU that never comes is still dead-lettered after its 1 s
/// window, and the batches are all stored.
#[tokio::test]
async fn after_a_reference_task_panics_the_window_still_closes() {
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let panic_at = format!("{}:2", env.topics.batch_created);
    let worker = spawn(
        &env,
        &[
            ("ALLOCATION_WORKER_TEST_PANIC_AT", panic_at.as_str()),
            ("MAX_BATCH_MESSAGES", "2"),
            ("UNKNOWN_REFERENCE_TIMEOUT", "1s"),
        ],
    );
    let stock = create_stock(&env, 12, 10).await;
    check!(
        env,
        !worker
            .log_lines_after(0, "partition task ended unexpectedly")
            .is_empty(),
        "the test hook's panic did not happen"
    );
    let _ = stock;
    let orderid = testkit::unique("order");
    env.allocation_required(&orderid, &testkit::unique("never"), 1, &[])
        .await;
    env.wait_for_count(
        "the order for a SKU that never comes dead-lettered",
        &env.topics.dead_letter,
        1,
        DEADLINE,
        |r| r.field("orderid") == orderid,
    )
    .await;
    drop(worker);
    env.finish().await;
}
