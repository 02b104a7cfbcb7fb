//! The broker frozen (contract §6.5, §6.6): a private Tansu broker SIGSTOPped
//! mid-stream, then again during a SIGTERM.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{check, spawn, OUTAGE, RECOVERY_DEADLINE};
use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::private_services::PrivateBroker;
use testkit::{distinct_ids, http_get, http_until, TestEnv, DEADLINE};

/// Issue 3 item 4a: the broker frozen (SIGSTOP) for 20 s mid-stream: while
/// the worker still works through a burst it has fetched, so that decisions
/// are committed that cannot be published until the broker is back.
#[tokio::test]
async fn a_broker_frozen_mid_stream_loses_nothing() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 5;
    const PACED: usize = 100;
    const BURST: usize = 1500;
    const AFTER: usize = 100;
    let broker = PrivateBroker::start().await;
    let database_url = testkit::containers::shared_database_url();
    let env = TestEnv::with_services(&database_url, &broker.bootstrap()).await;
    let t = env.topics.clone();
    // Batches of 16 (the same code path as the default 500): a burst then
    // takes the worker long enough that the freeze lands in the middle of it.
    let mut worker = spawn(
        &env,
        &[("SHUTDOWN_TIMEOUT", "5s"), ("MAX_BATCH_MESSAGES", "16")],
    );
    let stock = create_stock(&env, SKUS, 1000).await;
    let orders = orders_for(&stock, PACED + BURST + AFTER);
    let pacer = Pacer::default();
    let pace = Duration::from_millis(50);

    produce_orders(&env, &orders[..PACED], 10, pace, &pacer).await;
    let before_burst = env.processed().await;
    produce_orders(&env, &orders[PACED..PACED + BURST], BURST, pace, &pacer).await;
    // Freeze once the worker is into the burst (so it has fetched some).
    let at_freeze = env
        .eventually("the worker working on the burst", DEADLINE, || async {
            let n = env.processed().await;
            Ok::<_, String>((n >= before_burst + 20).then_some(n))
        })
        .await;
    broker.freeze();
    let frozen_at = Instant::now();
    let mark = worker.log_text().len();
    let in_flight = (SKUS + PACED + BURST) as i64 - at_freeze;
    env.note(&format!(
        "broker frozen with {in_flight} of {} produced messages not processed yet",
        SKUS + PACED + BURST
    ));
    check!(
        env,
        in_flight > 0,
        "meant to freeze mid-stream, but every produced message was processed"
    );
    let mut readiness: BTreeMap<u16, usize> = BTreeMap::new();
    // The freeze lasts OUTAGE (the scenario), with /readyz probed meanwhile.
    while frozen_at.elapsed() < OUTAGE {
        worker.assert_running();
        if let Some((status, _)) = http_get(worker.http_addr, "/readyz").await {
            *readiness.entry(status).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (during, unsent) = (
        env.processed().await - at_freeze,
        env.count("SELECT count(*) FROM outbox_pending").await,
    );
    let seen = distinct_ids(&env.witness.snapshot(), &t.allocated).len();
    broker.thaw();
    let thawed_at = Instant::now();
    env.note(&format!(
        "broker thawed after {:?}: {during} messages processed during the freeze, {unsent} \
         outbox rows waiting to be published, {seen} decisions seen; /readyz answers during \
         the freeze (status: count): {readiness:?}",
        frozen_at.elapsed()
    ));
    env.wait_for(
        "a new decision published after the freeze",
        RECOVERY_DEADLINE,
        |rs| distinct_ids(rs, &t.allocated).len() > seen,
    )
    .await;
    let first_event = thawed_at.elapsed();
    produce_orders(&env, &orders[PACED + BURST..], 10, pace, &pacer).await;

    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(
        &env,
        &expected,
        (SKUS + orders.len()) as i64,
        RECOVERY_DEADLINE,
    )
    .await;
    env.note(&format!(
        "recovery: first new event {first_event:?} after SIGCONT; all {} decisions published \
         and the outbox empty {:?} after SIGCONT",
        orders.len(),
        thawed_at.elapsed()
    ));
    worker.assert_running();
    let warnings = worker.log_lines_after(mark, " WARN ");
    env.note(&format!(
        "{} warning line(s) in the worker log since the freeze; first ones:\n{}",
        warnings.len(),
        warnings
            .iter()
            .take(12)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    ));
    // What the contract asks beyond "nothing lost" is collected, so that one
    // shortfall does not hide the next.
    let mut shortfalls: Vec<String> = Vec::new();
    if warnings.is_empty() {
        shortfalls.push("the worker logged no warning about the frozen broker".into());
    }
    if !readiness.contains_key(&503) {
        shortfalls.push(format!(
            "/readyz never said 503 while the broker was frozen (contract §6.5: reports \
             not-ready); answers (status: count): {readiness:?}"
        ));
    }
    http_until(&env, worker.http_addr, "/readyz", 200).await;

    // SIGTERM while the broker is frozen again, mid-burst: still a bounded exit.
    let more = orders_for(&stock, BURST);
    let before = env.processed().await;
    produce_orders(&env, &more, BURST, pace, &pacer).await;
    env.eventually(
        "the worker working on the second burst",
        DEADLINE,
        || async {
            let n = env.processed().await;
            Ok::<_, String>((n > before).then_some(()))
        },
    )
    .await;
    broker.freeze();
    let asked = Instant::now();
    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    broker.thaw();
    if status.is_none() {
        worker.kill().await;
    }
    env.note(&format!(
        "SIGTERM with the broker frozen (SHUTDOWN_TIMEOUT=5s): {status:?} after {took:?}"
    ));
    if !status.is_some_and(|s| s.success()) || took > Duration::from_secs(15) {
        shortfalls.push(format!(
            "SIGTERM with the broker frozen and SHUTDOWN_TIMEOUT=5s: {status:?} after {took:?} \
             (contract §6.6: exit 0 within a bounded time)"
        ));
    }
    check!(
        env,
        shortfalls.is_empty(),
        "with the broker frozen:\n- {}\nlog: {}",
        shortfalls.join("\n- "),
        worker.log.display()
    );
    env.finish().await;
    drop(broker);
}
