//! The flags of `run` and `migrate`, and the configuration they build.

use std::time::Duration;

use clap::Args;

use super::{InboundTopicArgs, KafkaPropertyArgs, OutboundTopicArgs};
use crate::adapters::kafka::{KafkaSettings, Topics};
use crate::adapters::retention::RetentionSettings;
use crate::configuration::{
    duration, non_empty, positive, refuse_guarantee_breakers, ConfigError, DatabaseSettings,
    RunSettings, WorkerSettings,
};

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,

    /// A file holding the PostgreSQL URL, e.g. a mounted Kubernetes Secret;
    /// surrounding whitespace is ignored. Instead of DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE", value_name = "PATH")]
    pub(crate) database_url_file: Option<std::path::PathBuf>,

    /// Most connections the worker opens to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) database_max_connections: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,

    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub(crate) kafka_bootstrap_servers: String,

    /// Consumer group of the worker's instances.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "allocation-worker")]
    pub(crate) kafka_group_id: String,

    #[command(flatten)]
    pub(crate) kafka_properties: KafkaPropertyArgs,

    #[command(flatten)]
    pub(crate) inbound_topics: InboundTopicArgs,
    #[command(flatten)]
    pub(crate) outbound_topics: OutboundTopicArgs,

    /// Address of the HTTP endpoints (/metrics, /healthz, /readyz,
    /// /allocations/{orderid}); port 0 picks a free port.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub(crate) http_addr: std::net::SocketAddr,

    /// Address of a listener of its own for the read model: when set,
    /// /allocations/{orderid} and a /readyz that judges only what the read
    /// model needs (the database and its schema) are served there, and
    /// /allocations no longer on HTTP_ADDR. Keeps client traffic apart from
    /// the metrics and probes; port 0 picks a free port.
    #[arg(long, env = "READ_MODEL_ADDR")]
    pub(crate) read_model_addr: Option<std::net::SocketAddr>,

    /// Most connections the read model's queries (/allocations) open to
    /// PostgreSQL, apart from the worker's DATABASE_MAX_CONNECTIONS, so that
    /// client traffic never takes the connections the worker and the probes
    /// need.
    #[arg(long, env = "READ_MODEL_MAX_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) read_model_max_connections: u32,

    /// Do not apply migrations at start (when a separate `migrate` job does).
    #[arg(long, env = "SKIP_MIGRATIONS")]
    pub(crate) skip_migrations: bool,

    /// How long a message naming an unknown SKU or batch is retried before it
    /// is dead-lettered, e.g. 30s, 2m; a bare number is seconds.
    #[arg(long, env = "UNKNOWN_REFERENCE_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub unknown_reference_timeout: Duration,

    /// Bound on finishing in-flight work and flushing at shutdown, e.g. 20s;
    /// a bare number is seconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Most messages of one partition handled in one database transaction.
    /// Whatever has arrived is taken, up to this many; 1 is one transaction
    /// per message.
    #[arg(long, env = "MAX_BATCH_MESSAGES", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) max_batch_messages: u32,

    /// How long one attempt at a batch's transaction may last, e.g. 60s,
    /// before its connection is given up as lost and the batch retried
    /// after a back-off. PostgreSQL's statement_timeout (30s) and
    /// lock_timeout (10s) act only while the server can reach the worker; a
    /// connection whose route has gone is otherwise waited on for as long as
    /// TCP retransmits. Keep it above statement_timeout.
    #[arg(long, env = "TRANSACTION_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub(crate) transaction_timeout: Duration,

    /// How long idempotency records are kept, e.g. 7d. Keep it longer than
    /// the inbound topics' retention.ms: a redelivered message whose record
    /// is gone is applied again.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "7d", value_parser = duration)]
    pub idempotency_retention: Duration,

    /// How long outbox rows are kept once published, e.g. 24h. Unpublished
    /// rows are kept whatever their age.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = duration)]
    pub outbox_retention: Duration,

    /// /healthz answers 503 when the consumer loop has not polled Kafka for
    /// this long, e.g. 5m.
    #[arg(long, env = "HEALTH_POLL_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub health_poll_timeout: Duration,

    /// `/readyz` answers 503 once a partition has failed its batch for this
    /// long (a statement that times out, a lock never released), e.g. 60s;
    /// a bare number is seconds.
    #[arg(long, env = "PARTITION_STALL_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub(crate) partition_stall_timeout: Duration,

    /// Memory for the products kept between transactions, in MiB (1–16384),
    /// as the cache estimates it: about 1.2 KB for a product of three open
    /// batches. The process's resident memory grows by about twice the
    /// estimate as the cache fills. A product that is not kept costs a read
    /// of its open batches when a transaction locks it; raise this when the
    /// catalogue is wider than the cache and bursts matter more than memory.
    #[arg(long, env = "PRODUCT_CACHE_MIB", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub(crate) product_cache_mib: u32,
}

impl DatabaseArgs {
    pub fn settings(&self) -> Result<DatabaseSettings, ConfigError> {
        DatabaseSettings::from_url_or_file(
            self.database_url.as_deref(),
            self.database_url_file.as_deref(),
            self.database_max_connections,
        )
    }
}

impl RunArgs {
    pub fn settings(&self) -> Result<RunSettings, ConfigError> {
        let database = self.database.settings()?;
        non_empty(
            "KAFKA_BOOTSTRAP_SERVERS (--kafka-bootstrap-servers)",
            &self.kafka_bootstrap_servers,
        )?;
        non_empty("KAFKA_GROUP_ID (--kafka-group-id)", &self.kafka_group_id)?;
        let properties = self.kafka_properties.properties()?;
        refuse_guarantee_breakers(&properties)?;
        let [batch_created, batch_quantity_changed, allocation_required] =
            self.inbound_topics.names()?;
        let [allocated, deallocated, out_of_stock, dead_letter] = self.outbound_topics.names()?;
        let topics = Topics {
            batch_created,
            batch_quantity_changed,
            allocation_required,
            allocated,
            deallocated,
            out_of_stock,
            dead_letter,
        };
        let retention = RetentionSettings {
            idempotency: positive(
                "IDEMPOTENCY_RETENTION (--idempotency-retention)",
                self.idempotency_retention,
            )?,
            outbox: positive(
                "OUTBOX_RETENTION (--outbox-retention)",
                self.outbox_retention,
            )?,
        };
        let health_poll_timeout = positive(
            "HEALTH_POLL_TIMEOUT (--health-poll-timeout)",
            self.health_poll_timeout,
        )?;
        let partition_stall_timeout = positive(
            "PARTITION_STALL_TIMEOUT (--partition-stall-timeout)",
            self.partition_stall_timeout,
        )?;
        let transaction_timeout = positive(
            "TRANSACTION_TIMEOUT (--transaction-timeout)",
            self.transaction_timeout,
        )?;
        Ok(RunSettings {
            database,
            kafka: KafkaSettings {
                bootstrap_servers: self.kafka_bootstrap_servers.clone(),
                group_id: self.kafka_group_id.clone(),
                properties,
            },
            topics,
            migrate: !self.skip_migrations,
            http_addr: self.http_addr,
            read_model_addr: self.read_model_addr,
            read_model_max_connections: self.read_model_max_connections,
            worker: WorkerSettings {
                unknown_reference_timeout: self.unknown_reference_timeout,
                shutdown_timeout: self.shutdown_timeout,
                max_batch_messages: self.max_batch_messages as usize,
                transaction_timeout,
            },
            retention,
            health_poll_timeout,
            partition_stall_timeout,
            product_cache_mib: self.product_cache_mib,
        })
    }
}
