//! Kafka clients: the consumer of the ERP topics and the producer the relay
//! publishes with, configured from our settings plus any librdkafka property
//! the operator passes through (TLS, SASL, timeouts).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
    StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use super::consumer::{HandOver, InboundConsumer};
use super::group_progress::group_unread;
use super::health::Health;
use super::inbound::InboundKind;
use super::inbound::InboundMessage;
use super::metrics::Metrics;
use super::outbox::OutboxKind;

/// Every topic name the worker uses (contract §3–5), defaults in the CLI
/// and in [`Topics::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub batch_created: String,
    pub batch_quantity_changed: String,
    pub allocation_required: String,
    pub allocated: String,
    pub deallocated: String,
    pub out_of_stock: String,
    pub dead_letter: String,
}

/// The contract's default names (§3–5), as the CLI's flags default to; for
/// the code that runs the processor without the CLI (tests, the cost
/// example).
impl Default for Topics {
    fn default() -> Self {
        Self {
            batch_created: "erp.batch-created".into(),
            batch_quantity_changed: "erp.batch-quantity-changed".into(),
            allocation_required: "erp.allocation-required".into(),
            allocated: "allocation.allocated".into(),
            deallocated: "allocation.deallocated".into(),
            out_of_stock: "allocation.out-of-stock".into(),
            dead_letter: "allocation.dead-letter".into(),
        }
    }
}

impl Topics {
    pub fn inbound(&self) -> [&str; 3] {
        [
            &self.batch_created,
            &self.batch_quantity_changed,
            &self.allocation_required,
        ]
    }

    pub(crate) fn inbound_kind(&self, topic: &str) -> Option<InboundKind> {
        if topic == self.batch_created {
            Some(InboundKind::BatchCreated)
        } else if topic == self.batch_quantity_changed {
            Some(InboundKind::BatchQuantityChanged)
        } else if topic == self.allocation_required {
            Some(InboundKind::AllocationRequired)
        } else {
            None
        }
    }

    pub(crate) fn outbound(&self, kind: OutboxKind) -> &str {
        match kind {
            OutboxKind::Allocated => &self.allocated,
            OutboxKind::Deallocated => &self.deallocated,
            OutboxKind::OutOfStock => &self.out_of_stock,
            OutboxKind::DeadLetter => &self.dead_letter,
        }
    }
}

/// Connection settings shared by the consumer and the producer.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Passed to librdkafka last, so an operator can override any default here.
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            // Every request is sent as soon as it is made, as Kafka's own
            // clients do (TCP_NODELAY): the relay waits for a key's
            // acknowledgements before it sends that key's next event to
            // another topic, and a commit or fetch waits for its answer, so
            // a request held back for a previous segment's ACK is latency
            // on the path of every event (BENCHMARKS.md, "The relay's round
            // trips").
            .set("socket.nagle.disable", "true")
            .set_log_level(RDKafkaLogLevel::Warning);
        config
    }

    fn apply_properties(&self, config: &mut ClientConfig) {
        for (key, value) in &self.properties {
            config.set(key, value);
        }
    }

    /// A consumer that stores offsets only when told to (after the message's
    /// effects are durable) and auto-commits what was stored. Its group
    /// membership goes to `health` (`consumer_assigned`), for `/readyz`.
    pub(crate) fn consumer(
        &self,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<StreamConsumer<WorkerContext>, KafkaError> {
        let mut config = self.base();
        config
            .set("group.id", &self.group_id)
            // Statistics carry the consumer lag per partition for the metrics,
            // and tell the unknown-reference window whether the worker has
            // caught up (docs/design.md, "Late references"): often enough
            // for a window of a few seconds.
            .set("statistics.interval.ms", "1000")
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // librdkafka prefetches up to 64 MiB by default; the partitions'
            // queues hold the next batches already, so 8 MiB bounds memory
            // without starving them.
            .set("queued.max.messages.kbytes", "8192");
        self.apply_properties(&mut config);
        config.create_with_context(WorkerContext {
            metrics: Some(metrics),
            health: Some(health),
            reading: Arc::default(),
            hand_over: OnceLock::new(),
        })
    }

    /// An admin client, for reading the inbound topics' settings at start.
    pub(crate) fn admin(
        &self,
    ) -> Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, KafkaError>
    {
        let mut config = self.base();
        self.apply_properties(&mut config);
        config.create()
    }

    /// An idempotent producer: retries never duplicate or reorder within a
    /// partition, which the per-SKU order of events relies on.
    pub fn producer(&self) -> Result<FutureProducer<WorkerContext>, KafkaError> {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The relay hands a whole pass of rows over at once, and waits
            // for a key's acknowledgements before that key's next event goes
            // to another topic (a quantity change's Deallocated, then its
            // Allocated): every wait is a round trip, and lingering only
            // lengthens each. What is handed over while a request is in
            // flight still goes out batched in the next one.
            .set("linger.ms", "0")
            // A dead letter carries the inbound value back, plus headers: let
            // the broker, not librdkafka's 1 MB default, decide what fits.
            .set("message.max.bytes", "16777216")
            .set("message.timeout.ms", "30000");
        self.apply_properties(&mut config);
        config.create_with_context(WorkerContext {
            metrics: None,
            health: None,
            reading: Arc::default(),
            hand_over: OnceLock::new(),
        })
    }
}

/// Sends librdkafka's logs and rebalances to `tracing`, and the consumer's
/// statistics to the lag metric.
pub struct WorkerContext {
    metrics: Option<Arc<Metrics>>,
    /// Where its group membership is told (`Health::consumer_assigned`).
    health: Option<Arc<Health>>,
    /// How far the consumer has read, from its statistics.
    reading: Arc<Reading>,
    /// Told of revoked partitions before they are released.
    hand_over: OnceLock<Arc<dyn HandOver>>,
}

impl WorkerContext {
    /// How far the consumer has read, from its statistics.
    pub(crate) fn reading(&self) -> Arc<Reading> {
        Arc::clone(&self.reading)
    }

    /// Sets what is done with revoked partitions (once; later calls are
    /// ignored).
    pub(crate) fn set_hand_over(&self, hand_over: Arc<dyn HandOver>) {
        let _ = self.hand_over.set(hand_over);
    }

    /// True between an assignment and the next revocation.
    pub(crate) fn is_assigned(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| h.consumer_assigned.load(Ordering::Relaxed))
    }
}

/// The production consumer: librdkafka's, with the worker's context.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<WorkerContext>>,
}

impl KafkaConsumer {
    pub(crate) fn new(consumer: StreamConsumer<WorkerContext>) -> Self {
        Self {
            consumer: Arc::new(consumer),
        }
    }
}

/// The bound on each request of [`InboundConsumer::group_unread`].
const GROUP_PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

impl InboundConsumer for KafkaConsumer {
    fn subscribe(&self, topics: &[&str]) -> Result<(), KafkaError> {
        self.consumer.subscribe(topics)
    }

    async fn recv(&self) -> Result<InboundMessage, KafkaError> {
        // Copied at once: a borrowed message must not outlive the poll.
        self.consumer.recv().await.map(|m| to_inbound(&m))
    }

    fn set_hand_over(&self, hand_over: Arc<dyn HandOver>) {
        self.consumer.context().set_hand_over(hand_over);
    }

    fn pause(&self, topic: &str, partition: i32, pause: bool) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        }
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        self.consumer.seek(
            topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        )
    }

    fn store_offset(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
        self.consumer.store_offsets(&tpl)
    }

    fn is_assigned(&self) -> bool {
        self.consumer.context().is_assigned()
    }

    fn unread(&self, topic: &str, fresh: Duration) -> Option<Vec<i64>> {
        self.consumer.context().reading().unread(topic, fresh)
    }

    async fn group_unread(&self, topic: &str) -> Result<i64, KafkaError> {
        // The client's calls block: off the runtime's threads.
        let consumer = Arc::clone(&self.consumer);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            group_unread(&*consumer, &topic, GROUP_PROGRESS_TIMEOUT)
        })
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "the group's progress could not be asked");
            Err(KafkaError::Canceled)
        })
    }

    async fn close(self: Arc<Self>) {
        // librdkafka's commit and close block, for ever while the broker is
        // unreachable: off the async threads (the caller bounds the wait).
        let consumer = Arc::clone(&self.consumer);
        drop(self);
        let closing = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => tracing::info!("offsets committed"),
                // NoOffset: nothing was stored since the last commit.
                Err(error) => tracing::info!(%error, "final offset commit"),
            }
            consumer.unsubscribe();
            drop(consumer);
        });
        if let Err(error) = closing.await {
            tracing::warn!(%error, "closing the consumer failed");
        }
    }
}

/// Unread messages of the assigned partitions, as the consumer's latest
/// statistics report them, forgotten at every rebalance so that a report
/// never speaks of another assignment.
#[derive(Debug, Default)]
pub(crate) struct Reading {
    state: Mutex<ReadingState>,
}

#[derive(Debug, Default)]
struct ReadingState {
    /// Unread messages by topic and partition; `None` until the first report
    /// after the latest rebalance, or while the group is not up.
    unread: Option<HashMap<(String, i32), i64>>,
    reported: Option<Instant>,
}

impl Reading {
    /// Unread messages of each assigned partition of `topic`, per the latest
    /// statistics; `None` when there is no report since the latest rebalance,
    /// or the latest is older than `fresh`.
    pub(crate) fn unread(&self, topic: &str, fresh: std::time::Duration) -> Option<Vec<i64>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.reported.is_none_or(|at| at.elapsed() > fresh) {
            return None;
        }
        let unread = state.unread.as_ref()?;
        Some(
            unread
                .iter()
                .filter(|((t, _), _)| t == topic)
                .map(|(_, n)| *n)
                .collect(),
        )
    }

    fn rebalanced(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.unread = None;
    }

    fn report(&self, statistics: &Statistics) {
        // A group that is not up has no assignment to speak of.
        let up = statistics
            .cgrp
            .as_ref()
            .is_some_and(|g| g.state == "up" && g.join_state == "steady");
        let unread = up.then(|| {
            let mut unread = HashMap::new();
            for (topic, stats) in &statistics.topics {
                for (partition, p) in &stats.partitions {
                    if *partition < 0 || !p.desired {
                        continue;
                    }
                    unread.insert((topic.clone(), *partition), unread_of(p));
                }
            }
            unread
        });
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.unread = unread;
        state.reported = Some(Instant::now());
    }
}

/// Messages of a partition not yet handed to the application: from the
/// offset after the last one handed over (else the next to fetch, counting
/// what is prefetched; else the committed offset) to the high watermark. Not
/// librdkafka's `consumer_lag`, which counts from the committed offset: a
/// waiting message holds that back.
fn unread_of(p: &rdkafka::statistics::Partition) -> i64 {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    if end < 0 {
        // Not known yet: not caught up.
        return i64::MAX;
    }
    let unread = if p.app_offset >= 0 {
        end - p.app_offset
    } else if p.next_offset >= 0 {
        end - p.next_offset + p.fetchq_cnt.max(0)
    } else if p.committed_offset >= 0 {
        end - p.committed_offset
    } else {
        return i64::MAX;
    };
    unread.max(0)
}

/// librdkafka's log lines as `tracing` events of the target `librdkafka`, at
/// the matching level. The properties of `KAFKA_PROPERTIES` go to consumers
/// and producers alike, and each ignores the other's with a warning that is
/// noise, not news: that one is logged at debug.
pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, message: &str) {
    if fac == "CONFWARN" && message.contains("will be ignored by this") {
        tracing::debug!(target: "librdkafka", fac, "{message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        _ => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing(level, fac, message);
    }

    fn stats(&self, statistics: Statistics) {
        self.reading.report(&statistics);
        let Some(metrics) = &self.metrics else { return };
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1 is librdkafka's internal unassigned partition.
                if *partition < 0 {
                    continue;
                }
                let Some(lag) = position_lag(p) else { continue };
                metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for WorkerContext {
    /// A clean hand-over: before revoked partitions are released, their
    /// tasks finish or abandon (uncommitted) the batch in hand and store
    /// their offsets, which are then committed, so that the next owner
    /// starts after what is applied here.
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        if partitions.is_empty() {
            return;
        }
        if let Some(hand_over) = self.hand_over.get() {
            hand_over.revoke(&partitions);
        }
        // A partition paused because its task was full must not stay paused
        // should it come back to this member.
        if let Err(error) = consumer.resume(tpl) {
            tracing::debug!(%error, "resuming revoked partitions");
        }
        // Bounded: this runs inside the consumer's poll, and a commit to a
        // coordinator that does not answer would otherwise hold the member
        // (and the whole group's rebalance) for as long as it does not.
        match commit_stored_within(consumer, REVOKE_COMMIT_BOUND) {
            Ok(()) => {
                tracing::info!(partitions = ?partition_names(tpl), "offsets committed before the partitions are released")
            }
            // NoOffset: nothing stored since the last commit.
            Err(error) => {
                tracing::info!(%error, "offset commit before the partitions are released")
            }
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Some(health) = &self.health {
            // Under cooperative assignment a revocation takes some of the
            // partitions, not necessarily all: the member is still assigned
            // while it holds any.
            let still = match rebalance {
                Rebalance::Assign(_) => true,
                Rebalance::Revoke(_) => {
                    matches!(
                        consumer.rebalance_protocol(),
                        RebalanceProtocol::Cooperative
                    ) && consumer.assignment().is_ok_and(|a| a.count() > 0)
                }
                Rebalance::Error(_) => false,
            };
            health.consumer_assigned.store(still, Ordering::Relaxed);
        }
        self.reading.rebalanced();
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partition_names(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partition_names(tpl), "partitions revoked");
                // Another member reports these now; a stale gauge here would
                // keep an alert firing.
                if let Some(metrics) = &self.metrics {
                    for e in tpl.elements() {
                        let partition = e.partition().to_string();
                        let _ = metrics
                            .consumer_lag
                            .remove_label_values(&[e.topic(), partition.as_str()]);
                    }
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

/// The longest the rebalance callback waits for the commit of the revoked
/// partitions' offsets. Past it the partitions are released all the same:
/// what was stored and not committed is consumed again by the next owner and
/// found processed (contract §6.2).
pub(crate) const REVOKE_COMMIT_BOUND: Duration = Duration::from_secs(5);

/// Commits the offsets stored for the consumer's current assignment and
/// waits at most `bound` for the coordinator's answer. rdkafka's
/// `commit_consumer_state(Sync)` has no bound: it waits as long as the
/// coordinator is unknown or silent. The commit is sent through a queue of
/// our own, polled with a timeout; a commit still in flight at the bound
/// goes on in librdkafka, its answer dropped with the queue.
pub(crate) fn commit_stored_within<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    bound: Duration,
) -> Result<(), KafkaError> {
    use rdkafka::bindings as rd;
    use rdkafka::types::RDKafkaErrorCode;
    let no_error = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let rk = consumer.client().native_ptr();
    let timeout_ms = i32::try_from(bound.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `rk` is the consumer's live handle for the whole call. The
    // queue is ours: created, polled and destroyed here; librdkafka keeps its
    // own reference while a commit is in flight. A null offsets list means
    // the current assignment's stored offsets. The event, when one comes, is
    // destroyed once its error is read.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        if queue.is_null() {
            return Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::Fail));
        }
        let err =
            rd::rd_kafka_commit_queue(rk, std::ptr::null(), queue, None, std::ptr::null_mut());
        let result = if err != no_error {
            Err(KafkaError::ConsumerCommit(err.into()))
        } else {
            let event = rd::rd_kafka_queue_poll(queue, timeout_ms);
            if event.is_null() {
                Err(KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::OperationTimedOut,
                ))
            } else {
                let err = rd::rd_kafka_event_error(event);
                rd::rd_kafka_event_destroy(event);
                if err == no_error {
                    Ok(())
                } else {
                    Err(KafkaError::ConsumerCommit(err.into()))
                }
            }
        };
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}

/// The lag from the worker's position, the offset it stored once the
/// messages before were done: the committed offset trails it by up to the
/// auto-commit interval (5 s of traffic), so a worker that keeps up would
/// show that much lag for ever. `None` when not known yet.
fn position_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag_stored >= 0 {
        Some(p.consumer_lag_stored)
    } else if p.stored_offset >= 0 {
        // librdkafka gives -1 when the position is past the end it last
        // heard of from the broker (which can trail by a fetch): caught up.
        (p.hi_offset >= 0).then_some(0)
    } else if p.consumer_lag >= 0 {
        // Nothing stored yet in this assignment: the committed offset is
        // where the worker will start.
        Some(p.consumer_lag)
    } else {
        None
    }
}

fn partition_names(tpl: &rdkafka::TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

/// An owned, Kafka-type-free copy of a consumed message. Taken at once so
/// that no borrowed message outlives the poll (a consumer dropped while one is
/// alive blocks forever).
pub(crate) fn to_inbound(message: &BorrowedMessage<'_>) -> InboundMessage {
    InboundMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: raw_headers(message),
    }
}

/// The message's headers, names decoded lossily. rdkafka's own iterator
/// unwraps header names as UTF-8 and so panics on a producer's bad header,
/// which would crash the worker on every restart; librdkafka is read directly.
fn raw_headers(message: &BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::bindings as rd;
    use std::ffi::{c_char, c_void, CStr};

    let no_error = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is valid while `message` is borrowed; librdkafka
    // keeps ownership of the headers, which live as long as the message.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut headers) };
    if err != no_error || headers.is_null() {
        return Vec::new();
    }
    // SAFETY: `headers` is the non-null list librdkafka just returned.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    (0..count)
        .filter_map(|idx| {
            let mut name: *const c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size = 0;
            // SAFETY: idx < count; the out-pointers are valid locals.
            let err = unsafe {
                rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size)
            };
            if err != no_error || name.is_null() {
                return None;
            }
            // SAFETY: librdkafka returns a NUL-terminated name and, when the
            // value is not null, `size` readable bytes; both outlive this call.
            let name = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            let value = (!value.is_null()).then(|| {
                // SAFETY: not null (checked above): `size` readable bytes
                // that outlive this call, as said of the name.
                unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
            });
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Partition;

    fn partition(hi: i64, stored: i64, committed: i64) -> Partition {
        // As librdkafka computes them (rdkafka.c, rd_kafka_stats_emit_toppar).
        let lag = |at: i64| {
            if at >= 0 && hi >= 0 && at <= hi {
                hi - at
            } else {
                -1
            }
        };
        Partition {
            hi_offset: hi,
            stored_offset: stored,
            committed_offset: committed,
            consumer_lag_stored: lag(stored),
            consumer_lag: lag(committed),
            ..Partition::default()
        }
    }

    /// Issue 22 finding 10: the commit in the rebalance callback is bounded.
    /// A "broker" that accepts connections and never answers: the group's
    /// coordinator is never found, and rdkafka's `commit_consumer_state(Sync)`
    /// would wait as long as that lasts.
    #[test]
    fn the_commit_before_a_hand_over_is_bounded_when_the_broker_is_silent() {
        use rdkafka::{Offset, TopicPartitionList};
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
        let address = silent.local_addr().expect("its address").to_string();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("group.id", "silent-broker")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(0))
            .expect("a partition");
        consumer.assign(&tpl).expect("assigned");
        let mut stored = TopicPartitionList::new();
        stored
            .add_partition_offset("t", 0, Offset::Offset(5))
            .expect("an offset");
        consumer.store_offsets(&stored).expect("stored");
        let started = std::time::Instant::now();
        let committed = commit_stored_within(&consumer, Duration::from_secs(1));
        let took = started.elapsed();
        assert!(committed.is_err(), "a silent broker acknowledged a commit");
        assert!(took < Duration::from_secs(3), "the commit took {took:?}");
        // Closing a consumer whose coordinator was never found waits out
        // librdkafka's own timeouts (about 45 s here): not what is tested.
        std::mem::forget(consumer);
        drop(silent);
    }

    #[test]
    fn lag_counts_from_the_stored_position_not_the_committed_offset() {
        // Kept up: everything stored, the commit 250 messages behind.
        assert_eq!(position_lag(&partition(1000, 1000, 750)), Some(0));
        assert_eq!(position_lag(&partition(1000, 990, 750)), Some(10));
    }

    #[test]
    fn a_position_past_a_stale_end_is_caught_up() {
        assert_eq!(position_lag(&partition(1000, 1005, 750)), Some(0));
    }

    #[test]
    fn before_anything_is_stored_the_committed_offset_is_the_position() {
        assert_eq!(position_lag(&partition(1000, -1001, 400)), Some(600));
        assert_eq!(position_lag(&partition(1000, -1001, -1001)), None);
        assert_eq!(position_lag(&partition(-1001, 10, 5)), None);
    }
}
