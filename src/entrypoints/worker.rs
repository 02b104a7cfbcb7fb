//! The worker loop: consumes the ERP topics, runs the messages of each
//! partition through the message bus in batches, one unit of work (one
//! transaction) per batch, and stores a partition's offset once the effects
//! (or dead letters) of the messages before it are committed.
//!
//! [`Processor::process_batch`] is the one place where a transaction begins
//! and ends. Partitions run concurrently, one task each, in order within a
//! partition. A message naming a SKU or batch not known yet is parked and
//! retried for a bounded time while the messages behind it keep flowing; the
//! partition's stored offset never passes a parked message, and redelivered
//! messages are recognised by their idempotency key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::adapters::health::PollClock;
use crate::adapters::inbound::{self, DecodeError};
use crate::adapters::kafka::{to_inbound, Topics, WorkerContext};
use crate::adapters::metrics::Metrics;
use crate::adapters::outbox::{
    dead_letter_record, DeadLetterReason, InboundMessage, MessageContext,
};
use crate::adapters::postgres::{classify, KeptConnections, PgUnitOfWork, ProductCache};
use crate::adapters::relay::Backoff;
use crate::domain::{Command, DomainError};
use crate::entrypoints::telemetry;
use crate::service_layer::{self, HandlerError, RepositoryError, UnitOfWork};

/// Tuning of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How long a message naming an unknown SKU or batch is retried before it
    /// is dead-lettered (SPEC §5).
    pub unknown_reference_timeout: Duration,
    /// Bound on finishing in-flight work at shutdown.
    pub shutdown_timeout: Duration,
    /// Most messages of one partition handled in one transaction. 1 gives
    /// one transaction per message.
    pub max_batch_messages: usize,
}

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
enum Plan {
    Handle(Command),
    DeadLetter(DeadLetterReason, String),
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
            transactions: Arc::new(Semaphore::new(most)),
        }
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
        let mut contexts: Vec<MessageContext> = batch.iter().map(|(m, _)| m.context()).collect();
        // One span per message when traces are exported (none otherwise),
        // ended with this call; the events carry its trace context.
        let spans: Vec<tracing::Span> = batch
            .iter()
            .zip(contexts.iter_mut())
            .filter_map(|((m, _), context)| telemetry::message_span(m, context))
            .collect();
        let mut conflicts = 0;
        loop {
            match self.attempt(batch, &plans, &contexts).await {
                Ok((outcomes, errors)) => {
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
                    return Ok(outcomes);
                }
                Err(RepositoryError::Conflict(why)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    self.metrics.concurrency_retries.inc();
                    tracing::debug!(%why, conflicts, "concurrent change; retrying");
                    pause_after_conflict(conflicts).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn plan(&self, message: &InboundMessage) -> Plan {
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
        plans: &[Plan],
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
            .attempt_on(&mut conn, batch, plans, contexts, started)
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
        plans: &[Plan],
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
            match plan {
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
            for (i, (message, give_up)) in batch.iter().enumerate() {
                let key = keys[i];
                // The same key twice in one batch: the second is a redelivery.
                if done.contains(key) || claimed.contains(key) {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                let verdict = match (&plans[i], &rejected[i]) {
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
                    Rejection::Deferred => outcomes.push(Outcome::Deferred),
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
}

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
            poll_clock: Arc::default(),
        }
    }

    /// Records the loop's polls on `clock`, which `/healthz` reads.
    pub fn with_poll_clock(mut self, clock: Arc<PollClock>) -> Self {
        self.poll_clock = clock;
        self
    }

    /// [`Processor::process_batch`] until it succeeds, backing off while the
    /// store is unavailable. `None` when shutdown came first: the batch is not done.
    async fn process_with_retry(
        &self,
        batch: &[(&InboundMessage, bool)],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let mut backoff = Backoff::default();
        loop {
            match self.processor.process_batch(batch).await {
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
        let tracker = TaskTracker::new();
        let mut partitions: HashMap<(String, i32), mpsc::Sender<Held>> = HashMap::new();
        let budget = Arc::new(Semaphore::new(QUEUED_BYTES));
        let mut errors = Backoff::default();
        loop {
            this.poll_clock.polling();
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                received = this.consumer.recv() => received.map(|m| to_inbound(&m)),
            };
            this.poll_clock.polled();
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
            // Memory: what the partitions hold, queued or in the batch in
            // hand, stays within QUEUED_BYTES (a message larger than that
            // waits until it is alone).
            let size = held_size(&message);
            let permit = tokio::select! {
                permit = Arc::clone(&budget).acquire_many_owned(size) => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // never closed
                },
                _ = shutdown.cancelled() => break,
            };
            let message = Held {
                message,
                _permit: permit,
            };
            let key = (message.message.topic.clone(), message.message.partition);
            let sender = partitions.entry(key.clone()).or_insert_with(|| {
                // Room for two batches: one being handled, the next filling.
                // It bounds memory, and what is queued but not handled at a
                // crash is simply consumed again.
                let (tx, rx) = mpsc::channel(2 * this.settings.max_batch_messages.max(32));
                let worker = Arc::clone(&this);
                let token = shutdown.clone();
                tracker.spawn(async move {
                    worker.run_partition(key.0, key.1, rx, token).await;
                });
                tx
            });
            tokio::select! {
                sent = sender.send(message) => {
                    if sent.is_err() {
                        // The task only ends at shutdown; nothing to do but stop.
                        break;
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }

        this.consumer_running.store(false, Ordering::Relaxed);
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
    /// size) is handled in one transaction. Parked messages are retried on a
    /// timer until they apply or their window closes.
    async fn run_partition(
        &self,
        topic: String,
        partition: i32,
        mut queue: mpsc::Receiver<Held>,
        shutdown: CancellationToken,
    ) {
        let mut parked: VecDeque<Parked> = VecDeque::new();
        let mut next_offset: Option<i64> = None;
        let mut stored: Option<i64> = None;
        let max = self.settings.max_batch_messages.max(1);
        let mut batch: Vec<Held> = Vec::with_capacity(max);
        loop {
            let retry_at = parked.iter().map(|p| p.next_try).min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                received = queue.recv() => {
                    let Some(first) = received else { break };
                    batch.push(first);
                    while batch.len() < max {
                        match queue.try_recv() {
                            Ok(message) => batch.push(message),
                            Err(_) => break,
                        }
                    }
                    let items: Vec<(&InboundMessage, bool)> =
                        batch.iter().map(|h| (&h.message, false)).collect();
                    let Some(outcomes) = self.handle_batch(&topic, partition, &items, &shutdown).await else {
                        break;
                    };
                    drop(items);
                    next_offset = batch.last().map(|h| h.message.offset + 1);
                    // Dropping a held message gives its bytes back; parked
                    // ones are few (bounded by the unknown-reference window).
                    for (held, outcome) in batch.drain(..).zip(outcomes) {
                        if outcome == Outcome::Deferred {
                            parked.push_back(Parked::new(held.message));
                        }
                    }
                }
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => {
                    if !self.retry_parked(&topic, partition, &mut parked, &shutdown).await {
                        break;
                    }
                }
            }
            // Never past a parked message: a crash must see it again.
            let watermark = parked.front().map(|p| p.message.offset).or(next_offset);
            if let Some(offset) = watermark {
                if stored.is_none_or(|s| offset > s) {
                    self.store_offset(&topic, partition, offset);
                    stored = Some(offset);
                }
            }
            self.report_waiting(&topic, partition, Some(&parked));
        }
        self.report_waiting(&topic, partition, None);
    }

    /// The waiting-message gauges of a partition from its parked queue;
    /// `None` removes them (the partition task ends).
    fn report_waiting(&self, topic: &str, partition: i32, parked: Option<&VecDeque<Parked>>) {
        let metrics = &self.processor.metrics;
        let partition = partition.to_string();
        let labels = [topic, partition.as_str()];
        let Some(parked) = parked else {
            let _ = metrics.waiting_messages.remove_label_values(&labels);
            let _ = metrics.waiting_oldest_age.remove_label_values(&labels);
            return;
        };
        let oldest = parked.iter().map(|p| p.since).min();
        metrics
            .waiting_messages
            .with_label_values(&labels)
            .set(parked.len() as i64);
        metrics
            .waiting_oldest_age
            .with_label_values(&labels)
            .set(oldest.map_or(0.0, |since| since.elapsed().as_secs_f64()));
    }

    /// Retries, as one batch in offset order, every parked message that is
    /// due. `false` when shutdown interrupted it.
    async fn retry_parked(
        &self,
        topic: &str,
        partition: i32,
        parked: &mut VecDeque<Parked>,
        shutdown: &CancellationToken,
    ) -> bool {
        let now = Instant::now();
        let due: Vec<usize> = (0..parked.len())
            .filter(|i| parked[*i].next_try <= now)
            .collect();
        if due.is_empty() {
            return true;
        }
        let items: Vec<(&InboundMessage, bool)> = due
            .iter()
            .map(|i| {
                let p = &parked[*i];
                let give_up =
                    now.duration_since(p.since) >= self.settings.unknown_reference_timeout;
                (&p.message, give_up)
            })
            .collect();
        let Some(outcomes) = self.handle_batch(topic, partition, &items, shutdown).await else {
            return false;
        };
        drop(items);
        let mut settled = HashSet::new();
        for (i, outcome) in due.into_iter().zip(outcomes) {
            if outcome == Outcome::Deferred {
                parked[i].schedule_next();
            } else {
                settled.insert(i);
            }
        }
        let mut i = 0;
        parked.retain(|_| {
            i += 1;
            !settled.contains(&(i - 1))
        });
        true
    }

    async fn handle_batch(
        &self,
        topic: &str,
        partition: i32,
        batch: &[(&InboundMessage, bool)],
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
            let outcomes = self.process_with_retry(batch, shutdown).await?;
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

/// Bytes of inbound messages the partitions may hold at once. With batches
/// of 500 messages of a few hundred bytes this never binds; it keeps a run of
/// megabyte messages from taking the memory of a whole batch each.
const QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// A message on its way through a partition, holding its share of QUEUED_BYTES.
struct Held {
    message: InboundMessage,
    _permit: OwnedSemaphorePermit,
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

struct Parked {
    message: InboundMessage,
    since: Instant,
    next_try: Instant,
    delay: Duration,
}

impl Parked {
    fn new(message: InboundMessage) -> Self {
        let delay = Duration::from_millis(200);
        let now = Instant::now();
        Self {
            message,
            since: now,
            next_try: now + delay,
            delay,
        }
    }

    fn schedule_next(&mut self) {
        self.delay = (self.delay * 2).min(Duration::from_secs(2));
        self.next_try = Instant::now() + self.delay;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
