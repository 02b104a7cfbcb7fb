//! The aggregate's storage against a real database (as tests/services/postgres.rs,
//! one fresh database per test): a product with a long history is loaded
//! and decided within a small fraction of `statement_timeout`; a statement
//! that does time out is counted and its batch applies once it can; the
//! batches' allocated sums stay true whoever writes the lines. Needs
//! DATABASE_URL (see scripts/services.sh), or a Docker engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allocation_worker::adapters::inbound::{InboundMessage, MessageContext};
use allocation_worker::adapters::kafka::Topics;
use allocation_worker::adapters::metrics::Metrics;
use allocation_worker::adapters::postgres::cache::ProductCache;
use allocation_worker::adapters::postgres::pool::{lazy_pool, MIGRATOR};
use allocation_worker::adapters::postgres::repository::OPEN_BATCHES_OF;
use allocation_worker::adapters::postgres::unit_of_work::PgUnitOfWork;
use allocation_worker::domain::{BatchRef, Event, OrderId, OrderLine, Sku};
use allocation_worker::engine::processor::Processor;
use allocation_worker::service_layer::chunk::Outcome;
use allocation_worker::service_layer::DeadLetterReason;
use allocation_worker::service_layer::{
    ChunkUnitOfWork, ProductRepository, RepositoryError, UnitOfWork,
};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;

fn topics() -> Topics {
    Topics::default()
}

/// A new, migrated database on the server of DATABASE_URL, and the options
/// that reach it.
async fn fresh_database() -> (PgPool, PgConnectOptions) {
    let url = testkit::containers::shared_database_url();
    let name = format!("aw_test_{}", testkit::random_hex(16));
    testkit::database::create_database(&url, &name).await;
    let base: PgConnectOptions = url.parse().expect("DATABASE_URL is not a PostgreSQL URL");
    let options = base.database(&name);
    let pool = lazy_pool(options.clone(), 10);
    MIGRATOR.run(&pool).await.expect("migrations must apply");
    (pool, options)
}

async fn drop_database(pool: PgPool) {
    let name = pool
        .connect_options()
        .get_database()
        .expect("test pools name their database")
        .to_owned();
    drop(pool);
    let url = testkit::containers::shared_database_url();
    testkit::database::drop_database(&url, &name)
        .await
        .unwrap_or_else(|e| panic!("drop the test database {name}: {e}"));
}

fn message(topic: &str, offset: i64, value: serde_json::Value) -> InboundMessage {
    InboundMessage {
        topic: topic.into(),
        partition: 0,
        offset,
        key: Some(b"key".to_vec()),
        payload: Some(value.to_string().into_bytes()),
        headers: vec![],
    }
}

fn processor(pool: &PgPool, metrics: Arc<Metrics>) -> Processor {
    Processor::new(pool.clone(), topics(), Arc::new(Notify::new()), metrics)
}

fn context(key: &str) -> MessageContext {
    MessageContext {
        idempotency_key: key.into(),
        traceparent: None,
        tracestate: None,
    }
}

fn oid(n: usize) -> OrderId {
    OrderId::parse(format!("o{n}")).unwrap()
}

const LINES: usize = 100_000;
const PER_TRANSACTION: usize = 10_000;

/// `LINES` lines of 1 in one batch of `LINES + 100`, written by the
/// worker's own repository and unit of work, `PER_TRANSACTION` a
/// transaction.
async fn product_with_a_long_history(pool: &PgPool, sku: &Sku) {
    let p = processor(pool, Arc::new(Metrics::new().unwrap()));
    let created = message(
        &topics().batch_created,
        0,
        json!({"ref": "big", "sku": sku.as_str(), "qty": LINES + 100}),
    );
    assert_eq!(
        p.process_one(&created, false).await.unwrap(),
        Outcome::Applied
    );
    for round in 0..LINES / PER_TRANSACTION {
        let cache = ProductCache::default();
        let mut uow = PgUnitOfWork::begin(pool, &cache).await.unwrap();
        uow.load(&[sku], &[], &[]).await.unwrap();
        let ids: Vec<OrderId> = (round * PER_TRANSACTION..(round + 1) * PER_TRANSACTION)
            .map(oid)
            .collect();
        let lines: Vec<(&Sku, &OrderId)> = ids.iter().map(|o| (sku, o)).collect();
        uow.load_lines(&lines).await.unwrap();
        uow.start_message(context(&format!("history-{round}")));
        let product = uow.products().get(sku).await.unwrap().unwrap();
        for orderid in ids {
            let line = OrderLine {
                orderid,
                sku: sku.clone(),
                qty: 1,
            };
            assert!(product.allocate(line).unwrap().is_some());
        }
        // Not published: the history is the state, not its events.
        drop(product.take_events());
        uow.finish_message();
        uow.commit().await.unwrap();
    }
}

#[tokio::test]
async fn a_product_with_100000_lines_is_loaded_and_decided_well_within_the_statement_timeout() {
    let (pool, options) = fresh_database().await;
    let sku = Sku::parse("BUSY-LAMP").unwrap();
    product_with_a_long_history(&pool, &sku).await;
    let (count, allocated): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM allocations), \
         (SELECT allocated_quantity FROM batches WHERE reference = 'big')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((count, allocated), (LINES as i64, LINES as i64));

    // Every statement of the check runs under a bound 30 times tighter than
    // the worker's (30 s), on a cold cache: a load that read the history
    // would have to fit in it too, and the whole check must take a fraction
    // of it.
    let tight = lazy_pool(options.options([("statement_timeout", "1s")]), 2);
    let cache = ProductCache::default();
    let started = Instant::now();
    let mut uow = PgUnitOfWork::begin(&tight, &cache).await.unwrap();
    let big = BatchRef::parse("big").unwrap();
    uow.load(&[&sku], &[&big], &["check"]).await.unwrap();
    let loaded = started.elapsed();
    uow.start_message(context("check"));

    // A new line, a line allocated long ago again (a duplicate, by key),
    // and a drop that frees the ten most recent lines.
    let product = uow
        .products()
        .get_for_line(&sku, &oid(LINES))
        .await
        .unwrap()
        .unwrap();
    assert!(
        product.batches()[0].allocations().is_empty(),
        "no line loaded"
    );
    let chosen = product
        .allocate(OrderLine {
            orderid: oid(LINES),
            sku: sku.clone(),
            qty: 1,
        })
        .unwrap();
    assert_eq!(chosen, Some(big.clone()));
    let product = uow
        .products()
        .get_for_line(&sku, &oid(7))
        .await
        .unwrap()
        .unwrap();
    let again = product.allocate(OrderLine {
        orderid: oid(7),
        sku: sku.clone(),
        qty: 1,
    });
    assert_eq!(again, Ok(None), "found allocated already, by key");
    drop(product.take_events());
    // LINES + 1 allocated; down to LINES - 9 frees ten.
    let qty = u32::try_from(LINES - 9).unwrap();
    let product = uow
        .products()
        .get_for_quantity_change(&big, qty)
        .await
        .unwrap()
        .unwrap();
    assert!(
        product.batches()[0].allocations().len() <= 64,
        "a drop reads the lines it frees, a page at most, not the history: {}",
        product.batches()[0].allocations().len()
    );
    assert!(product.change_quantity(&big, qty).unwrap());
    let freed: Vec<String> = product
        .take_events()
        .into_iter()
        .map(|e| match e {
            Event::Deallocated(d) => d.orderid.to_string(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let expected: Vec<String> = (LINES - 9..=LINES).rev().map(|n| format!("o{n}")).collect();
    assert_eq!(freed, expected, "the most recent first");
    uow.finish_message();
    uow.commit().await.unwrap();
    let decided = started.elapsed();
    println!(
        "100,000 lines: locked and loaded in {loaded:?}, decided and committed in {decided:?}"
    );
    assert!(
        decided < Duration::from_secs(3),
        "a tenth of statement_timeout at most: {decided:?}"
    );
    let (count, allocated): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM allocations), \
         (SELECT allocated_quantity FROM batches WHERE reference = 'big')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((count, allocated), (LINES as i64 - 9, LINES as i64 - 9));

    // A batch of messages that would drop the batch to nothing reads its
    // lines before its first message in one bounded statement (the
    // repository's page of 16,384 at most, not the history); the message
    // reads the rest itself, newest first, down to the first line.
    let mut uow = PgUnitOfWork::begin(&tight, &cache).await.unwrap();
    uow.load(&[&sku], &[&big], &["drop-all"]).await.unwrap();
    uow.load_freed_lines(&[(&big, 0)]).await.unwrap();
    uow.start_message(context("drop-all"));
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    let read_first = product.batch(&big).unwrap().allocations().len();
    assert!(
        (1..=16_384).contains(&read_first),
        "one statement's bound: {read_first} lines"
    );
    let product = uow
        .products()
        .get_for_quantity_change(&big, 0)
        .await
        .unwrap()
        .unwrap();
    let lines = product.batch(&big).unwrap().allocations();
    assert_eq!(lines.len(), LINES - 9, "every line, once");
    assert_eq!(
        lines[0].orderid,
        oid(0),
        "in allocation order, the first first"
    );
    assert_eq!(lines[lines.len() - 1].orderid, oid(LINES - 10));
    drop(uow);
    drop(tight);
    drop_database(pool).await;
}

#[tokio::test]
async fn a_statement_that_times_out_is_counted_and_its_batch_applies_once_it_can() {
    let (pool, options) = fresh_database().await;
    let setup = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let t = topics();
    let created = message(
        &t.batch_created,
        0,
        json!({"ref": "b1", "sku": "LAMP", "qty": 10}),
    );
    assert_eq!(
        setup.process_one(&created, false).await.unwrap(),
        Outcome::Applied
    );

    // A session holds the product's row; the worker's lock waits for it
    // past a statement_timeout shorter than its lock_timeout.
    let mut holder = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE sku = 'LAMP' FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();

    let short = lazy_pool(
        options.options([("statement_timeout", "300ms"), ("lock_timeout", "10s")]),
        5,
    );
    let metrics = Arc::new(Metrics::new().unwrap());
    let p = processor(&short, metrics.clone());
    let allocate = message(
        &t.allocation_required,
        1,
        json!({"orderid": "o1", "sku": "LAMP", "qty": 2}),
    );
    for attempt in 1..=2 {
        let error = p.process_one(&allocate, false).await.unwrap_err();
        assert!(
            matches!(error, RepositoryError::TimedOut(_)),
            "a statement timeout, not an outage: {error}"
        );
        assert_eq!(metrics.statement_timeouts.get(), attempt);
        assert!(!p.store_reachable(), "reported, not ready");
    }
    assert!(metrics
        .render()
        .unwrap()
        .contains("allocation_db_statement_timeouts_total 2"));

    held.rollback().await.unwrap();
    assert_eq!(
        p.process_one(&allocate, false).await.unwrap(),
        Outcome::Applied
    );
    assert!(p.store_reachable());
    assert_eq!(metrics.statement_timeouts.get(), 2, "no more");
    drop(holder);
    drop(short);
    drop_database(pool).await;
}

#[tokio::test]
async fn a_batch_keeps_its_allocated_sum_whoever_writes_its_lines() {
    let (pool, _) = fresh_database().await;
    let p = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let t = topics();
    let steps = [
        message(
            &t.batch_created,
            0,
            json!({"ref": "b1", "sku": "LAMP", "qty": 10}),
        ),
        message(
            &t.allocation_required,
            1,
            json!({"orderid": "o1", "sku": "LAMP", "qty": 3}),
        ),
        message(
            &t.allocation_required,
            2,
            json!({"orderid": "o2", "sku": "LAMP", "qty": 4}),
        ),
    ];
    for m in &steps {
        assert_eq!(p.process_one(m, false).await.unwrap(), Outcome::Applied);
    }
    let sum = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT allocated_quantity FROM batches WHERE reference = 'b1'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(sum().await, 7);
    // What a previous version, which knows nothing of the column, writes:
    // rows of allocations, inserted and deleted, and the product's row
    // moved on (a new version and revision, so no cached copy is used).
    let moved_on = || async {
        sqlx::query(
            "UPDATE products SET version_number = version_number + 1, revision = revision + 1 \
             WHERE sku = 'LAMP'",
        )
        .execute(&pool)
        .await
        .unwrap();
    };
    sqlx::query(
        "INSERT INTO allocations (batch_id, orderid, sku, qty) \
         SELECT id, 'o3', 'LAMP', 2 FROM batches WHERE reference = 'b1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    moved_on().await;
    assert_eq!(sum().await, 9);
    sqlx::query("DELETE FROM allocations WHERE orderid = 'o1'")
        .execute(&pool)
        .await
        .unwrap();
    moved_on().await;
    assert_eq!(sum().await, 6);
    sqlx::query("UPDATE allocations SET qty = 1 WHERE orderid = 'o2'")
        .execute(&pool)
        .await
        .unwrap();
    moved_on().await;
    assert_eq!(sum().await, 3);

    // And this version decides on it: 7 left, so 8 is out of stock, 7 fits.
    let more = message(
        &t.allocation_required,
        3,
        json!({"orderid": "o4", "sku": "LAMP", "qty": 8}),
    );
    assert_eq!(p.process_one(&more, false).await.unwrap(), Outcome::Applied);
    let fits = message(
        &t.allocation_required,
        4,
        json!({"orderid": "o5", "sku": "LAMP", "qty": 7}),
    );
    assert_eq!(p.process_one(&fits, false).await.unwrap(), Outcome::Applied);
    let placed: Vec<String> = sqlx::query_scalar("SELECT orderid FROM allocations ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(placed, ["o2", "o3", "o5"]);
    assert_eq!(sum().await, 10);
    drop_database(pool).await;
}

/// `open_batches` (which a load reads) holds exactly the batches with stock
/// left after every step of a seeded run, whoever writes: this version
/// through its messages (creations, lines, quantity raises and drops that
/// free lines), and what an older version or a person in psql writes
/// straight into `batches` and `allocations`.
#[tokio::test]
async fn open_batches_holds_exactly_the_batches_with_stock_left_whoever_writes() {
    use rand::{Rng, SeedableRng};
    let (pool, _) = fresh_database().await;
    let p = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let t = topics();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let skus = ["LAMP", "DESK", "SOFA"];
    let mut refs: Vec<String> = Vec::new();
    let (mut offset, mut order) = (0i64, 0usize);
    let mut kinds_seen = [0usize; 7];
    for step in 0..300 {
        let kind = if refs.is_empty() {
            0
        } else {
            rng.random_range(0..7)
        };
        kinds_seen[kind] += 1;
        let sku = skus[rng.random_range(0..skus.len())];
        offset += 1;
        match kind {
            // A batch created through the worker.
            0 => {
                let reference = format!("b{step}");
                let m = message(
                    &t.batch_created,
                    offset,
                    json!({"ref": reference, "sku": sku, "qty": rng.random_range(1..8)}),
                );
                assert_eq!(p.process_one(&m, false).await.unwrap(), Outcome::Applied);
                refs.push(reference);
            }
            // Lines through the worker: they take batches in full.
            1 | 2 => {
                order += 1;
                let m = message(
                    &t.allocation_required,
                    offset,
                    json!({"orderid": format!("o{order}"), "sku": sku, "qty": rng.random_range(1..5)}),
                );
                // Deferred while the SKU has no batch yet.
                let outcome = p.process_one(&m, false).await.unwrap();
                assert!(
                    matches!(outcome, Outcome::Applied | Outcome::Deferred),
                    "{outcome:?}"
                );
            }
            // A quantity raised or dropped through the worker (a drop frees lines).
            3 => {
                let reference = &refs[rng.random_range(0..refs.len())];
                let m = message(
                    &t.batch_quantity_changed,
                    offset,
                    json!({"ref": reference, "qty": rng.random_range(0..10)}),
                );
                p.process_one(&m, false).await.unwrap();
            }
            // An older version's line, into any batch of the SKU with room.
            4 => {
                order += 1;
                sqlx::query(
                    "INSERT INTO allocations (batch_id, orderid, sku, qty) \
                     SELECT id, $1, sku, 1 FROM batches \
                     WHERE sku = $2 AND purchased_quantity > allocated_quantity \
                     ORDER BY id LIMIT 1",
                )
                .bind(format!("o{order}"))
                .bind(sku)
                .execute(&pool)
                .await
                .unwrap();
            }
            // A line removed, and a quantity set, by hand.
            5 => {
                sqlx::query(
                    "DELETE FROM allocations WHERE id = \
                     (SELECT id FROM allocations ORDER BY random() LIMIT 1)",
                )
                .execute(&pool)
                .await
                .unwrap();
            }
            _ => {
                sqlx::query("UPDATE batches SET purchased_quantity = $1 WHERE reference = $2")
                    .bind(rng.random_range(0..10i64))
                    .bind(&refs[rng.random_range(0..refs.len())])
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
        if kind >= 4 {
            // The product moved on, as an older version's commit moves it.
            sqlx::query(
                "UPDATE products SET version_number = version_number + 1, \
                 revision = revision + 1",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
        let (truth, kept): (Vec<String>, Vec<String>) = sqlx::query_as(
            "SELECT ARRAY(SELECT sku || '/' || id FROM batches \
                          WHERE purchased_quantity > allocated_quantity ORDER BY 1), \
                    ARRAY(SELECT sku || '/' || batch_id FROM open_batches ORDER BY 1)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(kept, truth, "after step {step} (kind {kind})");
    }
    // The run crossed both ways many times.
    let (open, full): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE purchased_quantity > allocated_quantity), \
                count(*) FILTER (WHERE purchased_quantity <= allocated_quantity) FROM batches",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(open > 0 && full > 0, "{open} open, {full} full at the end");
    assert!(kinds_seen.iter().all(|n| *n > 10), "{kinds_seen:?}");
    // A batch removed by hand leaves the table too.
    sqlx::query(
        "DELETE FROM batches b WHERE NOT EXISTS \
         (SELECT 1 FROM allocations a WHERE a.batch_id = b.id)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM open_batches o WHERE NOT EXISTS \
         (SELECT 1 FROM batches b WHERE b.id = o.batch_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stale, 0);
    drop_database(pool).await;
}

/// A load looks its batches up by primary key, whatever the statistics
/// say: on 60,000 batches not analysed yet (a fresh database, or one
/// autovacuum has not reached), the same read written as a join of
/// `open_batches` and `batches` was planned as a hash join over a
/// sequential scan of every batch, for each load.
#[tokio::test]
async fn a_load_reads_its_batches_by_key_whatever_the_statistics() {
    let (pool, _) = fresh_database().await;
    sqlx::query(
        "INSERT INTO products (sku, version_number) \
         SELECT 'SKU-' || g, 1 FROM generate_series(0, 20000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO batches (reference, sku, purchased_quantity) \
         SELECT 'r' || g, 'SKU-' || (g / 3), 10 FROM generate_series(1, 60000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let plan = || async {
        let skus = vec!["SKU-5".to_owned(), "SKU-77".to_owned()];
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {OPEN_BATCHES_OF}"))
            .bind(&skus)
            .fetch_all(&pool)
            .await
            .unwrap();
        lines.join("\n")
    };
    for when in ["before ANALYZE", "after ANALYZE"] {
        let plan = plan().await;
        assert!(
            !plan.contains("Seq Scan") && plan.contains("batches_pkey"),
            "{when}:\n{plan}"
        );
        sqlx::query("ANALYZE batches, open_batches")
            .execute(&pool)
            .await
            .unwrap();
    }
    drop_database(pool).await;
}

/// `allocation_product_cache_lookups_total` counts each product a batch's
/// transaction locks: a hit when the cached copy is current, a miss when the
/// product is read (here: changed by another instance since).
#[tokio::test]
async fn the_product_cache_counts_its_hits_and_misses() {
    let (pool, _) = fresh_database().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let p = processor(&pool, Arc::clone(&metrics));
    let other = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let t = topics();
    let line = |offset: i64, orderid: &str| {
        message(
            &t.allocation_required,
            offset,
            json!({"orderid": orderid, "sku": "LAMP", "qty": 1}),
        )
    };
    let lookups = |result: &str| {
        let text = metrics.render().unwrap();
        let wanted = format!("allocation_product_cache_lookups_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&wanted))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!((lookups("hit"), lookups("miss")), (Some(0.0), Some(0.0)));
    // A new product is created, not looked up.
    let created = message(
        &t.batch_created,
        0,
        json!({"ref": "b1", "sku": "LAMP", "qty": 10}),
    );
    assert_eq!(
        p.process_one(&created, false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!((lookups("hit"), lookups("miss")), (Some(0.0), Some(0.0)));
    // The copy it put back is current.
    assert_eq!(
        p.process_one(&line(1, "o1"), false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!((lookups("hit"), lookups("miss")), (Some(1.0), Some(0.0)));
    // Another instance changes the product: this one's copy is stale.
    assert_eq!(
        other.process_one(&line(2, "o2"), false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        p.process_one(&line(3, "o3"), false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!((lookups("hit"), lookups("miss")), (Some(1.0), Some(1.0)));
    drop_database(pool).await;
}

async fn allocated_to(pool: &PgPool, orderid: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT b.reference FROM allocations a JOIN batches b ON b.id = a.batch_id \
         WHERE a.orderid = $1",
    )
    .bind(orderid)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// A product is loaded with its batches with stock left only; a batch taken
/// in full is read by reference when a message names it (a creation again,
/// a quantity change, a line allocated to it), and keeps its place in the
/// order of creation among the others. Each step runs on a cold processor
/// (a load from the database) and the next on a warm one (its cache).
#[tokio::test]
async fn a_batch_taken_in_full_is_not_loaded_until_a_message_names_it() {
    let (pool, _) = fresh_database().await;
    let t = topics();
    let sku = Sku::parse("SHELF").unwrap();
    let warm = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let mut offset = 0;
    let mut run = |cold: bool, topic: &str, value: serde_json::Value| {
        offset += 1;
        let m = message(topic, offset, value);
        let fresh = cold.then(|| processor(&pool, Arc::new(Metrics::new().unwrap())));
        let warm = &warm;
        async move {
            fresh
                .as_ref()
                .unwrap_or(warm)
                .process_one(&m, true)
                .await
                .unwrap()
        }
    };
    // "full" is created first and taken in full; "open" after it, same ETA.
    for (cold, topic, value) in [
        (
            true,
            &t.batch_created,
            json!({"ref": "full", "sku": "SHELF", "qty": 2}),
        ),
        (
            false,
            &t.allocation_required,
            json!({"orderid": "o1", "sku": "SHELF", "qty": 2}),
        ),
        (
            true,
            &t.batch_created,
            json!({"ref": "open", "sku": "SHELF", "qty": 10}),
        ),
    ] {
        assert_eq!(run(cold, topic, value).await, Outcome::Applied);
    }
    assert_eq!(allocated_to(&pool, "o1").await.as_deref(), Some("full"));

    // Loaded, the product has only the batch with stock.
    let cache = ProductCache::default();
    let mut uow = PgUnitOfWork::begin(&pool, &cache).await.unwrap();
    uow.load(&[&sku], &[], &[]).await.unwrap();
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    let loaded: Vec<String> = product
        .batches()
        .iter()
        .map(|b| b.reference().to_string())
        .collect();
    assert_eq!(loaded, ["open"], "the batch taken in full is not read");
    assert!(!product.knows_every_batch());
    drop(uow);

    for cold in [true, false] {
        // The creation of "full" again is a no-op; with other data, refused.
        let again = json!({"ref": "full", "sku": "SHELF", "qty": 2});
        assert_eq!(run(cold, &t.batch_created, again).await, Outcome::Applied);
        let other = json!({"ref": "full", "sku": "SHELF", "qty": 3});
        assert_eq!(
            run(cold, &t.batch_created, other).await,
            Outcome::DeadLettered(DeadLetterReason::DuplicateBatch)
        );
        // The line allocated to it, again: a no-op; with another quantity,
        // refused.
        let line = json!({"orderid": "o1", "sku": "SHELF", "qty": 2});
        assert_eq!(
            run(cold, &t.allocation_required, line).await,
            Outcome::Applied
        );
        let line = json!({"orderid": "o1", "sku": "SHELF", "qty": 1});
        assert_eq!(
            run(cold, &t.allocation_required, line).await,
            Outcome::DeadLettered(DeadLetterReason::DuplicateLine)
        );
    }
    let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lines, 1, "nothing allocated twice");

    // Raised, "full" takes the next line before "open": created first, it
    // comes first among batches of the same ETA, though the cached product
    // read it after.
    let raise = json!({"ref": "full", "qty": 3});
    assert_eq!(
        run(false, &t.batch_quantity_changed, raise).await,
        Outcome::Applied
    );
    let line = json!({"orderid": "o2", "sku": "SHELF", "qty": 1});
    assert_eq!(
        run(false, &t.allocation_required, line).await,
        Outcome::Applied
    );
    assert_eq!(allocated_to(&pool, "o2").await.as_deref(), Some("full"));

    // Taken in full again, then dropped to nothing on both paths: its lines
    // go to "open", the last allocated first.
    for (cold, orderid) in [(true, "o3"), (false, "o4")] {
        let drop_to_zero = json!({"ref": "full", "qty": 0});
        assert_eq!(
            run(cold, &t.batch_quantity_changed, drop_to_zero).await,
            Outcome::Applied
        );
        let raise = json!({"ref": "full", "qty": 1});
        assert_eq!(
            run(cold, &t.batch_quantity_changed, raise).await,
            Outcome::Applied
        );
        let line = json!({"orderid": orderid, "sku": "SHELF", "qty": 1});
        assert_eq!(
            run(!cold, &t.allocation_required, line).await,
            Outcome::Applied
        );
        assert_eq!(allocated_to(&pool, orderid).await.as_deref(), Some("full"));
    }
    let drop_to_zero = json!({"ref": "full", "qty": 0});
    assert_eq!(
        run(true, &t.batch_quantity_changed, drop_to_zero).await,
        Outcome::Applied
    );
    for orderid in ["o1", "o2", "o3", "o4"] {
        assert_eq!(allocated_to(&pool, orderid).await.as_deref(), Some("open"));
    }
    let (available, batches): (i64, i64) = sqlx::query_as(
        "SELECT sum(purchased_quantity - allocated_quantity)::int8, count(*) FROM batches",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((available, batches), (10 - 5, 2));
    drop_database(pool).await;
}

/// Ties between equal ETAs go to the earliest created whichever way the
/// worker came to know each batch: created by this instance and kept in its
/// cache, or read back by reference once taken in full. Every step but the
/// first runs on one warm processor, so its cache holds both kinds.
#[tokio::test]
async fn ties_go_to_the_earliest_created_however_the_cache_came_to_know_each_batch() {
    let (pool, _) = fresh_database().await;
    let t = topics();
    let warm = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let cold = processor(&pool, Arc::new(Metrics::new().unwrap()));
    let mut offset = 0;
    let mut next = |topic: &str, value: serde_json::Value| {
        offset += 1;
        message(topic, offset, value)
    };
    // A product this instance creates: "a" is taken in full and dropped
    // from the cached copy, "b" is created after it, then "a" is raised.
    let steps = [
        (
            &t.batch_created,
            json!({"ref": "a", "sku": "DESK", "qty": 10}),
        ),
        (
            &t.allocation_required,
            json!({"orderid": "d1", "sku": "DESK", "qty": 10}),
        ),
        (
            &t.batch_created,
            json!({"ref": "b", "sku": "DESK", "qty": 10}),
        ),
        (&t.batch_quantity_changed, json!({"ref": "a", "qty": 20})),
        (
            &t.allocation_required,
            json!({"orderid": "d2", "sku": "DESK", "qty": 5}),
        ),
    ];
    for (topic, value) in steps {
        let m = next(topic, value);
        assert_eq!(warm.process_one(&m, true).await.unwrap(), Outcome::Applied);
    }
    assert_eq!(allocated_to(&pool, "d2").await.as_deref(), Some("a"));

    // A product another instance made, loaded by this one without its batch
    // taken in full: "d" and "e" are created here, "e" is taken in full and
    // dropped, then raised.
    let setup = [
        (
            &t.batch_created,
            json!({"ref": "x", "sku": "LAMP", "qty": 1}),
        ),
        (
            &t.allocation_required,
            json!({"orderid": "l0", "sku": "LAMP", "qty": 1}),
        ),
    ];
    for (topic, value) in setup {
        let m = next(topic, value);
        assert_eq!(cold.process_one(&m, true).await.unwrap(), Outcome::Applied);
    }
    let steps = [
        (
            &t.batch_created,
            json!({"ref": "d", "sku": "LAMP", "qty": 2}),
        ),
        (
            &t.batch_created,
            json!({"ref": "e", "sku": "LAMP", "qty": 3}),
        ),
        (
            &t.allocation_required,
            json!({"orderid": "l1", "sku": "LAMP", "qty": 3}),
        ),
        (&t.batch_quantity_changed, json!({"ref": "e", "qty": 6})),
        (
            &t.allocation_required,
            json!({"orderid": "l2", "sku": "LAMP", "qty": 1}),
        ),
    ];
    for (topic, value) in steps {
        let m = next(topic, value);
        assert_eq!(warm.process_one(&m, true).await.unwrap(), Outcome::Applied);
    }
    assert_eq!(allocated_to(&pool, "l1").await.as_deref(), Some("e"));
    assert_eq!(allocated_to(&pool, "l2").await.as_deref(), Some("d"));
    drop(cold);
    drop(warm);
    drop_database(pool).await;
}

#[tokio::test]
async fn a_batch_of_quantity_drops_knows_the_lines_they_free_before_its_first_message() {
    let (pool, _) = fresh_database().await;
    let t = topics();
    let sku = Sku::parse("DESK").unwrap();
    let p = processor(&pool, Arc::new(Metrics::new().unwrap()));
    // d1 is created first, so it takes o0..o9 (20), and d2 o10..o13 (8).
    let mut messages = vec![
        (
            &t.batch_created,
            json!({"ref": "d1", "sku": "DESK", "qty": 20}),
        ),
        (
            &t.batch_created,
            json!({"ref": "d2", "sku": "DESK", "qty": 20}),
        ),
    ];
    for n in 0..14 {
        messages.push((
            &t.allocation_required,
            json!({"orderid": format!("o{n}"), "sku": "DESK", "qty": 2}),
        ));
    }
    for (offset, (topic, value)) in messages.into_iter().enumerate() {
        let m = message(topic, offset as i64, value);
        assert_eq!(p.process_one(&m, false).await.unwrap(), Outcome::Applied);
    }

    // What a batch of three drops does before its first message: its
    // products loaded, then the lines the drops free, in one go.
    let (d1, d2) = (
        BatchRef::parse("d1").unwrap(),
        BatchRef::parse("d2").unwrap(),
    );
    let cache = ProductCache::default();
    let mut uow = PgUnitOfWork::begin(&pool, &cache).await.unwrap();
    uow.load(&[], &[&d1, &d2], &[]).await.unwrap();
    uow.load_freed_lines(&[(&d1, 15), (&d2, 5), (&d1, 11)])
        .await
        .unwrap();
    uow.start_message(context("drops"));
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    // A message's own read happens only when the product wants lines.
    for (batch, qty) in [(&d1, 15), (&d1, 11), (&d2, 5)] {
        assert_eq!(
            product.lines_wanted(batch, qty),
            0,
            "{batch} lowered to {qty} would read its lines again, message by message"
        );
    }
    let known = |batch: &BatchRef| -> Vec<String> {
        product
            .batch(batch)
            .unwrap()
            .allocations()
            .iter()
            .map(|l| l.orderid.to_string())
            .collect()
    };
    // As many lines as the lowest quantity could free (each is at least
    // 1), the most recent, in allocation order: not the batch's history.
    let d1_known: Vec<String> = (1..10).map(|n| format!("o{n}")).collect();
    assert_eq!(known(&d1), d1_known);
    assert_eq!(known(&d2), ["o11", "o12", "o13"]);
    // The drops free the most recent lines first, as ever.
    assert!(product.change_quantity(&d1, 11).unwrap());
    let freed: Vec<String> = product
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Deallocated(d) => Some(d.orderid.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(freed, ["o9", "o8", "o7", "o6", "o5"]);
    drop(uow);
    drop_database(pool).await;
}
