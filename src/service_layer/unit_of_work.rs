//! The unit-of-work and repository traits (cosmicpython chapters 6 and 7).
//! A unit of work is one atomic change: the products it loaded and the events
//! to publish are stored together or not at all. The read model
//! (`allocations_view`) is a view of the stored allocations, so it needs no
//! writes of its own (docs/design.md, "Read model").
//!
//! The handlers need only [`UnitOfWork`]. The batch processor, which handles
//! several messages of a partition in one transaction, needs more of it
//! ([`ChunkUnitOfWork`]: one message at a time, dead letters, commit) and a
//! [`Store`] to begin one per attempt. The adapters implement all of them on
//! PostgreSQL; the unit tests, in memory.

use std::collections::HashSet;
use std::future::Future;

use crate::domain::{BatchRef, Event, OrderId, Product, Sku};

/// Why a message was dead-lettered: the `dlq.reason` header (contract §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    MalformedJson,
    InvalidMessage,
    UnknownSku,
    UnknownBatch,
    DuplicateBatch,
    DuplicateLine,
    UnknownTopic,
}

impl DeadLetterReason {
    pub(crate) const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::MalformedJson,
        DeadLetterReason::InvalidMessage,
        DeadLetterReason::UnknownSku,
        DeadLetterReason::UnknownBatch,
        DeadLetterReason::DuplicateBatch,
        DeadLetterReason::DuplicateLine,
        DeadLetterReason::UnknownTopic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MalformedJson => "malformed-json",
            DeadLetterReason::InvalidMessage => "invalid-message",
            DeadLetterReason::UnknownSku => "unknown-sku",
            DeadLetterReason::UnknownBatch => "unknown-batch",
            DeadLetterReason::DuplicateBatch => "duplicate-batch",
            DeadLetterReason::DuplicateLine => "duplicate-line",
            DeadLetterReason::UnknownTopic => "unknown-topic",
        }
    }
}

/// Where a batch's partition is to be read again from if the store is
/// restored to the state this batch's transaction leaves: every message
/// before `next_offset` had its effects, or its dead letter, stored before
/// this batch began. Recorded in the batch's own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPosition {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) next_offset: i64,
}

/// Why the store could not do what was asked. Every kind is transient: the
/// caller retries the whole unit of work (every message in it) in a fresh one.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// Another transaction changed the same product first (optimistic concurrency).
    #[error("product {0} was changed concurrently")]
    Conflict(String),
    /// The store is unreachable or failed; retry after a back-off.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A statement ran past the store's time bound (PostgreSQL's
    /// `statement_timeout`) and was cancelled. Retried after a back-off like
    /// `Unavailable`, but counted and reported on its own: no statement of
    /// the worker should come near the bound, so one that does is a
    /// database in trouble, or a wedge, not a blip.
    #[error("statement timed out: {0}")]
    TimedOut(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Products by SKU, with an identity map: a product is loaded once per unit of
/// work, and `get` hands out the same instance every time, so that changes
/// made by one handler are seen by the next and saved on commit.
pub trait ProductRepository: Send {
    /// Starts tracking a product that has never been stored.
    fn add(&mut self, product: Product);

    fn get(
        &mut self,
        sku: &Sku,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send;

    fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send;

    /// [`Self::get`], with the product told whether the line `(orderid,
    /// sku)` is allocated and where ([`Product::knows_line`]), which
    /// [`Product::allocate`] needs. A repository of whole products (every
    /// line in memory) has nothing to add.
    fn get_for_line(
        &mut self,
        sku: &Sku,
        orderid: &OrderId,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send {
        let _ = orderid;
        self.get(sku)
    }

    /// [`Self::get`], with the product told whether `reference` is one of
    /// its batches ([`Product::knows_batch`]), which
    /// [`Product::add_batch`] needs. A repository of whole products (every
    /// batch in memory) has nothing to add.
    fn get_for_batch(
        &mut self,
        sku: &Sku,
        reference: &BatchRef,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send {
        let _ = reference;
        self.get(sku)
    }

    /// [`Self::get_by_batchref`], with the product given the batch's lines
    /// that a change of its quantity to `qty` frees
    /// ([`Product::lines_wanted`]). A repository of whole products has
    /// nothing to add.
    fn get_for_quantity_change(
        &mut self,
        reference: &BatchRef,
        qty: u32,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send {
        let _ = qty;
        self.get_by_batchref(reference)
    }

    /// Every product loaded or added in this unit of work.
    fn seen(&mut self) -> Vec<&mut Product>;
}

pub trait UnitOfWork: Send {
    type Products: ProductRepository;

    fn products(&mut self) -> &mut Self::Products;

    /// Queues an event for publication; it is stored with the state change
    /// (transactional outbox) and sent after commit.
    fn publish(&mut self, event: &Event);

    /// Drains the events recorded by the products seen so far, oldest first.
    fn collect_new_events(&mut self) -> Vec<Event> {
        self.products()
            .seen()
            .into_iter()
            .flat_map(|p| p.take_events())
            .collect()
    }
}

/// A message as a batch's unit of work records it: by the key that makes a
/// redelivery recognisable (contract §6.2).
pub trait Idempotent {
    fn idempotency_key(&self) -> &str;
}

/// The unit of work of a batch of messages (one transaction), as the batch
/// processor ([`crate::service_layer::chunk`]) drives it. Between
/// [`Self::start_message`] and [`Self::finish_message`] it is the unit of
/// work of one message: a message that is refused is taken back alone
/// ([`Self::reject_message`]), so that the others of the batch still apply.
/// Nothing is stored until [`Self::commit`]; dropping it abandons everything.
pub trait ChunkUnitOfWork: UnitOfWork {
    /// A message as delivered, kept whole in its dead letter.
    type Message: Sync;
    /// What the records a message causes carry of it (its idempotency key,
    /// its trace context).
    type Context: Idempotent + Clone + Send + Sync;

    /// Locks and loads, in one go, every product named by `skus` or owning
    /// one of `refs`, and returns which of the idempotency `keys` were
    /// processed before. Products not named here are still found by the
    /// repository, one at a time.
    fn load(
        &mut self,
        skus: &[&Sku],
        refs: &[&BatchRef],
        keys: &[&str],
    ) -> impl Future<Output = Result<HashSet<String>, RepositoryError>> + Send;

    /// Tells the products loaded by [`Self::load`] whether each of `lines`
    /// is allocated, in one go, so that allocating them needs no read each.
    /// A unit of work of whole products has nothing to do.
    fn load_lines(
        &mut self,
        lines: &[(&Sku, &OrderId)],
    ) -> impl Future<Output = Result<(), RepositoryError>> + Send {
        let _ = lines;
        async { Ok(()) }
    }

    /// Gives the products loaded by [`Self::load`] the stored lines that
    /// each of `changes` (a batch and the quantity it is lowered to) would
    /// free, in one go, so that a batch of quantity changes reads no lines
    /// message by message. What a message needs beyond them, the repository
    /// still reads. A unit of work of whole products has nothing to do.
    fn load_freed_lines(
        &mut self,
        changes: &[(&BatchRef, u32)],
    ) -> impl Future<Output = Result<(), RepositoryError>> + Send {
        let _ = changes;
        async { Ok(()) }
    }

    /// The message whose handling follows: its events carry its context.
    fn start_message(&mut self, context: Self::Context);

    /// The current message is done: its idempotency key is recorded with it.
    fn finish_message(&mut self);

    /// Takes back what the current, refused message queued. `false` when it
    /// had changed a product, which cannot be taken back alone: call
    /// [`Self::reset`] and handle the batch's other messages again.
    fn reject_message(&mut self) -> bool;

    /// Forgets every message handled so far; the products are as loaded.
    fn reset(&mut self);

    /// Records a message that ends in a dead letter: its record (`message`
    /// as delivered, with `reason` and `error`) and its idempotency key,
    /// together.
    fn dead_letter(
        &mut self,
        message: &Self::Message,
        context: &Self::Context,
        reason: DeadLetterReason,
        error: &str,
    );

    /// Records, with the batch, where its partition must be read again from
    /// should the store be restored to this point (docs/design.md, "Backup
    /// and restore"). A store that is never restored need not keep it.
    fn record_position(&mut self, position: &ReadPosition) {
        let _ = position;
    }

    /// Whether `message`, a quantity change to batch `reference`, is a
    /// replay older than the last change applied to that batch from the same
    /// partition: it must then not be applied, or it would overwrite a later
    /// change (contract §7). A store that keeps no positions says no.
    fn superseded(
        &mut self,
        message: &Self::Message,
        reference: &BatchRef,
    ) -> impl Future<Output = Result<bool, RepositoryError>> + Send {
        let _ = (message, reference);
        async { Ok(false) }
    }

    /// `message`, a quantity change to `reference`, was applied: its
    /// position is stored with the batch's changes (see [`Self::superseded`]).
    fn quantity_changed(&mut self, message: &Self::Message, reference: &BatchRef) {
        let _ = (message, reference);
    }

    /// Stores everything queued, then commits. A `Conflict` means the caller
    /// must retry the batch from the start in a new unit of work.
    fn commit(self) -> impl Future<Output = Result<(), RepositoryError>> + Send;
}

/// Where a batch processor's units of work come from: one per attempt at a
/// batch.
pub trait Store: Sync {
    /// See [`ChunkUnitOfWork::Message`].
    type Message: Sync;
    /// See [`ChunkUnitOfWork::Context`].
    type Context: Idempotent + Clone + Send + Sync;
    /// What an attempt holds while its unit of work is open (for the
    /// database: a connection, and a share of the pool).
    type Session<'a>: Send
    where
        Self: 'a;
    type UnitOfWork<'s>: ChunkUnitOfWork<Message = Self::Message, Context = Self::Context>
    where
        Self: 's;

    /// Takes what one attempt needs; waits while every share is taken.
    fn session(&self) -> impl Future<Output = Result<Self::Session<'_>, RepositoryError>> + Send;

    /// Begins a unit of work in `session`.
    fn begin<'s, 'a: 's>(
        &'s self,
        session: &'s mut Self::Session<'a>,
    ) -> impl Future<Output = Result<Self::UnitOfWork<'s>, RepositoryError>> + Send;

    /// Hands back what the attempt held, once its unit of work is over:
    /// `committed`, or abandoned.
    fn end_session(&self, session: Self::Session<'_>, committed: bool);

    /// A random number of microseconds (below 1,000 is used) added to the
    /// pause after a conflict, so that two instances that collided do not
    /// collide again in step. The clock's nanoseconds by default; the
    /// engine's simulation draws it from its seed, so that a run replays.
    fn conflict_jitter(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
    }
}
