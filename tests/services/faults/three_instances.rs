//! Three instances in one group under process faults (issue 22, item 3):
//! one SIGKILLed and started again, one frozen past the session timeout and
//! thawed, while a stream of orders flows; what they publish together is
//! what one sequential model decides.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::two_instances::wait_shared;
use super::{check, check_eq, spawn, RECOVERY_DEADLINE};
use testkit::kafka::committed_offsets;
use testkit::model::{Ev, SequentialModel, Step};
use testkit::orders::diff;
use testkit::{distinct_ids, on, unique, Delivered, Record, TestEnv, DEADLINE, PARTITIONS};

/// The session timeout of [`crate::KAFKA_PROPERTIES`]: a frozen member is
/// evicted this long after its last heartbeat.
const SESSION_TIMEOUT: Duration = Duration::from_secs(2);

/// One inbound ERP message, as the model applies it.
#[derive(Debug, Clone)]
enum Msg {
    Batch {
        reference: String,
        qty: u32,
        eta: Option<NaiveDate>,
    },
    Order {
        orderid: String,
        qty: u32,
    },
    Change {
        reference: String,
        qty: u32,
    },
}

impl Msg {
    /// Per SKU, the test produces every batch before any order, and a
    /// quantity change only once every order of its SKU is decided (and no
    /// order after it): this rank, then the partition offset, is the order
    /// in which the worker must apply one SKU's messages.
    fn rank(&self) -> u8 {
        match self {
            Msg::Batch { .. } => 0,
            Msg::Order { .. } => 1,
            Msg::Change { .. } => 2,
        }
    }
}

/// A message produced, with its SKU, topic and delivery report.
#[derive(Debug, Clone)]
struct Produced {
    sku: String,
    topic: String,
    at: Delivered,
    msg: Msg,
}

/// What one worker alone, applying each SKU's messages in order, decides
/// (`tests/support/src/model.rs`, as in `tests/services/crash.rs`).
#[derive(Default)]
struct Model(SequentialModel);

impl std::ops::Deref for Model {
    type Target = SequentialModel;
    fn deref(&self) -> &SequentialModel {
        &self.0
    }
}

impl Model {
    fn apply(&mut self, sku: &str, msg: &Msg) {
        let step = match msg {
            Msg::Batch {
                reference,
                qty,
                eta,
            } => Step::Batch {
                reference,
                qty: *qty,
                eta: *eta,
            },
            Msg::Order { orderid, qty } => Step::Order { orderid, qty: *qty },
            Msg::Change { reference, qty } => Step::Change {
                reference,
                qty: *qty,
            },
        };
        self.0.apply(sku, step);
    }

    /// orderid → (SKU, batch reference, qty) at the end.
    fn allocations(&self) -> BTreeMap<String, (String, String, i64)> {
        let mut all = BTreeMap::new();
        for (sku, product) in &self.products {
            for batch in product.batches() {
                for line in batch.allocations() {
                    all.insert(
                        line.orderid.as_str().to_owned(),
                        (
                            sku.clone(),
                            batch.reference().as_str().to_owned(),
                            i64::from(line.qty),
                        ),
                    );
                }
            }
        }
        all
    }

    /// Per SKU and event type, the values in decision order.
    fn per_topic(&self) -> BTreeMap<String, Vec<Value>> {
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (sku, events) in &self.events {
            for (kind, value) in events {
                out.entry(format!("{sku} {kind}"))
                    .or_default()
                    .push(value.clone());
            }
        }
        out
    }
}

fn signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// Issue 22 item 3: three instances in one group (`session.timeout.ms`
/// 2000) while orders stream in: the first is SIGKILLed and, once the other
/// two share its partitions, started again; then the second is frozen
/// (SIGSTOP) until the other two hold every partition (it was evicted: past
/// the session timeout), and thawed (SIGCONT): it must find itself out of
/// the group, give its partitions up and join again. Every join completes
/// (the partitions shared among the live instances) before the next fault:
/// a Tansu group whose member leaves while joining wedges for minutes.
///
/// Stock: 9 SKUs with plenty, 3 scarce ones (one batch of 5, orders of 1–3
/// units: out of stock early and then on every order), and 3 that shrink:
/// a warehouse batch of 10 and a shipment of 2; their 8 orders come first,
/// and once all are decided (read from the database), mid-stream, the
/// warehouse batch drops to 3: five lines deallocated (the latest first),
/// two of them allocated to the shipment, three out of stock.
///
/// The model is exact, not a multiset built from the end state: each SKU's
/// messages on different topics are sequenced by the test (its batches
/// stored before any of its orders; its quantity change produced after every
/// order of it is decided, and no order after it), and within a topic one
/// SKU's messages share a partition. So the worker, however the instances
/// interleave the partitions, must decide per SKU exactly what one model
/// does applying them in that order. Checked at the end (each wait polled
/// with a deadline): each inbound message recorded once; the allocations
/// (and the read model) equal the model's, so each line allocated at most
/// once and where it must be; no batch over-allocated; per SKU, the outbox
/// rows in id order equal the model's events; per SKU and outbound topic,
/// the distinct events (by `ce_id`, the first copy of each, a re-sent copy
/// equal to it) in the order they were read equal the model's in decision
/// order; no dead letter; and the group's committed offset of each inbound
/// partition equals the number of messages produced to it (counted from
/// the delivery reports; the topics are new).
#[tokio::test]
async fn three_instances_killed_frozen_and_restarted_mid_stream_publish_what_the_model_says() {
    let _alone = testkit::alone::run_alone().await;
    const PLENTY: usize = 9;
    const SCARCE: usize = 3;
    const SHRINKING: usize = 3;
    const SHRINKING_ORDERS: usize = 8;
    /// One order per streamed SKU every `PACE`.
    const PACE: Duration = Duration::from_millis(400);
    /// Rounds streamed after the last fault, to run on the healed group.
    const TAIL_ROUNDS: usize = 10;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let mut workers = [spawn(&env, &[]), spawn(&env, &[]), spawn(&env, &[])];
    wait_shared(&env, &[&workers[0], &workers[1], &workers[2]]).await;

    let eta = NaiveDate::from_ymd_opt(2030, 6, 1);
    let mut produced: Vec<Produced> = Vec::new();
    let mut add_batch = async |sku: &str, qty: u32, eta: Option<NaiveDate>| {
        let reference = unique("batch");
        let at = env
            .batch_created(
                &reference,
                sku,
                i64::from(qty),
                eta.map(|d| d.to_string()).as_deref(),
            )
            .await;
        produced.push(Produced {
            sku: sku.to_owned(),
            topic: t.batch_created.clone(),
            at,
            msg: Msg::Batch {
                reference: reference.clone(),
                qty,
                eta,
            },
        });
        reference
    };
    let mut streamed: Vec<(String, bool)> = Vec::new();
    for i in 0..PLENTY {
        let sku = unique(&format!("plenty{i}"));
        add_batch(&sku, 1000, None).await;
        streamed.push((sku, false));
    }
    for i in 0..SCARCE {
        let sku = unique(&format!("scarce{i}"));
        add_batch(&sku, 5, None).await;
        streamed.push((sku, true));
    }
    let mut shrinking: Vec<(String, String)> = Vec::new();
    for i in 0..SHRINKING {
        let sku = unique(&format!("shrink{i}"));
        let warehouse = add_batch(&sku, 10, None).await;
        add_batch(&sku, 2, eta).await;
        shrinking.push((sku, warehouse));
    }
    env.wait_processed(produced.len() as i64, DEADLINE).await;
    env.note("stock stored");

    // The stream: the shrinking SKUs' orders first, then one order per
    // streamed SKU every PACE until the faults are over, and TAIL_ROUNDS
    // more.
    let faults_over = AtomicBool::new(false);
    let orders_produced = AtomicUsize::new(0);
    let order = async |sku: &str, qty: u32| {
        let orderid = unique("order");
        let at = env
            .allocation_required(&orderid, sku, i64::from(qty), &[])
            .await;
        orders_produced.fetch_add(1, Ordering::SeqCst);
        Produced {
            sku: sku.to_owned(),
            topic: t.allocation_required.clone(),
            at,
            msg: Msg::Order { orderid, qty },
        }
    };
    let streaming = async {
        let mut out = Vec::new();
        for (sku, _) in &shrinking {
            for _ in 0..SHRINKING_ORDERS {
                out.push(order(sku, 1).await);
            }
        }
        let mut round = 0usize;
        let mut tail = 0;
        while tail < TAIL_ROUNDS {
            if faults_over.load(Ordering::SeqCst) {
                tail += 1;
            }
            let sends = streamed.iter().map(|(sku, scarce)| {
                let qty = if *scarce { 1 + (round % 3) as u32 } else { 1 };
                order(sku, qty)
            });
            out.extend(futures::future::join_all(sends).await);
            round += 1;
            // The stream's pace (part of the scenario), not a wait for a result.
            tokio::time::sleep(PACE).await;
        }
        env.note(&format!("all {} orders produced", out.len()));
        out
    };

    let faulting = async {
        let noted = |what: &str| {
            env.note(&format!(
                "{what} ({} orders produced)",
                orders_produced.load(Ordering::SeqCst)
            ))
        };
        env.wait_for("40 Allocated events", DEADLINE, |rs| {
            distinct_ids(rs, &t.allocated).len() >= 40
        })
        .await;

        // 1. SIGKILL: no goodbye; the group notices after the session timeout.
        workers[0].kill().await;
        noted("first instance SIGKILLed");
        wait_shared(&env, &[&workers[1], &workers[2]]).await;
        noted("its partitions shared by the other two");

        // The quantity drops, once every order of their SKUs is decided.
        let skus: Vec<String> = shrinking.iter().map(|(s, _)| s.clone()).collect();
        env.eventually(
            "the shrinking SKUs' orders all allocated",
            DEADLINE,
            || async {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM allocations WHERE sku = ANY($1)")
                        .bind(&skus)
                        .fetch_one(&env.db)
                        .await?;
                Ok::<_, sqlx::Error>((n == (SHRINKING * SHRINKING_ORDERS) as i64).then_some(()))
            },
        )
        .await;
        let mut changes = Vec::new();
        for (sku, warehouse) in &shrinking {
            let value = json!({"ref": warehouse, "qty": 3});
            let at = env
                .produce_json(&t.batch_quantity_changed, Some(sku), &value, &[])
                .await;
            changes.push(Produced {
                sku: sku.clone(),
                topic: t.batch_quantity_changed.clone(),
                at,
                msg: Msg::Change {
                    reference: warehouse.clone(),
                    qty: 3,
                },
            });
        }
        noted("quantity changes produced");

        // 2. The killed instance started again.
        workers[0] = spawn(&env, &[]);
        wait_shared(&env, &[&workers[0], &workers[1], &workers[2]]).await;
        noted("first instance back in the group");

        // 3. SIGSTOP until the other two hold every partition: evicted.
        let mark = workers[1].log_text().len();
        signal(workers[1].pid(), Signal::SIGSTOP);
        let frozen_at = Instant::now();
        noted("second instance frozen");
        wait_shared(&env, &[&workers[0], &workers[2]]).await;
        let frozen_for = frozen_at.elapsed();
        signal(workers[1].pid(), Signal::SIGCONT);
        noted(&format!(
            "second instance thawed after {frozen_for:?}, its partitions moved"
        ));
        check!(
            env,
            frozen_for > SESSION_TIMEOUT,
            "the partitions moved {frozen_for:?} after the freeze, within the session timeout"
        );
        wait_shared(&env, &[&workers[0], &workers[1], &workers[2]]).await;
        noted("second instance back in the group");
        let revoked = workers[1].log_lines_after(mark, "partitions revoked");
        check!(
            env,
            !revoked.is_empty(),
            "the thawed instance never gave its partitions up"
        );
        faults_over.store(true, Ordering::SeqCst);
        changes
    };
    let (orders, changes) = tokio::join!(streaming, faulting);
    let at_last_fault = orders.len() - TAIL_ROUNDS * streamed.len();
    check!(
        env,
        at_last_fault > SHRINKING * SHRINKING_ORDERS + 40,
        "the faults did not happen mid-stream"
    );
    produced.extend(orders);
    produced.extend(changes);

    // The model, per SKU in rank-then-offset order (see the doc comment).
    let mut sequenced = produced.clone();
    sequenced.sort_by_key(|p| (p.sku.clone(), p.msg.rank(), p.at.partition, p.at.offset));
    let mut model = Model::default();
    for p in &sequenced {
        model.apply(&p.sku, &p.msg);
    }
    let mut partition_of: HashMap<(String, String), i32> = HashMap::new();
    for p in &produced {
        let first = *partition_of
            .entry((p.sku.clone(), p.topic.clone()))
            .or_insert(p.at.partition);
        check_eq!(
            env,
            first,
            p.at.partition,
            "one SKU's messages on one topic share a partition"
        );
    }
    let model_events: usize = model.events.values().map(Vec::len).sum();
    let kinds = |k: &str| {
        model
            .events
            .values()
            .flatten()
            .filter(|(kind, _)| *kind == k)
            .count()
    };
    env.note(&format!(
        "{} messages produced; the model decides {model_events} events: \
         {} Allocated, {} Deallocated, {} OutOfStock",
        produced.len(),
        kinds("Allocated"),
        kinds("Deallocated"),
        kinds("OutOfStock"),
    ));

    // Drained: every message recorded, every outbox row on the topics.
    env.wait_processed(produced.len() as i64, RECOVERY_DEADLINE)
        .await;
    let records = env.wait_outbox_published(RECOVERY_DEADLINE).await;
    check_eq!(
        env,
        env.processed().await,
        produced.len() as i64,
        "processed messages: each inbound message recorded once"
    );

    // The database.
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT a.orderid, a.sku, b.reference, a.qty FROM allocations a \
         JOIN batches b ON b.id = a.batch_id",
    )
    .fetch_all(&env.db)
    .await
    .expect("allocations");
    let want = model.allocations();
    let got: BTreeMap<String, (String, String, i64)> = rows
        .iter()
        .map(|(o, s, b, q)| (o.clone(), (s.clone(), b.clone(), *q)))
        .collect();
    check_eq!(
        env,
        rows.len(),
        got.len(),
        "allocation rows: one per order line"
    );
    check!(
        env,
        got == want,
        "allocations differ from the model: {:?}",
        diff(&want, &got)
    );
    let view: Vec<(String, String, String)> =
        sqlx::query_as("SELECT orderid, sku, batchref FROM allocations_view")
            .fetch_all(&env.db)
            .await
            .expect("allocations_view");
    let view: BTreeMap<String, (String, String)> =
        view.into_iter().map(|(o, s, b)| (o, (s, b))).collect();
    let want_view: BTreeMap<String, (String, String)> = want
        .iter()
        .map(|(o, (s, b, _))| (o.clone(), (s.clone(), b.clone())))
        .collect();
    check!(
        env,
        view == want_view,
        "allocations_view differs from the model: {:?}",
        diff(&want_view, &view)
    );
    check_eq!(
        env,
        env.over_allocated().await,
        vec![],
        "over-allocated batches"
    );

    // The outbox: per SKU, the decisions in the order stored.
    let outbox: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kind, payload FROM outbox ORDER BY id")
            .fetch_all(&env.db)
            .await
            .expect("outbox");
    let mut stored: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    for (kind, payload) in &outbox {
        let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let kind: &'static str = match kind.as_str() {
            "Allocated" => "Allocated",
            "Deallocated" => "Deallocated",
            "OutOfStock" => "OutOfStock",
            other => panic!("an outbox row of kind {other}: {value}"),
        };
        let sku = value["sku"].as_str().unwrap_or_default().to_owned();
        stored.entry(sku).or_default().push((kind, value));
    }
    check!(
        env,
        stored == model.events,
        "the outbox differs from the model, per SKU in id order: {:?}",
        diff(&model.events, &stored)
    );

    // The topics: per SKU and topic, the distinct events in the order read.
    let kind_of: HashMap<&str, &str> = [
        (t.allocated.as_str(), "Allocated"),
        (t.deallocated.as_str(), "Deallocated"),
        (t.out_of_stock.as_str(), "OutOfStock"),
    ]
    .into_iter()
    .collect();
    let mut first_copy: HashMap<String, &Record> = HashMap::new();
    let mut published: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut resent = 0;
    for r in records
        .iter()
        .filter(|r| kind_of.contains_key(r.topic.as_str()))
    {
        let Some(id) = r.ce_id() else {
            panic!("an event without ce_id: {}", r.summary());
        };
        if let Some(first) = first_copy.get(&id) {
            resent += 1;
            check_eq!(
                env,
                (&first.topic, first.json(), first.key_str()),
                (&r.topic, r.json(), r.key_str()),
                "a re-sent event (same ce_id) must be the same event"
            );
            continue;
        }
        first_copy.insert(id, r);
        let sku = r.field("sku");
        check_eq!(
            env,
            r.key_str().as_deref(),
            Some(sku.as_str()),
            "an event is keyed by its SKU"
        );
        published
            .entry(format!("{sku} {}", kind_of[r.topic.as_str()]))
            .or_default()
            .push(r.json());
    }
    env.note(&format!(
        "{} distinct events published, {resent} re-sent record(s) (allowed: at least once)",
        first_copy.len()
    ));
    let want_published = model.per_topic();
    check!(
        env,
        published == want_published,
        "the events per SKU and topic differ from the model's (or their order): {:?}",
        diff(&want_published, &published)
    );
    let letters: Vec<String> = on(&records, &t.dead_letter).map(Record::summary).collect();
    check!(env, letters.is_empty(), "dead letters: {letters:#?}");

    // The group's offsets: every message produced is committed.
    let mut counts: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in t.inbound() {
        for partition in 0..PARTITIONS {
            counts.insert((topic.to_owned(), partition), 0);
        }
    }
    for p in &produced {
        *counts.entry((p.topic.clone(), p.at.partition)).or_default() += 1;
    }
    let want_committed: BTreeMap<(String, i32), i64> = counts
        .into_iter()
        .map(|(k, n)| (k, if n == 0 { -1 } else { n }))
        .collect();
    env.eventually(
        "the committed offsets at the produced counts",
        DEADLINE,
        || {
            // A mismatch is "not yet", shown as the last probe on a timeout.
            let now = committed_offsets(&env, &t.inbound()).and_then(|now| {
                if now == want_committed {
                    Ok(Some(()))
                } else {
                    Err(format!("committed {now:?}, produced {want_committed:?}"))
                }
            });
            async move { now }
        },
    )
    .await;

    // Not asserted (a fault may land just after a commit), but it shows the
    // faults bit: messages handed over uncommitted and found processed.
    let redelivered: usize = env
        .log_paths()
        .split(", ")
        .map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .matches("outcome=Duplicate")
                .count()
        })
        .sum();
    env.note(&format!(
        "{redelivered} message(s) delivered again after a fault and found processed"
    ));
    for worker in &mut workers {
        worker.assert_running();
    }
    drop(workers);
    env.finish().await;
}
