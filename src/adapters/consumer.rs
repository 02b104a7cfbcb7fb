//! The consumer as the engine sees it ([`InboundConsumer`]): the seam
//! between the worker loop and Kafka. Production uses
//! [`super::kafka::KafkaConsumer`], a librdkafka `StreamConsumer`; the engine's simulation (tests/simulation)
//! runs the same loop, partition tasks, tracker and window on an in-memory
//! group of its own, on one thread, in simulated time (docs/design.md,
//! "Simulation").
//!
//! The trait speaks of what the engine does with a consumer and nothing
//! else: subscribe, receive (rebalances happen inside, as librdkafka runs
//! its callbacks inside its poll), pause and resume a partition, seek, store
//! an offset, say how far it and its group have read the reference-bringing
//! topic, and close. Its errors stay librdkafka's: the metrics and the
//! back-off classify them, and a fake can make any of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;

use super::inbound::InboundMessage;

/// A future the consumer's owner returns from a hand-over.
pub(crate) type HandOverFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What the consumer's owner does with partitions about to be revoked,
/// before their offsets are committed and they are released: stop working
/// on them and store the offsets of what is done. Bounded either way.
pub trait HandOver: Send + Sync {
    /// From librdkafka's rebalance callback, which runs inside its poll and
    /// must return before the partitions go: blocks the calling thread.
    fn revoke(&self, partitions: &[(String, i32)]);

    /// The same, awaited: for a consumer whose rebalances run inside an
    /// async receive (the simulation's, on a single thread, where blocking
    /// would stop the very tasks it waits for).
    fn revoke_async<'a>(&'a self, partitions: &'a [(String, i32)]) -> HandOverFuture<'a>;
}

/// The engine's consumer: a member of the group that reads the inbound
/// topics. Offsets are stored by the engine, once what precedes them is
/// durable, and committed by the consumer (periodically, before a
/// revocation, and at close).
pub trait InboundConsumer: Send + Sync + 'static {
    /// Joins the group on `topics`.
    fn subscribe(&self, topics: &[&str]) -> Result<(), KafkaError>;

    /// The next message of an assigned, unpaused partition. A rebalance
    /// runs inside: revoked partitions go through the [`HandOver`] first.
    fn recv(&self) -> impl Future<Output = Result<InboundMessage, KafkaError>> + Send;

    /// Who is told of revocations (once; later calls are ignored).
    fn set_hand_over(&self, hand_over: Arc<dyn HandOver>);

    /// Stops (or restarts) fetching one partition. Messages fetched before
    /// may still arrive.
    fn pause(&self, topic: &str, partition: i32, pause: bool) -> Result<(), KafkaError>;

    /// Reads `partition` again from `offset`; what was fetched of it is
    /// discarded.
    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError>;

    /// The offset to commit for `partition`: the next to read.
    fn store_offset(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError>;

    /// True between an assignment and the next revocation.
    fn is_assigned(&self) -> bool;

    /// Unread messages of each assigned partition of `topic`, from a report
    /// no older than `fresh` made since the latest rebalance; `None` when
    /// there is none.
    fn unread(&self, topic: &str, fresh: Duration) -> Option<Vec<i64>>;

    /// Unread messages of `topic` for the whole group, on the partitions
    /// other members hold or nobody does (see
    /// [`super::group_progress::group_unread`]).
    fn group_unread(&self, topic: &str) -> impl Future<Output = Result<i64, KafkaError>> + Send;

    /// Commits what was stored and leaves the group. May take long (a
    /// broker that does not answer): the caller bounds it.
    fn close(self: Arc<Self>) -> impl Future<Output = ()> + Send;
}
