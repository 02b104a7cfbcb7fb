//! Bad input never hurts (contract §3, §5), end to end through the real binary: a
//! corpus of bad messages on every inbound topic, interleaved with good ones
//! in the same partitions. Each bad message lands on the dead-letter topic
//! exactly once, with its reason and its original topic, partition, offset,
//! key and value; each good one is applied; the worker stays up and keeps
//! applying.
//!
//! `unknown-topic` cannot be produced through the subscribed topics; the
//! processor's handling of it is covered by `tests/services/postgres.rs`
//! (`rejected_messages_are_dead_lettered_once_with_their_reason`).
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).

use std::collections::HashSet;
use std::time::Duration;
use testkit::{check, check_eq};

use serde_json::{json, Value};

use testkit::{on, unique, Delivered, Record, TestEnv, DEADLINE};

/// Short, so unknown-sku and unknown-batch reach the dead-letter topic soon.
const UNKNOWN_REFERENCE_TIMEOUT: &str = "2s";

const DLQ_HEADERS: [&str; 5] = [
    "dlq.reason",
    "dlq.error",
    "dlq.original.topic",
    "dlq.original.partition",
    "dlq.original.offset",
];

// ------------------------------------------------------------------ helpers

/// One message of the corpus, and what must become of it.
struct Case {
    what: String,
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// `dlq.reason`, or `None` for a message that must be applied.
    reason: Option<&'static str>,
}

impl Case {
    fn new(what: impl Into<String>, topic: &str, key: &str, value: Option<Vec<u8>>) -> Self {
        Self {
            what: what.into(),
            topic: topic.to_owned(),
            key: Some(key.as_bytes().to_vec()),
            value,
            headers: Vec::new(),
            reason: None,
        }
    }

    fn json(what: impl Into<String>, topic: &str, key: &str, value: &Value) -> Self {
        Self::new(what, topic, key, Some(value.to_string().into_bytes()))
    }

    fn dead(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    fn size(&self) -> usize {
        self.value.as_ref().map_or(0, Vec::len)
    }
}

async fn produce(env: &TestEnv, case: &Case) -> Delivered {
    let headers: Vec<(&[u8], Option<&[u8]>)> = case
        .headers
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_deref()))
        .collect();
    env.produce_record(
        &case.topic,
        case.key.as_deref(),
        case.value.as_deref(),
        &headers,
    )
    .await
}

/// The dead letters of the message delivered at `d` on `topic`.
fn dead_letters_of<'a>(dead: &[&'a Record], topic: &str, d: Delivered) -> Vec<&'a Record> {
    dead.iter()
        .copied()
        .filter(|r| {
            r.header("dlq.original.topic").as_deref() == Some(topic)
                && r.header("dlq.original.partition") == Some(d.partition.to_string())
                && r.header("dlq.original.offset") == Some(d.offset.to_string())
        })
        .collect()
}

fn with(mut value: Value, field: &str, v: Value) -> Value {
    value[field] = v;
    value
}

fn without(mut value: Value, field: &str) -> Value {
    value.as_object_mut().unwrap().remove(field);
    value
}

/// `text` with raw bytes put in place of `marker` (for invalid UTF-8 inside a
/// JSON string).
fn splice(value: &Value, marker: &str, bytes: &[u8]) -> Vec<u8> {
    let text = value.to_string();
    let at = text.find(marker).expect("marker in the value");
    let mut out = text.as_bytes()[..at].to_vec();
    out.extend_from_slice(bytes);
    out.extend_from_slice(&text.as_bytes()[at + marker.len()..]);
    out
}

fn random_bytes(n: usize) -> Vec<u8> {
    // 0xff first: never the start of a JSON document.
    let mut bytes = vec![0xff];
    bytes.extend((1..n).map(|_| rand::random::<u8>()));
    bytes
}

/// The bad messages every topic gets, from a valid message of that topic.
/// `name_field` is a string field of it, `qty_min` its smallest quantity.
fn generic_bad(topic: &str, key: &str, valid: &Value, name_field: &str) -> Vec<Case> {
    let mut cases = vec![
        Case::new("random bytes", topic, key, Some(random_bytes(64))).dead("malformed-json"),
        Case::new(
            "invalid UTF-8 in a string",
            topic,
            key,
            Some(splice(
                &with(valid.clone(), name_field, json!("@@marker@@")),
                "@@marker@@",
                b"ab\xff\xfecd",
            )),
        )
        .dead("malformed-json"),
        Case::new(
            "a UTF-16 surrogate in UTF-8",
            topic,
            key,
            Some(splice(
                &with(valid.clone(), name_field, json!("@@marker@@")),
                "@@marker@@",
                b"\xed\xa0\x80",
            )),
        )
        .dead("malformed-json"),
        Case::new("empty value", topic, key, Some(Vec::new())).dead("malformed-json"),
        Case::new("no value (tombstone)", topic, key, None).dead("malformed-json"),
        Case::new("whitespace only", topic, key, Some(b" \n\t ".to_vec())).dead("malformed-json"),
        Case::new("truncated JSON", topic, key, {
            let text = valid.to_string().into_bytes();
            Some(text[..text.len() / 2].to_vec())
        })
        .dead("malformed-json"),
        Case::new("JSON with a BOM", topic, key, {
            let mut bytes = b"\xef\xbb\xbf".to_vec();
            bytes.extend(valid.to_string().into_bytes());
            Some(bytes)
        })
        .dead("malformed-json"),
        Case::json("JSON array", topic, key, &json!([valid])).dead("invalid-message"),
        Case::json("JSON null", topic, key, &Value::Null).dead("invalid-message"),
        Case::json("JSON string", topic, key, &json!("hello")).dead("invalid-message"),
        Case::json("JSON number", topic, key, &json!(42)).dead("invalid-message"),
        Case::json("empty object", topic, key, &json!({})).dead("invalid-message"),
        Case::json("missing qty", topic, key, &without(valid.clone(), "qty"))
            .dead("invalid-message"),
        Case::json(
            format!("missing {name_field}"),
            topic,
            key,
            &without(valid.clone(), name_field),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} is a number"),
            topic,
            key,
            &with(valid.clone(), name_field, json!(12345)),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} is null"),
            topic,
            key,
            &with(valid.clone(), name_field, Value::Null),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} is an object"),
            topic,
            key,
            &with(valid.clone(), name_field, json!({"id": "x"})),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} is empty"),
            topic,
            key,
            &with(valid.clone(), name_field, json!("")),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} of 256 characters"),
            topic,
            key,
            &with(valid.clone(), name_field, json!("n".repeat(256))),
        )
        .dead("invalid-message"),
        Case::json(
            format!("{name_field} of 256 multi-byte characters"),
            topic,
            key,
            &with(
                valid.clone(),
                name_field,
                json!("é".repeat(128) + &"😀".repeat(128)),
            ),
        )
        .dead("invalid-message"),
    ];
    let qty_cases: [(&str, Value); 9] = [
        ("a string", json!("3")),
        ("negative", json!(-1)),
        ("i64::MIN", json!(i64::MIN)),
        ("u32::MAX + 1", json!(u64::from(u32::MAX) + 1)),
        ("i64::MAX", json!(i64::MAX)),
        ("u64::MAX", json!(u64::MAX)),
        ("1e300", json!(1e300)),
        ("1.5", json!(1.5)),
        ("an array", json!([1])),
    ];
    for (what, qty) in qty_cases {
        cases.push(
            Case::json(
                format!("qty {what}"),
                topic,
                key,
                &with(valid.clone(), "qty", qty),
            )
            .dead("invalid-message"),
        );
    }
    cases
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn bad_messages_are_dead_lettered_once_and_the_worker_keeps_applying() {
    let env = TestEnv::new().await;
    let mut worker =
        env.spawn_worker_with(&[("UNKNOWN_REFERENCE_TIMEOUT", UNKNOWN_REFERENCE_TIMEOUT)]);
    let t = env.topics.clone();
    let (bc, bqc, ar) = (
        t.batch_created.as_str(),
        t.batch_quantity_changed.as_str(),
        t.allocation_required.as_str(),
    );

    // Phase 1: the stock that the good messages of phase 2 rely on.
    let sku = unique("sku");
    let stock = unique("stock");
    let resized = unique("resized");
    let resized_sku = unique("sku-resized");
    env.batch_created(&stock, &sku, 1_000_000, None).await;
    env.batch_created(&resized, &resized_sku, 10, None).await;
    env.wait_batch(&stock).await;
    env.wait_batch(&resized).await;
    let mut produced: i64 = 2;

    // Phase 2: the corpus. Bad messages of each topic, keyed like the good
    // ones so they share partitions with them.
    let valid_bc = json!({"ref": unique("b"), "sku": sku, "qty": 1, "eta": "2031-01-02"});
    let valid_bqc = json!({"ref": resized, "qty": 1});
    let valid_ar = json!({"orderid": unique("o"), "sku": sku, "qty": 1});
    let mut bad: Vec<Case> = Vec::new();
    bad.extend(generic_bad(bc, &sku, &valid_bc, "sku"));
    bad.extend(generic_bad(bqc, &resized, &valid_bqc, "ref"));
    bad.extend(generic_bad(ar, &sku, &valid_ar, "orderid"));
    // Kind-specific ones.
    for (what, eta) in [
        ("eta not a date", json!("2031-02-30")),
        ("eta not YYYY-MM-DD", json!("2031-1-2")),
        ("eta a number", json!(20310102)),
    ] {
        bad.push(
            Case::json(what, bc, &sku, &with(valid_bc.clone(), "eta", eta)).dead("invalid-message"),
        );
    }
    bad.push(
        Case::json(
            "ref and batchref both",
            bqc,
            &resized,
            &with(valid_bqc.clone(), "batchref", json!(resized)),
        )
        .dead("invalid-message"),
    );
    bad.push(
        Case::json("qty 0", ar, &sku, &with(valid_ar.clone(), "qty", json!(0)))
            .dead("invalid-message"),
    );
    bad.push(
        Case::json(
            "unknown batch",
            bqc,
            "nope",
            &json!({"ref": unique("no-such-batch"), "qty": 1}),
        )
        .dead("unknown-batch"),
    );
    bad.push(
        Case::json(
            "unknown sku",
            ar,
            "nope",
            &json!({"orderid": unique("o"), "sku": unique("no-such-sku"), "qty": 1}),
        )
        .dead("unknown-sku"),
    );
    // Binary key, header values that are not UTF-8, a header with no value:
    // all carried to the dead letter as they came.
    let mut odd = Case::new("binary key and headers", ar, "", Some(random_bytes(16)));
    odd.key = Some(vec![0, 0xff, 0xfe, b'k']);
    odd.headers = vec![
        (b"x-binary".to_vec(), Some(vec![0xff, 0, 0xc3])),
        (b"x-null".to_vec(), None),
        (b"x-text".to_vec(), Some("vérifié".as_bytes().to_vec())),
    ];
    bad.push(odd.dead("malformed-json"));
    // Large values, under the default producer limit (1 000 000 bytes) once
    // the dead-letter headers are added; the 1 MiB case is its own test.
    bad.push(
        Case::new(
            "900 kB of random bytes",
            bc,
            &sku,
            Some(random_bytes(900_000)),
        )
        .dead("malformed-json"),
    );
    bad.push(
        Case::json(
            "a 900 kB sku",
            ar,
            &sku,
            &with(valid_ar.clone(), "sku", json!("s".repeat(900_000))),
        )
        .dead("invalid-message"),
    );

    // Good messages, to interleave. Unknown fields are ignored, not rejected.
    let unknown = json!({
        "comment": "héllo 😀",
        "nested": {"a": [1, 2, {"b": null}], "qty": -1},
        "list": [true, false, null, 1e300, -9223372036854775808i64],
        "Ref": "case matters",
        "padding": "p".repeat(10_000),
    });
    let with_unknown = |mut v: Value| {
        for (k, u) in unknown.as_object().unwrap() {
            v[k] = u.clone();
        }
        v
    };
    let mut good: Vec<Case> = Vec::new();
    let mut good_orders: Vec<(String, i64)> = Vec::new();
    let mut good_batches: Vec<(String, String, i64)> = Vec::new();
    let mut last_resize = 10;
    for i in 0..bad.len() {
        match i % 3 {
            0 => {
                let orderid = unique("order");
                let qty = (i % 5 + 1) as i64;
                let mut v = json!({"orderid": orderid, "sku": sku, "qty": qty});
                if i % 2 == 0 {
                    v = with_unknown(v);
                }
                good.push(Case::json(format!("allocation {i}"), ar, &sku, &v));
                good_orders.push((orderid, qty));
            }
            1 => {
                let (reference, batch_sku) = (unique("batch"), unique("sku-new"));
                let mut v =
                    json!({"ref": reference, "sku": batch_sku, "qty": 5, "eta": "2031-12-31"});
                if i % 2 == 0 {
                    v = with_unknown(v);
                } else {
                    v = without(v, "eta");
                }
                good.push(Case::json(format!("new batch {i}"), bc, &batch_sku, &v));
                good_batches.push((reference, batch_sku, 5));
            }
            _ => {
                last_resize += 1;
                let field = if i % 2 == 0 { "ref" } else { "batchref" };
                let mut v = json!({"qty": last_resize});
                v[field] = json!(resized);
                if i % 4 == 2 {
                    v = with_unknown(v);
                }
                good.push(Case::json(
                    format!("resize {i} via {field}"),
                    bqc,
                    &resized,
                    &v,
                ));
            }
        }
    }
    // Duplicates: identical batch and same line, same qty, are no-ops; a
    // different batch or quantity is rejected.
    let line = unique("order-line");
    good.push(Case::json(
        "a line",
        ar,
        &sku,
        &json!({"orderid": line, "sku": sku, "qty": 2}),
    ));
    good_orders.push((line.clone(), 2));
    good.push(Case::json(
        "the same line again",
        ar,
        &sku,
        &json!({"orderid": line, "sku": sku, "qty": 2}),
    ));
    good.push(Case::json(
        "the same batch again",
        bc,
        &sku,
        &json!({"ref": stock, "sku": sku, "qty": 1_000_000, "eta": null}),
    ));
    bad.push(
        Case::json(
            "duplicate line, other qty",
            ar,
            &sku,
            &json!({"orderid": line, "sku": sku, "qty": 3}),
        )
        .dead("duplicate-line"),
    );
    bad.push(
        Case::json(
            "duplicate batch, other qty",
            bc,
            &sku,
            &json!({"ref": stock, "sku": sku, "qty": 5, "eta": null}),
        )
        .dead("duplicate-batch"),
    );

    // Interleave: bad, good, bad, good, ... (the duplicates keep their order:
    // the line and its repeats come before the rejected one).
    let (n_bad, n_good) = (bad.len(), good.len());
    let mut corpus: Vec<Case> = Vec::with_capacity(n_bad + n_good);
    let mut good_iter = good.into_iter();
    let dup_line_at = bad.len() - 2;
    for (i, b) in bad.into_iter().enumerate() {
        if i == dup_line_at {
            // Everything good goes first, the line among it.
            corpus.extend(good_iter.by_ref());
        }
        corpus.push(b);
        if let Some(g) = good_iter.next() {
            corpus.push(g);
        }
    }
    corpus.extend(good_iter);
    env.note(&format!(
        "producing {} messages: {n_bad} bad, {n_good} good",
        corpus.len()
    ));
    let mut delivered: Vec<(Case, Delivered)> = Vec::with_capacity(corpus.len());
    for case in corpus {
        let d = produce(&env, &case).await;
        delivered.push((case, d));
    }
    produced += delivered.len() as i64;

    // Every bad message dead-lettered.
    let records = env
        .wait_for(&format!("{n_bad} dead letters"), DEADLINE, |rs| {
            on(rs, &t.dead_letter).count() >= n_bad
        })
        .await;
    worker.assert_running();
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();
    let mut failures: Vec<String> = Vec::new();
    for (case, d) in delivered.iter().filter(|(c, _)| c.reason.is_some()) {
        let reason = case.reason.unwrap();
        let found = dead_letters_of(&dead, &case.topic, *d);
        if found.len() != 1 {
            failures.push(format!(
                "{} ({}[{}]@{}, {reason}): {} dead letters",
                case.what,
                case.topic,
                d.partition,
                d.offset,
                found.len()
            ));
            continue;
        }
        let r = found[0];
        let mut wrong = Vec::new();
        if r.header("dlq.reason").as_deref() != Some(reason) {
            wrong.push(format!("dlq.reason {:?}", r.header("dlq.reason")));
        }
        if r.header("dlq.error").is_none_or(|e| e.trim().is_empty()) {
            wrong.push("no dlq.error".to_owned());
        }
        for name in DLQ_HEADERS {
            if r.header_count(name) != 1 {
                wrong.push(format!("{} x {name}", r.header_count(name)));
            }
        }
        if r.key != case.key {
            wrong.push(format!("key {:?}", r.key));
        }
        // An empty value and no value are the same to Kafka clients.
        if r.value.as_deref().unwrap_or_default() != case.value.as_deref().unwrap_or_default() {
            wrong.push(format!(
                "value of {} bytes, not the original {} bytes",
                r.value.as_ref().map_or(0, Vec::len),
                case.size()
            ));
        }
        for (name, value) in &case.headers {
            let name = String::from_utf8_lossy(name);
            let got = r
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone().unwrap_or_default());
            if got.as_deref() != Some(value.as_deref().unwrap_or_default()) {
                wrong.push(format!("header {name} {got:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{} ({}[{}]@{}, {reason}): {}",
                case.what,
                case.topic,
                d.partition,
                d.offset,
                wrong.join("; ")
            ));
        }
    }
    check!(
        env,
        failures.is_empty(),
        "{} of {n_bad} bad messages not dead-lettered right:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );

    // Nothing else was dead-lettered: in particular no good message.
    env.wait_processed(produced, DEADLINE).await;
    let total = env.wait_outbox_sent(DEADLINE).await;
    let records = env
        .wait_for(&format!("{total} outbox rows published"), DEADLINE, |rs| {
            rs.len() as i64 >= total
        })
        .await;
    let dead: Vec<&Record> = on(&records, &t.dead_letter).collect();
    check_eq!(
        env,
        dead.len(),
        n_bad,
        "dead letters: {:#?}",
        dead.iter()
            .map(|r| r.summary().chars().take(300).collect::<String>())
            .collect::<Vec<_>>()
    );

    // Every good message applied, once.
    for (orderid, qty) in &good_orders {
        check_eq!(
            env,
            env.allocation_rows(orderid, &sku).await,
            vec![(stock.clone(), *qty)],
            "good order {orderid}"
        );
    }
    let allocated: Vec<String> = on(&records, &t.allocated)
        .map(|r| r.field("orderid"))
        .collect();
    let distinct: HashSet<&String> = allocated.iter().collect();
    check_eq!(
        env,
        allocated.len(),
        good_orders.len(),
        "one Allocated per good order"
    );
    check_eq!(
        env,
        distinct.len(),
        good_orders.len(),
        "Allocated: {allocated:?}"
    );
    for (reference, batch_sku, qty) in &good_batches {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT sku, purchased_quantity FROM batches WHERE reference = $1")
                .bind(reference)
                .fetch_optional(&env.db)
                .await
                .unwrap();
        check_eq!(
            env,
            row,
            Some((batch_sku.clone(), *qty)),
            "good batch {reference}"
        );
    }
    let quantities: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reference, purchased_quantity FROM batches WHERE reference = ANY($1)",
    )
    .bind(vec![stock.clone(), resized.clone()])
    .fetch_all(&env.db)
    .await
    .unwrap();
    let mut quantities = quantities;
    quantities.sort();
    let mut want = vec![(stock.clone(), 1_000_000), (resized.clone(), last_resize)];
    want.sort();
    check_eq!(
        env,
        quantities,
        want,
        "the rejected batches changed nothing; the last resize won"
    );
    check_eq!(
        env,
        on(&records, &t.deallocated).count() + on(&records, &t.out_of_stock).count(),
        0,
        "no deallocation, no out-of-stock"
    );

    // Still alive, still applying.
    worker.assert_running();
    let last = unique("order-last");
    env.allocation_required(&last, &sku, 1, &[]).await;
    env.wait_for("the last order allocated", DEADLINE, |rs| {
        on(rs, &t.allocated).any(|r| r.field("orderid") == last)
    })
    .await;
    worker.assert_running();
    check_eq!(
        env,
        env.allocation_rows(&last, &sku).await,
        vec![(stock.clone(), 1)],
        "the last order"
    );

    drop(worker);
    env.finish().await;
}

// ------------------------------------------- inputs that must not jam the worker

/// How long a probe below waits for the worker to get past its bad message.
const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// A worker, stock of one SKU, and an order to send after the bad message:
/// the proof that what follows a bad message still flows.
struct Probe {
    env: TestEnv,
    worker: testkit::WorkerProcess,
    sku: String,
}

impl Probe {
    async fn start() -> Self {
        let env = TestEnv::new().await;
        let worker =
            env.spawn_worker_with(&[("UNKNOWN_REFERENCE_TIMEOUT", UNKNOWN_REFERENCE_TIMEOUT)]);
        let (sku, stock) = (unique("sku"), unique("stock"));
        env.batch_created(&stock, &sku, 1000, None).await;
        env.wait_batch(&stock).await;
        Self { env, worker, sku }
    }

    /// Sends a good order in the same partition as `sku`'s messages, and
    /// waits (on the database) until it is allocated.
    async fn still_applies(&mut self) {
        let order = unique("order-after");
        self.env
            .allocation_required(&order, &self.sku, 1, &[])
            .await;
        let db = self.env.db.clone();
        let (o, s) = (order.clone(), self.sku.clone());
        self.env
            .eventually(
                &format!("{order}, sent after the bad message, allocated"),
                PROBE_DEADLINE,
                move || {
                    let (db, o, s) = (db.clone(), o.clone(), s.clone());
                    async move {
                        let n: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM allocations WHERE orderid = $1 AND sku = $2",
                        )
                        .bind(&o)
                        .bind(&s)
                        .fetch_one(&db)
                        .await?;
                        Ok::<_, sqlx::Error>((n == 1).then_some(()))
                    }
                },
            )
            .await;
        self.worker.assert_running();
    }

    /// Waits for the one dead letter of the message delivered at `d`.
    async fn dead_letter(&self, topic: &str, d: Delivered, reason: &str) -> Record {
        let dlq = self.env.topics.dead_letter.clone();
        let records = self
            .env
            .wait_for(
                &format!("the dead letter of {topic}[{}]@{}", d.partition, d.offset),
                PROBE_DEADLINE,
                |rs| {
                    let dead: Vec<&Record> = on(rs, &dlq).collect();
                    !dead_letters_of(&dead, topic, d).is_empty()
                },
            )
            .await;
        let dead: Vec<&Record> = on(&records, &dlq).collect();
        let found = dead_letters_of(&dead, topic, d);
        check_eq!(self.env, found.len(), 1, "one dead letter");
        check_eq!(
            self.env,
            found[0].header("dlq.reason").as_deref(),
            Some(reason),
            "{}",
            found[0].summary().chars().take(500).collect::<String>()
        );
        found[0].clone()
    }

    async fn finish(self) {
        drop(self.worker);
        self.env.finish().await;
    }
}

/// 1 MiB is more than librdkafka's default `message.max.bytes` (1 000 000),
/// but the broker takes it (Tansu accepts at least 10 MB), so the ERP can
/// publish it. Its dead letter carries the whole value back, and must not
/// jam the relay: the order sent after it is published too.
#[tokio::test]
async fn a_one_mib_value_is_dead_lettered_and_what_follows_is_published() {
    let mut p = Probe::start().await;
    let ar = p.env.topics.allocation_required.clone();
    let producer = p.env.large_record_producer(4 << 20);
    let big = random_bytes(1 << 20);
    let d = p
        .env
        .produce_record_via(&producer, &ar, Some(p.sku.as_bytes()), Some(&big), &[])
        .await;
    p.still_applies().await;
    let r = p.dead_letter(&ar, d, "malformed-json").await;
    check!(
        p.env,
        r.value.as_deref() == Some(&big[..]),
        "the original 1 MiB value"
    );
    // ... and the Allocated of the order after it is published.
    let allocated = p.env.topics.allocated.clone();
    p.env
        .wait_for(
            "an Allocated published after the dead letter",
            PROBE_DEADLINE,
            |rs| on(rs, &allocated).count() >= 1,
        )
        .await;
    p.finish().await;
}

/// `dlq.error` quotes the offending value (serde: `invalid type: string
/// "..."`), so a 600 kB string in `qty` makes a dead letter of value + error,
/// 1.2 MB: past the producer's limit, which must not jam the relay.
#[tokio::test]
async fn a_dead_letter_whose_error_quotes_a_large_value_does_not_jam_the_relay() {
    let mut p = Probe::start().await;
    let ar = p.env.topics.allocation_required.clone();
    let value = json!({"orderid": unique("o"), "sku": p.sku, "qty": "q".repeat(600_000)});
    let d = p.env.produce_json(&ar, Some(&p.sku), &value, &[]).await;
    p.still_applies().await;
    let r = p.dead_letter(&ar, d, "invalid-message").await;
    let error = r.header("dlq.error").unwrap_or_default();
    p.env.note(&format!("dlq.error is {} bytes", error.len()));
    let allocated = p.env.topics.allocated.clone();
    p.env
        .wait_for(
            "an Allocated published after the dead letter",
            PROBE_DEADLINE,
            |rs| on(rs, &allocated).count() >= 1,
        )
        .await;
    p.finish().await;
}

/// `"\u0000"` is valid JSON and a valid name by contract §3 (non-empty, at most
/// 255 characters), but PostgreSQL `text` cannot hold NUL. Such a message must
/// be dead-lettered (invalid-message), not retried forever as if the database
/// were down, which stalls its partition.
#[tokio::test]
async fn a_nul_character_in_a_name_is_dead_lettered_and_the_partition_flows() {
    let mut p = Probe::start().await;
    let (ar, bc) = (
        p.env.topics.allocation_required.clone(),
        p.env.topics.batch_created.clone(),
    );
    let order = json!({"orderid": "o\u{0}1", "sku": p.sku, "qty": 1});
    let d_order = p.env.produce_json(&ar, Some(&p.sku), &order, &[]).await;
    let batch = json!({"ref": "b\u{0}1", "sku": p.sku, "qty": 1});
    let d_batch = p.env.produce_json(&bc, Some(&p.sku), &batch, &[]).await;
    p.still_applies().await;
    p.dead_letter(&ar, d_order, "invalid-message").await;
    p.dead_letter(&bc, d_batch, "invalid-message").await;
    p.finish().await;
}

/// `ce_id` is the idempotency key (contract §3) and goes into a `text` column: a
/// NUL byte in it must not stall the partition either (applied under some
/// key, or dead-lettered: either way, what follows flows).
#[tokio::test]
async fn a_nul_byte_in_ce_id_does_not_stall_the_partition() {
    let mut p = Probe::start().await;
    let ar = p.env.topics.allocation_required.clone();
    let value = json!({"orderid": unique("o"), "sku": p.sku, "qty": 1});
    p.env
        .produce_record(
            &ar,
            Some(p.sku.as_bytes()),
            Some(value.to_string().as_bytes()),
            &[(b"ce_id", Some(b"id\0with-nul"))],
        )
        .await;
    p.still_applies().await;
    p.finish().await;
}

/// Kafka header names are bytes on the wire; one that is not UTF-8 must not
/// take the worker down (rdkafka's `Headers::iter` unwraps `str::from_utf8`
/// on header names and panics).
#[tokio::test]
async fn a_header_name_that_is_not_utf8_does_not_take_the_worker_down() {
    let mut p = Probe::start().await;
    let ar = p.env.topics.allocation_required.clone();
    let value = json!({"orderid": unique("o"), "sku": p.sku, "qty": 1});
    p.env
        .produce_record(
            &ar,
            Some(p.sku.as_bytes()),
            Some(value.to_string().as_bytes()),
            &[(b"x-\xff\xfe", Some(b"v"))],
        )
        .await;
    // The stock and this order: whether applied or dead-lettered, it was read.
    p.env.wait_processed(2, PROBE_DEADLINE).await;
    p.worker.assert_running();
    p.still_applies().await;
    p.finish().await;
}
