//! What the consumer loop hands each partition's task: its queue ([`Slot`]),
//! the messages on their way ([`Held`], counted against the memory bound
//! [`QUEUED_BYTES`] and a partition's share of it), the messages a task
//! keeps while they wait ([`Waiter`]), and the registry of running tasks
//! that a revocation stops before the partitions are released
//! ([`PartitionTasks`], the [`HandOver`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapters::consumer::{HandOver, HandOverFuture};
use crate::adapters::health::Health;
use crate::adapters::inbound::InboundMessage;
use crate::engine::processor::Planned;
use crate::service_layer::chunk::Plan;

/// Bytes of inbound messages the partitions may hold at once, waiting ones
/// included. With batches of 500 messages of a few hundred bytes this never
/// binds; it keeps a run of megabyte messages from taking the memory of a
/// whole batch each.
pub(super) const QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// How long the batch in hand may still take to commit once its partition
/// is told to stop; then it is abandoned, uncommitted.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(3);

/// The partitions' tasks, so that a revocation stops them before the
/// partitions are released ([`HandOver`]).
#[derive(Default)]
pub(super) struct PartitionTasks {
    tasks: std::sync::Mutex<HashMap<(String, i32), TaskControl>>,
    /// Revoked, for the consumer loop to forget.
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
    /// The loop's clock for `/healthz`: a revocation runs inside the
    /// consumer's poll but is the loop's own work, which can take seconds
    /// (it waits for the partitions' tasks), so it does not count as polling.
    health: Arc<Health>,
}

struct TaskControl {
    stop: CancellationToken,
    /// Disconnected when the task has ended, for a blocking wait.
    done: std::sync::mpsc::Receiver<()>,
    /// Closed when the task has ended, for an async one.
    ended: tokio::sync::watch::Receiver<()>,
}

/// What a partition's task holds until it ends: dropping it tells both
/// kinds of waiter ([`HandOver::revoke`], [`HandOver::revoke_async`]).
pub(super) struct TaskDone {
    _blocking: std::sync::mpsc::Sender<()>,
    _awaited: tokio::sync::watch::Sender<()>,
}

impl PartitionTasks {
    /// No tasks yet; revocations are kept off the loop's `clock`.
    pub(super) fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            ..Self::default()
        }
    }

    /// Registers a partition's task; the task drops what is returned when it
    /// ends.
    pub(super) fn register(&self, key: (String, i32), stop: CancellationToken) -> TaskDone {
        let (done_tx, done) = std::sync::mpsc::channel();
        let (ended_tx, ended) = tokio::sync::watch::channel(());
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.insert(key, TaskControl { stop, done, ended });
        TaskDone {
            _blocking: done_tx,
            _awaited: ended_tx,
        }
    }

    pub(super) fn take_revoked(&self) -> Vec<(String, i32)> {
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
        self.health.poll_clock.polled();
        // The callback may run on a runtime worker thread (whichever thread
        // polls the consumer). Blocking it as it is would strand the tasks
        // just woken in that worker's own queue (its LIFO slot, which the
        // other workers do not steal from) until the wait timed out: every
        // hand-over would take the whole bound. `block_in_place` hands the
        // worker's queue to another thread first. Elsewhere (the main
        // thread's `block_on`, a blocking thread) it just runs the closure;
        // on a current-thread runtime it would panic, and there the tasks
        // cannot run during the wait anyway.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.stop_revoked(partitions));
        } else {
            self.stop_revoked(partitions);
        }
        self.health.poll_clock.polling();
    }

    /// [`Self::revoke`], awaiting the tasks instead of blocking, with the
    /// same bound (in tokio's time).
    fn revoke_async<'a>(&'a self, partitions: &'a [(String, i32)]) -> HandOverFuture<'a> {
        Box::pin(async move {
            self.health.poll_clock.polled();
            let stopping = self.stop(partitions);
            // Forgotten before the wait, not after as in `revoke`: here the
            // consumer loop goes on meanwhile, and must not take a task that
            // ends for the hand-over for one that failed (and seek its
            // partition back). What it keeps for them is dropped either way.
            self.forget(partitions);
            let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(2);
            for ((topic, partition), mut control) in stopping {
                // `changed` fails once the task's end drops the sender.
                let ended = async { while control.ended.changed().await.is_ok() {} };
                if tokio::time::timeout_at(deadline, ended).await.is_err() {
                    tracing::warn!(
                        topic,
                        partition,
                        "partition task did not stop in time for the hand-over"
                    );
                }
            }
            self.health.poll_clock.polling();
        })
    }
}

impl PartitionTasks {
    /// Stops the tasks of `partitions` and waits for them, a few seconds at
    /// most (see [`HandOver::revoke`]).
    fn stop_revoked(&self, partitions: &[(String, i32)]) {
        let stopping = self.stop(partitions);
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
        self.forget(partitions);
    }

    /// Tells the tasks of `partitions` to stop; returns them, to wait for.
    fn stop(&self, partitions: &[(String, i32)]) -> Vec<((String, i32), TaskControl)> {
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
        stopping
    }

    /// Leaves `partitions` for the consumer loop to forget.
    fn forget(&self, partitions: &[(String, i32)]) {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(partitions.iter().cloned());
    }
}

/// The consumer loop's end of one partition's task.
pub(super) struct Slot {
    pub(super) sender: mpsc::Sender<Held>,
    /// Messages read that did not fit (the queue was full, or the memory
    /// bound reached), in offset order; the partition is paused meanwhile.
    pub(super) overflow: VecDeque<InboundMessage>,
    pub(super) paused: bool,
    /// Bytes its task holds now, of the memory bound.
    pub(super) holding: Arc<AtomicUsize>,
    /// The offset to read the partition again from, should its task fail:
    /// the last it stored, else the first it was given.
    pub(super) resume: Arc<AtomicI64>,
    /// Messages handed to its task and not yet handled by it: what a task
    /// that fails takes with it, which the unhandled-references count must
    /// forget.
    pub(super) in_task: Arc<AtomicUsize>,
}

impl Slot {
    /// Moves what is kept aside into the task's queue, in order, while
    /// there is room there, in the partition's share ([`PARTITION_BYTES`])
    /// and in the memory bound. A partition that holds nothing may always
    /// take its next message, bound or not: the bound can then never stop
    /// every partition at once (a few stuck on locks or waiting messages
    /// holding all of it), at the cost of one message per partition beyond
    /// it.
    pub(super) fn forward(&mut self, budget: &Arc<Semaphore>) {
        while let Some(message) = self.overflow.front() {
            let Ok(room) = self.sender.try_reserve() else {
                return;
            };
            let size = held_size(message);
            let holding = self.holding.load(Ordering::Relaxed);
            if holding > 0 && holding + size as usize > PARTITION_BYTES {
                return;
            }
            let permit = match Arc::clone(budget).try_acquire_many_owned(size) {
                Ok(permit) => Some(permit),
                Err(_) if holding == 0 => None,
                Err(_) => return,
            };
            let Some(message) = self.overflow.pop_front() else {
                return;
            };
            self.holding.fetch_add(size as usize, Ordering::Relaxed);
            self.in_task.fetch_add(1, Ordering::Relaxed);
            room.send(Held {
                message,
                _permit: permit,
                size: size as usize,
                holding: Arc::clone(&self.holding),
            });
        }
    }
}

/// Most bytes of QUEUED_BYTES one partition may hold (but for its first
/// message, see [`Slot::forward`]): a partition stuck on a lock, or with
/// many waiting messages, leaves the rest of the bound to the others. A
/// message larger than this is dead-lettered (`invalid-message`).
pub(super) const PARTITION_BYTES: usize = QUEUED_BYTES / 4;

/// A message on its way through a partition, holding its share of QUEUED_BYTES.
pub(super) struct Held {
    pub(super) message: InboundMessage,
    /// `None` for a partition's only message, taken beyond the bound.
    _permit: Option<OwnedSemaphorePermit>,
    /// Bytes it holds of QUEUED_BYTES.
    pub(super) size: usize,
    /// What its partition holds, given back when it is dropped.
    holding: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.holding.fetch_sub(self.size, Ordering::Relaxed);
    }
}

impl Held {
    /// Larger than a partition may hold: it is dead-lettered, unread.
    pub(super) fn oversized(&self) -> bool {
        self.size > PARTITION_BYTES
    }
}

/// What a message counts against QUEUED_BYTES: its key, value and headers,
/// plus a little for the rest; never more than a partition's share and one
/// byte (an oversized message is dead-lettered, not kept).
fn held_size(message: &InboundMessage) -> u32 {
    let bytes = 256
        + message.key.as_ref().map_or(0, Vec::len)
        + message.payload.as_ref().map_or(0, Vec::len)
        + message
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
    u32::try_from(bytes.min(PARTITION_BYTES + 1)).unwrap_or(u32::MAX)
}

/// A message of a partition with what was learnt of it when it was read.
pub(super) struct Waiter {
    pub(super) held: Held,
    pub(super) plan: Plan,
    /// Usable time when it was read: its window closes `window` later.
    pub(super) arrived: Duration,
    /// Wall-clock time when it was read, for the age gauge.
    pub(super) since: Instant,
}

impl Waiter {
    /// It, for the processor; `give_up` when its window has closed.
    pub(super) fn planned(&self, give_up: bool) -> Planned<'_> {
        Planned {
            message: &self.held.message,
            plan: &self.plan,
            give_up,
        }
    }
}
