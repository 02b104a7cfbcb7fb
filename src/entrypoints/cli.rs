//! The command line (SPEC §7): `run` and `migrate`, every setting a flag with
//! a matching environment variable. Parsing turns flags into typed settings;
//! anything wrong becomes one line naming the setting, and exit code 2.

use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sqlx::postgres::PgConnectOptions;

use crate::adapters::kafka::{KafkaSettings, Topics};
use crate::entrypoints::worker::WorkerSettings;

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
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

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

    /// Any librdkafka property, KEY=VALUE (TLS, SASL, timeouts); repeat the
    /// flag, or separate with commas in the variable. Applied last.
    #[arg(
        long = "kafka-property",
        env = "KAFKA_PROPERTIES",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "KEY=VALUE"
    )]
    pub kafka_properties: Vec<String>,

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
}

/// A setting that parsed but cannot be used. Displays as one line.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub reason: String,
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub topics: Topics,
    pub migrate: bool,
    pub http_addr: std::net::SocketAddr,
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub options: PgConnectOptions,
    pub max_connections: u32,
}

impl DatabaseArgs {
    pub fn settings(&self) -> Result<DatabaseSettings, ConfigError> {
        // The URL is not echoed back: it usually holds a password.
        let scheme = self.database_url.split("://").next().unwrap_or_default();
        if !matches!(scheme, "postgres" | "postgresql") || !self.database_url.contains("://") {
            return Err(ConfigError {
                setting: "DATABASE_URL (--database-url)",
                reason: "expected a postgres:// or postgresql:// URL".into(),
            });
        }
        let options = PgConnectOptions::from_str(&self.database_url).map_err(|e| ConfigError {
            setting: "DATABASE_URL (--database-url)",
            reason: e.to_string(),
        })?;
        Ok(DatabaseSettings {
            options,
            max_connections: self.database_max_connections,
        })
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
        let properties = kafka_properties(&self.kafka_properties)?;
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
        let inbound = topics.inbound();
        if inbound[0] == inbound[1] || inbound[0] == inbound[2] || inbound[1] == inbound[2] {
            return Err(ConfigError {
                setting:
                    "TOPIC_BATCH_CREATED / TOPIC_BATCH_QUANTITY_CHANGED / TOPIC_ALLOCATION_REQUIRED",
                reason: "the three inbound topics must be different".into(),
            });
        }
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
        })
    }
}

fn non_empty(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError {
            setting,
            reason: "must not be empty".into(),
        })
    } else {
        Ok(())
    }
}

/// `KEY=VALUE` librdkafka properties; blank entries are skipped. The value
/// is never echoed back: it may be a password.
pub(crate) fn kafka_properties(raw: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    raw.iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => Err(ConfigError {
                setting: "KAFKA_PROPERTIES (--kafka-property)",
                reason: format!(
                    "expected KEY=VALUE, got {:?}",
                    p.split('=').next().unwrap_or_default()
                ),
            }),
        })
        .collect()
}

/// Kafka's own rule for topic names: 1–249 of `[a-zA-Z0-9._-]`.
pub(crate) fn topic(setting: &'static str, name: &str) -> Result<String, ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(ConfigError {
            setting,
            reason: format!("{name:?} is not a valid Kafka topic name"),
        })
    }
}

/// Every duration setting: a bare number is seconds (`15`, `2.5`), as an
/// operator reads "--duration 15"; otherwise a humantime string such as
/// `30s`, `2m`, `1h 30m` or `7d`. Negative, NaN or unbounded numbers are
/// refused rather than wrapped.
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return text
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("{text:?} is not a number of seconds"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write seconds (15) or e.g. 15s, 2m, 1h")
    })
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
