//! An in-memory broker and consumer group, and the engine's consumer on it
//! ([`SimConsumer`], an `InboundConsumer`).
//!
//! What it keeps of Kafka, because the engine's promises rest on it:
//! - partitions are logs; a group commits an offset per partition; a member
//!   with nothing committed starts from the earliest message;
//! - an eager rebalance: when a member joins, leaves or is evicted, every
//!   member revokes all it holds (its hand-over runs, then its stored offsets
//!   are committed) and the new assignment takes effect only once every
//!   member still in the group has done so;
//! - a member whose heartbeats stop (frozen, killed) is evicted after the
//!   session timeout, and its partitions move without its hand-over; when it
//!   wakes, it finds itself out of the group, loses what it held (its
//!   commits are refused) and joins again: the zombie that Kafka allows;
//! - stored offsets are committed every auto-commit interval, before a
//!   revocation and at close;
//! - pausing stops fetching, but up to two messages fetched before may still
//!   arrive; seeking discards what was fetched;
//! - statistics (what is unread on each assigned partition) are a snapshot
//!   refreshed once a second and forgotten at every rebalance;
//! - the group's committed offsets and the ends of the partitions answer
//!   `group_unread`, as the broker would.
//!
//! What it leaves out: fetch sizes, the wire, compression, transactions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use allocation_worker::adapters::consumer::{HandOver, InboundConsumer};
use allocation_worker::adapters::inbound::InboundMessage;
use rand::rngs::StdRng;
use rand::Rng;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::time::Instant;

use super::life::Life;

pub type Partition = (String, i32);

pub struct GroupSettings {
    pub session_timeout: Duration,
    pub auto_commit_every: Duration,
}

pub struct Broker {
    state: Mutex<BrokerState>,
    /// Rung at every message produced: idle members fetch at once.
    produced: tokio::sync::Notify,
    /// The longest hand-over so far (revocation to commit), for the checks.
    longest_hand_over: Mutex<Duration>,
    settings: GroupSettings,
    /// Every choice of the fakes, in the order the single thread makes them.
    rng: Arc<Mutex<StdRng>>,
}

#[derive(Default)]
struct BrokerState {
    logs: BTreeMap<Partition, Vec<InboundMessage>>,
    committed: BTreeMap<Partition, i64>,
    members: BTreeMap<u32, Arc<Life>>,
    generation: u64,
    /// The assignment of `generation`.
    target: BTreeMap<Partition, u32>,
    /// Members that revoked what they held for `generation`.
    synced: BTreeSet<u32>,
    /// Rebalances so far, and evictions among them.
    pub rebalances: u64,
    pub evictions: u64,
}

impl Broker {
    pub fn new(
        topics: &[&str],
        partitions: i32,
        settings: GroupSettings,
        rng: Arc<Mutex<StdRng>>,
    ) -> Self {
        let mut state = BrokerState::default();
        for topic in topics {
            for p in 0..partitions {
                state.logs.insert((topic.to_string(), p), Vec::new());
            }
        }
        Self {
            state: Mutex::new(state),
            produced: tokio::sync::Notify::new(),
            longest_hand_over: Mutex::new(Duration::ZERO),
            settings,
            rng,
        }
    }

    /// Appends a message; returns its offset.
    pub fn produce(
        &self,
        topic: &str,
        partition: i32,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<(String, Option<Vec<u8>>)>,
    ) -> i64 {
        let mut state = self.state.lock().unwrap();
        let log = state
            .logs
            .get_mut(&(topic.to_owned(), partition))
            .expect("a known partition");
        let offset = log.len() as i64;
        log.push(InboundMessage {
            topic: topic.to_owned(),
            partition,
            offset,
            key,
            payload,
            headers,
        });
        drop(state);
        self.produced.notify_waiters();
        offset
    }

    pub fn longest_hand_over(&self) -> Duration {
        *self.longest_hand_over.lock().unwrap()
    }

    pub fn committed(&self) -> BTreeMap<Partition, i64> {
        self.state.lock().unwrap().committed.clone()
    }

    pub fn ends(&self) -> BTreeMap<Partition, i64> {
        let state = self.state.lock().unwrap();
        state
            .logs
            .iter()
            .map(|(p, log)| (p.clone(), log.len() as i64))
            .collect()
    }

    pub fn rebalances(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap();
        (state.rebalances, state.evictions)
    }

    fn rebalance(state: &mut BrokerState) {
        state.generation += 1;
        state.rebalances += 1;
        state.synced.clear();
        state.target.clear();
        let members: Vec<u32> = state.members.keys().copied().collect();
        if members.is_empty() {
            return;
        }
        // Round-robin over the sorted partitions, as Kafka's assignors do.
        let partitions: Vec<Partition> = state.logs.keys().cloned().collect();
        for (i, p) in partitions.into_iter().enumerate() {
            state.target.insert(p, members[i % members.len()]);
        }
    }

    fn join(state: &mut BrokerState, member: u32, life: Arc<Life>) {
        state.members.insert(member, life);
        Self::rebalance(state);
    }

    /// Evicts the members whose heartbeats stopped a session ago.
    fn evict(&self, state: &mut BrokerState) {
        let now = Instant::now();
        let gone: Vec<u32> = state
            .members
            .iter()
            .filter(|(_, life)| {
                life.down_since().is_some_and(|s| {
                    now.saturating_duration_since(s) > self.settings.session_timeout
                })
            })
            .map(|(id, _)| *id)
            .collect();
        if gone.is_empty() {
            return;
        }
        for id in gone {
            state.members.remove(&id);
            state.evictions += 1;
        }
        Self::rebalance(state);
    }

    /// Keeps the group going while no member asks anything (all of them
    /// frozen or idle): evictions happen on the broker's clock.
    pub fn tick(&self) {
        let mut state = self.state.lock().unwrap();
        self.evict(&mut state);
    }

    fn commit(&self, member: u32, offsets: &BTreeMap<Partition, i64>) -> Result<(), KafkaError> {
        let mut state = self.state.lock().unwrap();
        if !state.members.contains_key(&member) {
            // Evicted: its generation is over.
            return Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::UnknownMemberId,
            ));
        }
        for (p, offset) in offsets {
            let entry = state.committed.entry(p.clone()).or_insert(0);
            *entry = *offset;
        }
        Ok(())
    }
}

/// The engine's consumer, one per instance incarnation.
pub struct SimConsumer {
    id: u32,
    broker: Arc<Broker>,
    life: Arc<Life>,
    local: Mutex<Local>,
    hand_over: OnceLock<Arc<dyn HandOver>>,
    /// The rebalance in progress, run as a task of its own so that a receive
    /// dropped by the loop's other branches does not cut it in half (in
    /// librdkafka it runs inside one poll).
    rebalancing: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Chance in a thousand of a transient error on a receive.
    error_per_mille: u32,
}

#[derive(Default)]
struct Local {
    subscribed: bool,
    /// The generation whose assignment it holds (or revoked for).
    generation: u64,
    assigned: BTreeMap<Partition, PartitionState>,
    stored: BTreeMap<Partition, i64>,
    last_auto_commit: Option<Instant>,
    /// Unread messages per assigned partition, as of when.
    statistics: Option<(Instant, BTreeMap<Partition, i64>)>,
    cursor: usize,
}

struct PartitionState {
    position: i64,
    paused: bool,
    /// Messages fetched before a pause that still arrive.
    fetched_after_pause: u32,
}

impl SimConsumer {
    pub fn new(id: u32, broker: Arc<Broker>, life: Arc<Life>, error_per_mille: u32) -> Self {
        Self {
            id,
            broker,
            life,
            local: Mutex::new(Local::default()),
            hand_over: OnceLock::new(),
            rebalancing: tokio::sync::Mutex::new(None),
            error_per_mille,
        }
    }

    fn roll(&self, per_mille: u32) -> bool {
        per_mille > 0 && self.broker.rng.lock().unwrap().random_range(0..1000) < per_mille
    }

    /// Revokes what it holds (hand-over, then commit) if its group moved on;
    /// takes its new assignment once the group has settled. `true` when it
    /// must run a hand-over first (returned as a task to await).
    fn rebalance_step(self: &Arc<Self>) -> Option<Vec<Partition>> {
        let mut state = self.broker.state.lock().unwrap();
        self.broker.evict(&mut state);
        let mut local = self.local.lock().unwrap();
        if !local.subscribed {
            return None;
        }
        if !state.members.contains_key(&self.id) {
            // Evicted (or never joined): what it holds is lost, not handed
            // over cleanly; it joins again.
            let lost: Vec<Partition> = local.assigned.keys().cloned().collect();
            if !lost.is_empty() {
                return Some(lost);
            }
            Broker::join(&mut state, self.id, Arc::clone(&self.life));
            local.generation = 0;
        }
        if state.generation > local.generation {
            let held: Vec<Partition> = local.assigned.keys().cloned().collect();
            if !held.is_empty() {
                return Some(held);
            }
            state.synced.insert(self.id);
            local.generation = state.generation;
            local.statistics = None;
        }
        let settled = state.members.keys().all(|m| state.synced.contains(m));
        if settled && local.assigned.is_empty() && state.synced.contains(&self.id) {
            for (p, owner) in &state.target {
                if *owner == self.id {
                    let position = state.committed.get(p).copied().unwrap_or(0);
                    local.assigned.insert(
                        p.clone(),
                        PartitionState {
                            position,
                            paused: false,
                            fetched_after_pause: 0,
                        },
                    );
                }
            }
            local.statistics = None;
        }
        None
    }

    /// The hand-over of `partitions`, then their commit, then they go.
    async fn revoke(self: Arc<Self>, partitions: Vec<Partition>) {
        let started = Instant::now();
        let stops = self.life.stops();
        if let Some(hand_over) = self.hand_over.get() {
            hand_over.revoke_async(&partitions).await;
        }
        self.life.gate().await;
        let stored: BTreeMap<Partition, i64> = {
            let mut local = self.local.lock().unwrap();
            let stored = partitions
                .iter()
                .filter_map(|p| local.stored.get(p).map(|o| (p.clone(), *o)))
                .collect();
            for p in &partitions {
                local.assigned.remove(p);
                local.stored.remove(p);
            }
            local.statistics = None;
            stored
        };
        if !stored.is_empty() {
            let _ = self.broker.commit(self.id, &stored);
        }
        // Only a hand-over that ran: a frozen member's wait is the freeze's.
        if self.life.stops() == stops {
            let took = started.elapsed();
            let mut longest = self.broker.longest_hand_over.lock().unwrap();
            *longest = (*longest).max(took);
        }
    }

    fn auto_commit(&self) {
        let now = Instant::now();
        let stored = {
            let mut local = self.local.lock().unwrap();
            if local.last_auto_commit.is_some_and(|at| {
                now.saturating_duration_since(at) < self.broker.settings.auto_commit_every
            }) {
                return;
            }
            local.last_auto_commit = Some(now);
            local.stored.clone()
        };
        if !stored.is_empty() {
            let _ = self.broker.commit(self.id, &stored);
        }
    }

    fn refresh_statistics(&self) {
        let now = Instant::now();
        let ends = self.broker.ends();
        let mut local = self.local.lock().unwrap();
        if local
            .statistics
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < Duration::from_secs(1))
        {
            return;
        }
        let unread = local
            .assigned
            .iter()
            .map(|(p, s)| {
                (
                    p.clone(),
                    (ends.get(p).copied().unwrap_or(0) - s.position).max(0),
                )
            })
            .collect();
        local.statistics = Some((now, unread));
    }

    fn next_message(&self) -> Option<InboundMessage> {
        let state = self.broker.state.lock().unwrap();
        let mut local = self.local.lock().unwrap();
        let keys: Vec<Partition> = local.assigned.keys().cloned().collect();
        if keys.is_empty() {
            return None;
        }
        let start = local.cursor;
        for i in 0..keys.len() {
            let p = &keys[(start + i) % keys.len()];
            let Some(s) = local.assigned.get_mut(p) else {
                continue;
            };
            if s.paused && s.fetched_after_pause == 0 {
                continue;
            }
            let Some(log) = state.logs.get(p) else {
                continue;
            };
            let Some(message) = log.get(s.position as usize) else {
                continue;
            };
            s.position += 1;
            if s.paused {
                s.fetched_after_pause -= 1;
            }
            local.cursor = (start + i + 1) % keys.len();
            return Some(message.clone());
        }
        None
    }
}

/// The trait is implemented on the `Arc` the worker holds, through this
/// wrapper (the rebalance task needs an owned handle to itself).
pub struct SimConsumerHandle(pub Arc<SimConsumer>);

impl InboundConsumer for SimConsumerHandle {
    fn subscribe(&self, _topics: &[&str]) -> Result<(), KafkaError> {
        self.0.local.lock().unwrap().subscribed = true;
        Ok(())
    }

    async fn recv(&self) -> Result<InboundMessage, KafkaError> {
        let this = &self.0;
        loop {
            this.life.gate().await;
            {
                let mut rebalancing = this.rebalancing.lock().await;
                if let Some(task) = rebalancing.as_mut() {
                    let _ = task.await;
                    *rebalancing = None;
                    continue;
                }
                if let Some(partitions) = this.rebalance_step() {
                    let task = tokio::spawn(Arc::clone(this).revoke(partitions));
                    *rebalancing = Some(task);
                    continue;
                }
            }
            if this.roll(this.error_per_mille) {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::BrokerTransportFailure,
                ));
            }
            this.auto_commit();
            this.refresh_statistics();
            if let Some(message) = this.next_message() {
                return Ok(message);
            }
            // Idle: until something is produced, or a fetch interval
            // passes (the group may have moved, a commit may be due).
            let produced = this.broker.produced.notified();
            let idle = Duration::from_millis(this.broker.rng.lock().unwrap().random_range(50..150));
            tokio::select! {
                biased;
                _ = produced => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    fn set_hand_over(&self, hand_over: Arc<dyn HandOver>) {
        let _ = self.0.hand_over.set(hand_over);
    }

    fn pause(&self, topic: &str, partition: i32, pause: bool) -> Result<(), KafkaError> {
        let fetched = self.0.broker.rng.lock().unwrap().random_range(0..=2);
        let mut local = self.0.local.lock().unwrap();
        let Some(s) = local.assigned.get_mut(&(topic.to_owned(), partition)) else {
            return Err(KafkaError::PauseResume("not assigned".into()));
        };
        if pause && !s.paused {
            s.fetched_after_pause = fetched;
        }
        s.paused = pause;
        if !pause {
            s.fetched_after_pause = 0;
        }
        Ok(())
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let mut local = self.0.local.lock().unwrap();
        let Some(s) = local.assigned.get_mut(&(topic.to_owned(), partition)) else {
            return Err(KafkaError::Seek("not assigned".into()));
        };
        s.position = offset;
        s.fetched_after_pause = 0;
        Ok(())
    }

    fn store_offset(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError> {
        let mut local = self.0.local.lock().unwrap();
        let p = (topic.to_owned(), partition);
        if !local.assigned.contains_key(&p) {
            return Err(KafkaError::StoreOffset(RDKafkaErrorCode::State));
        }
        local.stored.insert(p, next);
        Ok(())
    }

    fn is_assigned(&self) -> bool {
        !self.0.local.lock().unwrap().assigned.is_empty()
    }

    fn unread(&self, topic: &str, fresh: Duration) -> Option<Vec<i64>> {
        let local = self.0.local.lock().unwrap();
        let (at, unread) = local.statistics.as_ref()?;
        if Instant::now().saturating_duration_since(*at) > fresh {
            return None;
        }
        Some(
            unread
                .iter()
                .filter(|((t, _), _)| t == topic)
                .map(|(_, n)| *n)
                .collect(),
        )
    }

    async fn group_unread(&self, topic: &str) -> Result<i64, KafkaError> {
        self.0.life.gate().await;
        // A round trip to the broker.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let state = self.0.broker.state.lock().unwrap();
        let local = self.0.local.lock().unwrap();
        Ok(state
            .logs
            .iter()
            .filter(|((t, p), _)| t == topic && !local.assigned.contains_key(&(t.clone(), *p)))
            .map(|(p, log)| {
                let end = log.len() as i64;
                (end - state.committed.get(p).copied().unwrap_or(0)).max(0)
            })
            .sum())
    }

    async fn close(self: Arc<Self>) {
        let this = &self.0;
        this.life.gate().await;
        let stored = {
            let mut local = this.local.lock().unwrap();
            local.subscribed = false;
            local.assigned.clear();
            std::mem::take(&mut local.stored)
        };
        let _ = this.broker.commit(this.id, &stored);
        let mut state = this.broker.state.lock().unwrap();
        if state.members.remove(&this.id).is_some() {
            Broker::rebalance(&mut state);
        }
    }
}
