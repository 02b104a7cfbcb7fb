//! A stream of order lines over known stock, and the check that ends the
//! tests that disturb the worker while it flows (restarts, outages,
//! rebalances): every order allocated exactly once, where the model says, in
//! the events and in the database.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use super::{distinct_ids, on, random_hex, unique, Delivered, Record, TestEnv, DEADLINE};
use crate::{check, check_eq};

/// Stock: (SKU, the reference of its one batch).
pub type Stock = Vec<(String, String)>;

/// Orders: (orderid, SKU), one unit each.
pub type Orders = Vec<(String, String)>;

/// The model: orderid → (SKU, batch reference) it must be allocated to.
pub type Model = BTreeMap<String, (String, String)>;

/// `n` SKUs with one warehouse batch each, created and stored (on a worker
/// that has processed nothing yet).
pub async fn create_stock(env: &TestEnv, n: usize, qty: i64) -> Stock {
    let stock: Stock = (0..n)
        .map(|i| (unique(&format!("sku{i}")), unique(&format!("batch{i}"))))
        .collect();
    let creates = stock
        .iter()
        .map(|(sku, batch)| env.batch_created(batch, sku, qty, None));
    futures::future::join_all(creates).await;
    env.wait_processed(n as i64, DEADLINE).await;
    stock
}

/// `n` orders spread over the SKUs: order i is for SKU i % SKUs.
pub fn orders_for(stock: &[(String, String)], n: usize) -> Orders {
    (0..n)
        .map(|i| {
            (
                format!("order-{i:04}-{}", random_hex(6)),
                stock[i % stock.len()].0.clone(),
            )
        })
        .collect()
}

/// Each order to the single batch of its SKU.
pub fn single_batch_model(stock: &[(String, String)], orders: &[(String, String)]) -> Model {
    let batch_of: HashMap<&str, &str> = stock
        .iter()
        .map(|(s, b)| (s.as_str(), b.as_str()))
        .collect();
    orders
        .iter()
        .map(|(o, s)| (o.clone(), (s.clone(), batch_of[s.as_str()].to_owned())))
        .collect()
}

/// How far a stream of order lines has got, for a test that acts on the
/// worker while the stream is produced.
#[derive(Default)]
pub struct Pacer {
    produced: AtomicUsize,
}

impl Pacer {
    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::SeqCst)
    }
}

/// AllocationRequired (qty 1) for each (orderid, sku), `chunk` at a time
/// with a pause of `pace` after each, as an ERP publishes over time; returns
/// the delivery reports in input order.
pub async fn produce_orders(
    env: &TestEnv,
    orders: &[(String, String)],
    chunk: usize,
    pace: Duration,
    pacer: &Pacer,
) -> Vec<Delivered> {
    let mut delivered = Vec::with_capacity(orders.len());
    for part in orders.chunks(chunk) {
        let sends = part
            .iter()
            .map(|(orderid, sku)| env.allocation_required(orderid, sku, 1, &[]));
        delivered.extend(futures::future::join_all(sends).await);
        pacer.produced.fetch_add(part.len(), Ordering::SeqCst);
        // The stream's pace (part of the scenario), not a wait for a result.
        tokio::time::sleep(pace).await;
    }
    env.note(&format!("all {} orders produced", orders.len()));
    delivered
}

/// Every order allocated exactly once, to the expected batch, in the events
/// and in the database; nothing else decided; `messages` processed in all.
/// Returns the witness's records.
pub async fn assert_allocated_once(
    env: &TestEnv,
    expected: &Model,
    messages: i64,
    timeout: Duration,
) -> Vec<Record> {
    let t = env.topics.clone();
    env.wait_for(
        &format!("{} distinct Allocated ce_ids", expected.len()),
        timeout,
        |rs| distinct_ids(rs, &t.allocated).len() >= expected.len(),
    )
    .await;
    env.wait_processed(messages, timeout).await;
    let records = env.wait_outbox_published(timeout).await;
    check_eq!(
        env,
        env.processed().await,
        messages,
        "processed messages: each inbound message recorded once"
    );

    let mut by_id: HashMap<String, &Record> = HashMap::new();
    let mut resent = 0;
    for r in on(&records, &t.allocated) {
        let id = r.ce_id().unwrap_or_default();
        if let Some(first) = by_id.get(&id) {
            resent += 1;
            check_eq!(
                env,
                (first.json(), first.key_str()),
                (r.json(), r.key_str()),
                "a re-sent event (same ce_id) must be the same event"
            );
        } else {
            by_id.insert(id, r);
        }
    }
    env.note(&format!(
        "{} distinct Allocated ce_ids, {resent} re-sent record(s) (allowed: at least once)",
        by_id.len()
    ));
    let mut decided: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in by_id.values() {
        let orderid = r.field("orderid");
        let Some((sku, batch)) = expected.get(&orderid) else {
            panic!(
                "unexpected Allocated {}; logs: {}",
                r.summary(),
                env.log_paths()
            );
        };
        check_eq!(
            env,
            r.json(),
            json!({"orderid": orderid, "sku": sku, "qty": 1, "batchref": batch}),
            "Allocated value"
        );
        decided
            .entry(orderid)
            .or_default()
            .push(r.field("batchref"));
    }
    let twice: Vec<_> = decided.iter().filter(|(_, b)| b.len() > 1).collect();
    check!(env, twice.is_empty(), "orders decided twice: {twice:?}");
    check_eq!(
        env,
        decided.len(),
        expected.len(),
        "orders with an Allocated event"
    );
    for topic in [&t.deallocated, &t.out_of_stock, &t.dead_letter] {
        let other: Vec<String> = on(&records, topic).map(Record::summary).collect();
        check!(env, other.is_empty(), "only Allocated expected: {other:#?}");
    }

    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT a.orderid, a.sku, b.reference, a.qty FROM allocations a \
         JOIN batches b ON b.id = a.batch_id ORDER BY a.orderid",
    )
    .fetch_all(&env.db)
    .await
    .expect("allocations");
    let got: Model = rows
        .iter()
        .map(|(o, s, b, _)| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check_eq!(env, rows.len(), expected.len(), "allocation rows");
    check!(
        env,
        rows.iter().all(|r| r.3 == 1),
        "every allocation of qty 1"
    );
    check!(
        env,
        &got == expected,
        "allocation rows differ from the model: {:?}",
        diff(expected, &got)
    );
    let view: Vec<(String, String, String)> =
        sqlx::query_as("SELECT orderid, sku, batchref FROM allocations_view")
            .fetch_all(&env.db)
            .await
            .expect("allocations_view");
    let view: Model = view.into_iter().map(|(o, s, b)| (o, (s, b))).collect();
    check!(
        env,
        &view == expected,
        "allocations_view differs from the model: {:?}",
        diff(expected, &view)
    );
    check_eq!(
        env,
        env.count("SELECT count(*) FROM outbox WHERE kind = 'Allocated'")
            .await,
        expected.len() as i64,
        "Allocated rows in the outbox: each decision stored once"
    );
    check_eq!(
        env,
        env.over_allocated().await,
        vec![],
        "over-allocated batches"
    );
    records
}

/// Up to 10 keys where two maps differ, for failure messages.
pub fn diff<'a, V: PartialEq + std::fmt::Debug>(
    want: &'a BTreeMap<String, V>,
    got: &'a BTreeMap<String, V>,
) -> Vec<(&'a String, Option<&'a V>, Option<&'a V>)> {
    want.keys()
        .chain(got.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .take(10)
        .map(|k| (k, want.get(k), got.get(k)))
        .collect()
}
