//! The command line (contract §7): `run` and `migrate`, every setting a flag with
//! a matching environment variable. Parsing turns flags into typed settings;
//! anything wrong becomes one line naming the setting, and exit code 2.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::adapters::kafka::{KafkaSettings, Topics};
use crate::adapters::retention::RetentionSettings;
use crate::configuration::{
    distinct_inbound, duration, kafka_properties, non_empty, positive, refuse_guarantee_breakers,
    topic, ConfigError, DatabaseSettings, RunSettings, WorkerSettings,
};

#[derive(Debug, Parser)]
#[command(
    name = "allocation-worker",
    version,
    about = "Allocates ERP order lines to stock and publishes what it decided"
)]
pub struct Cli {
    /// Log output: `text` for people, `json` for machines. Filter with RUST_LOG.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: CommandLine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CommandLine {
    /// Apply the database migrations (unless --skip-migrations) and run the worker.
    Run(Box<RunArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Publish a realistic, seeded stream of ERP messages to the inbound topics.
    Simulate(Box<crate::entrypoints::simulate::SimulateArgs>),
    /// Live summary of what the worker decides: outbound topics, dead letters,
    /// consumer lag and outbox backlog.
    Watch(Box<crate::entrypoints::watch::WatchArgs>),
    /// Publish dead letters again to the topic they came from, chosen by
    /// reason, original topic and time; --dry-run lists them.
    ReplayDeadLetters(Box<crate::entrypoints::replay::ReplayArgs>),
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A file holding the PostgreSQL URL, e.g. a mounted Kubernetes Secret;
    /// surrounding whitespace is ignored. Instead of DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE", value_name = "PATH")]
    pub database_url_file: Option<std::path::PathBuf>,

    /// Most connections the worker opens to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: String,

    /// Consumer group of the worker's instances.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "allocation-worker")]
    pub kafka_group_id: String,

    #[command(flatten)]
    pub kafka_properties: KafkaPropertyArgs,

    #[arg(long, env = "TOPIC_BATCH_CREATED", default_value = "erp.batch-created")]
    pub topic_batch_created: String,
    #[arg(
        long,
        env = "TOPIC_BATCH_QUANTITY_CHANGED",
        default_value = "erp.batch-quantity-changed"
    )]
    pub topic_batch_quantity_changed: String,
    #[arg(
        long,
        env = "TOPIC_ALLOCATION_REQUIRED",
        default_value = "erp.allocation-required"
    )]
    pub topic_allocation_required: String,
    #[arg(long, env = "TOPIC_ALLOCATED", default_value = "allocation.allocated")]
    pub topic_allocated: String,
    #[arg(
        long,
        env = "TOPIC_DEALLOCATED",
        default_value = "allocation.deallocated"
    )]
    pub topic_deallocated: String,
    #[arg(
        long,
        env = "TOPIC_OUT_OF_STOCK",
        default_value = "allocation.out-of-stock"
    )]
    pub topic_out_of_stock: String,
    #[arg(
        long,
        env = "TOPIC_DEAD_LETTER",
        default_value = "allocation.dead-letter"
    )]
    pub topic_dead_letter: String,

    /// Address of the HTTP endpoints (/metrics, /healthz, /readyz,
    /// /allocations/{orderid}); port 0 picks a free port.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: std::net::SocketAddr,

    /// Do not apply migrations at start (when a separate `migrate` job does).
    #[arg(long, env = "SKIP_MIGRATIONS")]
    pub skip_migrations: bool,

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
    pub max_batch_messages: u32,

    /// How long idempotency records are kept, e.g. 7d. Keep it longer than
    /// the inbound topics' retention.ms: a redelivered message whose record
    /// is gone is applied again.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub idempotency_retention: Duration,

    /// How long outbox rows are kept once published, e.g. 24h. Unpublished
    /// rows are kept whatever their age.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub outbox_retention: Duration,

    /// /healthz answers 503 when the consumer loop has not polled Kafka for
    /// this long, e.g. 5m.
    #[arg(long, env = "HEALTH_POLL_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub health_poll_timeout: Duration,
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
        let topics = Topics {
            batch_created: topic("TOPIC_BATCH_CREATED", &self.topic_batch_created)?,
            batch_quantity_changed: topic(
                "TOPIC_BATCH_QUANTITY_CHANGED",
                &self.topic_batch_quantity_changed,
            )?,
            allocation_required: topic(
                "TOPIC_ALLOCATION_REQUIRED",
                &self.topic_allocation_required,
            )?,
            allocated: topic("TOPIC_ALLOCATED", &self.topic_allocated)?,
            deallocated: topic("TOPIC_DEALLOCATED", &self.topic_deallocated)?,
            out_of_stock: topic("TOPIC_OUT_OF_STOCK", &self.topic_out_of_stock)?,
            dead_letter: topic("TOPIC_DEAD_LETTER", &self.topic_dead_letter)?,
        };
        distinct_inbound(topics.inbound())?;
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
            worker: WorkerSettings {
                unknown_reference_timeout: self.unknown_reference_timeout,
                shutdown_timeout: self.shutdown_timeout,
                max_batch_messages: self.max_batch_messages as usize,
            },
            retention,
            health_poll_timeout,
        })
    }
}

/// Any librdkafka property (TLS, SASL, timeouts), four ways, applied in
/// this order after the worker's own settings, so that the last one given
/// wins: the `KAFKA_PROPERTIES_FILE` file, the `KAFKA_PROPERTIES` list, one
/// `KAFKA_PROPERTY_<NAME>` variable per property, then the
/// `--kafka-property` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaPropertyArgs {
    /// Any librdkafka property, KEY=VALUE (TLS, SASL, timeouts); repeat the
    /// flag for more. The value is taken whole, commas included. Also
    /// KAFKA_PROPERTY_<NAME> variables, one per property (the name upper-cased,
    /// dots as `_`, e.g. KAFKA_PROPERTY_SASL_PASSWORD). Applied last.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub flags: Vec<String>,

    /// librdkafka properties as one list: one KEY=VALUE per line (values may
    /// hold commas), or, on a single line, comma-separated.
    #[arg(
        long = "kafka-properties",
        env = "KAFKA_PROPERTIES",
        hide_env_values = true,
        value_name = "LIST"
    )]
    pub list: Option<String>,

    /// A file of librdkafka properties, one KEY=VALUE a line (`#` starts a
    /// comment), e.g. a mounted Kubernetes Secret with SASL credentials.
    /// Applied first: the other forms win.
    #[arg(
        long = "kafka-properties-file",
        env = "KAFKA_PROPERTIES_FILE",
        value_name = "PATH"
    )]
    pub file: Option<std::path::PathBuf>,
}

impl KafkaPropertyArgs {
    /// Every property given, in the order they apply; values never echoed.
    pub fn properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        kafka_properties(
            self.file.as_deref(),
            self.list.as_deref(),
            std::env::vars_os(),
            &self.flags,
        )
    }
}

/// A clap error as one line: its message without the usage block.
pub fn one_line(error: &clap::Error) -> String {
    error
        .render()
        .to_string()
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}
