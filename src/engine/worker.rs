//! The worker loop: consumes the ERP topics and hands the messages of each
//! partition to that partition's task ([`crate::engine::partition`]),
//! which runs them through the [`Processor`] in batches, one transaction per
//! batch, and stores the partition's offset once the effects (or dead
//! letters) of the messages before it are committed.
//!
//! Partitions run concurrently, one task each, in order within a partition;
//! a partition whose task is full is paused, so the consumer loop never
//! waits for one. Late references wait (the rule: docs/contract.md §5; how:
//! docs/design.md, "Late references"); this loop runs their window's clock
//! ([`crate::engine::window`]) and keeps the waiting gauges. On revocation,
//! a partition's task finishes or abandons its batch and its offsets are
//! committed before the partition goes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters::backoff::Backoff;
use crate::adapters::consumer::{HandOver, InboundConsumer};
use crate::adapters::health::Health;
use crate::adapters::kafka::KafkaConsumer;
use crate::adapters::postgres::unit_of_work::PgStore;
use crate::engine::processor::{Processor, WorkerStore};
use crate::engine::slots::{PartitionTasks, Slot, Waiter, QUEUED_BYTES};
use crate::engine::tracker::Tracker;
use crate::engine::window::{Conditions, UsableClock};
use crate::service_layer::chunk::MessageKey;

pub(crate) use crate::configuration::WorkerSettings;

/// The consumer loop around a [`Processor`]. Its partitions' tasks are
/// methods of it too (in [`crate::engine::partition`]), which share the
/// fields marked `pub(super)`; what the loop hands each task is in
/// [`crate::engine::slots`]. It runs on Kafka and PostgreSQL in
/// production, and on the simulation's fakes in tests (the seams:
/// [`InboundConsumer`], [`WorkerStore`], tokio's clock).
pub struct Worker<C = KafkaConsumer, S = PgStore> {
    pub(super) processor: Processor<S>,
    pub(super) consumer: Arc<C>,
    pub(super) settings: WorkerSettings,
    /// What the probes read: whether the consumer runs, when the loop last
    /// polled it, which partitions keep failing.
    pub(super) health: Arc<Health>,
    /// The unknown-reference window's clock: usable time only, in tokio's
    /// time (simulated in the simulation).
    clock: std::sync::Mutex<UsableClock>,
    /// Messages of the batch-created topic fetched and not yet handled.
    pub(super) unhandled_references: AtomicUsize,
    /// Bytes held by waiting messages (part of QUEUED_BYTES).
    pub(super) waiting_bytes: AtomicUsize,
    /// Waiting messages and the wall-clock arrival of the oldest, by partition.
    waiting: std::sync::Mutex<WaitingByPartition>,
}

/// Waiting messages and the wall-clock arrival of the oldest, by topic and
/// partition.
type WaitingByPartition = HashMap<(String, i32), (usize, Option<Instant>)>;

impl<C: InboundConsumer, S: WorkerStore> Worker<C, S> {
    pub fn new(
        processor: Processor<S>,
        consumer: C,
        settings: WorkerSettings,
        health: Arc<Health>,
    ) -> Self {
        Self {
            processor,
            consumer: Arc::new(consumer),
            settings,
            health,
            clock: std::sync::Mutex::new(UsableClock::new()),
            unhandled_references: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            waiting: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Usable time so far (see [`Self::watch_window`]).
    pub(super) fn usable_time(&self) -> Duration {
        self.clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(Instant::now())
    }

    /// Runs the unknown-reference window's clock while its conditions hold
    /// ([`Conditions::usable`]), checked a few times a second.
    async fn watch_window(self: Arc<Self>, shutdown: CancellationToken) {
        let mut was_usable = None;
        // The group's progress on the reference-bringing topic: asked of the
        // broker every GROUP_PROGRESS_EVERY, one question at a time, while
        // the clock goes on being set from the last answer.
        let mut group: Option<(i64, Instant)> = None;
        let mut asking: Option<tokio::task::JoinHandle<Result<i64, rdkafka::error::KafkaError>>> =
            None;
        let mut asked_at: Option<Instant> = None;
        loop {
            if asking.as_ref().is_some_and(|a| a.is_finished()) {
                if let Some(answer) = asking.take() {
                    match answer.await {
                        Ok(Ok(unread)) => group = Some((unread, Instant::now())),
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "cannot read the group's progress");
                            group = None;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "the group's progress could not be asked");
                            group = None;
                        }
                    }
                }
            }
            if asking.is_none() && asked_at.is_none_or(|at| at.elapsed() >= GROUP_PROGRESS_EVERY) {
                asked_at = Some(Instant::now());
                let consumer = Arc::clone(&self.consumer);
                let topic = self.processor.topics().batch_created.clone();
                asking = Some(tokio::spawn(
                    async move { consumer.group_unread(&topic).await },
                ));
            }
            let group_unread_references = group
                .filter(|(_, at)| at.elapsed() <= STATISTICS_FRESH)
                .map(|(unread, _)| unread);
            let conditions = Conditions {
                group_unread_references,
                database_reachable: self.processor.store_reachable(),
                // Not `consumer_running`: it stays false for a while after
                // a transient error (ERROR_CLEARED_AFTER). The group being
                // up shows in the statistics.
                consumer_connected: self.consumer.is_assigned(),
                unhandled_references: self.unhandled_references.load(Ordering::Relaxed),
                unread_references: self
                    .consumer
                    .unread(&self.processor.topics().batch_created, STATISTICS_FRESH),
                batch: self.settings.max_batch_messages.max(1),
                waiting_memory_full: self.waiting_bytes.load(Ordering::Relaxed) >= QUEUED_BYTES / 2,
            };
            let usable = conditions.usable();
            self.clock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_usable(usable, Instant::now());
            if was_usable != Some(usable) {
                tracing::debug!(usable, ?conditions, "unknown-reference window clock");
                was_usable = Some(usable);
            }
            self.report_waiting_age();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    if let Some(asking) = asking {
                        asking.abort();
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
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
        this.consumer
            .subscribe(&this.processor.topics().inbound())?;
        tracing::info!(topics = ?this.processor.topics().inbound(), "consuming");
        this.health.consumer_running.store(true, Ordering::Relaxed);
        this.processor
            .metrics()
            .init_topics(&this.processor.topics().inbound());
        let window_stop = CancellationToken::new();
        let window = tokio::spawn({
            let worker = Arc::clone(&this);
            let stop = window_stop.clone();
            async move { worker.watch_window(stop).await }
        });
        let tracker = TaskTracker::new();
        let tasks = Arc::new(PartitionTasks::new(Arc::clone(&this.health)));
        this.consumer
            .set_hand_over(Arc::clone(&tasks) as Arc<dyn HandOver>);
        // Ordered: the loop's pauses and resumes go in the same order every
        // run, which the simulation's replays rely on.
        let mut partitions: BTreeMap<(String, i32), Slot> = BTreeMap::new();
        let budget = Arc::new(Semaphore::new(QUEUED_BYTES));
        let mut errors = Backoff::default();
        // The loop never waits for a partition: a partition whose queue is
        // full (or that the memory bound stops) is paused and its messages
        // kept aside until it has room again, while the loop goes on serving
        // the other partitions, rebalances and statistics, and librdkafka
        // sees its main queue polled (`max.poll.interval.ms`).
        let mut unblock = tokio::time::interval(Duration::from_millis(20));
        unblock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed_check = tokio::time::interval(Duration::from_millis(500));
        failed_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<Instant> = None;
        loop {
            let any_paused = partitions.values().any(|s| s.paused);
            let clear_errors_at = last_error.map(|at| at + ERROR_CLEARED_AFTER);
            this.health.poll_clock.polling();
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
                // A transient error marked the consumer not running; it
                // runs again once a poll has gone this long without one,
                // not only when a message comes, which on idle topics could
                // be never. Membership of the group is judged apart
                // (`consumer_assigned`). A deadline, not a sleep: the loop
                // goes round at every tick of the checks below.
                _ = tokio::time::sleep_until(clear_errors_at.unwrap_or_else(Instant::now)),
                    if clear_errors_at.is_some() =>
                {
                    this.health.consumer_running.store(true, Ordering::Relaxed);
                    last_error = None;
                    continue;
                }
                // A task that failed is noticed here too, not only when
                // its partition's next message comes (which may be never).
                _ = failed_check.tick() => {
                    this.forget_revoked(&tasks, &mut partitions);
                    let failed: Vec<(String, i32)> = partitions
                        .iter()
                        .filter(|(_, s)| s.sender.is_closed())
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in failed {
                        this.restart_failed(&mut partitions, &key);
                    }
                    continue;
                }
                received = this.consumer.recv() => received,
            };
            this.health.poll_clock.polled();
            this.forget_revoked(&tasks, &mut partitions);
            let message = match received {
                Ok(message) => {
                    errors.reset();
                    this.health.consumer_running.store(true, Ordering::Relaxed);
                    last_error = None;
                    message
                }
                Err(error) => {
                    this.health.consumer_running.store(false, Ordering::Relaxed);
                    last_error = Some(Instant::now());
                    this.processor.metrics().consumer_error(&error);
                    let delay = errors.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "consumer error");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if message.topic == this.processor.topics().batch_created {
                this.unhandled_references.fetch_add(1, Ordering::Relaxed);
            }
            let key = (message.topic.clone(), message.partition);
            if partitions.get(&key).is_some_and(|s| s.sender.is_closed()) {
                // This message is read again too, after the seek.
                if key.0 == this.processor.topics().batch_created {
                    this.unhandled_references.fetch_sub(1, Ordering::Relaxed);
                }
                this.restart_failed(&mut partitions, &key);
                continue;
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
                // Where to read again should the task fail: the first
                // message it is given, then each offset it stores.
                let resume = Arc::new(AtomicI64::new(message.offset));
                let stored = Arc::clone(&resume);
                let in_task = Arc::new(AtomicUsize::new(0));
                let handled = Arc::clone(&in_task);
                tracker.spawn(async move {
                    worker
                        .run_partition(topic, partition, rx, token, stored, handled)
                        .await;
                    drop(done);
                });
                Slot {
                    sender: tx,
                    overflow: VecDeque::new(),
                    paused: false,
                    holding: Arc::default(),
                    resume,
                    in_task,
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

        this.health.consumer_running.store(false, Ordering::Relaxed);
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
        this.processor.close_connections();
        // Committing and leaving can wait for ever on a broker that does
        // not answer: under a deadline.
        let consumer = Arc::clone(&this.consumer);
        drop(this);
        if tokio::time::timeout_at(started + budget * 3 / 4, consumer.close())
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

    /// Updates the waiting gauges with this partition's waiting messages.
    pub(super) fn set_waiting(
        &self,
        topic: &str,
        partition: i32,
        tracker: &Tracker<MessageKey, Waiter>,
    ) {
        let oldest = tracker.waiting().next().map(|(_, w)| w.since);
        let count = tracker.waiting_len();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let key = (topic.to_owned(), partition);
            let metrics = self.processor.metrics();
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
                .metrics()
                .waiting_oldest_age
                .with_label_values(&[topic.as_str(), partition.as_str()])
                .set(since.map_or(0.0, |o| o.elapsed().as_secs_f64()));
        }
    }

    /// Partitions handed over meanwhile: their tasks have stopped; what was
    /// kept aside for them is dropped (their next owner reads it again).
    fn forget_revoked(
        &self,
        tasks: &PartitionTasks,
        partitions: &mut BTreeMap<(String, i32), Slot>,
    ) {
        for key in tasks.take_revoked() {
            if let Some(slot) = partitions.remove(&key) {
                if key.0 == self.processor.topics().batch_created {
                    self.unhandled_references
                        .fetch_sub(slot.overflow.len(), Ordering::Relaxed);
                }
            }
        }
    }

    /// A partition whose task ended, and not at a hand-over (those slots are
    /// gone, see [`Self::forget_revoked`]): it failed (a panic). What it
    /// held (its batch, queue and waiting messages) and what is kept aside
    /// for it are read again from the last offset it stored, not skipped by
    /// a fresh task storing offsets past them.
    fn restart_failed(&self, partitions: &mut BTreeMap<(String, i32), Slot>, key: &(String, i32)) {
        let Some(slot) = partitions.remove(key) else {
            return;
        };
        let resume = slot.resume.load(Ordering::Relaxed);
        if key.0 == self.processor.topics().batch_created {
            // Kept aside, and what the task took with it.
            let dropped = slot.overflow.len() + slot.in_task.load(Ordering::Relaxed);
            self.unhandled_references
                .fetch_sub(dropped, Ordering::Relaxed);
        }
        tracing::error!(
            topic = key.0,
            partition = key.1,
            resume,
            "partition task ended unexpectedly; its partition is read again from the last offset it stored"
        );
        self.rewind_partition(&key.0, key.1, resume);
    }

    /// Reads a partition again from `offset`, fetching it (resumed) from
    /// there: what librdkafka fetched of it before is discarded.
    fn rewind_partition(&self, topic: &str, partition: i32, offset: i64) {
        match self.consumer.seek(topic, partition, offset) {
            Ok(()) => tracing::info!(topic, partition, offset, "partition read again from offset"),
            // Revoked meanwhile: its next owner starts from the last commit,
            // which is not past `offset`.
            Err(error) => {
                tracing::warn!(%error, topic, partition, offset, "cannot seek the partition back")
            }
        }
        self.pause_partition(topic, partition, false);
    }

    /// Pauses (or resumes) fetching one partition. Messages of it already
    /// fetched still arrive and are kept aside in its slot; librdkafka
    /// resumes from the one after the last handed over.
    fn pause_partition(&self, topic: &str, partition: i32, pause: bool) {
        match self.consumer.pause(topic, partition, pause) {
            Ok(()) => tracing::debug!(topic, partition, pause, "partition fetch paused/resumed"),
            // Revoked meanwhile: its next owner fetches it.
            Err(error) => tracing::debug!(%error, topic, partition, pause, "cannot pause/resume"),
        }
    }
}

/// Statistics older than this say nothing of whether the worker has caught
/// up (librdkafka reports every second; see adapters::kafka); nor does an
/// answer about the group's progress.
const STATISTICS_FRESH: Duration = Duration::from_secs(10);

/// How often the group's progress on the reference-bringing topic is asked
/// of the broker (a metadata request, an offset fetch and a watermark
/// request per partition).
const GROUP_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How long a poll must go without an error before a consumer that had one
/// counts as running again (see the consumer loop). Above the error
/// back-off's longest pause (5 s), so that a consumer failing at every
/// poll does not flap.
const ERROR_CLEARED_AFTER: Duration = Duration::from_secs(10);
