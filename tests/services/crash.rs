//! Crash anywhere (contract §6.4): a few thousand generated ERP messages stream
//! through Kafka to the real `allocation-worker` binary while it is SIGKILLed
//! at 20+ random instants and restarted each time. At the end the database and
//! the distinct outbound events (by `ce_id`) must be exactly what a model
//! computed from the same stream says: zero lost, zero extra, per-SKU order
//! kept.
//!
//! Run: `cargo test --test services crash:: -- --nocapture` (needs `source
//! scripts/services.sh`). Every run prints its seed. Knobs, for replaying a
//! seed or an opt-in long run:
//!
//! - `CRASH_SEED=<u64>`: the stream and the kill delays (default: random);
//! - `CRASH_MESSAGES=<n>`: inbound messages (default 2500);
//! - `CRASH_KILLS=<n>`: SIGKILLs at least (default 20).
//!
//! A seed replays the same stream and the same sequence of kill delays; the
//! instants the kills land on still depend on timing, so a failure is
//! reproduced by running the seed a few times, not always on the first.
//!
//! # What is checked, and what is not
//!
//! The domain rules themselves (which batch a line goes to, LIFO deallocation,
//! out of stock) are verified by the unit tests (`unit_domain.rs`,
//! `unit_handlers.rs`). This test uses that same domain as its model (the
//! crate's public `Product` API, plus the message bus's event order: events
//! are handled first in, first out; each `Deallocated` is published, then its
//! line is allocated again, and that `Allocated`/`OutOfStock` queues behind the
//! remaining `Deallocated` events). What it checks is the infrastructure:
//! offsets, idempotency, the one transaction per message, the outbox and its
//! relay. Each message must take effect exactly once however often the worker
//! dies, and every decided event must reach Kafka, in decision order per SKU.
//! After the run it compares:
//!
//! - every order line's batch and quantity (`allocations`), and each batch's
//!   allocation order, which LIFO deallocation depends on;
//! - every batch's purchased and available quantity, and every product's
//!   `version_number` (a change applied twice would bump it twice);
//! - the read model `allocations_view`;
//! - the outbox rows per SKU in id order (the decisions as stored, across
//!   the three event types): the sequence of (type, value) per SKU must equal
//!   the model's;
//! - the records the witness read from `allocation.allocated`, `.deallocated`
//!   and `.out-of-stock`: deduplicated by `ce_id` (keeping the first
//!   occurrence; a re-sent record must equal the first), grouped by key (the
//!   SKU): per SKU and topic, the sequence of values must equal the model's
//!   (Kafka orders records within one topic's partition, not across topics,
//!   so that is the order a subscriber can rely on), and nothing may be
//!   missing or extra;
//! - nothing on the dead-letter topic, and one `processed_messages` row per
//!   produced message.
//!
//! # Why the expected end state is unique: phases
//!
//! The worker consumes its three inbound topics concurrently, so the relative
//! order of two messages on different topics is not defined, and neither is
//! the result when they touch the same product. To make the expected end state
//! unique, the stream is produced in phases:
//!
//! - each message is keyed by its SKU, so one SKU's messages on one topic share
//!   a partition and are handled in the order they were produced;
//! - within a phase, each SKU gets messages of one topic only (phase 1: every
//!   SKU's batches; later phases: per SKU, either order lines, or quantity
//!   changes, which force LIFO deallocation and reallocation, or new batches);
//!   SKUs are independent, so a phase's outcome does not depend on how the
//!   worker interleaves them;
//! - the next phase is produced only once the previous one is fully applied,
//!   which the test knows by counting `processed_messages` rows against the
//!   number of messages it produced (never from broker watermarks).
//!
//! The model applies each SKU's messages in the order the broker stored them
//! (delivery-report offsets), phase after phase.
//!
//! # The kills
//!
//! A killer runs beside the producer, independently of its phases. For each
//! worker it starts it waits until the worker has joined the group (the
//! "partitions assigned" log line) and applied at least one new message, then
//! sleeps a random 50–600 ms and sends SIGKILL. When the kills fall behind
//! the work (a larger share of the stream is applied than of the kills
//! made), the sleep is 10–200 ms instead, so the kills spread over the whole
//! stream instead of running out of work. Each worker runs with a batch size
//! drawn from 500 (the default, twice as likely), 16 and 1, so kills land
//! inside big transactions and between the small ones of a backlog. Between kills it checks that
//! progress was made (the processed count grows in every life). Once every
//! phase is applied and enough kills were made, the last worker is left
//! running to drain the outbox, then stopped with SIGTERM (exit 0 expected).
//!
//! The worker runs with `session.timeout.ms=2000`: after a SIGKILL, Tansu lets
//! a new member join only once the dead one's session expired.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};
use testkit::check;

use allocation_worker::domain::BatchRef;
use chrono::NaiveDate;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use testkit::model::{Ev, SequentialModel, Step};
use testkit::{tail, Delivered, Record, TestEnv, Topics, WorkerProcess, DEADLINE};

/// Kafka properties of the worker in this test (see the module docs).
const CRASH_KAFKA_PROPERTIES: &str = "session.timeout.ms=2000,heartbeat.interval.ms=500";

const DEFAULT_MESSAGES: usize = 2500;
const DEFAULT_KILLS: usize = 20;
const SKUS: usize = 30;

/// No new `processed_messages` row for this long while work is pending is a
/// stuck worker, not a slow one (a kill and rejoin takes a few seconds).
const STALL: Duration = Duration::from_secs(90);

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    let parsed = value.trim().parse().ok();
    assert!(parsed.is_some(), "{name}={value:?} is not a number");
    parsed
}

// ------------------------------------------------------------------ stream

/// One inbound ERP message.
#[derive(Debug, Clone)]
enum Msg {
    BatchCreated {
        reference: String,
        sku: String,
        qty: u32,
        eta: Option<NaiveDate>,
    },
    AllocationRequired {
        orderid: String,
        sku: String,
        qty: u32,
    },
    BatchQuantityChanged {
        reference: String,
        sku: String,
        qty: u32,
        /// Spell the reference `batchref` (the accepted alias) instead of `ref`.
        alias: bool,
    },
}

impl Msg {
    fn sku(&self) -> &str {
        match self {
            Msg::BatchCreated { sku, .. }
            | Msg::AllocationRequired { sku, .. }
            | Msg::BatchQuantityChanged { sku, .. } => sku,
        }
    }

    fn topic<'a>(&self, topics: &'a Topics) -> &'a str {
        match self {
            Msg::BatchCreated { .. } => &topics.batch_created,
            Msg::AllocationRequired { .. } => &topics.allocation_required,
            Msg::BatchQuantityChanged { .. } => &topics.batch_quantity_changed,
        }
    }

    fn value(&self) -> Value {
        match self {
            Msg::BatchCreated {
                reference,
                sku,
                qty,
                eta,
            } => json!({
                "ref": reference,
                "sku": sku,
                "qty": qty,
                "eta": eta.map(|d| d.format("%Y-%m-%d").to_string()),
            }),
            Msg::AllocationRequired { orderid, sku, qty } => {
                json!({"orderid": orderid, "sku": sku, "qty": qty})
            }
            Msg::BatchQuantityChanged {
                reference,
                qty,
                alias,
                ..
            } => {
                if *alias {
                    json!({"batchref": reference, "qty": qty})
                } else {
                    json!({"ref": reference, "qty": qty})
                }
            }
        }
    }
}

/// One message as produced: the message, its optional `ce_id` header, and
/// where the broker stored it.
struct Produced {
    msg: Msg,
    ce_id: Option<String>,
    topic: String,
    at: Delivered,
}

/// Generates the phased stream (see the module docs). Uses a model of its own
/// to aim quantity changes below what is allocated.
fn generate(rng: &mut StdRng, total: usize) -> Vec<Vec<Msg>> {
    let skus: Vec<String> = (0..SKUS).map(|i| format!("crash-sku-{i:02}")).collect();
    let base = NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
    let mut model = Model::default();
    let mut batches: HashMap<String, Vec<String>> = HashMap::new();
    let mut lines: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    let mut next_order = 0usize;
    let mut phases: Vec<Vec<Msg>> = Vec::new();

    let new_batch = |rng: &mut StdRng, sku: &str, batches: &mut HashMap<_, Vec<String>>| {
        let list = batches.entry(sku.to_owned()).or_default();
        let reference = format!("{sku}-b{}", list.len());
        list.push(reference.clone());
        // Few distinct ETAs, so ties (broken by creation order) happen, and
        // some warehouse stock (no ETA), which goes first.
        let eta = if rng.random_bool(0.3) {
            None
        } else {
            Some(base + chrono::Days::new(rng.random_range(0..4)))
        };
        Msg::BatchCreated {
            reference,
            sku: sku.to_owned(),
            qty: rng.random_range(20..=80),
            eta,
        }
    };

    // Phase 1: every SKU's batches.
    let mut phase = Vec::new();
    for sku in &skus {
        for _ in 0..rng.random_range(3..=5) {
            phase.push(new_batch(rng, sku, &mut batches));
        }
    }
    phase.shuffle(rng);
    let mut produced = phase.len();
    for m in &phase {
        model.apply(m);
    }
    phases.push(phase);

    // Then rounds. In each, a SKU gets one kind of message only.
    let remaining = total.saturating_sub(produced);
    // Small phases: the worker applies a phase within a few hundred
    // milliseconds, so there must be many of them for the kills to land on
    // work in progress.
    let rounds = (remaining / 50).clamp(3, 200);
    for round in 0..rounds {
        let budget = if round + 1 == rounds {
            total.saturating_sub(produced)
        } else {
            remaining / rounds
        };
        #[derive(Clone, Copy, PartialEq)]
        enum Role {
            Allocate,
            Change,
            NewBatch,
        }
        let mut order: Vec<&String> = skus.iter().collect();
        order.shuffle(rng);
        let roles: HashMap<&str, Role> = order
            .iter()
            .enumerate()
            .map(|(i, sku)| {
                let role = if round == 0 || i >= SKUS * 3 / 10 {
                    Role::Allocate
                } else if i < SKUS * 2 / 10 {
                    Role::Change
                } else {
                    Role::NewBatch
                };
                (sku.as_str(), role)
            })
            .collect();
        let with_role = |role: Role| -> Vec<&str> {
            skus.iter()
                .map(String::as_str)
                .filter(|s| roles[s] == role)
                .collect()
        };
        let (allocating, changing, adding) = (
            with_role(Role::Allocate),
            with_role(Role::Change),
            with_role(Role::NewBatch),
        );
        let mut phase = Vec::with_capacity(budget);
        while phase.len() < budget {
            let pick = rng.random_range(0..100);
            let msg = if pick < 4 && !adding.is_empty() {
                let sku = *adding.choose(rng).unwrap();
                new_batch(rng, sku, &mut batches)
            } else if pick < 22 && !changing.is_empty() {
                let sku = *changing.choose(rng).unwrap();
                let reference = batches[sku].choose(rng).unwrap().clone();
                let batch = model.products[sku]
                    .batch(&BatchRef::parse(reference.clone()).unwrap())
                    .unwrap();
                let purchased = batch.purchased_quantity();
                let allocated = u32::try_from(batch.allocated_quantity()).unwrap();
                let qty = if allocated > 0 && rng.random_bool(0.6) {
                    // Below what is allocated: LIFO deallocation, reallocation.
                    rng.random_range(0..allocated)
                } else if rng.random_bool(0.5) {
                    purchased + rng.random_range(5..=40)
                } else {
                    rng.random_range(0..=purchased + 10)
                };
                Msg::BatchQuantityChanged {
                    reference,
                    sku: sku.to_owned(),
                    qty,
                    alias: rng.random_bool(0.2),
                }
            } else {
                let sku = *allocating.choose(rng).unwrap();
                let previous = lines.entry(sku.to_owned()).or_default();
                if !previous.is_empty() && rng.random_bool(0.1) {
                    // The same line again (same qty): a no-op if it is
                    // allocated, a new attempt if it was out of stock.
                    let (orderid, qty) = previous.choose(rng).unwrap().clone();
                    Msg::AllocationRequired {
                        orderid,
                        sku: sku.to_owned(),
                        qty,
                    }
                } else {
                    next_order += 1;
                    let orderid = format!("order-{next_order:05}");
                    let qty = if rng.random_bool(0.7) {
                        rng.random_range(1..=4)
                    } else {
                        rng.random_range(5..=12)
                    };
                    previous.push((orderid.clone(), qty));
                    Msg::AllocationRequired {
                        orderid,
                        sku: sku.to_owned(),
                        qty,
                    }
                }
            };
            model.apply(&msg);
            phase.push(msg);
        }
        produced += phase.len();
        phases.push(phase);
    }

    // The determinism argument: one topic per SKU per phase.
    for (i, phase) in phases.iter().enumerate() {
        let mut kinds: HashMap<&str, std::mem::Discriminant<Msg>> = HashMap::new();
        for m in phase {
            let kind = std::mem::discriminant(m);
            assert_eq!(
                *kinds.entry(m.sku()).or_insert(kind),
                kind,
                "phase {i} gives SKU {} messages of two topics",
                m.sku()
            );
        }
    }
    phases
}

// ------------------------------------------------------------------- model

/// The expected state (`tests/support/src/model.rs`): the crate's own `Product`
/// aggregates, driven the way the message bus drives them, and the events
/// they decided, per SKU.
#[derive(Default)]
struct Model(SequentialModel);

impl std::ops::Deref for Model {
    type Target = SequentialModel;
    fn deref(&self) -> &SequentialModel {
        &self.0
    }
}

impl Model {
    fn apply(&mut self, msg: &Msg) {
        let step = match msg {
            Msg::BatchCreated {
                reference,
                qty,
                eta,
                ..
            } => Step::Batch {
                reference,
                qty: *qty,
                eta: *eta,
            },
            Msg::AllocationRequired { orderid, qty, .. } => Step::Order { orderid, qty: *qty },
            Msg::BatchQuantityChanged { reference, qty, .. } => Step::Change {
                reference,
                qty: *qty,
            },
        };
        self.0.apply(msg.sku(), step);
    }
}

// ------------------------------------------------------------------- probes

/// (processed_messages rows, unsent outbox rows).
async fn counts(env: &TestEnv) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM processed_messages), \
                (SELECT count(*) FROM outbox_pending)",
    )
    .fetch_one(&env.db)
    .await
}

/// Processed count; 0 while the worker has not created the table yet.
async fn processed(env: &TestEnv) -> i64 {
    counts(env).await.map_or(0, |(p, _)| p)
}

/// Waits until `n` messages are processed, failing if the count stalls.
async fn wait_applied(env: &TestEnv, n: i64, what: &str) {
    let started = Instant::now();
    let mut last = processed(env).await;
    let mut last_change = Instant::now();
    loop {
        let now = processed(env).await;
        assert!(
            now <= n,
            "{now} processed_messages rows but only {n} messages produced so far; logs: {}",
            env.log_paths()
        );
        if now == n {
            env.note(&format!(
                "{what}: {n} applied after {:?}",
                started.elapsed()
            ));
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        assert!(
            last_change.elapsed() < STALL,
            "{what}: stuck at {now} of {n} processed for {STALL:?}; logs: {}",
            env.log_paths()
        );
        // Poll interval; the deadline is STALL without progress, above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the worker's "partitions assigned" log line.
async fn wait_joined(env: &TestEnv, worker: &mut WorkerProcess) -> Duration {
    let started = Instant::now();
    loop {
        worker.assert_running();
        if worker.log_text().contains("partitions assigned") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} did not join the group within {DEADLINE:?}; log {}:\n{}\nall logs: {}",
            worker.name,
            worker.log.display(),
            tail(&worker.log, 30),
            env.log_paths()
        );
        // Poll interval of the deadline above.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One worker's life, for the report.
#[derive(Debug)]
struct Life {
    join: Duration,
    processed_at_join: i64,
    processed_at_kill: i64,
    produced_at_kill: i64,
    unsent_at_kill: i64,
    delay: Duration,
}

/// Kills and restarts the worker until `kills` kills are made and the whole
/// stream is applied; returns the last worker, running, and the lives.
async fn killer(
    env: &TestEnv,
    rng: &mut StdRng,
    kills: usize,
    total: i64,
    produced: &AtomicI64,
    producer_done: &AtomicBool,
) -> (WorkerProcess, Vec<Life>) {
    let mut lives: Vec<Life> = Vec::new();
    loop {
        // Mostly the default batch size; sometimes small batches or one
        // message per transaction, so that kills also land between the
        // transactions of a backlog.
        let batch = *["500", "500", "16", "1"].choose(rng).unwrap_or(&"500");
        let mut worker = env.spawn_worker_with(&[
            ("KAFKA_PROPERTIES", CRASH_KAFKA_PROPERTIES),
            ("MAX_BATCH_MESSAGES", batch),
        ]);
        let join = wait_joined(env, &mut worker).await;
        let at_join = processed(env).await;
        let all_applied = |p: i64| producer_done.load(Ordering::SeqCst) && p >= total;
        if lives.len() >= kills || all_applied(at_join) {
            return (worker, lives);
        }
        // Progress first: the kill must land while this worker is applying.
        let started = Instant::now();
        loop {
            worker.assert_running();
            let now = processed(env).await;
            if now > at_join {
                break;
            }
            if all_applied(now) {
                return (worker, lives);
            }
            assert!(
                started.elapsed() < STALL,
                "{} joined but applied nothing in {STALL:?} ({now} of {} produced \
                 processed); log {}:\n{}",
                worker.name,
                produced.load(Ordering::SeqCst),
                worker.log.display(),
                tail(&worker.log, 30)
            );
            // Poll interval of the STALL deadline above.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Behind schedule (more of the stream applied than of the kills
        // made): kill sooner, so the kills do not outlast the work.
        let behind = (at_join as f64 / total as f64) > (lives.len() as f64 / kills as f64);
        let delay = Duration::from_millis(if behind {
            rng.random_range(10..=200)
        } else {
            rng.random_range(50..=600)
        });
        // Where the kill lands: a random moment of the worker's work (the
        // scenario itself, not a wait for a result).
        tokio::time::sleep(delay).await;
        worker.assert_running();
        let (at_kill, unsent) = counts(env).await.unwrap_or((0, 0));
        let produced_at_kill = produced.load(Ordering::SeqCst);
        worker.kill().await;
        env.note(&format!(
            "kill {}: {} (batches of {batch}) after {join:?} to join + {delay:?}; processed \
             {at_join} -> {at_kill} of {produced_at_kill} produced, {unsent} outbox rows unsent",
            lives.len() + 1,
            worker.name
        ));
        check!(
            env,
            at_kill > at_join,
            "no progress in the life of {}",
            worker.name
        );
        lives.push(Life {
            join,
            processed_at_join: at_join,
            processed_at_kill: at_kill,
            produced_at_kill,
            unsent_at_kill: unsent,
            delay,
        });
    }
}

// ---------------------------------------------------------------- checking

/// Lists the differences of two maps (at most 15 lines).
fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    expected: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
    failures: &mut Vec<String>,
) {
    let mut lines = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => lines.push(format!("  {k:?}: expected {v:?}, missing")),
            Some(a) if a != v => lines.push(format!("  {k:?}: expected {v:?}, got {a:?}")),
            Some(_) => {}
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            lines.push(format!("  {k:?}: not expected, got {a:?}"));
        }
    }
    if !lines.is_empty() {
        let n = lines.len();
        lines.truncate(15);
        failures.push(format!(
            "{what}: {n} difference(s) with the model, e.g.\n{}",
            lines.join("\n")
        ));
    }
}

/// Per-SKU event sequences: the first difference of each SKU.
fn diff_sequences(
    what: &str,
    expected: &BTreeMap<String, Vec<Ev>>,
    actual: &BTreeMap<String, Vec<Ev>>,
    failures: &mut Vec<String>,
) {
    let empty = Vec::new();
    let mut lines = Vec::new();
    let skus: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for sku in skus {
        let (e, a) = (
            expected.get(sku).unwrap_or(&empty),
            actual.get(sku).unwrap_or(&empty),
        );
        if e == a {
            continue;
        }
        let at = e.iter().zip(a).take_while(|(x, y)| x == y).count();
        lines.push(format!(
            "  {sku}: {} expected, {} actual; first difference at #{at}: expected {:?}, got {:?}",
            e.len(),
            a.len(),
            e.get(at),
            a.get(at)
        ));
    }
    if !lines.is_empty() {
        failures.push(format!(
            "{what}: {} SKU(s) differ from the model:\n{}",
            lines.len(),
            lines.join("\n")
        ));
    }
}

/// The per-SKU sequences split by event type (that is, by outbound topic):
/// keys `"<sku> <type>"`.
fn per_topic(events: &BTreeMap<String, Vec<Ev>>) -> BTreeMap<String, Vec<Ev>> {
    let mut split: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    for (sku, evs) in events {
        for ev in evs {
            split
                .entry(format!("{sku} {}", ev.0))
                .or_default()
                .push(ev.clone());
        }
    }
    split
}

/// (expected but absent, present but not expected), as multisets over all SKUs.
fn lost_and_extra(
    expected: &BTreeMap<String, Vec<Ev>>,
    actual: &BTreeMap<String, Vec<Ev>>,
) -> (usize, usize) {
    let mut balance: HashMap<(String, &str, String), i64> = HashMap::new();
    for (sku, evs) in expected {
        for (t, v) in evs {
            *balance.entry((sku.clone(), *t, v.to_string())).or_default() += 1;
        }
    }
    for (sku, evs) in actual {
        for (t, v) in evs {
            *balance.entry((sku.clone(), *t, v.to_string())).or_default() -= 1;
        }
    }
    let lost = balance
        .values()
        .filter(|n| **n > 0)
        .map(|n| *n as usize)
        .sum();
    let extra = balance
        .values()
        .filter(|n| **n < 0)
        .map(|n| -*n as usize)
        .sum();
    (lost, extra)
}

// -------------------------------------------------------------------- test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_anywhere_loses_nothing_and_applies_nothing_twice() {
    let seed: u64 = env_number("CRASH_SEED").unwrap_or_else(rand::random);
    let total_wanted: usize = env_number("CRASH_MESSAGES").unwrap_or(DEFAULT_MESSAGES);
    let kills: usize = env_number("CRASH_KILLS").unwrap_or(DEFAULT_KILLS);
    eprintln!(
        "[crash] seed {seed} (replay: CRASH_SEED={seed} CRASH_MESSAGES={total_wanted} \
         CRASH_KILLS={kills})"
    );
    let test_started = Instant::now();
    let mut stream_rng = StdRng::seed_from_u64(seed);
    let mut kill_rng = StdRng::seed_from_u64(seed ^ 0x6b69_6c6c);
    let phases = generate(&mut stream_rng, total_wanted);
    let total: usize = phases.iter().map(Vec::len).sum();
    let sizes: Vec<usize> = phases.iter().map(Vec::len).collect();
    eprintln!(
        "[crash] {total} messages in {} phases {sizes:?}",
        phases.len()
    );

    // Alone, as it ran in a test binary of its own: twenty restarts are
    // timed against stall bounds.
    let _alone = testkit::alone::run_alone().await;
    let env = TestEnv::new().await;
    let t = env.topics.clone();
    let produced = AtomicI64::new(0);
    let producer_done = AtomicBool::new(false);

    // The producer: phase after phase, each once the previous one is applied.
    let producing = async {
        let mut all: Vec<Produced> = Vec::with_capacity(total);
        for (i, phase) in phases.iter().enumerate() {
            for chunk in phase.chunks(100) {
                let first_index = all.len();
                let sends = chunk.iter().enumerate().map(|(j, msg)| {
                    // Half the messages carry a ce_id (their idempotency key);
                    // the others are known by topic/partition/offset.
                    let ce_id = stream_rng
                        .random_bool(0.5)
                        .then(|| format!("crash-{seed:x}-{}", first_index + j));
                    let topic = msg.topic(&t).to_owned();
                    let env = &env;
                    async move {
                        let headers: Vec<(&str, &str)> = ce_id
                            .as_deref()
                            .map(|id| vec![("ce_id", id)])
                            .unwrap_or_default();
                        let at = env
                            .produce_json(&topic, Some(msg.sku()), &msg.value(), &headers)
                            .await;
                        Produced {
                            msg: msg.clone(),
                            ce_id,
                            topic,
                            at,
                        }
                    }
                });
                let sends: Vec<_> = sends.collect();
                let delivered = futures::future::join_all(sends).await;
                produced.fetch_add(delivered.len() as i64, Ordering::SeqCst);
                all.extend(delivered);
            }
            env.note(&format!(
                "phase {} produced ({} messages)",
                i + 1,
                phase.len()
            ));
            wait_applied(&env, all.len() as i64, &format!("phase {}", i + 1)).await;
        }
        producer_done.store(true, Ordering::SeqCst);
        all
    };
    let killing = killer(
        &env,
        &mut kill_rng,
        kills,
        total as i64,
        &produced,
        &producer_done,
    );
    let (all, (mut worker, lives)) = tokio::join!(producing, killing);
    let stream_done = test_started.elapsed();

    // The model, fed each phase in the order the broker stored it. Phases are
    // consecutive in `all`; within one, each SKU's messages share a partition.
    let mut model = Model::default();
    let mut start = 0;
    for phase in &phases {
        let mut idx: Vec<usize> = (start..start + phase.len()).collect();
        idx.sort_by_key(|&i| (all[i].topic.clone(), all[i].at.partition, all[i].at.offset));
        for i in idx {
            model.apply(&all[i].msg);
        }
        start += phase.len();
    }
    let with_ce_id = all.iter().filter(|p| p.ce_id.is_some()).count();

    // Drain: the outbox fully sent, and the witness has every decision.
    let db = env.db.clone();
    env.eventually("the outbox is fully sent", DEADLINE, move || {
        let db = db.clone();
        async move {
            let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_pending")
                .fetch_one(&db)
                .await?;
            Ok::<_, sqlx::Error>((unsent == 0).then_some(()))
        }
    })
    .await;
    type OutboxRow = (String, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT kind, message_key, payload, \
                (SELECT value FROM outbox_headers(headers) WHERE name = 'ce_id') \
         FROM outbox ORDER BY id",
    )
    .fetch_all(&env.db)
    .await
    .expect("read the outbox");
    let outbox_ids: HashSet<String> = rows
        .iter()
        .filter(|(kind, ..)| kind != "DeadLetter")
        .filter_map(|(.., id)| id.as_deref())
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .collect();
    let event_topics: HashMap<&str, &'static str> = [
        (t.allocated.as_str(), "Allocated"),
        (t.deallocated.as_str(), "Deallocated"),
        (t.out_of_stock.as_str(), "OutOfStock"),
    ]
    .into_iter()
    .collect();
    let records = env
        .wait_for(
            &format!("the {} published events", outbox_ids.len()),
            DEADLINE,
            |rs| {
                let seen: HashSet<String> = rs
                    .iter()
                    .filter(|r| event_topics.contains_key(r.topic.as_str()))
                    .filter_map(Record::ce_id)
                    .collect();
                outbox_ids.is_subset(&seen)
            },
        )
        .await;

    let mut failures: Vec<String> = Vec::new();

    // --- Inbound: each message recorded once.
    let processed_rows = processed(&env).await;
    if processed_rows != total as i64 {
        failures.push(format!(
            "{processed_rows} processed_messages rows for {total} messages produced"
        ));
    }

    // --- State: allocations, their order per batch, batches, versions, view.
    let allocation_rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT a.orderid, a.sku, a.qty, b.reference FROM allocations a \
         JOIN batches b ON b.id = a.batch_id ORDER BY a.id",
    )
    .fetch_all(&env.db)
    .await
    .expect("read allocations");
    let mut lines_db: BTreeMap<(String, String), (String, i64)> = BTreeMap::new();
    let mut order_db: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (orderid, sku, qty, batch) in allocation_rows {
        order_db
            .entry(batch.clone())
            .or_default()
            .push(orderid.clone());
        if let Some(before) = lines_db.insert((sku.clone(), orderid.clone()), (batch, qty)) {
            failures.push(format!(
                "line ({orderid}, {sku}) allocated twice: {before:?}"
            ));
        }
    }
    let batch_rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT b.reference, b.sku, b.purchased_quantity, \
                b.purchased_quantity - COALESCE(sum(a.qty), 0)::BIGINT \
         FROM batches b LEFT JOIN allocations a ON a.batch_id = b.id GROUP BY b.id",
    )
    .fetch_all(&env.db)
    .await
    .expect("read batches");
    let batches_db: BTreeMap<String, (String, i64, i64)> = batch_rows
        .into_iter()
        .map(|(r, s, p, a)| (r, (s, p, a)))
        .collect();
    let versions_db: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT sku, version_number FROM products")
            .fetch_all(&env.db)
            .await
            .expect("read products")
            .into_iter()
            .collect();
    let view_db: BTreeMap<(String, String), String> =
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT orderid, sku, batchref FROM allocations_view",
        )
        .fetch_all(&env.db)
        .await
        .expect("read allocations_view")
        .into_iter()
        .map(|(o, s, b)| ((s, o), b))
        .collect();

    let mut lines_model = BTreeMap::new();
    let mut order_model = BTreeMap::new();
    let mut batches_model = BTreeMap::new();
    let mut versions_model = BTreeMap::new();
    let mut view_model = BTreeMap::new();
    for (sku, product) in &model.products {
        versions_model.insert(sku.clone(), product.version_number());
        for b in product.batches() {
            let reference = b.reference().as_str().to_owned();
            batches_model.insert(
                reference.clone(),
                (
                    sku.clone(),
                    i64::from(b.purchased_quantity()),
                    b.available_quantity(),
                ),
            );
            let mut order = Vec::new();
            for l in b.allocations() {
                let key = (sku.clone(), l.orderid.as_str().to_owned());
                lines_model.insert(key.clone(), (reference.clone(), i64::from(l.qty)));
                view_model.insert(key, reference.clone());
                order.push(l.orderid.as_str().to_owned());
            }
            if !order.is_empty() {
                order_model.insert(reference, order);
            }
        }
    }
    diff(
        "allocations (line -> batch, qty)",
        &lines_model,
        &lines_db,
        &mut failures,
    );
    diff(
        "allocation order per batch (allocations.id, LIFO)",
        &order_model,
        &order_db,
        &mut failures,
    );
    diff(
        "batches (sku, purchased, available)",
        &batches_model,
        &batches_db,
        &mut failures,
    );
    diff(
        "products.version_number",
        &versions_model,
        &versions_db,
        &mut failures,
    );
    diff("allocations_view", &view_model, &view_db, &mut failures);

    // --- The outbox: the decisions as stored, once each, in order per SKU.
    let mut outbox_seq: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    let mut dead_letters = 0;
    for (kind, key, payload, _) in &rows {
        let kind: &'static str = match kind.as_str() {
            "Allocated" => "Allocated",
            "Deallocated" => "Deallocated",
            "OutOfStock" => "OutOfStock",
            _ => {
                dead_letters += 1;
                continue;
            }
        };
        let key = String::from_utf8_lossy(key.as_deref().unwrap_or_default()).into_owned();
        let value = payload
            .as_deref()
            .and_then(|p| serde_json::from_slice(p).ok())
            .unwrap_or(Value::Null);
        outbox_seq.entry(key).or_default().push((kind, value));
    }
    let outbox_events: usize = outbox_seq.values().map(Vec::len).sum();
    if outbox_ids.len() != outbox_events {
        failures.push(format!(
            "{outbox_events} event rows in the outbox but {} distinct ce_ids",
            outbox_ids.len()
        ));
    }
    if dead_letters > 0 {
        failures.push(format!("{dead_letters} dead letters in the outbox"));
    }
    diff_sequences(
        "outbox rows per SKU",
        &model.events,
        &outbox_seq,
        &mut failures,
    );

    // --- Kafka: distinct events by ce_id, first occurrence, per SKU.
    let mut first: HashMap<String, &Record> = HashMap::new();
    let mut published: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    let mut records_seen = 0;
    let mut duplicates = 0;
    for r in &records {
        if r.topic == t.dead_letter {
            failures.push(format!("unexpected dead letter {}", r.summary()));
            continue;
        }
        let Some(kind) = event_topics.get(r.topic.as_str()).copied() else {
            continue;
        };
        records_seen += 1;
        if r.header("ce_type").as_deref() != Some(&format!("allocation.{kind}")) {
            failures.push(format!("ce_type does not match the topic: {}", r.summary()));
        }
        let Some(id) = r.ce_id() else {
            failures.push(format!("no ce_id: {}", r.summary()));
            continue;
        };
        match first.get(&id) {
            Some(earlier) => {
                duplicates += 1;
                if (&earlier.topic, earlier.key_str(), earlier.json())
                    != (&r.topic, r.key_str(), r.json())
                {
                    failures.push(format!(
                        "same ce_id, different event:\n  {}\n  {}",
                        earlier.summary(),
                        r.summary()
                    ));
                }
            }
            None => {
                first.insert(id, r);
                published
                    .entry(r.key_str().unwrap_or_default())
                    .or_default()
                    .push((kind, r.json()));
            }
        }
    }
    // Kafka orders records within a partition of one topic only, so the
    // witness can check the order per SKU per topic; the order across the
    // three topics is the outbox's, checked above.
    diff_sequences(
        "distinct published events per SKU and topic (by ce_id, first occurrence)",
        &per_topic(&model.events),
        &per_topic(&published),
        &mut failures,
    );
    let (lost, extra) = lost_and_extra(&model.events, &published);
    let expected_events: usize = model.events.values().map(Vec::len).sum();
    let count = |kind: &str| {
        model
            .events
            .values()
            .flatten()
            .filter(|(k, _)| *k == kind)
            .count()
    };

    // --- The kills really hit the work.
    let mid_work = lives
        .iter()
        .filter(|l| l.processed_at_kill < l.produced_at_kill)
        .count();
    let with_unsent = lives.iter().filter(|l| l.unsent_at_kill > 0).count();
    if lives.len() < kills {
        failures.push(format!(
            "only {} kills before the stream was applied; {kills} wanted",
            lives.len()
        ));
    }
    let joins: Vec<f64> = lives.iter().map(|l| l.join.as_secs_f64()).collect();
    let progress: Vec<i64> = lives
        .iter()
        .map(|l| l.processed_at_kill - l.processed_at_join)
        .collect();
    let delays: Vec<u128> = lives.iter().map(|l| l.delay.as_millis()).collect();

    let mut report = String::new();
    writeln!(report, "[crash] seed {seed}").unwrap();
    writeln!(
        report,
        "[crash] messages: {total} in {} phases ({with_ce_id} with a ce_id header), \
         {processed_rows} processed_messages rows",
        phases.len()
    )
    .unwrap();
    writeln!(
        report,
        "[crash] kills: {} (wanted {kills}); with work pending: {mid_work}; with outbox rows \
         unsent: {with_unsent}",
        lives.len()
    )
    .unwrap();
    writeln!(
        report,
        "[crash] per life: join s {:?}; applied {:?}; kill delay ms {:?}",
        joins
            .iter()
            .map(|j| (j * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        progress,
        delays
    )
    .unwrap();
    writeln!(
        report,
        "[crash] events expected: {expected_events} (Allocated {}, Deallocated {}, OutOfStock \
         {}); outbox rows: {outbox_events}; records seen: {records_seen}, distinct by ce_id: {}, \
         duplicates seen: {duplicates}; lost: {lost}; extra: {extra}",
        count("Allocated"),
        count("Deallocated"),
        count("OutOfStock"),
        first.len()
    )
    .unwrap();
    writeln!(
        report,
        "[crash] stream applied in {:.1}s; checked after {:.1}s",
        stream_done.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    )
    .unwrap();
    eprint!("{report}");

    if !failures.is_empty() {
        panic!(
            "{} check(s) failed (seed {seed}):\n{}\nworker logs: {}",
            failures.len(),
            failures.join("\n"),
            env.log_paths()
        );
    }
    check!(
        env,
        count("Deallocated") > 0 && count("OutOfStock") > 0,
        "the stream was meant to cause reallocations and out-of-stock"
    );

    // The last worker, never killed, stops cleanly.
    let status = worker.terminate(Duration::from_secs(30)).await;
    check!(env, status.success(), "exit status after SIGTERM: {status}");
    drop(worker);
    env.finish().await;
}
