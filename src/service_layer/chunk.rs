//! The chunk processor: the one place where a transaction begins and ends.
//! A chunk is a run of messages of one partition, in offset order (what the
//! settings and metrics call a batch, `MAX_BATCH_MESSAGES`; a chunk here, so
//! that it is never mistaken for the domain's stock `Batch`). It is handled
//! in one unit of work, so that the cost of a commit is shared, yet each
//! message is applied through the message bus as if it had its own:
//!
//! - a message whose idempotency key was recorded before (or that appears
//!   twice in the chunk) is a `Duplicate` and changes nothing;
//! - a message that is refused is dead-lettered (or, when it names a SKU or
//!   batch not known yet and its window is still open, `Deferred`) and taken
//!   back alone; the others of the chunk still apply (`Rejection::of` is the
//!   policy);
//! - within the chunk, a message naming a SKU or batch of an earlier deferred
//!   message is held back untried ([`ChunkGate`]), so that each key's
//!   messages apply in partition order (the contract's dead-letter section);
//! - a conflict with another transaction retries the whole chunk in a new
//!   unit of work, up to [`CONFLICT_RETRIES`] times; a store that cannot be
//!   reached ends the chunk with an error, with nothing of it stored.
//!
//! It knows neither Kafka nor PostgreSQL: it runs on any [`Store`], which
//! is how the unit tests drive it in memory (tests/unit/chunk.rs).

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use crate::domain::{BatchRef, Command, DomainError, OrderId, Sku};

use super::handlers::HandlerError;
use super::messagebus;
use super::unit_of_work::{
    ChunkUnitOfWork, DeadLetterReason, Idempotent, ReadPosition, RepositoryError, Store,
};

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Its idempotency key was already recorded: nothing was changed.
    Duplicate,
    DeadLettered(DeadLetterReason),
    /// Names a SKU or batch not known yet; try again later.
    Deferred,
    /// A replayed quantity change older than the last change applied to its
    /// batch from its partition: not applied, its idempotency key recorded
    /// (contract §7).
    Superseded,
}

/// What is known of a message before any transaction: a command to handle,
/// or a dead letter (unknown topic, undecodable value).
#[derive(Debug, Clone)]
pub enum Plan {
    Handle(Command),
    DeadLetter(DeadLetterReason, String),
}

/// What a message names, for the waiting rule (docs/design.md, "Late references"): the
/// messages naming one key apply in the order of their partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum MessageKey {
    Sku(Sku),
    Batch(BatchRef),
}

impl Plan {
    /// The SKU and batch the message names; none for a dead letter.
    pub(crate) fn keys(&self) -> Vec<MessageKey> {
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

    /// Whether applying it may make a SKU or batch known, which messages
    /// waiting for one need to hear of.
    pub(crate) fn creates_batch(&self) -> bool {
        matches!(self, Plan::Handle(Command::CreateBatch(_)))
    }
}

/// The waiting rule within one batch, message by message in offset order:
/// a message naming a key of an earlier deferred (or held back) message of
/// the batch is held back too, without being tried. Across batches, the
/// partition's tracker (`engine::tracker`) applies the same rule.
#[derive(Debug)]
pub struct ChunkGate<K> {
    held: HashSet<K>,
}

impl<K: Eq + Hash + Clone> Default for ChunkGate<K> {
    fn default() -> Self {
        Self {
            held: HashSet::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> ChunkGate<K> {
    /// Whether the message must wait without being tried; if so, its keys
    /// are held from now on.
    pub fn blocked(&mut self, keys: &[K]) -> bool {
        if keys.iter().any(|k| self.held.contains(k)) {
            self.hold(keys);
            true
        } else {
            false
        }
    }

    /// The message was tried and deferred: its keys hold back the rest.
    pub fn hold(&mut self, keys: &[K]) {
        self.held.extend(keys.iter().cloned());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
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
    /// The rejection policy. An unknown SKU or batch may become known (a
    /// late `BatchCreated`), so it is deferred until `give_up`; every other
    /// refusal is final, and dead-lettered at once.
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
            // WrongSku and the not-loaded refusals guard invariants of the
            // caller: final, like a message that cannot be valid.
            HandlerError::Rejected(
                DomainError::WrongSku { .. }
                | DomainError::LineNotLoaded { .. }
                | DomainError::LinesNotLoaded(_)
                | DomainError::BatchNotLoaded(_)
                | DomainError::EveryBatchNotLoaded(_),
            )
            | HandlerError::Repository(_) => (DeadLetterReason::InvalidMessage, false),
        };
        if retryable && !give_up {
            Rejection::Deferred
        } else {
            Rejection::DeadLetter(reason, error.to_string())
        }
    }
}

/// Optimistic-concurrency conflicts retried before the batch is handed back
/// as a transient failure. A conflict means another transaction made progress,
/// so retrying is safe; the growing, jittered pause spreads out a hot product's
/// contenders instead of letting them collide again in lock step.
pub const CONFLICT_RETRIES: u32 = 100;

async fn pause_after_conflict<S: Store>(store: &S, conflicts: u32) {
    let jitter = store.conflict_jitter() % 1000;
    let micros = (200 * u64::from(conflicts.min(25))) + jitter;
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// One message of a chunk, with what its processing needs.
#[derive(Debug, Clone)]
pub struct Entry<'a, M, C> {
    pub message: &'a M,
    /// What was learnt of it before any transaction.
    pub plan: &'a Plan,
    /// What the records it causes carry of it.
    pub context: C,
    /// Its window has closed: an unknown reference is dead-lettered rather
    /// than `Deferred`.
    pub give_up: bool,
}

/// What a committed batch came to.
#[derive(Debug)]
pub struct Handled {
    /// One per message, in the batch's order.
    pub outcomes: Vec<Outcome>,
    /// The position in the batch and the error text of each message
    /// dead-lettered, in order.
    pub dead_letters: Vec<(usize, String)>,
}

/// Handles `chunk` (messages of one partition, in offset order) in one unit
/// of work of `store`. The messages are applied one after the other
/// through the message bus, as if each had its own transaction: a refused
/// message is taken back alone, and the others commit. A message naming a
/// SKU or batch of an earlier message that was deferred (or held back) is
/// held back too, without being tried: `Deferred`.
///
/// `position`, when given, is recorded in the same transaction
/// ([`ChunkUnitOfWork::record_position`]).
///
/// A conflict retries the whole batch in a new unit of work, after calling
/// `on_conflict`. An `Err` is transient (store unreachable, or conflicts
/// that kept recurring): retry the whole batch after a back-off; nothing of
/// it was stored.
///
/// (Not an `async fn`: its future is declared `Send` here, where the
/// store's bounds prove it, rather than left to each caller to prove for
/// every lifetime, which the compiler cannot do through the store's generic
/// associated types: "implementation of `Send` is not general enough".)
#[allow(clippy::manual_async_fn)]
pub fn process<'a, S: Store>(
    store: &'a S,
    chunk: &'a [Entry<'a, S::Message, S::Context>],
    position: Option<&'a ReadPosition>,
    on_conflict: impl Fn() + Send + Sync + 'a,
) -> impl Future<Output = Result<Handled, RepositoryError>> + Send + 'a {
    async move {
        let keys: Vec<Vec<MessageKey>> = chunk.iter().map(|e| e.plan.keys()).collect();
        let mut conflicts = 0;
        loop {
            match attempt(store, chunk, &keys, position).await {
                Err(RepositoryError::Conflict(why)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    on_conflict();
                    tracing::debug!(%why, conflicts, "concurrent change; retrying");
                    pause_after_conflict(store, conflicts).await;
                }
                handled => return handled,
            }
        }
    }
}

/// One unit of work for the whole batch, in a session of its own.
async fn attempt<S: Store>(
    store: &S,
    chunk: &[Entry<'_, S::Message, S::Context>],
    message_keys: &[Vec<MessageKey>],
    position: Option<&ReadPosition>,
) -> Result<Handled, RepositoryError> {
    let started = std::time::Instant::now();
    let mut session = store.session().await?;
    let attempt = attempt_in(store, &mut session, chunk, message_keys, position, started).await;
    store.end_session(session, attempt.is_ok());
    attempt
}

async fn attempt_in<S: Store>(
    store: &S,
    session: &mut S::Session<'_>,
    chunk: &[Entry<'_, S::Message, S::Context>],
    message_keys: &[Vec<MessageKey>],
    position: Option<&ReadPosition>,
    started: std::time::Instant,
) -> Result<Handled, RepositoryError> {
    let mut uow = store.begin(session).await?;
    let keys: Vec<&str> = chunk.iter().map(|e| e.context.idempotency_key()).collect();

    // Lock and load, in one go, every product the batch names, and learn
    // which messages were processed before.
    let mut skus = Vec::new();
    let mut refs = Vec::new();
    for entry in chunk {
        match entry.plan {
            Plan::Handle(Command::CreateBatch(c)) => {
                skus.push(&c.sku);
                refs.push(&c.reference);
            }
            Plan::Handle(Command::ChangeBatchQuantity(c)) => refs.push(&c.reference),
            Plan::Handle(Command::Allocate(c)) => skus.push(&c.sku),
            Plan::DeadLetter(..) => {}
        }
    }
    let done = uow.load(&skus, &refs, &keys).await?;
    // Whether each line to allocate is allocated already, for every line in
    // one go (a product restored from summaries knows none of its lines).
    let lines: Vec<(&Sku, &OrderId)> = chunk
        .iter()
        .filter_map(|entry| match entry.plan {
            Plan::Handle(Command::Allocate(c)) => Some((&c.sku, &c.orderid)),
            _ => None,
        })
        .collect();
    uow.load_lines(&lines).await?;
    // The stored lines each quantity drop frees, for every drop in one go.
    let drops: Vec<(&BatchRef, u32)> = chunk
        .iter()
        .filter_map(|entry| match entry.plan {
            Plan::Handle(Command::ChangeBatchQuantity(c)) => Some((&c.reference, c.qty)),
            _ => None,
        })
        .collect();
    uow.load_freed_lines(&drops).await?;
    let locked = started.elapsed();

    // Rejections depend on the state, so they are decided anew in every
    // attempt; a pass starts over only when a rejected message had
    // changed a product, which the domain never does before refusing.
    let mut rejected: Vec<Option<Rejection>> = vec![None; chunk.len()];
    'pass: loop {
        let mut outcomes = Vec::with_capacity(chunk.len());
        let mut dead_letters = Vec::new();
        let mut claimed: HashSet<&str> = HashSet::with_capacity(chunk.len());
        let mut gate = ChunkGate::default();
        for (i, entry) in chunk.iter().enumerate() {
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
            let verdict = match (entry.plan, &rejected[i]) {
                (_, Some(rejection)) => rejection.clone(),
                (Plan::DeadLetter(reason, error), None) => {
                    Rejection::DeadLetter(*reason, error.clone())
                }
                (Plan::Handle(command), None) => {
                    let quantity_change = match command {
                        Command::ChangeBatchQuantity(c) => Some(&c.reference),
                        _ => None,
                    };
                    if let Some(reference) = quantity_change {
                        if uow.superseded(entry.message, reference).await? {
                            uow.start_message(entry.context.clone());
                            uow.finish_message();
                            claimed.insert(key);
                            outcomes.push(Outcome::Superseded);
                            continue;
                        }
                    }
                    uow.start_message(entry.context.clone());
                    match messagebus::handle(command.clone(), &mut uow).await {
                        Ok(()) => {
                            if let Some(reference) = quantity_change {
                                uow.quantity_changed(entry.message, reference);
                            }
                            uow.finish_message();
                            claimed.insert(key);
                            outcomes.push(Outcome::Applied);
                            continue;
                        }
                        Err(HandlerError::Repository(e)) => return Err(e),
                        Err(error) => {
                            let rejection = Rejection::of(&error, entry.give_up);
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
                    uow.dead_letter(entry.message, &entry.context, reason, &error);
                    claimed.insert(key);
                    outcomes.push(Outcome::DeadLettered(reason));
                    dead_letters.push((i, error));
                }
            }
        }
        let handled = started.elapsed();
        if let Some(position) = position {
            uow.record_position(position);
        }
        uow.commit().await?;
        tracing::debug!(?locked, ?handled, committed = ?started.elapsed(), "batch attempt timings");
        return Ok(Handled {
            outcomes,
            dead_letters,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_keys_transitively() {
        let mut g = ChunkGate::default();
        assert!(!g.blocked(&["a"]));
        g.hold(&["a"]);
        assert!(g.blocked(&["a", "b"]));
        assert!(g.blocked(&["b"]));
        assert!(!g.blocked(&["c"]));
    }
}
