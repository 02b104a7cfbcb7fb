//! The PostgreSQL adapters and the message processor against a real database:
//! one fresh database per test. Needs DATABASE_URL (see scripts/services.sh),
//! or a Docker engine (a PostgreSQL container, see tests/common/containers.rs).

mod common;

use std::sync::Arc;

use allocation_worker::adapters::kafka::Topics;
use allocation_worker::adapters::metrics::Metrics;
use allocation_worker::adapters::outbox::{DeadLetterReason, InboundMessage, MessageContext};
use allocation_worker::adapters::postgres::{lazy_pool, PgUnitOfWork, ProductCache, MIGRATOR};
use allocation_worker::domain::{OrderId, OrderLine, Sku};
use allocation_worker::entrypoints::worker::{Outcome, Processor};
use allocation_worker::service_layer::{ProductRepository, UnitOfWork};
use rand::Rng;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;

fn topics() -> Topics {
    Topics {
        batch_created: "erp.batch-created".into(),
        batch_quantity_changed: "erp.batch-quantity-changed".into(),
        allocation_required: "erp.allocation-required".into(),
        allocated: "allocation.allocated".into(),
        deallocated: "allocation.deallocated".into(),
        out_of_stock: "allocation.out-of-stock".into(),
        dead_letter: "allocation.dead-letter".into(),
    }
}

/// A new, migrated database on the server of DATABASE_URL.
async fn fresh_database() -> PgPool {
    let pool = empty_database().await;
    MIGRATOR.run(&pool).await.expect("migrations must apply");
    pool
}

/// The options of DATABASE_URL, and a connection to its database, from
/// which test databases are created and dropped.
async fn admin_connection() -> (PgConnectOptions, sqlx::PgConnection) {
    // DATABASE_URL, or a PostgreSQL container of this test process.
    let url = common::containers::shared_database_url();
    let base: PgConnectOptions = url.parse().expect("DATABASE_URL is not a PostgreSQL URL");
    let admin = sqlx::PgConnection::connect_with(&base)
        .await
        .expect("cannot connect to DATABASE_URL: is PostgreSQL running? (scripts/services.sh)");
    (base, admin)
}

/// A new database on the server of DATABASE_URL, without any migration.
async fn empty_database() -> PgPool {
    let (base, mut admin) = admin_connection().await;
    let name = format!("aw_test_{:016x}", rand::rng().random::<u64>());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("cannot create a test database (the role needs CREATEDB)");
    lazy_pool(base.database(&name), 20)
}

/// Drops a test's database once it passed (a failed test keeps its own, for
/// inspection): left behind, they add up, and PostgreSQL's autovacuum
/// launcher visits every database, which slows every later run.
async fn drop_database(pool: PgPool) {
    let name = pool
        .connect_options()
        .get_database()
        .expect("test pools name their database")
        .to_owned();
    // Not pool.close(): it waits for every connection, and a processor
    // still in scope keeps its last one. FORCE ends those sessions.
    drop(pool);
    let (_, mut admin) = admin_connection().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop the test database");
}

fn message(topic: &str, offset: i64, value: serde_json::Value) -> InboundMessage {
    raw_message(topic, offset, value.to_string().into_bytes())
}

fn raw_message(topic: &str, offset: i64, payload: Vec<u8>) -> InboundMessage {
    InboundMessage {
        topic: topic.into(),
        partition: 0,
        offset,
        key: Some(b"key".to_vec()),
        payload: Some(payload),
        headers: vec![],
    }
}

fn processor(pool: &PgPool) -> Processor {
    Processor::new(
        pool.clone(),
        topics(),
        Arc::new(Notify::new()),
        Arc::new(Metrics::new().expect("metrics register")),
    )
}

async fn outbox_kinds(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM outbox ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn allocated_to(pool: &PgPool, orderid: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT b.reference FROM allocations a JOIN batches b ON b.id = a.batch_id WHERE a.orderid = $1",
    )
    .bind(orderid)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn stores_and_reloads_a_product_with_its_allocations_in_order() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let steps = [
        message(
            &t.batch_created,
            0,
            json!({"ref": "ship", "sku": "LAMP", "qty": 10, "eta": "2011-01-02"}),
        ),
        message(
            &t.batch_created,
            1,
            json!({"ref": "stock", "sku": "LAMP", "qty": 3}),
        ),
        message(
            &t.allocation_required,
            0,
            json!({"orderid": "o1", "sku": "LAMP", "qty": 2}),
        ),
        message(
            &t.allocation_required,
            1,
            json!({"orderid": "o2", "sku": "LAMP", "qty": 2}),
        ),
        message(
            &t.allocation_required,
            2,
            json!({"orderid": "o3", "sku": "LAMP", "qty": 2}),
        ),
    ];
    for m in &steps {
        assert_eq!(p.process_one(m, false).await.unwrap(), Outcome::Applied);
    }
    assert_eq!(allocated_to(&pool, "o1").await.as_deref(), Some("stock"));
    assert_eq!(allocated_to(&pool, "o2").await.as_deref(), Some("ship"));

    let cache = ProductCache::default();
    let mut uow = PgUnitOfWork::begin(&pool, &cache).await.unwrap();
    let product = uow
        .products()
        .get(&Sku::parse("LAMP").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(product.version_number(), 5);
    let refs: Vec<_> = product
        .batches()
        .iter()
        .map(|b| b.reference().as_str())
        .collect();
    assert_eq!(
        refs,
        ["ship", "stock"],
        "batches come back in creation order"
    );
    let ship: Vec<_> = product.batches()[0]
        .allocations()
        .iter()
        .map(|l| l.orderid.as_str())
        .collect();
    assert_eq!(
        ship,
        ["o2", "o3"],
        "allocations come back in allocation order"
    );
    assert_eq!(
        product.batches()[0].eta().map(|d| d.to_string()).as_deref(),
        Some("2011-01-02")
    );

    // Ends the transaction, which holds the product's row lock.
    std::mem::drop(uow);

    // The LIFO rule sees the stored order: dropping the shipment to 2 frees o3.
    let drop = message(
        &t.batch_quantity_changed,
        0,
        json!({"ref": "ship", "qty": 2}),
    );
    assert_eq!(p.process_one(&drop, false).await.unwrap(), Outcome::Applied);
    assert_eq!(allocated_to(&pool, "o2").await.as_deref(), Some("ship"));
    assert_eq!(allocated_to(&pool, "o3").await, None);
    let view: Vec<(String, String)> =
        sqlx::query_as("SELECT orderid, batchref FROM allocations_view ORDER BY orderid")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        view,
        [("o1".into(), "stock".into()), ("o2".into(), "ship".into())]
    );
    assert_eq!(
        outbox_kinds(&pool).await,
        [
            "Allocated",
            "Allocated",
            "Allocated",
            "Deallocated",
            "OutOfStock"
        ]
    );
    drop_database(pool).await;
}

fn context(key: &str) -> MessageContext {
    MessageContext {
        idempotency_key: key.into(),
        traceparent: None,
    }
}

#[tokio::test]
async fn of_two_transactions_on_one_product_the_second_decides_on_the_first_ones_result() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let batch = message(
        &t.batch_created,
        0,
        json!({"ref": "b1", "sku": "CHAIR", "qty": 5}),
    );
    p.process_one(&batch, false).await.unwrap();

    // The first transaction loads (and so locks) the product and allocates 4.
    let sku = Sku::parse("CHAIR").unwrap();
    let first_cache = ProductCache::default();
    let mut first = PgUnitOfWork::begin(&pool, &first_cache).await.unwrap();
    first.start_message(context("first"));
    let product = first.products().get(&sku).await.unwrap().unwrap();
    product
        .allocate(OrderLine {
            orderid: OrderId::parse("o1").unwrap(),
            sku: sku.clone(),
            qty: 4,
        })
        .unwrap();
    assert_eq!(product.version_number(), 2);

    // A second one, started meanwhile, cannot read the product until the
    // first ends, so it never decides on the stale version 1.
    let second = {
        let pool = pool.clone();
        let sku = sku.clone();
        tokio::spawn(async move {
            let cache = ProductCache::default();
            let mut uow = PgUnitOfWork::begin(&pool, &cache).await.unwrap();
            let product = uow.products().get(&sku).await.unwrap().unwrap();
            let version = product.version_number();
            let available: i64 = product
                .batches()
                .iter()
                .map(|b| b.available_quantity())
                .sum();
            drop(uow);
            (version, available)
        })
    };
    first.finish_message();
    first.commit().await.expect("the first commits");
    let (version, available) = second.await.unwrap();
    assert_eq!(
        (version, available),
        (2, 1),
        "the second transaction saw the first one's allocation"
    );
    assert_eq!(allocated_to(&pool, "o1").await.as_deref(), Some("b1"));

    // Through the processor, the same race ends with an OutOfStock.
    let retry = message(
        &t.allocation_required,
        0,
        json!({"orderid": "o2", "sku": "CHAIR", "qty": 4}),
    );
    assert_eq!(
        p.process_one(&retry, false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(allocated_to(&pool, "o2").await, None);
    assert_eq!(outbox_kinds(&pool).await, ["OutOfStock"]);
    drop_database(pool).await;
}

#[tokio::test]
async fn concurrent_allocations_and_a_quantity_drop_never_over_allocate() {
    let pool = fresh_database().await;
    let p = Arc::new(processor(&pool));
    let t = topics();
    for (i, (reference, qty)) in [("b1", 10), ("b2", 5)].into_iter().enumerate() {
        let m = message(
            &t.batch_created,
            i as i64,
            json!({"ref": reference, "sku": "DESK", "qty": qty}),
        );
        p.process_one(&m, false).await.unwrap();
    }
    let mut messages: Vec<_> = (0..20)
        .map(|i| {
            message(
                &t.allocation_required,
                i,
                json!({"orderid": format!("o{i}"), "sku": "DESK", "qty": 1}),
            )
        })
        .collect();
    messages.insert(
        7,
        message(&t.batch_quantity_changed, 0, json!({"ref": "b1", "qty": 3})),
    );
    let tasks: Vec<_> = messages
        .into_iter()
        .map(|m| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.process_one(&m, false).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Outcome::Applied);
    }

    let over: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT b.reference, b.purchased_quantity, COALESCE(SUM(a.qty), 0)::BIGINT FROM batches b \
         LEFT JOIN allocations a ON a.batch_id = b.id GROUP BY b.id HAVING COALESCE(SUM(a.qty), 0) > b.purchased_quantity",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(over.is_empty(), "over-allocated batches: {over:?}");
    let allocated: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM allocations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        allocated, 8,
        "3 + 5 units of stock, every unit taken by one of 20 orders"
    );
    let view: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM allocations_view")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(view, allocated, "the read model matches the allocations");
    // Every order was decided: allocated now, or reported out of stock last.
    let out_of_stock: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT convert_from(payload, 'UTF8')::json->>'orderid') FROM outbox o WHERE kind = 'OutOfStock' \
         AND NOT EXISTS (SELECT 1 FROM allocations a WHERE a.orderid = convert_from(o.payload, 'UTF8')::json->>'orderid')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(allocated + out_of_stock, 20);
    eprintln!("optimistic-concurrency retries: {}", p.conflict_retries());
    drop_database(pool).await;
}

#[tokio::test]
async fn a_redelivered_message_changes_nothing() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let batch = message(
        &t.batch_created,
        0,
        json!({"ref": "b1", "sku": "LAMP", "qty": 5}),
    );
    let order = message(
        &t.allocation_required,
        0,
        json!({"orderid": "o1", "sku": "LAMP", "qty": 1}),
    );
    assert_eq!(
        p.process_one(&batch, false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        p.process_one(&order, false).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        p.process_one(&order, false).await.unwrap(),
        Outcome::Duplicate
    );

    // Same ce_id at another offset (the ERP published it twice) is the same message.
    let mut again = message(
        &t.allocation_required,
        7,
        json!({"orderid": "o2", "sku": "LAMP", "qty": 1}),
    );
    again
        .headers
        .push(("ce_id".into(), Some(b"erp-42".to_vec())));
    assert_eq!(
        p.process_one(&again, false).await.unwrap(),
        Outcome::Applied
    );
    again.offset = 8;
    assert_eq!(
        p.process_one(&again, false).await.unwrap(),
        Outcome::Duplicate
    );

    assert_eq!(outbox_kinds(&pool).await, ["Allocated", "Allocated"]);
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM processed_messages ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        keys.contains(&"erp.allocation-required/0/0".to_owned()),
        "without ce_id the key is topic/partition/offset: {keys:?}"
    );
    drop_database(pool).await;
}

#[tokio::test]
async fn rejected_messages_are_dead_lettered_once_with_their_reason() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let cases = [
        (
            raw_message(&t.allocation_required, 0, b"{not json".to_vec()),
            DeadLetterReason::MalformedJson,
        ),
        (
            message(
                &t.allocation_required,
                1,
                json!({"orderid": "o", "sku": "LAMP", "qty": 0}),
            ),
            DeadLetterReason::InvalidMessage,
        ),
        (
            message("erp.somewhere-else", 0, json!({})),
            DeadLetterReason::UnknownTopic,
        ),
    ];
    for (m, reason) in &cases {
        assert_eq!(
            p.process_one(m, false).await.unwrap(),
            Outcome::DeadLettered(*reason)
        );
        assert_eq!(
            p.process_one(m, false).await.unwrap(),
            Outcome::Duplicate,
            "dead-lettered once"
        );
    }
    let reasons: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT (SELECT value FROM outbox_headers(headers) WHERE name = 'dlq.reason') \
         FROM outbox ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let reasons: Vec<_> = reasons
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(
        reasons,
        ["malformed-json", "invalid-message", "unknown-topic"]
    );
    drop_database(pool).await;
}

#[tokio::test]
async fn an_unknown_reference_is_deferred_without_a_trace_then_dead_lettered_on_giving_up() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let order = message(
        &t.allocation_required,
        0,
        json!({"orderid": "o1", "sku": "NOPE", "qty": 1}),
    );
    let change = message(
        &t.batch_quantity_changed,
        0,
        json!({"ref": "nope", "qty": 1}),
    );
    assert_eq!(
        p.process_one(&order, false).await.unwrap(),
        Outcome::Deferred
    );
    assert_eq!(
        p.process_one(&change, false).await.unwrap(),
        Outcome::Deferred
    );
    let claimed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processed_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(claimed, 0, "a deferred message must stay retryable");
    assert_eq!(
        p.process_one(&order, true).await.unwrap(),
        Outcome::DeadLettered(DeadLetterReason::UnknownSku)
    );
    assert_eq!(
        p.process_one(&change, true).await.unwrap(),
        Outcome::DeadLettered(DeadLetterReason::UnknownBatch)
    );
    drop_database(pool).await;
}

/// A line freed and allocated again in one message is the most recently
/// allocated one afterwards, in the database as in the domain.
#[tokio::test]
async fn a_line_reallocated_to_its_own_batch_is_the_next_to_be_freed() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let mut offset = 0;
    let mut apply = |topic: &str, value: serde_json::Value| {
        offset += 1;
        message(topic, offset, value)
    };
    let mut steps = vec![apply(
        &t.batch_created,
        json!({"ref": "b", "sku": "RUG", "qty": 11}),
    )];
    for (order, qty) in [("o1", 5), ("o2", 4), ("o3", 1), ("o4", 1)] {
        steps.push(apply(
            &t.allocation_required,
            json!({"orderid": order, "sku": "RUG", "qty": qty}),
        ));
    }
    // Frees o4, o3, o2; o4 then o3 fit again: the batch holds [o1, o4, o3].
    steps.push(apply(
        &t.batch_quantity_changed,
        json!({"ref": "b", "qty": 7}),
    ));
    // Frees the last allocated, o3, which no longer fits anywhere.
    steps.push(apply(
        &t.batch_quantity_changed,
        json!({"ref": "b", "qty": 6}),
    ));
    for m in &steps {
        assert_eq!(p.process_one(m, false).await.unwrap(), Outcome::Applied);
    }
    assert_eq!(allocated_to(&pool, "o1").await.as_deref(), Some("b"));
    assert_eq!(allocated_to(&pool, "o4").await.as_deref(), Some("b"));
    assert_eq!(
        allocated_to(&pool, "o3").await,
        None,
        "o3 was the most recent allocation"
    );
    assert_eq!(allocated_to(&pool, "o2").await, None);
    drop_database(pool).await;
}

#[tokio::test]
async fn in_a_batch_a_rejected_message_is_taken_back_alone_and_its_neighbours_commit() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let a = &t.allocation_required;
    let mut with_ce_id = message(a, 6, json!({"orderid": "o4", "sku": "MUG", "qty": 1}));
    with_ce_id
        .headers
        .push(("ce_id".into(), Some(b"erp-7".to_vec())));
    let mut same_ce_id = message(a, 7, json!({"orderid": "o5", "sku": "MUG", "qty": 1}));
    same_ce_id
        .headers
        .push(("ce_id".into(), Some(b"erp-7".to_vec())));
    let batch = [
        message(
            &t.batch_created,
            0,
            json!({"ref": "mugs", "sku": "MUG", "qty": 10}),
        ),
        message(a, 1, json!({"orderid": "o1", "sku": "MUG", "qty": 3})),
        // The same line with another quantity: refused, after o1 applied.
        message(a, 2, json!({"orderid": "o1", "sku": "MUG", "qty": 4})),
        // Names a SKU nobody created yet: parked, not dead-lettered.
        message(a, 3, json!({"orderid": "o2", "sku": "LAMP", "qty": 1})),
        raw_message(a, 4, b"{not json".to_vec()),
        message(a, 5, json!({"orderid": "o3", "sku": "MUG", "qty": 2})),
        // The ERP published erp-7 twice: the second is a redelivery.
        with_ce_id,
        same_ce_id,
    ];
    let items: Vec<(&InboundMessage, bool)> = batch.iter().map(|m| (m, false)).collect();
    let outcomes = p.process_batch(&items).await.unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Applied,
            Outcome::Applied,
            Outcome::DeadLettered(DeadLetterReason::DuplicateLine),
            Outcome::Deferred,
            Outcome::DeadLettered(DeadLetterReason::MalformedJson),
            Outcome::Applied,
            Outcome::Applied,
            Outcome::Duplicate,
        ]
    );
    assert_eq!(allocated_to(&pool, "o1").await.as_deref(), Some("mugs"));
    assert_eq!(allocated_to(&pool, "o3").await.as_deref(), Some("mugs"));
    assert_eq!(allocated_to(&pool, "o4").await.as_deref(), Some("mugs"));
    assert_eq!(allocated_to(&pool, "o5").await, None);
    assert_eq!(
        outbox_kinds(&pool).await,
        [
            "Allocated",
            "DeadLetter",
            "DeadLetter",
            "Allocated",
            "Allocated"
        ],
        "events and dead letters in the order of the messages"
    );
    let qty: i64 = sqlx::query_scalar("SELECT sum(qty)::int8 FROM allocations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(qty, 6, "o1 once with 3, o3 with 2, o4 with 1");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 6, "every message but the parked one and the repeat");

    // The whole batch again (a redelivery after a crash): nothing changes,
    // and the parked message is still only parked.
    let again = p.process_batch(&items).await.unwrap();
    assert_eq!(
        again,
        [
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Deferred,
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate,
        ]
    );
    assert_eq!(outbox_kinds(&pool).await.len(), 5);
    let version: i64 = sqlx::query_scalar("SELECT version_number FROM products WHERE sku = 'MUG'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, 4, "one batch and three allocations");
    drop_database(pool).await;
}

#[tokio::test]
async fn a_message_that_changed_a_product_cannot_be_taken_back_alone_and_reset_undoes_all() {
    let pool = fresh_database().await;
    let p = processor(&pool);
    let t = topics();
    let batch = message(
        &t.batch_created,
        0,
        json!({"ref": "b1", "sku": "SOFA", "qty": 5}),
    );
    p.process_one(&batch, false).await.unwrap();

    let sku = Sku::parse("SOFA").unwrap();
    let line = |orderid: &str| OrderLine {
        orderid: OrderId::parse(orderid).unwrap(),
        sku: sku.clone(),
        qty: 1,
    };
    let cache = ProductCache::default();
    let mut uow = PgUnitOfWork::begin(&pool, &cache).await.unwrap();
    uow.start_message(context("first"));
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    product.allocate(line("o1")).unwrap();
    drop(product.take_events());
    uow.finish_message();

    // A message that refuses without changing anything is taken back alone.
    uow.start_message(context("refused"));
    uow.products().get(&sku).await.unwrap().unwrap();
    assert!(uow.reject_message());

    // One that changed the product first cannot be.
    uow.start_message(context("changed"));
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    product.allocate(line("o2")).unwrap();
    assert!(!uow.reject_message());
    uow.reset();
    let product = uow.products().get(&sku).await.unwrap().unwrap();
    assert_eq!(product.version_number(), 1, "back to the state as loaded");
    assert!(product
        .allocation_of(&OrderId::parse("o1").unwrap())
        .is_none());
    uow.commit().await.unwrap();
    assert_eq!(allocated_to(&pool, "o1").await, None);
    assert_eq!(allocated_to(&pool, "o2").await, None);
    drop_database(pool).await;
}

/// Migration 3 moves the header arrays of rows written before it into the
/// one-column format, which the relay's decoder and the SQL reader
/// `outbox_headers()` both read back as they were; migration 5 lists the
/// unsent ones in `outbox_pending`, which the relay reads.
#[tokio::test]
async fn older_outbox_rows_migrate_headers_into_one_column_and_unsent_into_pending() {
    use allocation_worker::adapters::outbox::{decode_headers, encode_headers};

    let pool = empty_database().await;
    // The schema as it was before: the first two migrations only.
    let dir = std::env::temp_dir().join(format!(
        "aw_migrations_{:016x}",
        rand::rng().random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for file in [
        "20261128000001_initial.sql",
        "20261128000002_product_revision.sql",
    ] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let before = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    before
        .run(&pool)
        .await
        .expect("the first two migrations apply");
    std::fs::remove_dir_all(&dir).unwrap();

    let headers: Vec<(&str, &[u8])> = vec![
        ("ce_id", b"1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        ("empty", b""),
        ("caf\u{e9}", &[0, 0xff, 0x80, 7]),
        ("dup", b"1"),
        ("dup", b"2"),
    ];
    let names: Vec<&str> = headers.iter().map(|h| h.0).collect();
    let values: Vec<&[u8]> = headers.iter().map(|h| h.1).collect();
    sqlx::query(
        "INSERT INTO outbox (kind, message_key, payload, header_names, header_values, sent_at) \
         VALUES ('DeadLetter', 'k', 'v', $1, $2, NULL), ('Allocated', 'k', 'v', '{}', '{}', NULL), \
                ('OutOfStock', 'k', 'v', '{}', '{}', now())",
    )
    .bind(&names)
    .bind(&values)
    .execute(&pool)
    .await
    .unwrap();

    MIGRATOR
        .run(&pool)
        .await
        .expect("the later migrations apply");
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT headers FROM outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(decode_headers(&stored[0]), Some(headers.clone()));
    assert_eq!(stored[0], encode_headers(headers.iter().copied()).unwrap());
    assert_eq!(decode_headers(&stored[1]), Some(vec![]));
    // The two unsent rows are listed as pending; the sent one is not.
    let pending: Vec<String> = sqlx::query_scalar(
        "SELECT o.kind FROM outbox_pending p JOIN outbox o ON o.id = p.id ORDER BY p.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(pending, ["DeadLetter", "Allocated"]);
    let marked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT marked_at FROM outbox_relay")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(marked.is_some(), "the last marking is carried over");

    let read: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT h.name, h.value FROM outbox, outbox_headers(headers) h WHERE kind = 'DeadLetter'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let read: Vec<(&str, &[u8])> = read
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    assert_eq!(read, headers);
    drop_database(pool).await;
}
