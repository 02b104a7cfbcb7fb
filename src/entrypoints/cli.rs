//! The command line (contract §7): `run` and `migrate`, every setting a flag with
//! a matching environment variable. Parsing turns flags into typed settings;
//! anything wrong becomes one line naming the setting, and exit code 2.

use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sqlx::postgres::PgConnectOptions;

use crate::adapters::kafka::{KafkaSettings, Topics};
use crate::adapters::retention::RetentionSettings;
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
    pub retention: RetentionSettings,
    pub health_poll_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub options: PgConnectOptions,
    pub max_connections: u32,
}

impl DatabaseArgs {
    pub fn settings(&self) -> Result<DatabaseSettings, ConfigError> {
        let (setting, url) = self.database_url()?;
        // The URL is not echoed back: it usually holds a password.
        let scheme = url.split("://").next().unwrap_or_default();
        if !matches!(scheme, "postgres" | "postgresql") || !url.contains("://") {
            return Err(ConfigError {
                setting,
                reason: "expected a postgres:// or postgresql:// URL".into(),
            });
        }
        let options = PgConnectOptions::from_str(&url).map_err(|e| ConfigError {
            setting,
            reason: e.to_string(),
        })?;
        Ok(DatabaseSettings {
            options,
            max_connections: self.database_max_connections,
        })
    }
}

impl DatabaseArgs {
    /// The URL, from DATABASE_URL or from the file DATABASE_URL_FILE names,
    /// and the setting it came from (for messages). A blank DATABASE_URL
    /// counts as not set, as an empty variable in a manifest often is.
    fn database_url(&self) -> Result<(&'static str, String), ConfigError> {
        const URL: &str = "DATABASE_URL (--database-url)";
        const FILE: &str = "DATABASE_URL_FILE (--database-url-file)";
        let url = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty());
        match (url, &self.database_url_file) {
            (Some(_), Some(_)) => Err(ConfigError {
                setting: "DATABASE_URL / DATABASE_URL_FILE",
                reason: "set one of them, not both".into(),
            }),
            (None, None) => Err(ConfigError {
                setting: URL,
                reason: "required (or DATABASE_URL_FILE naming a file that holds it)".into(),
            }),
            (Some(url), None) => Ok((URL, url.to_owned())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    setting: FILE,
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                let url = text.trim();
                if url.is_empty() {
                    return Err(ConfigError {
                        setting: FILE,
                        reason: format!("{} is empty", path.display()),
                    });
                }
                Ok((FILE, url.to_owned()))
            }
        }
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
        let inbound = topics.inbound();
        if inbound[0] == inbound[1] || inbound[0] == inbound[2] || inbound[1] == inbound[2] {
            return Err(ConfigError {
                setting:
                    "TOPIC_BATCH_CREATED / TOPIC_BATCH_QUANTITY_CHANGED / TOPIC_ALLOCATION_REQUIRED",
                reason: "the three inbound topics must be different".into(),
            });
        }
        for (setting, value) in [
            (
                "IDEMPOTENCY_RETENTION (--idempotency-retention)",
                self.idempotency_retention,
            ),
            (
                "OUTBOX_RETENTION (--outbox-retention)",
                self.outbox_retention,
            ),
            (
                "HEALTH_POLL_TIMEOUT (--health-poll-timeout)",
                self.health_poll_timeout,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError {
                    setting,
                    reason: "must be longer than 0".into(),
                });
            }
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
            retention: RetentionSettings {
                idempotency: self.idempotency_retention,
                outbox: self.outbox_retention,
            },
            health_poll_timeout: self.health_poll_timeout,
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

/// Prefix of the variables that each set one librdkafka property.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

impl KafkaPropertyArgs {
    /// Every property given, in the order they apply; values never echoed.
    pub fn properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut properties = with_properties_file(self.file.as_deref(), Vec::new())?;
        if let Some(list) = &self.list {
            properties.extend(kafka_properties(
                "KAFKA_PROPERTIES (--kafka-properties)",
                &split_property_list(list),
            )?);
        }
        properties.extend(property_variables(std::env::vars_os())?);
        properties.extend(kafka_properties("--kafka-property", &self.flags)?);
        Ok(properties)
    }
}

/// A `KAFKA_PROPERTIES` value as entries: one per line when it has several
/// lines (so that values may hold commas: `debug=broker,topic`), otherwise
/// comma-separated, as before lines were read. Lines starting with `#` are
/// comments.
fn split_property_list(list: &str) -> Vec<String> {
    if list.trim().contains('\n') {
        list.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect()
    } else {
        list.split(',').map(str::to_owned).collect()
    }
}

/// `KAFKA_PROPERTY_<NAME>=value` variables as properties, sorted by name.
/// The name is lower-cased and `_` read as `.`; `__` stands for a literal
/// `_` (the convention of Confluent's images).
pub(crate) fn property_variables(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut properties = Vec::new();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(property) = name.strip_prefix(KAFKA_PROPERTY_PREFIX) else {
            continue;
        };
        let error = |reason: String| ConfigError {
            setting: "KAFKA_PROPERTY_<NAME>",
            reason,
        };
        if property.is_empty() {
            return Err(error(format!("{name} names no property")));
        }
        let value = value
            .into_string()
            .map_err(|_| error(format!("{name} is not valid UTF-8")))?;
        let property = property
            .to_ascii_lowercase()
            .split("__")
            .map(|part| part.replace('_', "."))
            .collect::<Vec<_>>()
            .join("_");
        properties.push((property, value));
    }
    properties.sort();
    Ok(properties)
}

/// `KEY=VALUE` librdkafka properties; blank entries are skipped. The value
/// is never echoed back: it may be a password.
pub(crate) fn kafka_properties(
    setting: &'static str,
    raw: &[String],
) -> Result<Vec<(String, String)>, ConfigError> {
    raw.iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => Err(ConfigError {
                setting,
                reason: format!(
                    "expected KEY=VALUE, got {:?}",
                    p.split('=').next().unwrap_or_default()
                ),
            }),
        })
        .collect()
}

/// A librdkafka property that the delivery guarantees rest on: `allowed`
/// says which values keep them (the worker's own, in librdkafka's spellings).
struct Guarded {
    name: &'static str,
    allowed: fn(&str) -> bool,
    why: &'static str,
}

fn is_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "t" | "1")
}

fn is_false(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "f" | "0")
}

const GUARDED: &[Guarded] = &[
    Guarded {
        name: "group.id",
        allowed: |_| false,
        why: "must not be set as a property: it is KAFKA_GROUP_ID (--kafka-group-id)",
    },
    Guarded {
        name: "enable.auto.offset.store",
        allowed: is_false,
        why: "must be false: an offset is stored only once the message's effects are committed",
    },
    Guarded {
        name: "enable.auto.commit",
        allowed: is_true,
        why: "must be true: the offsets the worker stores are committed in the background",
    },
    // The legacy consumer's spelling of enable.auto.commit.
    Guarded {
        name: "auto.commit.enable",
        allowed: is_true,
        why: "must be true: the offsets the worker stores are committed in the background",
    },
    // 0 switches auto commit off.
    Guarded {
        name: "auto.commit.interval.ms",
        allowed: |v| v.trim().parse::<u64>().is_ok_and(|ms| ms > 0),
        why: "must be a positive number of milliseconds (0 switches committing off)",
    },
    Guarded {
        name: "offset.store.method",
        allowed: |v| v.trim() == "broker",
        why: "must be broker: offsets are committed to the consumer group",
    },
    Guarded {
        name: "auto.offset.reset",
        allowed: |v| matches!(v.trim(), "earliest" | "smallest" | "beginning"),
        why: "must be earliest: a group with no committed offset must not skip what was published before",
    },
    // Each partition's end would come back as a consumer error: the worker
    // would report itself not ready and back off at every one.
    Guarded {
        name: "enable.partition.eof",
        allowed: is_false,
        why: "must be false: the end of a partition is not an error to the worker",
    },
    // The unknown-reference window counts time only while fresh statistics
    // show the worker caught up: without them it would never close, and a
    // reference that never comes would wait for ever.
    Guarded {
        name: "statistics.interval.ms",
        allowed: |v| v.trim().parse::<u64>().is_ok_and(|ms| (1..=5_000).contains(&ms)),
        why: "must be between 1 and 5000 ms: the unknown-reference window reads the consumer's statistics",
    },
    Guarded {
        name: "enable.idempotence",
        allowed: is_true,
        why: "must be true: the producer's retries must never duplicate or reorder events",
    },
    Guarded {
        name: "acks",
        allowed: |v| matches!(v.trim(), "all" | "-1"),
        why: "must be all: an event is marked sent only once every in-sync replica has it",
    },
    Guarded {
        name: "request.required.acks",
        allowed: |v| matches!(v.trim(), "all" | "-1"),
        why: "must be all: an event is marked sent only once every in-sync replica has it",
    },
];

/// Refuses a property that would break a delivery guarantee (offset
/// storing, auto commit, group id, offset reset, the producer's
/// idempotence): one line naming it. Its value is not echoed.
pub(crate) fn refuse_guarantee_breakers(
    properties: &[(String, String)],
) -> Result<(), ConfigError> {
    for (name, value) in properties {
        if let Some(guarded) = GUARDED.iter().find(|g| g.name == name) {
            if !(guarded.allowed)(value) {
                return Err(ConfigError {
                    setting: "Kafka property",
                    reason: format!("{name} {} (refused)", guarded.why),
                });
            }
        }
    }
    Ok(())
}

/// The properties of a KAFKA_PROPERTIES_FILE, if one is named, then
/// `properties` (so that those win). A line is `KEY=VALUE`, both trimmed;
/// blank lines and lines starting with `#` or `!` are skipped. Values are
/// never echoed back: they are secrets.
pub(crate) fn with_properties_file(
    path: Option<&std::path::Path>,
    properties: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    const SETTING: &str = "KAFKA_PROPERTIES_FILE (--kafka-properties-file)";
    let Some(path) = path else {
        return Ok(properties);
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        setting: SETTING,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let mut from_file = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                from_file.push((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => {
                return Err(ConfigError {
                    setting: SETTING,
                    reason: format!("{} line {}: expected KEY=VALUE", path.display(), number + 1),
                })
            }
        }
    }
    from_file.extend(properties);
    Ok(from_file)
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
