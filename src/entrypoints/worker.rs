//! The worker loop: consumes the ERP topics, runs the messages of each
//! partition through the message bus in batches, one unit of work (one
//! transaction) per batch, and stores a partition's offset once the effects
//! (or dead letters) of the messages before it are committed.
//!
//! [`Processor::process_batch`] is the one place where a transaction begins
//! and ends. Partitions run concurrently, one task each, in order within a
//! partition; a partition whose task is full is paused, so the consumer loop
//! never waits for one. A message naming a SKU or batch not known yet waits
//! (see [`crate::entrypoints::tracker`]), with the later messages of its
//! partition that name the same SKU or batch behind it, while the others
//! flow; it is dead-lettered once its window of usable time
//! ([`crate::entrypoints::window`]) has passed. The partition's stored offset
//! never passes a waiting message, and redelivered messages are recognised by
//! their idempotency key. On revocation, a partition's task finishes or
//! abandons its batch and its offsets are committed before the partition goes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::adapters::health::PollClock;
use crate::adapters::inbound::{self, DecodeError};
use crate::adapters::kafka::{to_inbound, HandOver, Topics, WorkerContext};
use crate::adapters::metrics::Metrics;
use crate::adapters::outbox::{
    dead_letter_record, DeadLetterReason, InboundMessage, MessageContext,
};
use crate::adapters::postgres::{classify, KeptConnections, PgUnitOfWork, ProductCache};
use crate::adapters::relay::Backoff;
pub use crate::configuration::WorkerSettings;
use crate::domain::{BatchRef, Command, DomainError, Sku};
use crate::entrypoints::telemetry;
use crate::entrypoints::tracker::{BatchGate, Tracker};
use crate::entrypoints::window::{Conditions, UsableClock};
use crate::service_layer::{self, HandlerError, RepositoryError, UnitOfWork};

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Its idempotency key was already recorded: nothing was changed.
    Duplicate,
    DeadLettered(DeadLetterReason),
    /// Names a SKU or batch not known yet; try again later.
    Deferred,
}

/// Optimistic-concurrency conflicts retried before the message is handed back
/// as a transient failure. A conflict means another transaction made progress,
/// so retrying is safe; the growing, jittered pause spreads out a hot product's
/// contenders instead of letting them collide again in lock step.
const CONFLICT_RETRIES: u32 = 100;

async fn pause_after_conflict(conflicts: u32) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos() % 1000));
    let micros = (200 * u64::from(conflicts.min(25))) + jitter;
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// What is known of a message before any transaction: a command to handle,
/// or a dead letter (unknown topic, undecodable value).
#[derive(Debug, Clone)]
pub enum Plan {
    Handle(Command),
    DeadLetter(DeadLetterReason, String),
}

/// What a message names, for the waiting rule (docs/design.md, "Late
/// references"): the messages naming one key apply in the order of their
/// partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageKey {
    Sku(Sku),
    Batch(BatchRef),
}

impl Plan {
    /// The SKU and batch the message names; none for a dead letter.
    pub fn keys(&self) -> Vec<MessageKey> {
        match self {
            Plan::Handle(Command::Allocate(c)) => vec![MessageKey::Sku(c.sku.clone())],
            Plan::Handle(Command::CreateBatch(c)) => vec![
                MessageKey::Sku(c.sku.clone()),
                MessageKey::Batch(c.reference.clone()),
            ],
            Plan::Handle(Command::ChangeBatchQuantity(c)) => {
                vec![MessageKey::Batch(c.reference.clone())]
            }
            Plan::DeadLetter(..) => Vec::new(),
        }
    }

    fn creates_batch(&self) -> bool {
        matches!(self, Plan::Handle(Command::CreateBatch(_)))
    }
}

/// Why a command was not applied in this attempt.
#[derive(Clone)]
enum Rejection {
    /// Names a SKU or batch not known yet (and the window is still open).
    Deferred,
    DeadLetter(DeadLetterReason, String),
}

impl Rejection {
    fn of(error: &HandlerError, give_up: bool) -> Self {
        let (reason, retryable) = match error {
            HandlerError::UnknownSku(_) => (DeadLetterReason::UnknownSku, true),
            HandlerError::UnknownBatch(_) => (DeadLetterReason::UnknownBatch, true),
            HandlerError::Rejected(DomainError::DuplicateBatch(_)) => {
                (DeadLetterReason::DuplicateBatch, false)
            }
            HandlerError::Rejected(DomainError::DuplicateLine { .. }) => {
                (DeadLetterReason::DuplicateLine, false)
            }
            HandlerError::Rejected(DomainError::WrongSku { .. }) | HandlerError::Repository(_) => {
                (DeadLetterReason::InvalidMessage, false)
            }
        };
        if retryable && !give_up {
            Rejection::Deferred
        } else {
            Rejection::DeadLetter(reason, error.to_string())
        }
    }
}

/// Messages and their outcomes, with the error text of each dead letter.
type Attempt = (Vec<Outcome>, Vec<(usize, String)>);

/// Handles batches of messages, one transaction per batch, with no Kafka
/// client of its own: tests drive it directly against a real database. It
/// keeps connections out of the pool between batches ([`KeptConnections`]):
/// drop it before closing the pool, which waits for them.
pub struct Processor {
    connections: KeptConnections,
    topics: Topics,
    /// Rung after each commit, so the relay publishes without waiting to poll.
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Shared by the partitions: products stay in memory between batches.
    cache: ProductCache,
    /// Bumped after a commit that applied a BatchCreated: a SKU or batch
    /// that messages wait for may exist now.
    references: watch::Sender<u64>,
    /// Whether the last transaction could be made (false after a transient
    /// failure, until one commits): a condition of the unknown-reference
    /// window.
    store_reachable: AtomicBool,
    /// Transactions the partitions may have open at once: three connections
    /// fewer than the pool holds, so that the relay and the HTTP probes always
    /// find one, however many partitions are busy (or waiting on a lock).
    transactions: Arc<Semaphore>,
}

impl Processor {
    pub fn new(
        pool: PgPool,
        topics: Topics,
        relay_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Up to one connection per busy partition, leaving three of the pool
        // to the relay and the HTTP probes (with a pool of fewer than four,
        // one for the partitions all the same).
        let most = (pool.options().get_max_connections() as usize)
            .saturating_sub(RESERVED_CONNECTIONS)
            .max(1);
        Self {
            connections: KeptConnections::new(pool, most),
            topics,
            relay_wake,
            metrics,
            cache: ProductCache::default(),
            references: watch::Sender::new(0),
            store_reachable: AtomicBool::new(true),
            transactions: Arc::new(Semaphore::new(most)),
        }
    }

    /// Changes after every commit that applied a BatchCreated.
    pub fn references_changed(&self) -> watch::Receiver<u64> {
        self.references.subscribe()
    }

    /// False after a transaction failed for a transient reason, until one
    /// commits.
    pub fn store_reachable(&self) -> bool {
        self.store_reachable.load(Ordering::Relaxed)
    }

    /// Optimistic-concurrency conflicts retried so far.
    pub fn conflict_retries(&self) -> u64 {
        self.metrics.concurrency_retries.get()
    }

    /// [`Self::process_batch`] of one message.
    pub async fn process_one(
        &self,
        message: &InboundMessage,
        give_up: bool,
    ) -> Result<Outcome, RepositoryError> {
        let outcomes = self.process_batch(&[(message, give_up)]).await?;
        outcomes.into_iter().next().ok_or_else(|| {
            RepositoryError::Unavailable("a batch of one message had no outcome".into())
        })
    }

    /// Handles `batch` (messages of one partition, in offset order, each
    /// with its `give_up` flag: whether an unknown reference is dead-lettered
    /// rather than `Deferred`) in one transaction. Returns one outcome per
    /// message. The messages are applied one after the other through the
    /// message bus, as if each had its own transaction: a rejected message
    /// is taken back alone, and the others commit. An `Err` is transient
    /// (database unreachable, or conflicts that kept recurring): retry the
    /// whole batch after a back-off; nothing of it was stored.
    pub async fn process_batch(
        &self,
        batch: &[(&InboundMessage, bool)],
    ) -> Result<Vec<Outcome>, RepositoryError> {
        let plans: Vec<Plan> = batch.iter().map(|(m, _)| self.plan(m)).collect();
        let plans: Vec<&Plan> = plans.iter().collect();
        self.process_planned(batch, &plans).await
    }

    /// [`Self::process_batch`] of messages already decoded by [`Self::plan`]
    /// (one plan per message). Within the batch, a message naming a SKU or
    /// batch of an earlier message that was deferred (or held back) is held
    /// back too, without being tried: `Deferred`.
    pub async fn process_planned(
        &self,
        batch: &[(&InboundMessage, bool)],
        plans: &[&Plan],
    ) -> Result<Vec<Outcome>, RepositoryError> {
        let mut contexts: Vec<MessageContext> = batch.iter().map(|(m, _)| m.context()).collect();
        // One span per message when traces are exported (none otherwise),
        // ended with this call; the events carry its trace context.
        let spans: Vec<tracing::Span> = batch
            .iter()
            .zip(contexts.iter_mut())
            .filter_map(|((m, _), context)| telemetry::message_span(m, context))
            .collect();
        let keys: Vec<Vec<MessageKey>> = plans.iter().map(|p| p.keys()).collect();
        let mut conflicts = 0;
        loop {
            match self.attempt(batch, plans, &keys, &contexts).await {
                Ok((outcomes, errors)) => {
                    self.store_reachable.store(true, Ordering::Relaxed);
                    for (span, outcome) in spans.iter().zip(&outcomes) {
                        span.record("outcome", tracing::field::debug(outcome));
                    }
                    for (i, error) in errors {
                        if let Outcome::DeadLettered(reason) = outcomes[i] {
                            let m = batch[i].0;
                            tracing::warn!(
                                reason = reason.as_str(),
                                error,
                                topic = %m.topic,
                                partition = m.partition,
                                offset = m.offset,
                                "message dead-lettered"
                            );
                            self.metrics
                                .dead_letters
                                .with_label_values(&[reason.as_str()])
                                .inc();
                        }
                    }
                    if outcomes
                        .iter()
                        .any(|o| matches!(o, Outcome::Applied | Outcome::DeadLettered(_)))
                    {
                        self.relay_wake.notify_one();
                    }
                    if outcomes
                        .iter()
                        .zip(plans)
                        .any(|(o, p)| *o == Outcome::Applied && p.creates_batch())
                    {
                        self.references.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    return Ok(outcomes);
                }
                Err(RepositoryError::Conflict(why)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    self.metrics.concurrency_retries.inc();
                    tracing::debug!(%why, conflicts, "concurrent change; retrying");
                    pause_after_conflict(conflicts).await;
                }
                Err(e) => {
                    if matches!(e, RepositoryError::Unavailable(_)) {
                        self.store_reachable.store(false, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Decodes a message: what to do with it, and the keys it names.
    pub fn plan(&self, message: &InboundMessage) -> Plan {
        let Some(kind) = self.topics.inbound_kind(&message.topic) else {
            let error = format!("topic {} is not an inbound topic", message.topic);
            return Plan::DeadLetter(DeadLetterReason::UnknownTopic, error);
        };
        match inbound::decode(kind, message.payload.as_deref()) {
            Ok(command) => Plan::Handle(command),
            Err(error) => {
                let reason = match error {
                    DecodeError::Malformed(_) => DeadLetterReason::MalformedJson,
                    DecodeError::Invalid(_) => DeadLetterReason::InvalidMessage,
                };
                Plan::DeadLetter(reason, error.to_string())
            }
        }
    }

    /// One transaction for the whole batch.
    async fn attempt(
        &self,
        batch: &[(&InboundMessage, bool)],
        plans: &[&Plan],
        message_keys: &[Vec<MessageKey>],
        contexts: &[MessageContext],
    ) -> Result<Attempt, RepositoryError> {
        // Held until the connection is back (kept or in the pool).
        let _transaction = self
            .transactions
            .acquire()
            .await
            .map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
        let started = std::time::Instant::now();
        let mut conn = self.connections.acquire().await.map_err(classify)?;
        let attempt = self
            .attempt_on(&mut conn, batch, plans, message_keys, contexts, started)
            .await;
        // Kept only after a commit; after an error it goes back to the pool,
        // which checks it.
        if attempt.is_ok() {
            self.connections.keep(conn);
        }
        attempt
    }

    async fn attempt_on(
        &self,
        conn: &mut PgConnection,
        batch: &[(&InboundMessage, bool)],
        plans: &[&Plan],
        message_keys: &[Vec<MessageKey>],
        contexts: &[MessageContext],
        started: std::time::Instant,
    ) -> Result<Attempt, RepositoryError> {
        let mut uow = PgUnitOfWork::begin(conn, &self.cache).await?;
        let keys: Vec<&str> = contexts
            .iter()
            .map(|c| c.idempotency_key.as_str())
            .collect();

        // Lock and load, in one go, every product the batch names, and learn
        // which messages were processed before.
        let mut skus = Vec::new();
        let mut refs = Vec::new();
        for plan in plans {
            match *plan {
                Plan::Handle(Command::CreateBatch(c)) => {
                    skus.push(&c.sku);
                    refs.push(&c.reference);
                }
                Plan::Handle(Command::ChangeBatchQuantity(c)) => refs.push(&c.reference),
                Plan::Handle(Command::Allocate(c)) => skus.push(&c.sku),
                Plan::DeadLetter(..) => {}
            }
        }
        let done = uow.products().preload(&skus, &refs, &keys).await?;
        let locked = started.elapsed();

        // Rejections depend on the state, so they are decided anew in every
        // attempt; a pass starts over only when a rejected message had
        // changed a product, which the domain never does before refusing.
        let mut rejected: Vec<Option<Rejection>> = vec![None; batch.len()];
        'pass: loop {
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut errors = Vec::new();
            let mut claimed: HashSet<&str> = HashSet::with_capacity(batch.len());
            let mut gate = BatchGate::default();
            for (i, (message, give_up)) in batch.iter().enumerate() {
                let key = keys[i];
                // The same key twice in one batch: the second is a redelivery.
                if done.contains(key) || claimed.contains(key) {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                // Behind a deferred message naming the same SKU or batch: it
                // waits its turn, untried.
                if !gate.is_empty() && gate.blocked(&message_keys[i]) {
                    outcomes.push(Outcome::Deferred);
                    continue;
                }
                let verdict = match (plans[i], &rejected[i]) {
                    (_, Some(rejection)) => rejection.clone(),
                    (Plan::DeadLetter(reason, error), None) => {
                        Rejection::DeadLetter(*reason, error.clone())
                    }
                    (Plan::Handle(command), None) => {
                        uow.start_message(contexts[i].clone());
                        match service_layer::handle(command.clone(), &mut uow).await {
                            Ok(()) => {
                                uow.finish_message();
                                claimed.insert(key);
                                outcomes.push(Outcome::Applied);
                                continue;
                            }
                            Err(HandlerError::Repository(e)) => return Err(e),
                            Err(error) => {
                                let rejection = Rejection::of(&error, *give_up);
                                rejected[i] = Some(rejection.clone());
                                if !uow.reject_message() {
                                    uow.reset();
                                    continue 'pass;
                                }
                                rejection
                            }
                        }
                    }
                };
                match verdict {
                    Rejection::Deferred => {
                        gate.hold(&message_keys[i]);
                        outcomes.push(Outcome::Deferred);
                    }
                    Rejection::DeadLetter(reason, error) => {
                        let record = dead_letter_record(message, reason, &error);
                        uow.dead_letter(key.to_owned(), record);
                        claimed.insert(key);
                        outcomes.push(Outcome::DeadLettered(reason));
                        errors.push((i, error));
                    }
                }
            }
            let handled = started.elapsed();
            uow.commit().await?;
            tracing::debug!(?locked, ?handled, committed = ?started.elapsed(), "batch attempt timings");
            return Ok((outcomes, errors));
        }
    }
}

/// Pool connections the partitions leave to the relay (one) and the HTTP
/// probes and metrics (two).
pub const RESERVED_CONNECTIONS: usize = 3;

/// The consumer loop around a [`Processor`].
pub struct Worker {
    processor: Processor,
    consumer: Arc<StreamConsumer<WorkerContext>>,
    settings: WorkerSettings,
    /// Read by `/readyz`: true while the loop runs and the consumer is healthy.
    consumer_running: Arc<AtomicBool>,
    /// Read by `/healthz`: when the loop last polled the consumer.
    poll_clock: Arc<PollClock>,
    /// The unknown-reference window's clock: usable time only.
    clock: std::sync::Mutex<UsableClock>,
    /// Messages of the batch-created topic fetched and not yet handled.
    unhandled_references: AtomicUsize,
    /// Bytes held by waiting messages (part of QUEUED_BYTES).
    waiting_bytes: AtomicUsize,
    /// Waiting messages and the wall-clock arrival of the oldest, by partition.
    waiting: std::sync::Mutex<WaitingByPartition>,
}

/// Waiting messages and the wall-clock arrival of the oldest, by topic and
/// partition.
type WaitingByPartition = HashMap<(String, i32), (usize, Option<Instant>)>;

impl Worker {
    pub fn new(
        processor: Processor,
        consumer: StreamConsumer<WorkerContext>,
        settings: WorkerSettings,
        consumer_running: Arc<AtomicBool>,
    ) -> Self {
        Self {
            processor,
            consumer: Arc::new(consumer),
            settings,
            consumer_running,
            clock: std::sync::Mutex::new(UsableClock::new()),
            unhandled_references: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            waiting: std::sync::Mutex::new(HashMap::new()),
            poll_clock: Arc::default(),
        }
    }

    /// Records the loop's polls on `clock`, which `/healthz` reads.
    pub fn with_poll_clock(mut self, clock: Arc<PollClock>) -> Self {
        self.poll_clock = clock;
        self
    }

    /// [`Processor::process_planned`] until it succeeds, backing off while
    /// the store is unavailable. `None` when shutdown came first: the batch
    /// is not done.
    async fn process_with_retry(
        &self,
        batch: &[(&InboundMessage, bool)],
        plans: &[&Plan],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let mut backoff = Backoff::default();
        loop {
            // Once told to stop (revoked, or shutting down), the batch in
            // hand has a little while to commit; then it is abandoned,
            // uncommitted (the transaction rolls back), and read again by
            // whoever owns the partition next.
            let processed = tokio::select! {
                biased;
                processed = self.processor.process_planned(batch, plans) => processed,
                _ = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(STOP_GRACE).await;
                } => {
                    tracing::info!("batch in hand abandoned, uncommitted: the partition stops");
                    return None;
                }
            };
            match processed {
                Ok(outcomes) => {
                    if backoff.failures() > 0 {
                        tracing::info!("database reachable again; resumed");
                    }
                    return Some(outcomes);
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "cannot handle messages now; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Usable time so far (see [`Self::watch_window`]).
    fn usable_time(&self) -> Duration {
        self.clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(std::time::Instant::now())
    }

    /// Runs the unknown-reference window's clock while its conditions hold
    /// ([`Conditions::usable`]), checked a few times a second.
    async fn watch_window(&self, shutdown: CancellationToken) {
        let reading = self.consumer.context().reading();
        let mut was_usable = None;
        loop {
            let conditions = Conditions {
                database_reachable: self.processor.store_reachable(),
                // Not `consumer_running`: it stays false after a transient
                // error until a message arrives, which on idle topics could
                // be never. The group being up shows in the statistics.
                consumer_connected: self.consumer.context().is_assigned(),
                unhandled_references: self.unhandled_references.load(Ordering::Relaxed),
                unread_references: reading
                    .unread(&self.processor.topics.batch_created, STATISTICS_FRESH),
                batch: self.settings.max_batch_messages.max(1),
                waiting_memory_full: self.waiting_bytes.load(Ordering::Relaxed) >= QUEUED_BYTES / 2,
            };
            let usable = conditions.usable();
            self.clock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_usable(usable, std::time::Instant::now());
            if was_usable != Some(usable) {
                tracing::debug!(usable, ?conditions, "unknown-reference window clock");
                was_usable = Some(usable);
            }
            self.report_waiting_age();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Consumes until `shutdown`, then stops fetching, lets each partition
    /// finish the message in hand, and commits the stored offsets. Returns
    /// the deadline by which the rest of the shutdown must be done.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<Instant, rdkafka::error::KafkaError> {
        let this = Arc::new(self);
        this.consumer.subscribe(&this.processor.topics.inbound())?;
        tracing::info!(topics = ?this.processor.topics.inbound(), "consuming");
        this.consumer_running.store(true, Ordering::Relaxed);
        this.processor
            .metrics
            .init_topics(&this.processor.topics.inbound());
        let window_stop = CancellationToken::new();
        let window = tokio::spawn({
            let worker = Arc::clone(&this);
            let stop = window_stop.clone();
            async move { worker.watch_window(stop).await }
        });
        let tracker = TaskTracker::new();
        let tasks = Arc::new(PartitionTasks {
            poll_clock: Arc::clone(&this.poll_clock),
            ..PartitionTasks::default()
        });
        this.consumer
            .context()
            .set_hand_over(Arc::clone(&tasks) as Arc<dyn HandOver>);
        let mut partitions: HashMap<(String, i32), Slot> = HashMap::new();
        let budget = Arc::new(Semaphore::new(QUEUED_BYTES));
        let mut errors = Backoff::default();
        // The loop never waits for a partition: a partition whose queue is
        // full (or that the memory bound stops) is paused and its messages
        // kept aside until it has room again, while the loop goes on serving
        // the other partitions, rebalances and statistics, and librdkafka
        // sees its main queue polled (`max.poll.interval.ms`).
        let mut unblock = tokio::time::interval(Duration::from_millis(20));
        unblock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let any_paused = partitions.values().any(|s| s.paused);
            this.poll_clock.polling();
            let received = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = unblock.tick(), if any_paused => {
                    for (key, slot) in partitions.iter_mut().filter(|(_, s)| s.paused) {
                        slot.forward(&budget);
                        if slot.overflow.is_empty() {
                            slot.paused = false;
                            this.pause_partition(&key.0, key.1, false);
                        }
                    }
                    continue;
                }
                received = this.consumer.recv() => received.map(|m| to_inbound(&m)),
            };
            this.poll_clock.polled();
            // Partitions handed over meanwhile: their tasks have stopped;
            // what was kept aside for them is dropped (their next owner
            // reads it again).
            for key in tasks.take_revoked() {
                if let Some(slot) = partitions.remove(&key) {
                    if key.0 == this.processor.topics.batch_created {
                        this.unhandled_references
                            .fetch_sub(slot.overflow.len(), Ordering::Relaxed);
                    }
                }
            }
            let message = match received {
                Ok(message) => {
                    errors.reset();
                    this.consumer_running.store(true, Ordering::Relaxed);
                    message
                }
                Err(error) => {
                    this.consumer_running.store(false, Ordering::Relaxed);
                    this.processor.metrics.consumer_error(&error);
                    let delay = errors.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "consumer error");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            if message.topic == this.processor.topics.batch_created {
                this.unhandled_references.fetch_add(1, Ordering::Relaxed);
            }
            let key = (message.topic.clone(), message.partition);
            if partitions.get(&key).is_some_and(|s| s.sender.is_closed()) {
                // Its task stopped at a hand-over: a new one starts afresh.
                partitions.remove(&key);
            }
            let slot = partitions.entry(key.clone()).or_insert_with(|| {
                // Room for two batches: one being handled, the next filling.
                // It bounds memory, and what is queued but not handled at a
                // crash is simply consumed again.
                let (tx, rx) = mpsc::channel(2 * this.settings.max_batch_messages.max(32));
                let worker = Arc::clone(&this);
                // Cancelled at shutdown, or when the partition is revoked.
                let token = shutdown.child_token();
                let done = tasks.register(key.clone(), token.clone());
                let (topic, partition) = key.clone();
                tracker.spawn(async move {
                    worker.run_partition(topic, partition, rx, token).await;
                    drop(done);
                });
                Slot {
                    sender: tx,
                    overflow: VecDeque::new(),
                    paused: false,
                }
            });
            slot.overflow.push_back(message);
            slot.forward(&budget);
            // Paused again now and then, should a rebalance have resumed it.
            if !slot.overflow.is_empty() && (!slot.paused || slot.overflow.len() % 1000 == 0) {
                slot.paused = true;
                this.pause_partition(&key.0, key.1, true);
            }
        }

        this.consumer_running.store(false, Ordering::Relaxed);
        window_stop.cancel();
        let _ = window.await;
        // From here on, every stage is bounded so that the whole stop takes
        // at most SHUTDOWN_TIMEOUT: half for the partitions to finish the
        // message in hand, a quarter to commit offsets and leave the group,
        // the rest (see bootstrap) for the relay.
        let started = Instant::now();
        let budget = this.settings.shutdown_timeout;
        drop(partitions);
        tracker.close();
        if tokio::time::timeout_at(started + budget / 2, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight messages did not finish in time; they will be consumed again"
            );
        }
        // A task still running holds the worker: hand its connections back,
        // or closing the pool would wait for them.
        this.processor.connections.close();
        // librdkafka's commit and close block, for ever while the broker is
        // unreachable: keep them off the async threads and under a deadline.
        let consumer = Arc::clone(&this.consumer);
        drop(this);
        let closing = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => tracing::info!("offsets committed"),
                // NoOffset: nothing was stored since the last commit.
                Err(error) => tracing::info!(%error, "final offset commit"),
            }
            consumer.unsubscribe();
            drop(consumer);
        });
        if tokio::time::timeout_at(started + budget * 3 / 4, closing)
            .await
            .is_err()
        {
            tracing::warn!(
                "could not commit offsets and leave the group in time (broker unreachable?); \
                 what was not committed is consumed again and skipped as already processed"
            );
        }
        Ok(started + budget)
    }

    /// One partition, in order: whatever has queued up (up to the batch
    /// size) is handled in one transaction. A message naming a SKU or batch
    /// not known yet waits, and so does every later message naming one of
    /// the keys of a waiting message ([`Tracker`]); the others flow. Waiting
    /// messages are tried again, in order and a batch at a time, after a
    /// commit that created a batch, after some of them settled, and on a
    /// timer, until they apply or their window closes.
    async fn run_partition(
        &self,
        topic: String,
        partition: i32,
        mut queue: mpsc::Receiver<Held>,
        shutdown: CancellationToken,
    ) {
        let mut tracker: Tracker<MessageKey, Waiter> = Tracker::new();
        let mut stored: Option<i64> = None;
        let max = self.settings.max_batch_messages.max(1);
        let brings_references = topic == self.processor.topics.batch_created;
        let mut references = self.processor.references_changed();
        let mut retry = RetrySchedule::new();
        let mut batch: Vec<Held> = Vec::with_capacity(max);
        loop {
            let waiting = tracker.waiting_len() > 0;
            let retry_at = waiting.then_some(retry.next);
            // Waiting messages come first: under a backlog they would
            // otherwise starve.
            let retry_now = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                changed = references.changed(), if waiting => {
                    // Soon, not at once: a run of small commits creating
                    // batches would otherwise retry after every one.
                    if changed.is_ok() {
                        retry.soon();
                    }
                    false
                }
                _ = sleep_until_opt(retry_at), if waiting => true,
                received = queue.recv() => {
                    let Some(first) = received else { break };
                    batch.push(first);
                    while batch.len() < max {
                        match queue.try_recv() {
                            Ok(message) => batch.push(message),
                            Err(_) => break,
                        }
                    }
                    false
                }
            };
            if retry_now {
                retry.last = Instant::now();
                let Some(settled) = self
                    .retry_waiting(&topic, partition, &mut tracker, &shutdown)
                    .await
                else {
                    break;
                };
                if settled > 0 {
                    // Those behind may go now: try them at once.
                    retry.reset();
                    retry.next = Instant::now();
                } else {
                    retry.back_off();
                }
            } else if !batch.is_empty() {
                let fetched = batch.len();
                let handled = self
                    .handle_new(&topic, partition, &mut batch, &mut tracker, &shutdown)
                    .await;
                if brings_references {
                    self.unhandled_references
                        .fetch_sub(fetched, Ordering::Relaxed);
                }
                if !handled {
                    break;
                }
                if tracker.waiting_len() > 0 && !waiting {
                    // Batches created before now were there for this try.
                    references.borrow_and_update();
                    retry = RetrySchedule::new();
                }
            }
            // Never past a message not settled: a crash must see it again.
            if let Some(offset) = tracker.safe_offset() {
                if stored.is_none_or(|s| offset > s) {
                    self.store_offset(&topic, partition, offset);
                    stored = Some(offset);
                }
            }
            self.set_waiting(&topic, partition, &tracker);
        }
        // Whatever is queued or waits here is read again by the next owner
        // or run.
        queue.close();
        let mut queued = 0;
        while queue.try_recv().is_ok() {
            queued += 1;
        }
        if brings_references {
            self.unhandled_references
                .fetch_sub(queued, Ordering::Relaxed);
        }
        let left: usize = tracker.waiting().map(|(_, w)| w.held.size).sum();
        self.waiting_bytes.fetch_sub(left, Ordering::Relaxed);
        tracker.clear();
        self.set_waiting(&topic, partition, &tracker);
    }

    /// Admits the messages just read (in offset order): those behind a
    /// waiting message with a shared key wait; the others are handled in one
    /// transaction. `false` when shutdown interrupted it.
    async fn handle_new(
        &self,
        topic: &str,
        partition: i32,
        batch: &mut Vec<Held>,
        tracker: &mut Tracker<MessageKey, Waiter>,
        shutdown: &CancellationToken,
    ) -> bool {
        let arrived = self.usable_time();
        let since = Instant::now();
        let mut ready: Vec<Waiter> = Vec::with_capacity(batch.len());
        for held in batch.drain(..) {
            let plan = self.processor.plan(&held.message);
            let offset = held.message.offset;
            let size = held.size;
            let waiter = Waiter {
                held,
                plan,
                arrived,
                since,
            };
            let keys = waiter.plan.keys();
            match tracker.admit(offset, keys, waiter) {
                Some(waiter) => ready.push(waiter),
                None => {
                    self.waiting_bytes.fetch_add(size, Ordering::Relaxed);
                }
            }
        }
        if ready.is_empty() {
            return true;
        }
        let items: Vec<(&InboundMessage, bool)> =
            ready.iter().map(|w| (&w.held.message, false)).collect();
        let plans: Vec<&Plan> = ready.iter().map(|w| &w.plan).collect();
        let Some(outcomes) = self
            .handle_batch(topic, partition, &items, &plans, shutdown)
            .await
        else {
            return false;
        };
        drop(items);
        drop(plans);
        // Dropping a message gives its bytes back; waiting ones keep theirs.
        for (waiter, outcome) in ready.into_iter().zip(outcomes) {
            let offset = waiter.held.message.offset;
            if outcome == Outcome::Deferred {
                self.waiting_bytes
                    .fetch_add(waiter.held.size, Ordering::Relaxed);
                let keys = waiter.plan.keys();
                tracker.defer(offset, keys, waiter);
            } else {
                tracker.settle(offset);
            }
        }
        true
    }

    /// Tries the first waiting messages again, in offset order, as one
    /// batch; each whose window has closed is dead-lettered, and those
    /// behind it are then tried in turn. Returns how many settled, `None`
    /// when shutdown interrupted it.
    async fn retry_waiting(
        &self,
        topic: &str,
        partition: i32,
        tracker: &mut Tracker<MessageKey, Waiter>,
        shutdown: &CancellationToken,
    ) -> Option<usize> {
        let now = self.usable_time();
        let window = self.settings.unknown_reference_timeout;
        let max = self
            .settings
            .max_batch_messages
            .clamp(1, RETRY_BATCH_MESSAGES);
        let due = tracker.retry_batch(max);
        if due.is_empty() {
            return Some(0);
        }
        let offsets: Vec<i64> = due.iter().map(|(o, _)| *o).collect();
        let items: Vec<(&InboundMessage, bool)> = due
            .iter()
            .map(|(_, w)| (&w.held.message, now.saturating_sub(w.arrived) >= window))
            .collect();
        let plans: Vec<&Plan> = due.iter().map(|(_, w)| &w.plan).collect();
        let outcomes = self
            .handle_batch(topic, partition, &items, &plans, shutdown)
            .await?;
        drop(items);
        drop(plans);
        drop(due);
        let mut settled = 0;
        for (offset, outcome) in offsets.into_iter().zip(outcomes) {
            if outcome != Outcome::Deferred {
                if let Some(waiter) = tracker.settle(offset) {
                    self.waiting_bytes
                        .fetch_sub(waiter.held.size, Ordering::Relaxed);
                }
                settled += 1;
            }
        }
        Some(settled)
    }

    /// Updates the waiting gauges with this partition's waiting messages.
    fn set_waiting(&self, topic: &str, partition: i32, tracker: &Tracker<MessageKey, Waiter>) {
        let oldest = tracker.waiting().next().map(|(_, w)| w.since);
        let count = tracker.waiting_len();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let key = (topic.to_owned(), partition);
            let metrics = &self.processor.metrics;
            let partition = partition.to_string();
            let labels = [topic, partition.as_str()];
            if count == 0 {
                if waiting.remove(&key).is_none() {
                    return;
                }
                let _ = metrics.waiting_messages.remove_label_values(&labels);
                let _ = metrics.waiting_oldest_age.remove_label_values(&labels);
            } else {
                waiting.insert(key, (count, oldest));
                metrics
                    .waiting_messages
                    .with_label_values(&labels)
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        self.report_waiting_age();
    }

    /// Sets the age of each partition's oldest waiting message.
    fn report_waiting_age(&self) {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for ((topic, partition), (_, since)) in waiting.iter() {
            let partition = partition.to_string();
            self.processor
                .metrics
                .waiting_oldest_age
                .with_label_values(&[topic.as_str(), partition.as_str()])
                .set(since.map_or(0.0, |o| o.elapsed().as_secs_f64()));
        }
    }

    async fn handle_batch(
        &self,
        topic: &str,
        partition: i32,
        batch: &[(&InboundMessage, bool)],
        plans: &[&Plan],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let span = tracing::info_span!(
            "batch",
            topic,
            partition,
            first_offset = batch.first().map(|(m, _)| m.offset),
            last_offset = batch.last().map(|(m, _)| m.offset),
            size = batch.len(),
        );
        async {
            let started = std::time::Instant::now();
            let outcomes = self.process_with_retry(batch, plans, shutdown).await?;
            // Every message of the batch waited for the whole transaction:
            // that is its handling duration.
            let elapsed = started.elapsed().as_secs_f64();
            tracing::debug!(elapsed_ms = elapsed * 1e3, "batch done");
            let metrics = &self.processor.metrics;
            metrics.batch_messages.observe(batch.len() as f64);
            for ((message, _), outcome) in batch.iter().zip(&outcomes) {
                let kind = self
                    .processor
                    .topics
                    .inbound_kind(&message.topic)
                    .map_or("unknown", |k| k.as_str());
                metrics
                    .handling_duration
                    .with_label_values(&[kind])
                    .observe(elapsed);
                let label = match outcome {
                    Outcome::Applied => "applied",
                    Outcome::Duplicate => "duplicate",
                    Outcome::DeadLettered(_) => "dead_lettered",
                    Outcome::Deferred => continue,
                };
                metrics
                    .messages_consumed
                    .with_label_values(&[message.topic.as_str(), label])
                    .inc();
                tracing::debug!(
                    offset = message.offset,
                    kind,
                    ce_id = message
                        .header("ce_id")
                        .map(|v| String::from_utf8_lossy(v).into_owned()),
                    ?outcome,
                    "handled"
                );
            }
            Some(outcomes)
        }
        .instrument(span)
        .await
    }

    /// Pauses (or resumes) fetching one partition. Messages of it already
    /// fetched still arrive and are kept aside in its slot; librdkafka
    /// resumes from the one after the last handed over.
    fn pause_partition(&self, topic: &str, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let done = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        match done {
            Ok(()) => tracing::debug!(topic, partition, pause, "partition fetch paused/resumed"),
            // Revoked meanwhile: its next owner fetches it.
            Err(error) => tracing::debug!(%error, topic, partition, pause, "cannot pause/resume"),
        }
    }

    fn store_offset(&self, topic: &str, partition: i32, next: i64) {
        let mut tpl = TopicPartitionList::new();
        let stored = tpl
            .add_partition_offset(topic, partition, Offset::Offset(next))
            .and_then(|()| self.consumer.store_offsets(&tpl));
        if let Err(error) = stored {
            // Happens when the partition was revoked meanwhile; its new owner
            // consumes again from the last commit and skips what we applied.
            tracing::debug!(%error, topic, partition, next, "offset not stored");
        }
    }
}

/// Bytes of inbound messages the partitions may hold at once, waiting ones
/// included. With batches of 500 messages of a few hundred bytes this never
/// binds; it keeps a run of megabyte messages from taking the memory of a
/// whole batch each.
const QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// Most waiting messages tried again in one transaction.
const RETRY_BATCH_MESSAGES: usize = 100;

/// Statistics older than this say nothing of whether the worker has caught
/// up (librdkafka reports every second; see adapters::kafka).
const STATISTICS_FRESH: Duration = Duration::from_secs(10);

/// How long the batch in hand may still take to commit once its partition
/// is told to stop; then it is abandoned, uncommitted.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The partitions' tasks, so that a revocation stops them before the
/// partitions are released ([`HandOver`]).
#[derive(Default)]
struct PartitionTasks {
    tasks: std::sync::Mutex<HashMap<(String, i32), TaskControl>>,
    /// Revoked, for the consumer loop to forget.
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
    /// The loop's clock for `/healthz`: a revocation runs inside the
    /// consumer's poll but is the loop's own work, which can take seconds
    /// (it waits for the partitions' tasks), so it does not count as polling.
    poll_clock: Arc<PollClock>,
}

struct TaskControl {
    stop: CancellationToken,
    /// Disconnected when the task has ended.
    done: std::sync::mpsc::Receiver<()>,
}

impl PartitionTasks {
    /// Registers a partition's task; the task drops what is returned when it
    /// ends.
    fn register(&self, key: (String, i32), stop: CancellationToken) -> std::sync::mpsc::Sender<()> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.insert(key, TaskControl { stop, done });
        done_tx
    }

    fn take_revoked(&self) -> Vec<(String, i32)> {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *revoked)
    }
}

impl HandOver for PartitionTasks {
    /// Stops the revoked partitions' tasks and waits (bounded) until they
    /// have ended: each finishes the batch in hand within [`STOP_GRACE`] or
    /// abandons it, uncommitted, after storing the offsets of what it
    /// committed; its queue and waiting messages are dropped. Runs in the
    /// rebalance callback, on the thread of the consumer loop, not on the
    /// runtime's workers that the tasks need.
    fn revoke(&self, partitions: &[(String, i32)]) {
        self.poll_clock.polled();
        self.stop_revoked(partitions);
        self.poll_clock.polling();
    }
}

impl PartitionTasks {
    /// Stops the tasks of `partitions` and waits for them, a few seconds at
    /// most (see [`HandOver::revoke`]).
    fn stop_revoked(&self, partitions: &[(String, i32)]) {
        let stopping: Vec<((String, i32), TaskControl)> = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            partitions
                .iter()
                .filter_map(|p| tasks.remove(p).map(|c| (p.clone(), c)))
                .collect()
        };
        for (_, control) in &stopping {
            control.stop.cancel();
        }
        let deadline = std::time::Instant::now() + STOP_GRACE + Duration::from_secs(2);
        for ((topic, partition), control) in stopping {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = control.done.recv_timeout(left)
            {
                tracing::warn!(
                    topic,
                    partition,
                    "partition task did not stop in time for the hand-over"
                );
            }
        }
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(partitions.iter().cloned());
    }
}

/// The consumer loop's end of one partition's task.
struct Slot {
    sender: mpsc::Sender<Held>,
    /// Messages read that did not fit (the queue was full, or the memory
    /// bound reached), in offset order; the partition is paused meanwhile.
    overflow: VecDeque<InboundMessage>,
    paused: bool,
}

impl Slot {
    /// Moves what is kept aside into the task's queue, in order, while
    /// there is room there and in the memory bound.
    fn forward(&mut self, budget: &Arc<Semaphore>) {
        while let Some(message) = self.overflow.front() {
            let Ok(room) = self.sender.try_reserve() else {
                return;
            };
            let size = held_size(message);
            let Ok(permit) = Arc::clone(budget).try_acquire_many_owned(size) else {
                return;
            };
            let Some(message) = self.overflow.pop_front() else {
                return;
            };
            room.send(Held {
                message,
                _permit: permit,
                size: size as usize,
            });
        }
    }
}

/// A message on its way through a partition, holding its share of QUEUED_BYTES.
struct Held {
    message: InboundMessage,
    _permit: OwnedSemaphorePermit,
    /// Bytes it holds of QUEUED_BYTES.
    size: usize,
}

/// What a message counts against QUEUED_BYTES: its key, value and headers,
/// plus a little for the rest; never more than the whole budget.
fn held_size(message: &InboundMessage) -> u32 {
    let bytes = 256
        + message.key.as_ref().map_or(0, Vec::len)
        + message.payload.as_ref().map_or(0, Vec::len)
        + message
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
    u32::try_from(bytes.min(QUEUED_BYTES)).unwrap_or(u32::MAX)
}

/// A message of a partition with what was learnt of it when it was read.
struct Waiter {
    held: Held,
    plan: Plan,
    /// Usable time when it was read: its window closes `window` later.
    arrived: Duration,
    /// Wall-clock time when it was read, for the age gauge.
    since: Instant,
}

/// When a partition tries its waiting messages again, on a timer that backs
/// off while nothing changes.
struct RetrySchedule {
    next: Instant,
    delay: Duration,
    /// When the last retry began.
    last: Instant,
}

impl RetrySchedule {
    const FIRST: Duration = Duration::from_millis(200);
    const MOST: Duration = Duration::from_secs(1);
    /// Least time between two retries prompted by new batches.
    const SPACING: Duration = Duration::from_millis(25);

    fn new() -> Self {
        let now = Instant::now();
        Self {
            next: now + Self::FIRST,
            delay: Self::FIRST,
            last: now - Self::SPACING,
        }
    }

    /// Something changed: retry within [`Self::SPACING`] of the last retry.
    fn soon(&mut self) {
        self.delay = Self::FIRST;
        self.next = self
            .next
            .min((self.last + Self::SPACING).max(Instant::now()));
    }

    fn reset(&mut self) {
        self.delay = Self::FIRST;
        self.next = Instant::now() + self.delay;
    }

    fn back_off(&mut self) {
        self.delay = (self.delay * 2).min(Self::MOST);
        self.next = Instant::now() + self.delay;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
