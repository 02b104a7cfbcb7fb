//! Prometheus metrics (contract §7). One registry per process, built in bootstrap
//! and shared by the worker, the relay, the Kafka context and the HTTP
//! endpoint. Names follow Prometheus conventions: `_total` counters, seconds,
//! and label sets bounded by the topics, types and reasons of the contract.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::outbox::OutboxKind;
use crate::service_layer::DeadLetterReason;

pub struct Metrics {
    registry: Registry,
    pub(crate) messages_consumed: IntCounterVec,
    pub(crate) handling_duration: HistogramVec,
    pub(crate) batch_messages: Histogram,
    pub(crate) events_published: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) outbox_backlog: IntGauge,
    pub(crate) outbox_oldest_age: prometheus::Gauge,
    pub(crate) outbox_quarantined: IntGauge,
    pub(crate) outbox_quarantined_total: IntCounter,
    pub(crate) consumer_lag: IntGaugeVec,
    pub(crate) concurrency_retries: IntCounter,
    pub(crate) ready: IntGauge,
    pub(crate) retention_removed: IntCounterVec,
    pub(crate) retention_kept: IntGaugeVec,
    pub(crate) waiting_messages: IntGaugeVec,
    pub(crate) waiting_oldest_age: GaugeVec,
    pub(crate) consumer_errors: IntCounterVec,
    /// The worker's database pool, read at scrape time: connections by
    /// state (`in_use`, which counts those the partitions keep between
    /// batches, and `idle`), its size limit, and the batch attempts waiting
    /// for a connection or a share of the pool.
    pub(crate) db_pool_connections: IntGaugeVec,
    pub(crate) db_pool_max_connections: IntGauge,
    pub(crate) db_pool_waiting: IntGauge,
    pub statement_timeouts: IntCounter,
    /// Products a batch's transaction locked, by `result`: `hit` when the
    /// cached copy was current, `miss` when it was read from the database.
    pub(crate) product_cache_lookups: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let messages_consumed = IntCounterVec::new(
            Opts::new(
                "allocation_messages_consumed_total",
                "Inbound messages finished, by topic and outcome (applied, duplicate, dead_lettered, superseded).",
            ),
            &["topic", "outcome"],
        )?;
        let handling_duration = HistogramVec::new(
            HistogramOpts::new(
                "allocation_message_handling_duration_seconds",
                "Time to handle one inbound message, retries included, by message type: the \
                 duration of the transaction of the batch it was handled in.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["message_type"],
        )?;
        let batch_messages = Histogram::with_opts(
            HistogramOpts::new(
                "allocation_batch_messages",
                "Messages of one partition handled in one database transaction.",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
            ]),
        )?;
        let events_published = IntCounterVec::new(
            Opts::new(
                "allocation_events_published_total",
                "Outbound events acknowledged by the broker, by event type.",
            ),
            &["event_type"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "allocation_dead_letters_total",
                "Inbound messages dead-lettered, by reason.",
            ),
            &["reason"],
        )?;
        let outbox_backlog = IntGauge::new(
            "allocation_outbox_backlog_events",
            "Outbox rows (events and dead letters) committed but not yet published.",
        )?;
        let outbox_oldest_age = prometheus::Gauge::new(
            "allocation_outbox_oldest_unsent_age_seconds",
            "Age of the oldest unpublished outbox row; 0 when the outbox is empty.",
        )?;
        let outbox_quarantined = IntGauge::new(
            "allocation_outbox_quarantined_events",
            "Outbox rows the relay could not publish and set aside in outbox_quarantine \
             (all instances'), for an operator: allocation-worker outbox-quarantine.",
        )?;
        let outbox_quarantined_total = IntCounter::new(
            "allocation_outbox_quarantined_total",
            "Outbox rows this instance's relay quarantined (too large, refused by the broker, \
             unknown kind).",
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "allocation_consumer_lag_messages",
                "Messages between the worker's position (the offset it stored once the messages \
                 before were done) and the end of each assigned partition.",
            ),
            &["topic", "partition"],
        )?;
        let concurrency_retries = IntCounter::new(
            "allocation_optimistic_concurrency_retries_total",
            "Transactions retried because another changed the same product first.",
        )?;
        let ready = IntGauge::new(
            "allocation_ready",
            "1 when the database is reachable and the consumer is running, else 0.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "allocation_build_info",
                "Always 1; the labels say which build runs: the crate version and the git \
                 commit it was built from.",
            ),
            &["version", "revision"],
        )?;
        build_info
            .with_label_values(&[crate::VERSION, crate::REVISION])
            .set(1);
        let retention_removed = IntCounterVec::new(
            Opts::new(
                "allocation_retention_removed_rows_total",
                "Rows deleted by retention, by table (processed_messages: idempotency records \
                 older than IDEMPOTENCY_RETENTION; outbox: published rows older than \
                 OUTBOX_RETENTION).",
            ),
            &["table"],
        )?;
        let retention_kept = IntGaugeVec::new(
            Opts::new(
                "allocation_retention_kept_rows",
                "Rows in each table that retention trims, after its last pass (PostgreSQL's \
                 live-row count, pg_stat_user_tables.n_live_tup: an estimate).",
            ),
            &["table"],
        )?;
        let waiting_messages = IntGaugeVec::new(
            Opts::new(
                "allocation_waiting_messages",
                "Messages of a partition waiting for a SKU or batch not known yet (parked), \
                 by topic and partition.",
            ),
            &["topic", "partition"],
        )?;
        let waiting_oldest_age = GaugeVec::new(
            Opts::new(
                "allocation_waiting_oldest_age_seconds",
                "How long the oldest waiting (parked) message of a partition has waited; 0 \
                 when none waits.",
            ),
            &["topic", "partition"],
        )?;
        let consumer_errors = IntCounterVec::new(
            Opts::new(
                "allocation_kafka_consumer_errors_total",
                "Errors the Kafka consumer returned instead of a message, by kind: \
                 `undecodable` (a message set librdkafka cannot decode: a codec it \
                 lacks, a corrupt batch; its partition does not move past it), \
                 `other` (broker unreachable and the like, which pass by themselves).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(messages_consumed.clone()))?;
        registry.register(Box::new(handling_duration.clone()))?;
        registry.register(Box::new(batch_messages.clone()))?;
        registry.register(Box::new(events_published.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(outbox_backlog.clone()))?;
        registry.register(Box::new(outbox_oldest_age.clone()))?;
        registry.register(Box::new(outbox_quarantined.clone()))?;
        registry.register(Box::new(outbox_quarantined_total.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(concurrency_retries.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        registry.register(Box::new(retention_removed.clone()))?;
        registry.register(Box::new(retention_kept.clone()))?;
        registry.register(Box::new(waiting_messages.clone()))?;
        registry.register(Box::new(waiting_oldest_age.clone()))?;
        registry.register(Box::new(consumer_errors.clone()))?;
        let db_pool_connections = IntGaugeVec::new(
            Opts::new(
                "allocation_db_pool_connections",
                "Connections of the worker's database pool, by state (in_use, idle).",
            ),
            &["state"],
        )?;
        let db_pool_max_connections = IntGauge::new(
            "allocation_db_pool_max_connections",
            "The most connections the worker's database pool opens (DATABASE_MAX_CONNECTIONS).",
        )?;
        let db_pool_waiting = IntGauge::new(
            "allocation_db_pool_waiting",
            "Batch attempts waiting for a database connection or a share of the pool.",
        )?;
        registry.register(Box::new(db_pool_connections.clone()))?;
        registry.register(Box::new(db_pool_max_connections.clone()))?;
        registry.register(Box::new(db_pool_waiting.clone()))?;
        for state in ["in_use", "idle"] {
            db_pool_connections.with_label_values(&[state]);
        }
        let statement_timeouts = IntCounter::new(
            "allocation_db_statement_timeouts_total",
            "Batch transactions that failed because a statement ran past statement_timeout \
             (SQLSTATE 57014); each is retried after a back-off.",
        )?;
        registry.register(Box::new(statement_timeouts.clone()))?;
        let product_cache_lookups = IntCounterVec::new(
            Opts::new(
                "allocation_product_cache_lookups_total",
                "Products a batch's transaction locked, by result: hit (the cached copy was \
                 current) or miss (read from the database: never cached, evicted, or changed \
                 by another instance since).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(product_cache_lookups.clone()))?;
        for result in ["hit", "miss"] {
            product_cache_lookups.with_label_values(&[result]);
        }
        // Every bounded label value exists from the start at 0, so that
        // `increase()` sees the first occurrence after a restart.
        for reason in DeadLetterReason::ALL {
            dead_letters.with_label_values(&[reason.as_str()]);
        }
        for kind in OutboxKind::ALL {
            events_published.with_label_values(&[kind.as_str()]);
        }
        for table in RETENTION_TABLES {
            retention_removed.with_label_values(&[table]);
        }
        for kind in ConsumerErrorKind::ALL {
            consumer_errors.with_label_values(&[kind.as_str()]);
        }
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            messages_consumed,
            handling_duration,
            batch_messages,
            events_published,
            dead_letters,
            outbox_backlog,
            outbox_oldest_age,
            outbox_quarantined,
            outbox_quarantined_total,
            consumer_lag,
            concurrency_retries,
            ready,
            retention_removed,
            retention_kept,
            waiting_messages,
            waiting_oldest_age,
            consumer_errors,
            db_pool_connections,
            db_pool_max_connections,
            db_pool_waiting,
            statement_timeouts,
            product_cache_lookups,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

impl Metrics {
    /// Counts an error the consumer returned instead of a message, by kind.
    pub(crate) fn consumer_error(&self, error: &rdkafka::error::KafkaError) {
        self.consumer_errors
            .with_label_values(&[ConsumerErrorKind::of(error).as_str()])
            .inc();
    }

    /// Reads the pool's gauges from `pool` (at scrape time).
    pub(crate) fn observe_pool(&self, pool: &sqlx::PgPool) {
        let size = i64::from(pool.size());
        let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
        self.db_pool_connections
            .with_label_values(&["in_use"])
            .set(size.saturating_sub(idle).max(0));
        self.db_pool_connections
            .with_label_values(&["idle"])
            .set(idle);
        self.db_pool_max_connections
            .set(i64::from(pool.options().get_max_connections()));
    }

    /// Creates the consumed-message series of `topics` at 0 (see `new`).
    pub(crate) fn init_topics(&self, topics: &[&str]) {
        for topic in topics {
            for outcome in ["applied", "duplicate", "dead_lettered", "superseded"] {
                self.messages_consumed.with_label_values(&[topic, outcome]);
            }
        }
    }
}

/// The tables retention trims (adapters/retention.rs), as named in the
/// `table` label of its metrics.
pub(crate) const RETENTION_TABLES: [&str; 2] = ["processed_messages", "outbox"];

/// What a consumer error means for the partition it came from: the
/// `kind` label of `allocation_consumer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsumerErrorKind {
    /// librdkafka cannot decode a message set: compressed with a codec it was
    /// built without, corrupt, or failing its CRC. It reports the error again
    /// at every fetch of that offset: the partition stays at that message
    /// (nothing after it is skipped) until an operator acts.
    Undecodable,
    /// Anything else: a broker unreachable, a rebalance in progress; these
    /// pass by themselves.
    Other,
}

impl ConsumerErrorKind {
    pub(crate) const ALL: [ConsumerErrorKind; 2] =
        [ConsumerErrorKind::Undecodable, ConsumerErrorKind::Other];

    pub(crate) fn of(error: &rdkafka::error::KafkaError) -> Self {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match error {
            rdkafka::error::KafkaError::MessageConsumption(code)
            | rdkafka::error::KafkaError::MessageConsumptionFatal(code)
                if matches!(
                    code,
                    Code::BadCompression
                        | Code::BadMessage
                        | Code::NotImplemented
                        | Code::InvalidMessage
                ) =>
            {
                ConsumerErrorKind::Undecodable
            }
            _ => ConsumerErrorKind::Other,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConsumerErrorKind::Undecodable => "undecodable",
            ConsumerErrorKind::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn a_message_set_librdkafka_cannot_decode_is_told_apart() {
        for code in [
            Code::BadCompression,
            Code::NotImplemented,
            Code::BadMessage,
            Code::InvalidMessage,
        ] {
            assert_eq!(
                ConsumerErrorKind::of(&KafkaError::MessageConsumption(code)),
                ConsumerErrorKind::Undecodable,
                "{code:?}"
            );
        }
        for error in [
            KafkaError::MessageConsumption(Code::AllBrokersDown),
            KafkaError::MessageConsumption(Code::BrokerTransportFailure),
            KafkaError::PartitionEOF(0),
        ] {
            assert_eq!(
                ConsumerErrorKind::of(&error),
                ConsumerErrorKind::Other,
                "{error}"
            );
        }
    }
}
