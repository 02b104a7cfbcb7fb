//! A partition's task: the messages of one partition, in order, a chunk at a
//! time through the [`Processor`], with the waiting rule of
//! [`crate::engine::tracker`] and the unknown-reference window of
//! [`crate::engine::window`] (docs/design.md, "Late references", says when
//! waiting messages are tried again). The consumer loop ([`Worker`]) feeds
//! each task through a bounded queue and a memory bound
//! ([`crate::engine::slots`]). A chunk's transaction is retried after a
//! back-off while the database is unavailable, until it commits or the task
//! is told to stop. The task stores its partition's offset, never past a
//! message not settled.
//!
//! [`Processor`]: crate::engine::processor::Processor

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::adapters::backoff::Backoff;
use crate::adapters::consumer::InboundConsumer;
use crate::engine::processor::{Planned, WorkerStore};
use crate::engine::slots::{Held, Waiter, PARTITION_BYTES, STOP_GRACE};
use crate::engine::tracker::Tracker;
use crate::engine::worker::Worker;
use crate::service_layer::chunk::{MessageKey, Outcome, Plan};
use crate::service_layer::DeadLetterReason;

impl<C: InboundConsumer, S: WorkerStore> Worker<C, S> {
    /// One partition, in order: whatever has queued up (up to the batch
    /// size) is handled in one transaction; late references wait
    /// ([`Tracker`]) and are tried again until they apply or their window
    /// closes.
    pub(super) async fn run_partition(
        &self,
        topic: String,
        partition: i32,
        mut queue: mpsc::Receiver<Held>,
        shutdown: CancellationToken,
        resume: Arc<AtomicI64>,
        in_task: Arc<AtomicUsize>,
    ) {
        // Gives back the bytes its waiting messages hold of the bound even
        // if the task fails (a panic) rather than ending.
        let mut tracker = WaitingTracker {
            tracker: Tracker::new(),
            waiting_bytes: &self.waiting_bytes,
        };
        let mut stored: Option<i64> = None;
        let max = self.settings.max_batch_messages.max(1);
        let brings_references = topic == self.processor.topics().batch_created;
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
                #[cfg(debug_assertions)]
                test_hooks::panic_once(&topic, &batch);
                let fetched = batch.len();
                let handled = self
                    .handle_new(&topic, partition, &mut batch, &mut tracker, &shutdown)
                    .await;
                in_task.fetch_sub(fetched, Ordering::Relaxed);
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
                    resume.store(offset, Ordering::Relaxed);
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
        in_task.fetch_sub(queued, Ordering::Relaxed);
        if brings_references {
            self.unhandled_references
                .fetch_sub(queued, Ordering::Relaxed);
        }
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
        tracker: &mut WaitingTracker<'_>,
        shutdown: &CancellationToken,
    ) -> bool {
        let arrived = self.usable_time();
        let since = Instant::now();
        let mut ready: Vec<Waiter> = Vec::with_capacity(batch.len());
        for held in batch.drain(..) {
            let plan = if held.oversized() {
                let bytes = held.message.payload.as_ref().map_or(0, Vec::len)
                    + held.message.key.as_ref().map_or(0, Vec::len);
                Plan::DeadLetter(
                    DeadLetterReason::InvalidMessage,
                    format!(
                        "the message is too large: {bytes} bytes of key and value, more than \
                         the {PARTITION_BYTES} bytes a partition may hold in the worker's memory"
                    ),
                )
            } else {
                self.processor.plan(&held.message)
            };
            let offset = held.message.offset;
            let waiter = Waiter {
                held,
                plan,
                arrived,
                since,
            };
            let keys = waiter.plan.keys();
            if let Some(waiter) = tracker.admit(offset, keys, waiter) {
                ready.push(waiter);
            }
        }
        if ready.is_empty() {
            return true;
        }
        let chunk: Vec<Planned<'_>> = ready.iter().map(|w| w.planned(false)).collect();
        let Some(outcomes) = self
            .handle_chunk(topic, partition, &chunk, tracker.safe_offset(), shutdown)
            .await
        else {
            return false;
        };
        drop(chunk);
        // Dropping a message gives its bytes back; waiting ones keep theirs.
        for (waiter, outcome) in ready.into_iter().zip(outcomes) {
            let offset = waiter.held.message.offset;
            if outcome == Outcome::Deferred {
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
        tracker: &mut WaitingTracker<'_>,
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
        let chunk: Vec<Planned<'_>> = due
            .iter()
            .map(|(_, w)| w.planned(now.saturating_sub(w.arrived) >= window))
            .collect();
        let outcomes = self
            .handle_chunk(topic, partition, &chunk, tracker.safe_offset(), shutdown)
            .await?;
        drop(chunk);
        drop(due);
        let mut settled = 0;
        for (offset, outcome) in offsets.into_iter().zip(outcomes) {
            if outcome != Outcome::Deferred {
                tracker.settle(offset);
                settled += 1;
            }
        }
        Some(settled)
    }

    /// [`Processor::process_planned`] until it succeeds, backing off while
    /// the store is unavailable. `None` when shutdown came first: the batch
    /// is not done.
    ///
    /// [`Processor::process_planned`]: crate::engine::processor::Processor::process_planned
    async fn process_with_retry(
        &self,
        chunk: &[Planned<'_>],
        resume_from: Option<i64>,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let done = self.retry_until_done(chunk, resume_from, shutdown).await;
        // Committed, or the task stops: either way no longer failing.
        if let Some(first) = chunk.first() {
            self.health
                .failing
                .recovered(&first.message.topic, first.message.partition);
        }
        done
    }

    /// [`Self::process_with_retry`] but for keeping `Health::failing`.
    async fn retry_until_done(
        &self,
        chunk: &[Planned<'_>],
        resume_from: Option<i64>,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let mut backoff = Backoff::default();
        let mut timeouts = TimeoutStreak::default();
        loop {
            // Bounded on our side too (TRANSACTION_TIMEOUT): PostgreSQL's
            // own timeouts need a route to us, and a connection whose route
            // has gone neither fails nor answers for as long as TCP
            // retransmits. The attempt is dropped at the bound, its
            // connection closed rather than reused (PgSession), and nothing
            // of it committed, or, if the commit went through unanswered,
            // its messages are found processed when the batch comes again.
            let attempt = tokio::time::timeout(
                self.settings.transaction_timeout,
                self.processor.process_planned(chunk, resume_from),
            );
            // Once told to stop (revoked, or shutting down), the batch in
            // hand has a little while to commit; then it is abandoned,
            // uncommitted (the transaction rolls back), and read again by
            // whoever owns the partition next.
            let processed = tokio::select! {
                biased;
                processed = attempt => processed.unwrap_or_else(|_| {
                    Err(self.processor.attempt_timed_out(self.settings.transaction_timeout))
                }),
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
                    if let Some(first) = chunk.first() {
                        self.health.failing.failed(
                            &first.message.topic,
                            first.message.partition,
                            &error.to_string(),
                        );
                    }
                    let delay = backoff.next_delay();
                    if timeouts.record(&error) {
                        // Not retried unseen: counted, alerted on
                        // (AllocationStatementTimeouts), and said at error
                        // level with the messages it holds back. The batch is
                        // still retried: the messages are valid, and dropping
                        // them for the database's slowness would lose orders.
                        tracing::error!(
                            %error,
                            timeouts = timeouts.consecutive(),
                            first_offset = chunk.first().map(|p| p.message.offset),
                            size = chunk.len(),
                            retry_in = ?delay,
                            "the batch's transaction keeps running past statement_timeout; \
                             the partition is stuck behind it (see the runbook)"
                        );
                    } else {
                        tracing::warn!(%error, retry_in = ?delay, "cannot handle messages now; backing off");
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// `resume_from` is the tracker's safe offset as the batch begins,
    /// recorded with it for a rewind after a restore.
    async fn handle_chunk(
        &self,
        topic: &str,
        partition: i32,
        chunk: &[Planned<'_>],
        resume_from: Option<i64>,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        // Named "batch", as the exported traces have always called it.
        let span = tracing::info_span!(
            "batch",
            topic,
            partition,
            first_offset = chunk.first().map(|p| p.message.offset),
            last_offset = chunk.last().map(|p| p.message.offset),
            size = chunk.len(),
        );
        async {
            let started = Instant::now();
            let outcomes = self
                .process_with_retry(chunk, resume_from, shutdown)
                .await?;
            // Every message of the batch waited for the whole transaction:
            // that is its handling duration.
            let elapsed = started.elapsed().as_secs_f64();
            tracing::debug!(elapsed_ms = elapsed * 1e3, "batch done");
            let metrics = self.processor.metrics();
            metrics.batch_messages.observe(chunk.len() as f64);
            for (Planned { message, .. }, outcome) in chunk.iter().zip(&outcomes) {
                let kind = self
                    .processor
                    .topics()
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
                    Outcome::Superseded => "superseded",
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
        if let Err(error) = self.consumer.store_offset(topic, partition, next) {
            // Happens when the partition was revoked meanwhile; its new owner
            // consumes again from the last commit and skips what we applied.
            tracing::debug!(%error, topic, partition, next, "offset not stored");
        }
    }
}

/// A partition task's [`Tracker`], which keeps the count of the bytes its
/// waiting messages hold of the memory bound (`Worker::waiting_bytes`): a
/// message counts from when it starts waiting until it settles, and what
/// still waits when the task ends, or fails, is given back when this is
/// dropped. Read through `Deref`; changed only through the methods below,
/// which keep the count.
struct WaitingTracker<'a> {
    tracker: Tracker<MessageKey, Waiter>,
    waiting_bytes: &'a std::sync::atomic::AtomicUsize,
}

impl WaitingTracker<'_> {
    /// [`Tracker::admit`]: a message that must wait starts counting.
    fn admit(&mut self, offset: i64, keys: Vec<MessageKey>, waiter: Waiter) -> Option<Waiter> {
        let size = waiter.held.size;
        let ready = self.tracker.admit(offset, keys, waiter);
        if ready.is_none() {
            self.waiting_bytes.fetch_add(size, Ordering::Relaxed);
        }
        ready
    }

    /// [`Tracker::defer`]: the message tried and deferred starts counting.
    fn defer(&mut self, offset: i64, keys: Vec<MessageKey>, waiter: Waiter) {
        self.waiting_bytes
            .fetch_add(waiter.held.size, Ordering::Relaxed);
        self.tracker.defer(offset, keys, waiter);
    }

    /// [`Tracker::settle`]: a waiting message stops counting.
    fn settle(&mut self, offset: i64) {
        if let Some(waiter) = self.tracker.settle(offset) {
            self.waiting_bytes
                .fetch_sub(waiter.held.size, Ordering::Relaxed);
        }
    }

    /// [`Tracker::clear`]: every waiting message stops counting.
    fn clear(&mut self) {
        let left: usize = self.tracker.waiting().map(|(_, w)| w.held.size).sum();
        self.waiting_bytes.fetch_sub(left, Ordering::Relaxed);
        self.tracker.clear();
    }
}

impl std::ops::Deref for WaitingTracker<'_> {
    type Target = Tracker<MessageKey, Waiter>;
    fn deref(&self) -> &Self::Target {
        &self.tracker
    }
}

impl Drop for WaitingTracker<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Most waiting messages tried again in one transaction.
const RETRY_BATCH_MESSAGES: usize = 100;

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

/// Consecutive statement timeouts of one batch. After
/// [`STATEMENT_TIMEOUT_ATTEMPTS`] the batch is not "backing off" any more
/// but stuck: every further one is reported at error level.
#[derive(Debug, Default)]
struct TimeoutStreak {
    consecutive: u32,
}

/// Attempts at a batch that may time out before it is reported as stuck.
/// No statement of the worker should come near `statement_timeout`; one
/// timeout can be a passing stall of the database, three in a row are not.
const STATEMENT_TIMEOUT_ATTEMPTS: u32 = 3;

impl TimeoutStreak {
    /// Counts a failed attempt; `true` when the batch has now timed out
    /// too many times in a row to be a passing stall.
    fn record(&mut self, error: &crate::service_layer::RepositoryError) -> bool {
        if let crate::service_layer::RepositoryError::TimedOut(_) = error {
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        self.consecutive >= STATEMENT_TIMEOUT_ATTEMPTS
    }

    fn consecutive(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use crate::service_layer::RepositoryError;

    fn timed_out() -> RepositoryError {
        RepositoryError::TimedOut("canceling statement due to statement timeout".into())
    }

    #[test]
    fn a_batch_is_reported_stuck_after_three_timeouts_in_a_row() {
        let mut streak = TimeoutStreak::default();
        assert!(!streak.record(&timed_out()));
        assert!(!streak.record(&timed_out()));
        assert!(streak.record(&timed_out()));
        assert!(streak.record(&timed_out()), "and every one after");
        assert_eq!(streak.consecutive(), 4);
    }

    #[test]
    fn another_failure_between_timeouts_starts_the_count_again() {
        let mut streak = TimeoutStreak::default();
        assert!(!streak.record(&timed_out()));
        assert!(!streak.record(&timed_out()));
        assert!(!streak.record(&RepositoryError::Unavailable("connection refused".into())));
        assert!(!streak.record(&timed_out()));
        assert!(!streak.record(&timed_out()));
        assert!(streak.record(&timed_out()));
    }
}

/// Faults only tests cause, in debug builds only (never in a release image).
#[cfg(debug_assertions)]
mod test_hooks {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::Held;

    /// `ALLOCATION_WORKER_TEST_PANIC_AT=topic:offset`: the first batch of
    /// any partition of `topic` holding a message at `offset` panics its
    /// partition's task, once per process (tests/services/faults, a task that ends
    /// unexpectedly).
    pub(super) fn panic_once(topic: &str, batch: &[Held]) {
        static DONE: AtomicBool = AtomicBool::new(false);
        if DONE.load(Ordering::Relaxed) {
            return;
        }
        let Ok(at) = std::env::var("ALLOCATION_WORKER_TEST_PANIC_AT") else {
            return;
        };
        let Some((t, offset)) = at.rsplit_once(':') else {
            return;
        };
        let Ok(offset) = offset.parse::<i64>() else {
            return;
        };
        if t == topic
            && batch.iter().any(|h| h.message.offset == offset)
            && !DONE.swap(true, Ordering::Relaxed)
        {
            panic!("test hook: partition task of {topic} panics at offset {offset}");
        }
    }
}
