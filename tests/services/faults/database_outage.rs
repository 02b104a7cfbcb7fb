//! PostgreSQL stopped (contract §6.5, §5): a private cluster stopped
//! mid-stream, and for a minute while messages wait for their references.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{check, check_eq, spawn, OUTAGE, RECOVERY_DEADLINE};
use testkit::orders::{
    assert_allocated_once, create_stock, orders_for, produce_orders, single_batch_model, Pacer,
};
use testkit::private_services::PrivatePostgres;
use testkit::{
    distinct_ids, http_get, http_until, metrics_until, on, sample_sum, unique, Record, TestEnv,
    DEADLINE,
};

/// Issue 3 item 4b: PostgreSQL stopped for 20 s mid-stream (a private cluster).
#[tokio::test]
async fn a_database_stopped_mid_stream_loses_nothing() {
    let _alone = testkit::alone::run_alone().await;
    const SKUS: usize = 5;
    const ORDERS: usize = 400;
    let pg = PrivatePostgres::start().await;
    let bootstrap = testkit::containers::shared_bootstrap_servers();
    let env = TestEnv::with_services(&pg.admin_url(), &bootstrap).await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("SHUTDOWN_TIMEOUT", "5s")]);
    let stock = create_stock(&env, SKUS, 1000).await;
    http_until(&env, worker.http_addr, "/readyz", 200).await;
    let orders = orders_for(&stock, ORDERS);
    let pacer = Pacer::default();

    // The ERP goes on publishing through the outage: ~8 s of orders.
    let producing = produce_orders(&env, &orders, 10, Duration::from_millis(200), &pacer);
    let outage = async {
        env.wait_for("50 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 50
        })
        .await;
        let mark = worker.log_text().len();
        let at_stop = env.processed().await;
        pg.stop_server().await;
        let stopped_at = Instant::now();
        env.note(&format!(
            "database stopped: {} orders produced, {at_stop} messages processed",
            pacer.produced()
        ));
        check!(
            env,
            pacer.produced() < ORDERS,
            "meant to stop the database mid-stream, but all {ORDERS} orders were produced"
        );
        let body = http_until(&env, worker.http_addr, "/readyz", 503).await;
        let not_ready_after = stopped_at.elapsed();
        check!(env, body.contains("database"), "/readyz says why: {body}");
        let mut probes = 0;
        // The outage lasts OUTAGE (the scenario), with /readyz probed meanwhile.
        while stopped_at.elapsed() < OUTAGE {
            worker.assert_running();
            if let Some((status, body)) = http_get(worker.http_addr, "/readyz").await {
                probes += 1;
                check_eq!(env, status, 503, "/readyz during the outage: {body}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        check!(env, probes > 0, "/readyz never answered during the outage");
        let produced_during = pacer.produced();
        pg.start_server().await;
        let started_at = Instant::now();
        env.note(&format!(
            "database started again after {:?} ({produced_during} orders produced by then); \
             /readyz said 503 {not_ready_after:?} after the stop",
            stopped_at.elapsed()
        ));
        http_until(&env, worker.http_addr, "/readyz", 200).await;
        let ready_after = started_at.elapsed();
        env.eventually(
            "a message processed after the outage",
            RECOVERY_DEADLINE,
            || async {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
                    .fetch_one(&env.db)
                    .await?;
                Ok::<_, sqlx::Error>((n > at_stop).then_some(()))
            },
        )
        .await;
        let processing_after = started_at.elapsed();
        (mark, started_at, ready_after, processing_after)
    };
    let (delivered, (mark, started_at, ready_after, processing_after)) =
        tokio::join!(producing, outage);
    check_eq!(env, delivered.len(), ORDERS, "orders delivered");

    let expected = single_batch_model(&stock, &orders);
    assert_allocated_once(&env, &expected, (SKUS + ORDERS) as i64, RECOVERY_DEADLINE).await;
    env.note(&format!(
        "recovery after the restart: ready in {ready_after:?}, processing in \
         {processing_after:?}, everything published in {:?}",
        started_at.elapsed()
    ));
    worker.assert_running();
    let backing_off = worker.log_lines_after(mark, "backing off");
    let resumed = worker
        .log_lines_after(mark, "reachable again")
        .into_iter()
        .chain(worker.log_lines_after(mark, "relay recovered"))
        .count();
    env.note(&format!(
        "{} 'backing off' line(s) and {resumed} 'resumed/recovered' line(s) since the stop; \
         first ones:\n{}",
        backing_off.len(),
        backing_off
            .iter()
            .take(8)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    ));
    check!(
        env,
        !backing_off.is_empty(),
        "the log says nothing about backing off; log: {}",
        worker.log.display()
    );
    // Backing off, not spinning: exponential up to 5 s, per partition task.
    check!(
        env,
        backing_off.len() < 500,
        "{} 'backing off' lines in a {OUTAGE:?} outage: retrying without backing off",
        backing_off.len()
    );
    check!(env, resumed > 0, "the log does not say the worker resumed");

    // SIGTERM while the database is away again: still a bounded, clean exit.
    pg.stop_server().await;
    http_until(&env, worker.http_addr, "/readyz", 503).await;
    let asked = Instant::now();
    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    env.note(&format!(
        "SIGTERM with the database down: {status:?} after {took:?}"
    ));
    check!(
        env,
        status.is_some_and(|s| s.success()),
        "exit status after SIGTERM with the database down: {status:?}"
    );
    check!(
        env,
        took <= Duration::from_secs(15),
        "SIGTERM with the database down took {took:?} (SHUTDOWN_TIMEOUT=5s)"
    );
    env.finish().await;
    drop(pg);
}

/// Issue 12 item 2: orders wait for their products (window 5 s) while the
/// database is stopped for 60 s; one product is published during the
/// outage, the other right after it. No late reference becomes a dead
/// letter: the window counts only while the database is reachable.
#[tokio::test]
async fn a_database_outage_turns_no_late_reference_into_a_dead_letter() {
    let _alone = testkit::alone::run_alone().await;
    const LONG_OUTAGE: Duration = Duration::from_secs(60);
    let pg = PrivatePostgres::start().await;
    let bootstrap = testkit::containers::shared_bootstrap_servers();
    let env = TestEnv::with_services(&pg.admin_url(), &bootstrap).await;
    let t = env.topics.clone();
    let mut worker = spawn(&env, &[("UNKNOWN_REFERENCE_TIMEOUT", "5s")]);
    env.batch_created(&unique("warm"), &unique("warm-sku"), 1, None)
        .await;
    env.wait_processed(1, DEADLINE).await;

    let (during, after) = (unique("sku-during"), unique("sku-after"));
    let mut orders = Vec::new();
    for sku in [&during, &after] {
        for _ in 0..3 {
            let orderid = unique("order");
            env.allocation_required(&orderid, sku, 1, &[]).await;
            orders.push((orderid, sku.clone()));
        }
    }
    metrics_until(&env, worker.http_addr, "six orders wait", |m| {
        sample_sum(m, "allocation_waiting_messages") >= 6.0
    })
    .await;

    pg.stop_server().await;
    let stopped_at = Instant::now();
    env.note("database stopped with six orders waiting");
    // Halfway through the outage (the scenario's timing).
    tokio::time::sleep_until((stopped_at + LONG_OUTAGE / 2).into()).await;
    env.batch_created(&unique("batch"), &during, 10, None).await;
    env.note("the first product published during the outage");
    // The outage lasts LONG_OUTAGE (the scenario); the worker must stay up.
    while stopped_at.elapsed() < LONG_OUTAGE {
        worker.assert_running();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pg.start_server().await;
    env.batch_created(&unique("batch"), &after, 10, None).await;
    env.note(&format!(
        "database started again after {:?}; the second product published",
        stopped_at.elapsed()
    ));

    env.wait_processed(1 + 6 + 2, RECOVERY_DEADLINE).await;
    let records = env.wait_outbox_published(RECOVERY_DEADLINE).await;
    let dead: Vec<String> = on(&records, &t.dead_letter).map(Record::summary).collect();
    check!(
        env,
        dead.is_empty(),
        "dead letters after the outage: {dead:#?}"
    );
    let allocated: BTreeSet<String> = on(&records, &t.allocated)
        .map(|r| r.field("orderid"))
        .collect();
    let expected: BTreeSet<String> = orders.iter().map(|(o, _)| o.clone()).collect();
    check_eq!(env, allocated, expected, "every waiting order allocated");
    worker.assert_running();
    drop(worker);
    env.finish().await;
    drop(pg);
}
