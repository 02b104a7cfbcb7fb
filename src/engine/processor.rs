//! Kafka messages through the service layer's batch processor
//! ([`crate::service_layer::chunk`]) on PostgreSQL ([`PgStore`]). The
//! processor decodes each message into a [`Plan`], gives it its trace span,
//! and reports what became of a batch: the dead-letter and conflict metrics,
//! a wake-up for the relay after a commit that wrote outbox rows, and one for
//! the messages waiting on a reference after a commit that created a batch.
//! It has no Kafka client of its own, so tests drive it directly against a
//! real database (tests/services/postgres.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::adapters::inbound::{self, DecodeError};
use crate::adapters::inbound::{InboundMessage, MessageContext};
use crate::adapters::kafka::Topics;
use crate::adapters::metrics::Metrics;
use crate::adapters::postgres::unit_of_work::PgStore;
use crate::service_layer::chunk::{self, Entry, Handled, Outcome, Plan};
use crate::service_layer::{DeadLetterReason, ReadPosition};
use crate::service_layer::{RepositoryError, Store};
use crate::telemetry;

/// A message of a chunk as the engine hands it over: decoded by
/// [`Processor::plan`], and whether its window has closed (an unknown
/// reference is then dead-lettered rather than `Deferred`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planned<'a> {
    pub(crate) message: &'a InboundMessage,
    pub(crate) plan: &'a Plan,
    pub(crate) give_up: bool,
}

/// Handles batches of messages, one transaction per batch. It keeps
/// connections out of the pool between batches ([`PgStore`]): call
/// [`Self::close_connections`], or drop it, before closing the pool, which
/// waits for them.
pub struct Processor<S = PgStore> {
    store: S,
    topics: Topics,
    /// Rung after each commit, so the relay publishes without waiting to poll.
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Bumped after a commit that applied a BatchCreated: a SKU or batch
    /// that messages wait for may exist now.
    references: watch::Sender<u64>,
    /// Whether the last transaction could be made (false after a transient
    /// failure, until one commits): a condition of the unknown-reference
    /// window.
    store_reachable: AtomicBool,
}

/// The store a [`Processor`] runs on: PostgreSQL ([`PgStore`]) in
/// production, an in-memory one in the engine's simulation.
pub trait WorkerStore:
    Store<Message = InboundMessage, Context = MessageContext> + Send + Sync + 'static
{
    /// Hands back what the store keeps between batches, and keeps nothing
    /// from now on (before the pool is closed, which waits for it).
    fn close(&self) {}
}

impl WorkerStore for PgStore {
    fn close(&self) {
        PgStore::close(self);
    }
}

impl Processor<PgStore> {
    pub fn new(
        pool: PgPool,
        topics: Topics,
        relay_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store = PgStore::new(pool)
            .with_waiting_gauge(metrics.db_pool_waiting.clone())
            .with_cache_lookups(&metrics.product_cache_lookups);
        Self::with_store(store, topics, relay_wake, metrics)
    }
}

impl<S: WorkerStore> Processor<S> {
    /// A processor on any [`WorkerStore`].
    pub fn with_store(
        store: S,
        topics: Topics,
        relay_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            topics,
            relay_wake,
            metrics,
            references: watch::Sender::new(0),
            store_reachable: AtomicBool::new(true),
        }
    }

    pub(crate) fn topics(&self) -> &Topics {
        &self.topics
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Hands the connections kept between batches back to the pool, and
    /// keeps none from now on (see [`WorkerStore::close`]).
    pub(crate) fn close_connections(&self) {
        WorkerStore::close(&self.store);
    }

    /// Changes after every commit that applied a BatchCreated.
    pub(crate) fn references_changed(&self) -> watch::Receiver<u64> {
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

    /// The error of an attempt that outlived `bound` (see
    /// `TRANSACTION_TIMEOUT`): the database counts as unreachable until an
    /// attempt succeeds, as after any other lost connection.
    pub(crate) fn attempt_timed_out(&self, bound: std::time::Duration) -> RepositoryError {
        self.store_reachable.store(false, Ordering::Relaxed);
        RepositoryError::Unavailable(
            format!(
                "the database did not finish the batch's transaction within {} (TRANSACTION_TIMEOUT); its connection is given up",
                humantime::format_duration(bound)
            )
            .into(),
        )
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
    /// rather than `Deferred`) in one transaction; see
    /// [`chunk::process`]. Returns one outcome per message. An `Err` is
    /// transient (database unreachable, or conflicts that kept recurring):
    /// retry the whole batch after a back-off; nothing of it was stored.
    pub async fn process_batch(
        &self,
        batch: &[(&InboundMessage, bool)],
    ) -> Result<Vec<Outcome>, RepositoryError> {
        let plans: Vec<Plan> = batch.iter().map(|(m, _)| self.plan(m)).collect();
        let chunk: Vec<Planned<'_>> = batch
            .iter()
            .zip(&plans)
            .map(|(&(message, give_up), plan)| Planned {
                message,
                plan,
                give_up,
            })
            .collect();
        self.process_planned(&chunk, None).await
    }

    /// [`Self::process_batch`] of messages already decoded by [`Self::plan`]
    /// (one plan per message). `resume_from`, when given, is the partition's
    /// lowest offset not yet settled as the batch begins: it is recorded
    /// with the batch, for a rewind after a restore of the database
    /// ([`ReadPosition`]).
    pub(crate) async fn process_planned(
        &self,
        chunk: &[Planned<'_>],
        resume_from: Option<i64>,
    ) -> Result<Vec<Outcome>, RepositoryError> {
        let position = match (chunk.first(), resume_from) {
            (Some(first), Some(next_offset)) => Some(ReadPosition {
                topic: first.message.topic.clone(),
                partition: first.message.partition,
                next_offset,
            }),
            _ => None,
        };
        let mut contexts: Vec<MessageContext> = chunk.iter().map(|p| p.message.context()).collect();
        // One span per message when traces are exported (none otherwise),
        // ended with this call; the events carry its trace context.
        let spans: Vec<tracing::Span> = chunk
            .iter()
            .zip(contexts.iter_mut())
            .filter_map(|(p, context)| telemetry::message_span(p.message, context))
            .collect();
        let entries: Vec<Entry<'_, InboundMessage, MessageContext>> = chunk
            .iter()
            .zip(contexts)
            .map(|(p, context)| Entry {
                message: p.message,
                plan: p.plan,
                context,
                give_up: p.give_up,
            })
            .collect();
        let handled = chunk::process(&self.store, &entries, position.as_ref(), || {
            self.metrics.concurrency_retries.inc();
        })
        .await;
        let Handled {
            outcomes,
            dead_letters,
        } = match handled {
            Ok(handled) => handled,
            Err(e) => {
                if let RepositoryError::TimedOut(_) = e {
                    self.metrics.statement_timeouts.inc();
                }
                if matches!(
                    e,
                    RepositoryError::Unavailable(_) | RepositoryError::TimedOut(_)
                ) {
                    self.store_reachable.store(false, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        self.store_reachable.store(true, Ordering::Relaxed);
        for (span, outcome) in spans.iter().zip(&outcomes) {
            span.record("outcome", tracing::field::debug(outcome));
        }
        for (i, error) in dead_letters {
            if let Outcome::DeadLettered(reason) = outcomes[i] {
                let m = chunk[i].message;
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
        for (p, outcome) in chunk.iter().zip(&outcomes) {
            let m = p.message;
            if *outcome == Outcome::Superseded {
                let position = m.order_position();
                tracing::info!(
                    topic = %m.topic,
                    partition = m.partition,
                    offset = m.offset,
                    first_read_at = position.offset,
                    "replayed quantity change not applied: a later change to its batch was applied since"
                );
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
            .zip(chunk)
            .any(|(o, p)| *o == Outcome::Applied && p.plan.creates_batch())
        {
            self.references.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcomes)
    }

    /// Decodes a message: what to do with it, and the keys it names.
    pub(crate) fn plan(&self, message: &InboundMessage) -> Plan {
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
}
