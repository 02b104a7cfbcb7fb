//! In-memory fakes of what the outbox relay talks to: its database
//! ([`MemStore`], a `RelayStore`) and the broker ([`Broker`], whose
//! [`FakeProducer`]s are `Publisher`s). Both run on tokio's clock, so a paused
//! runtime drives them, and draw every choice from one seeded [`Rng`].
//!
//! What they keep of the real ones, since the simulation's checks are only
//! as good as that:
//! - Advisory locks are a session's until it ends: closed, dropped (a killed
//!   process's connection) or ended by a fault (a server restart, a lost
//!   route). A statement applies atomically; its reply may be lost after it
//!   applied (the session ended meanwhile), so the relay sees an error for a
//!   mark that happened.
//! - The fence (`outbox_relay_shards`) lives in simulated time.
//! - A producer keeps each partition (a topic here: one partition each) in
//!   send order, and a failure fails whatever it queued behind it on that
//!   partition, as the idempotent producer does. A record is written, or
//!   given up, within the delivery timeout ([`DELIVERY_TIMEOUT`], as
//!   `message.timeout.ms`); a written record's acknowledgement can be lost
//!   (it then times out, and is sent again). Records handed over keep going
//!   when the relay that sent them is killed, as records on the wire do.
//! - Too large is refused at send, a missing topic at delivery, by code, as
//!   librdkafka reports them.
//!
//! Not modelled: `idle_session_timeout`, a crash losing marks committed
//! without the WAL flush, pending ids without a shard (an earlier
//! version's), an earlier version's relay, and the gap librdkafka can leave
//! when a record times out with others of its partition already written
//! (docs/design.md "Relay": the one case of a key's rows written out of
//! order; the checks would flag it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use allocation_worker::adapters::outbox;
use allocation_worker::adapters::relay::{
    Delivery, OutboundRecord, OutboxRow, Publisher, Quarantine, RelayError, RelayStore,
};
use allocation_worker::service_layer::RepositoryError;
use rand::rngs::StdRng;
use rand::Rng as _;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::time::Instant;

/// The seeded source of every choice of one run, shared by the fakes and
/// the driver. Single-threaded runtime: the order of draws is the order of
/// the run, the same for the same seed.
#[derive(Clone)]
pub struct Rng(Arc<Mutex<StdRng>>);

impl Rng {
    pub fn new(rng: StdRng) -> Self {
        Self(Arc::new(Mutex::new(rng)))
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    pub fn ms(&self, range: std::ops::RangeInclusive<u64>) -> Duration {
        Duration::from_millis(self.with(|r| r.random_range(range)))
    }

    pub fn chance(&self, p: f64) -> bool {
        self.with(|r| r.random_bool(p))
    }
}

/// The shard of a key: the worker's own ([`outbox::shard_of`], which a
/// service test holds to the database's `outbox_shard()`).
pub fn shard_of(key: Option<&[u8]>) -> i16 {
    outbox::shard_of(key)
}

#[derive(Debug, Clone)]
pub struct StoredRow {
    pub id: i64,
    pub kind: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<u8>,
    pub shard: i16,
}

#[derive(Debug, Default)]
struct Fence {
    holder: Option<i64>,
    until: Option<Instant>,
}

#[derive(Debug, Default)]
struct SessionLocks {
    relay_shared: bool,
    shards: BTreeSet<i16>,
}

#[derive(Default)]
struct Db {
    rows: BTreeMap<i64, StoredRow>,
    pending: BTreeSet<i64>,
    quarantine: BTreeMap<i64, Quarantine>,
    fences: BTreeMap<i16, Fence>,
    /// Live sessions and the locks each holds.
    sessions: BTreeMap<u64, SessionLocks>,
    shard_owner: BTreeMap<i16, u64>,
    next_session: u64,
}

impl Db {
    fn end_session(&mut self, id: u64) {
        if let Some(locks) = self.sessions.remove(&id) {
            for s in locks.shards {
                self.shard_owner.remove(&s);
            }
        }
    }
}

/// The outbox, its pending ids, the fence table, the quarantine and the
/// advisory locks, in memory.
#[derive(Clone)]
pub struct MemStore {
    db: Arc<Mutex<Db>>,
    rng: Rng,
}

/// A session of [`MemStore`]: its locks are released when it is dropped.
pub struct MemSession {
    id: u64,
    db: Arc<Mutex<Db>>,
}

impl Drop for MemSession {
    fn drop(&mut self) {
        self.db.lock().unwrap().end_session(self.id);
    }
}

fn gone() -> RelayError {
    RelayError::Database(RepositoryError::Unavailable(
        "the relay's session ended (simulated)".into(),
    ))
}

impl MemStore {
    pub fn new(rng: Rng) -> Self {
        Self {
            db: Arc::new(Mutex::new(Db::default())),
            rng,
        }
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap()
    }

    /// A row committed by the worker, pending; its id. Its value starts
    /// with the id (the fake broker reads it back), padded to `size` bytes.
    pub fn append(&self, kind: &str, key: Option<&[u8]>, size: usize, headers: Vec<u8>) -> i64 {
        let mut db = self.db();
        let id = db.rows.keys().next_back().map_or(1, |last| last + 1);
        let mut value = format!("{id} ").into_bytes();
        value.resize(size.max(value.len()), b'.');
        let payload = Some(value);
        let row = StoredRow {
            id,
            kind: kind.to_owned(),
            key: key.map(<[u8]>::to_vec),
            payload,
            headers,
            shard: shard_of(key),
        };
        db.rows.insert(id, row);
        db.pending.insert(id);
        id
    }

    pub fn pending(&self) -> Vec<i64> {
        self.db().pending.iter().copied().collect()
    }

    pub fn quarantined(&self) -> BTreeMap<i64, Quarantine> {
        self.db().quarantine.clone()
    }

    pub fn live_sessions(&self) -> Vec<u64> {
        self.db().sessions.keys().copied().collect()
    }

    /// Ends session `id` under its relay (a server restart, a lost route):
    /// its locks are released at once, its next statement fails.
    pub fn end_session(&self, id: u64) {
        self.db().end_session(id);
    }

    /// One statement on `session`: sent after a seeded delay, applied
    /// atomically if the session is alive, answered after another; an
    /// error if the session ended before it applied or before the answer.
    async fn statement<T>(
        &self,
        session: &MemSession,
        apply: impl FnOnce(&mut Db, u64) -> T,
    ) -> Result<T, RelayError> {
        tokio::time::sleep(self.latency()).await;
        let out = {
            let mut db = self.db();
            if !db.sessions.contains_key(&session.id) {
                return Err(gone());
            }
            apply(&mut db, session.id)
        };
        tokio::time::sleep(self.latency()).await;
        if !self.db().sessions.contains_key(&session.id) {
            return Err(gone());
        }
        Ok(out)
    }

    fn latency(&self) -> Duration {
        if self.rng.chance(0.05) {
            self.rng.ms(5..=200)
        } else {
            self.rng.ms(0..=2)
        }
    }
}

impl RelayStore for MemStore {
    type Session = MemSession;

    async fn connect(&self, _idle: Duration) -> Result<MemSession, RelayError> {
        tokio::time::sleep(self.latency()).await;
        let mut db = self.db();
        let id = db.next_session;
        db.next_session += 1;
        db.sessions.insert(id, SessionLocks::default());
        Ok(MemSession {
            id,
            db: Arc::clone(&self.db),
        })
    }

    async fn join_relays(&self, session: &mut MemSession) -> Result<bool, RelayError> {
        self.statement(session, |db, id| {
            if let Some(locks) = db.sessions.get_mut(&id) {
                locks.relay_shared = true;
            }
            true
        })
        .await
    }

    async fn census(&self, session: &mut MemSession) -> Result<(i64, i64), RelayError> {
        self.statement(session, |db, _| {
            let relays = db.sessions.values().filter(|l| l.relay_shared).count();
            (relays as i64, db.quarantine.len() as i64)
        })
        .await
    }

    async fn try_lock_shards(
        &self,
        session: &mut MemSession,
        candidates: &[i16],
        limit: usize,
    ) -> Result<Vec<i16>, RelayError> {
        self.statement(session, |db, id| {
            let mut taken = Vec::new();
            for &s in candidates {
                if taken.len() >= limit {
                    break;
                }
                match db.shard_owner.get(&s) {
                    Some(owner) if *owner != id => continue,
                    _ => {}
                }
                db.shard_owner.insert(s, id);
                if let Some(locks) = db.sessions.get_mut(&id) {
                    locks.shards.insert(s);
                }
                taken.push(s);
            }
            taken
        })
        .await
    }

    async fn unlock_shards(
        &self,
        session: &mut MemSession,
        shards: &[i16],
    ) -> Result<(), RelayError> {
        self.statement(session, |db, id| {
            for s in shards {
                if db.shard_owner.get(s) == Some(&id) {
                    db.shard_owner.remove(s);
                    if let Some(locks) = db.sessions.get_mut(&id) {
                        locks.shards.remove(s);
                    }
                }
            }
        })
        .await
    }

    async fn fences(
        &self,
        session: &mut MemSession,
        shards: &[i16],
        holder: i64,
    ) -> Result<Vec<(i16, Duration)>, RelayError> {
        self.statement(session, |db, _| {
            let now = Instant::now();
            shards
                .iter()
                .filter_map(|s| {
                    let fence = db.fences.get(s)?;
                    let until = fence.until?;
                    (until > now && fence.holder != Some(holder)).then(|| (*s, until - now))
                })
                .collect()
        })
        .await
    }

    async fn take_pending(
        &self,
        session: &mut MemSession,
        shards: &[i16],
        limit: i64,
        max_bytes: i64,
        holder: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, RelayError> {
        self.statement(session, |db, _| {
            let wanted: BTreeSet<i16> = shards.iter().copied().collect();
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            // The first `limit` pending ids of those shards, in id order,
            // as the SQL reads them.
            let ids: Vec<i64> = db
                .pending
                .iter()
                .filter(|id| wanted.contains(&db.rows[*id].shard))
                .take(limit)
                .copied()
                .collect();
            let total = ids.len() as i64;
            let mut upto = 0i64;
            let mut rows = Vec::new();
            for id in ids {
                let r = &db.rows[&id];
                let len = r.payload.as_ref().map_or(0, |p| p.len() as i64);
                upto += len;
                if upto - len < max_bytes {
                    rows.push(OutboxRow {
                        id: r.id,
                        kind: r.kind.clone(),
                        message_key: r.key.clone(),
                        payload: r.payload.clone(),
                        headers: r.headers.clone(),
                        shard: r.shard,
                        total,
                    });
                }
            }
            let until = Instant::now() + lease;
            for row in &rows {
                db.fences.insert(
                    row.shard,
                    Fence {
                        holder: Some(holder),
                        until: Some(until),
                    },
                );
            }
            rows
        })
        .await
    }

    async fn mark(
        &self,
        session: &mut MemSession,
        sent: &[i64],
        quarantine: &[Quarantine],
        shards: &[i16],
        holder: i64,
    ) -> Result<(), RelayError> {
        self.statement(session, |db, _| {
            for q in quarantine {
                if db.rows.contains_key(&q.id) {
                    db.quarantine.entry(q.id).or_insert_with(|| q.clone());
                }
            }
            for id in sent.iter().chain(quarantine.iter().map(|q| &q.id)) {
                db.pending.remove(id);
            }
            lift(db, shards, holder);
        })
        .await
    }

    async fn omit_value(
        &self,
        session: &mut MemSession,
        id: i64,
        header: &[u8],
    ) -> Result<(), RelayError> {
        self.statement(session, |db, _| {
            if let Some(row) = db.rows.get_mut(&id) {
                if row.payload.is_some() {
                    row.payload = None;
                    row.headers.extend_from_slice(header);
                }
            }
        })
        .await
    }

    async fn lift_fences(
        &self,
        session: &mut MemSession,
        shards: &[i16],
        holder: i64,
    ) -> Result<(), RelayError> {
        self.statement(session, |db, _| lift(db, shards, holder))
            .await
    }

    async fn close(&self, session: MemSession) {
        drop(session);
    }
}

fn lift(db: &mut Db, shards: &[i16], holder: i64) {
    for s in shards {
        if let Some(fence) = db.fences.get_mut(s) {
            if fence.holder == Some(holder) {
                fence.until = None;
            }
        }
    }
}

/// `message.timeout.ms` of the fake producers: a record is written or given
/// up within this of its send.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest value the fake broker takes.
pub const MAX_MESSAGE_BYTES: usize = 1000;

/// A record written to the broker's log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Written {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    /// The outbox id, which the simulation puts at the start of the value.
    pub id: i64,
    /// The producer (relay instance) that wrote it.
    pub producer: String,
    pub at: Duration,
}

/// A period in which the broker misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerFault {
    /// Deliveries take seconds.
    Slow,
    /// Deliveries fail (a partition without a leader): transient.
    Failing,
    /// Records are written but not acknowledged: the acknowledgement comes
    /// at the end of the period or at a flush, if within the delivery
    /// timeout.
    Unacknowledged,
}

#[derive(Default)]
struct BrokerState {
    log: Vec<Written>,
    missing_topics: BTreeSet<String>,
    faults: Vec<(BrokerFault, Instant, Instant)>,
    started: Option<Instant>,
}

/// The broker: one log for every producer, topics that may be missing, and
/// periods of faults.
#[derive(Clone)]
pub struct Broker {
    state: Arc<Mutex<BrokerState>>,
    rng: Rng,
}

impl Broker {
    pub fn new(rng: Rng, missing_topics: impl IntoIterator<Item = String>) -> Self {
        let state = BrokerState {
            missing_topics: missing_topics.into_iter().collect(),
            started: Some(Instant::now()),
            ..BrokerState::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            rng,
        }
    }

    pub fn add_fault(&self, fault: BrokerFault, from: Instant, to: Instant) {
        self.state.lock().unwrap().faults.push((fault, from, to));
    }

    fn fault_at(&self, fault: BrokerFault, at: Instant) -> Option<Instant> {
        let state = self.state.lock().unwrap();
        state
            .faults
            .iter()
            .filter(|(f, from, to)| *f == fault && *from <= at && at < *to)
            .map(|(_, _, to)| *to)
            .max()
    }

    pub fn log(&self) -> Vec<Written> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn producer(&self, name: &str) -> FakeProducer {
        FakeProducer {
            broker: self.clone(),
            name: name.to_owned(),
            state: Arc::new(Mutex::new(ProducerState::default())),
        }
    }

    fn write(&self, topic: &str, key: Option<Vec<u8>>, id: i64, producer: &str) {
        let mut state = self.state.lock().unwrap();
        let at = state
            .started
            .map_or(Duration::ZERO, |s| Instant::now().duration_since(s));
        state.log.push(Written {
            topic: topic.to_owned(),
            key,
            id,
            producer: producer.to_owned(),
            at,
        });
    }
}

struct InFlight {
    topic: String,
    key: Option<Vec<u8>>,
    id: i64,
    sent: Instant,
    /// Written, its acknowledgement held until then.
    held_until: Option<Instant>,
    ack: Option<tokio::sync::oneshot::Sender<Result<(), KafkaError>>>,
}

#[derive(Default)]
struct ProducerState {
    next_seq: u64,
    in_flight: BTreeMap<u64, InFlight>,
    /// Per topic (one partition each): when its last queued record is due.
    due: BTreeMap<String, Instant>,
    /// Per topic: records up to this sequence number fail (queued behind a
    /// failed one).
    failed_through: BTreeMap<String, u64>,
}

/// One relay's producer on the [`Broker`].
pub struct FakeProducer {
    broker: Broker,
    name: String,
    state: Arc<Mutex<ProducerState>>,
}

/// Settles record `seq` now: written and acknowledged, written with its
/// acknowledgement held, or failed with everything queued behind it.
fn settle(broker: &Broker, name: &str, state: &Mutex<ProducerState>, seq: u64, flushing: bool) {
    let now = Instant::now();
    let mut st = state.lock().unwrap();
    let Some(record) = st.in_flight.get(&seq) else {
        return;
    };
    let topic = record.topic.clone();
    let timed_out = now >= record.sent + DELIVERY_TIMEOUT;
    let outcome: Option<Result<(), KafkaError>> = if let Some(held) = record.held_until {
        if flushing || now >= held {
            Some(Ok(()))
        } else if timed_out {
            Some(Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )))
        } else {
            None
        }
    } else if st.failed_through.get(&topic).is_some_and(|f| seq <= *f) || timed_out {
        Some(Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        )))
    } else if broker.state.lock().unwrap().missing_topics.contains(&topic) {
        Some(Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        )))
    } else if broker.fault_at(BrokerFault::Failing, now).is_some() {
        Some(Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::NotLeaderForPartition,
        )))
    } else {
        broker.write(&topic, record.key.clone(), record.id, name);
        match broker.fault_at(BrokerFault::Unacknowledged, now) {
            Some(until) if !flushing => {
                let until = until.min(record.sent + DELIVERY_TIMEOUT);
                if let Some(r) = st.in_flight.get_mut(&seq) {
                    r.held_until = Some(until);
                }
                None
            }
            _ => Some(Ok(())),
        }
    };
    let Some(outcome) = outcome else {
        return;
    };
    if outcome.is_err() {
        // The idempotent producer fails what it queued behind a failure on
        // the partition rather than leave a gap.
        let last = st
            .in_flight
            .iter()
            .filter(|(_, r)| r.topic == topic)
            .map(|(s, _)| *s)
            .max()
            .unwrap_or(seq);
        let f = st.failed_through.entry(topic).or_default();
        *f = (*f).max(last);
    }
    if let Some(mut record) = st.in_flight.remove(&seq) {
        if let Some(ack) = record.ack.take() {
            let _ = ack.send(outcome);
        }
    }
}

impl Publisher for FakeProducer {
    fn send(&self, record: OutboundRecord<'_>) -> Result<Delivery, KafkaError> {
        let now = Instant::now();
        let rng = &self.broker.rng;
        if record.payload.is_some_and(|p| p.len() > MAX_MESSAGE_BYTES) {
            return Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            ));
        }
        if self.broker.fault_at(BrokerFault::Failing, now).is_some() && rng.chance(0.3) {
            return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
        }
        let id: i64 = record
            .payload
            .and_then(|p| p.split(|b| *b == b' ').next())
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse().ok())
            .unwrap_or(-1);
        let delay = if self.broker.fault_at(BrokerFault::Slow, now).is_some() {
            rng.ms(500..=8000)
        } else {
            rng.ms(1..=20)
        };
        let (ack, acked) = tokio::sync::oneshot::channel();
        let (seq, due) = {
            let mut st = self.state.lock().unwrap();
            let seq = st.next_seq;
            st.next_seq += 1;
            let after = st.due.get(record.topic).copied().unwrap_or(now).max(now);
            let due = after + delay;
            st.due.insert(record.topic.to_owned(), due);
            st.in_flight.insert(
                seq,
                InFlight {
                    topic: record.topic.to_owned(),
                    key: record.key.map(<[u8]>::to_vec),
                    id,
                    sent: now,
                    held_until: None,
                    ack: Some(ack),
                },
            );
            (seq, due)
        };
        // The record goes on without the relay: a task of the runtime, not
        // of the relay's future, so a killed relay's records still land.
        let (broker, name, state) = (
            self.broker.clone(),
            self.name.clone(),
            Arc::clone(&self.state),
        );
        tokio::spawn(async move {
            let timeout_at = now + DELIVERY_TIMEOUT;
            tokio::time::sleep_until(due.min(timeout_at)).await;
            settle(&broker, &name, &state, seq, false);
            // Held acknowledgements: at the end of the period, or given up.
            let held = state
                .lock()
                .unwrap()
                .in_flight
                .get(&seq)
                .and_then(|r| r.held_until);
            if let Some(until) = held {
                tokio::time::sleep_until(until.min(timeout_at)).await;
                settle(&broker, &name, &state, seq, false);
            }
        });
        Ok(Box::pin(async move {
            acked.await.unwrap_or(Err(KafkaError::Canceled))
        }))
    }

    /// Settles everything in flight now, unless the broker is failing: then
    /// the flush times out and leaves them to their delivery timeout.
    fn flush(&self, _timeout: Duration) -> Result<(), KafkaError> {
        if self
            .broker
            .fault_at(BrokerFault::Failing, Instant::now())
            .is_some()
        {
            let empty = self.state.lock().unwrap().in_flight.is_empty();
            if !empty {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
        }
        let seqs: Vec<u64> = self
            .state
            .lock()
            .unwrap()
            .in_flight
            .keys()
            .copied()
            .collect();
        for seq in seqs {
            settle(&self.broker, &self.name, &self.state, seq, true);
        }
        Ok(())
    }
}

impl FakeProducer {
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight.len()
    }

    /// A handle on the same producer (the relay owns the other).
    pub fn handle(&self) -> FakeProducer {
        FakeProducer {
            broker: self.broker.clone(),
            name: self.name.clone(),
            state: Arc::clone(&self.state),
        }
    }
}
