//! The worker loop: consumes the ERP topics, runs each message through the
//! message bus in its own unit of work, and stores the message's offset once
//! its effects (or its dead letter) are committed.
//!
//! [`Worker::process_one`] is the one place where a message's transaction
//! begins and ends. Partitions run concurrently, one task each, in order within
//! a partition. A message naming a SKU or batch not known yet is parked and
//! retried for a bounded time while the messages behind it keep flowing; the
//! partition's stored offset never passes a parked message, and redelivered
//! messages are recognised by their idempotency key.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::adapters::inbound::{self, DecodeError};
use crate::adapters::kafka::{to_inbound, Topics, WorkerContext};
use crate::adapters::metrics::Metrics;
use crate::adapters::outbox::{dead_letter_record, DeadLetterReason, InboundMessage};
use crate::adapters::postgres::{Claim, PgUnitOfWork};
use crate::adapters::relay::Backoff;
use crate::domain::DomainError;
use crate::service_layer::{self, HandlerError, RepositoryError};

/// Tuning of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How long a message naming an unknown SKU or batch is retried before it
    /// is dead-lettered (SPEC §5).
    pub unknown_reference_timeout: Duration,
    /// Bound on finishing in-flight work at shutdown.
    pub shutdown_timeout: Duration,
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

/// Handles messages, one transaction each, with no Kafka client of its own:
/// tests drive it directly against a real database.
pub struct Processor {
    pool: PgPool,
    topics: Topics,
    /// Rung after each commit, so the relay publishes without waiting to poll.
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Processor {
    pub fn new(
        pool: PgPool,
        topics: Topics,
        relay_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pool,
            topics,
            relay_wake,
            metrics,
        }
    }

    /// Optimistic-concurrency conflicts retried so far.
    pub fn conflict_retries(&self) -> u64 {
        self.metrics.concurrency_retries.get()
    }

    /// Handles one message once. `give_up` turns an unknown reference into a
    /// dead letter instead of `Deferred`. An `Err` is transient (database
    /// unreachable, or conflicts that kept recurring): retry after a back-off.
    pub async fn process_one(
        &self,
        message: &InboundMessage,
        give_up: bool,
    ) -> Result<Outcome, RepositoryError> {
        let Some(kind) = self.topics.inbound_kind(&message.topic) else {
            let error = format!("topic {} is not an inbound topic", message.topic);
            return self
                .dead_letter(message, DeadLetterReason::UnknownTopic, &error)
                .await;
        };
        let command = match inbound::decode(kind, message.payload.as_deref()) {
            Ok(command) => command,
            Err(error) => {
                let reason = match error {
                    DecodeError::Malformed(_) => DeadLetterReason::MalformedJson,
                    DecodeError::Invalid(_) => DeadLetterReason::InvalidMessage,
                };
                return self.dead_letter(message, reason, &error.to_string()).await;
            }
        };

        let mut conflicts = 0;
        loop {
            let mut uow = PgUnitOfWork::begin(&self.pool, message.context()).await?;
            if uow.claim().await? == Claim::AlreadyProcessed {
                return Ok(Outcome::Duplicate);
            }
            let handled = service_layer::handle(command.clone(), &mut uow).await;
            let committed = match handled {
                Ok(()) => uow.commit().await,
                Err(HandlerError::Repository(e)) => Err(e),
                Err(rejection) => {
                    drop(uow);
                    let (reason, retryable) = match &rejection {
                        HandlerError::UnknownSku(_) => (DeadLetterReason::UnknownSku, true),
                        HandlerError::UnknownBatch(_) => (DeadLetterReason::UnknownBatch, true),
                        HandlerError::Rejected(DomainError::DuplicateBatch(_)) => {
                            (DeadLetterReason::DuplicateBatch, false)
                        }
                        HandlerError::Rejected(DomainError::DuplicateLine { .. }) => {
                            (DeadLetterReason::DuplicateLine, false)
                        }
                        HandlerError::Rejected(DomainError::WrongSku { .. }) => {
                            (DeadLetterReason::InvalidMessage, false)
                        }
                        HandlerError::Repository(_) => unreachable!("matched above"),
                    };
                    if retryable && !give_up {
                        return Ok(Outcome::Deferred);
                    }
                    return self
                        .dead_letter(message, reason, &rejection.to_string())
                        .await;
                }
            };
            match committed {
                Ok(()) => {
                    self.relay_wake.notify_one();
                    return Ok(Outcome::Applied);
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

    /// Records the dead letter and the message's idempotency key together.
    async fn dead_letter(
        &self,
        message: &InboundMessage,
        reason: DeadLetterReason,
        error: &str,
    ) -> Result<Outcome, RepositoryError> {
        let mut conflicts = 0;
        loop {
            let mut uow = PgUnitOfWork::begin(&self.pool, message.context()).await?;
            if uow.claim().await? == Claim::AlreadyProcessed {
                return Ok(Outcome::Duplicate);
            }
            uow.add_outbox_record(dead_letter_record(message, reason, error));
            match uow.commit().await {
                Ok(()) => {
                    tracing::warn!(reason = reason.as_str(), error, "message dead-lettered");
                    self.metrics
                        .dead_letters
                        .with_label_values(&[reason.as_str()])
                        .inc();
                    self.relay_wake.notify_one();
                    return Ok(Outcome::DeadLettered(reason));
                }
                Err(RepositoryError::Conflict(_)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    self.metrics.concurrency_retries.inc();
                    pause_after_conflict(conflicts).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The consumer loop around a [`Processor`].
pub struct Worker {
    processor: Processor,
    consumer: Arc<StreamConsumer<WorkerContext>>,
    settings: WorkerSettings,
    /// Read by `/readyz`: true while the loop runs and the consumer is healthy.
    consumer_running: Arc<AtomicBool>,
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
        }
    }

    /// [`Self::process_one`] until it succeeds, backing off while the store is
    /// unavailable. `None` when shutdown came first: the message is not done.
    async fn process_with_retry(
        &self,
        message: &InboundMessage,
        give_up: bool,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut backoff = Backoff::default();
        loop {
            match self.processor.process_one(message, give_up).await {
                Ok(outcome) => {
                    if backoff.failures() > 0 {
                        tracing::info!("database reachable again; resumed");
                    }
                    return Some(outcome);
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "cannot handle message now; backing off");
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
        let mut partitions: HashMap<(String, i32), mpsc::Sender<InboundMessage>> = HashMap::new();
        let mut errors = Backoff::default();
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                received = this.consumer.recv() => received.map(|m| to_inbound(&m)),
            };
            let message = match received {
                Ok(message) => {
                    errors.reset();
                    this.consumer_running.store(true, Ordering::Relaxed);
                    message
                }
                Err(error) => {
                    this.consumer_running.store(false, Ordering::Relaxed);
                    let delay = errors.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "consumer error");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            let key = (message.topic.clone(), message.partition);
            let sender = partitions.entry(key.clone()).or_insert_with(|| {
                // Small queue: it bounds memory, and what is queued but not
                // handled at a crash is simply consumed again.
                let (tx, rx) = mpsc::channel(64);
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

    /// One partition, in order. Parked messages are retried on a timer until
    /// they apply or their window closes.
    async fn run_partition(
        &self,
        topic: String,
        partition: i32,
        mut queue: mpsc::Receiver<InboundMessage>,
        shutdown: CancellationToken,
    ) {
        let mut parked: VecDeque<Parked> = VecDeque::new();
        let mut next_offset: Option<i64> = None;
        let mut stored: Option<i64> = None;
        loop {
            let retry_at = parked.iter().map(|p| p.next_try).min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                received = queue.recv() => {
                    let Some(message) = received else { break };
                    let offset = message.offset;
                    match self.handle_traced(&message, false, &shutdown).await {
                        None => break,
                        Some(Outcome::Deferred) => parked.push_back(Parked::new(message)),
                        Some(_) => {}
                    }
                    next_offset = Some(offset + 1);
                }
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => {
                    if !self.retry_parked(&mut parked, &shutdown).await {
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
        }
    }

    /// Retries every parked message that is due, in offset order. `false` when
    /// shutdown interrupted it.
    async fn retry_parked(
        &self,
        parked: &mut VecDeque<Parked>,
        shutdown: &CancellationToken,
    ) -> bool {
        let now = Instant::now();
        let mut still = VecDeque::with_capacity(parked.len());
        while let Some(mut p) = parked.pop_front() {
            if p.next_try > now {
                still.push_back(p);
                continue;
            }
            let give_up = now.duration_since(p.since) >= self.settings.unknown_reference_timeout;
            match self.handle_traced(&p.message, give_up, shutdown).await {
                None => {
                    still.push_back(p);
                    still.extend(parked.drain(..));
                    *parked = still;
                    return false;
                }
                Some(Outcome::Deferred) => {
                    p.schedule_next();
                    still.push_back(p);
                }
                Some(_) => {}
            }
        }
        *parked = still;
        true
    }

    async fn handle_traced(
        &self,
        message: &InboundMessage,
        give_up: bool,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let kind = self
            .processor
            .topics
            .inbound_kind(&message.topic)
            .map_or("unknown", |k| k.as_str());
        let ce_id = message
            .header("ce_id")
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let span = tracing::info_span!(
            "message",
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            kind,
            ce_id,
        );
        async {
            let started = std::time::Instant::now();
            let outcome = self.process_with_retry(message, give_up, shutdown).await;
            let metrics = &self.processor.metrics;
            metrics
                .handling_duration
                .with_label_values(&[kind])
                .observe(started.elapsed().as_secs_f64());
            let label = match outcome {
                Some(Outcome::Applied) => Some("applied"),
                Some(Outcome::Duplicate) => Some("duplicate"),
                Some(Outcome::DeadLettered(_)) => Some("dead_lettered"),
                Some(Outcome::Deferred) | None => None,
            };
            if let Some(label) = label {
                metrics
                    .messages_consumed
                    .with_label_values(&[message.topic.as_str(), label])
                    .inc();
            }
            tracing::debug!(?outcome, "handled");
            outcome
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
