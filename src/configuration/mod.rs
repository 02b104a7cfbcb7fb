//! Configuration: the validated settings of `run` and `migrate`, and the
//! rules every command's settings are checked by (an operation's settings,
//! and an adapter's, live beside what they set). The command line
//! ([`crate::entrypoints::cli`]) reads flags and environment variables and
//! builds these; [`crate::bootstrap`] and the commands take them as they
//! are. Nothing here knows about clap.
//!
//! A setting that cannot be used is a [`ConfigError`]: one line naming it,
//! and exit code 2 (contract §7).

mod kafka_properties;
mod values;

use std::str::FromStr;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use sqlx::postgres::PgConnectOptions;

use crate::adapters::kafka::{KafkaSettings, Topics};
use crate::adapters::retention::RetentionSettings;

pub use kafka_properties::{kafka_properties, refuse_guarantee_breakers, KAFKA_PROPERTY_PREFIX};
pub use values::{distinct_inbound, duration, non_empty, positive, time, topic};

/// A setting that parsed but cannot be used. Displays as one line.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub reason: String,
}

impl ConfigError {
    /// librdkafka refused the properties when a client was made (an unknown
    /// name, a bad value): a setting error too.
    pub(crate) fn refused_property(error: rdkafka::error::KafkaError) -> Self {
        Self {
            setting: "KAFKA_PROPERTIES / KAFKA_PROPERTY_<NAME> / --kafka-property",
            reason: error.to_string(),
        }
    }
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub(crate) database: DatabaseSettings,
    pub(crate) kafka: KafkaSettings,
    pub(crate) topics: Topics,
    pub(crate) migrate: bool,
    pub(crate) http_addr: std::net::SocketAddr,
    /// The read model's own listener, if any (`READ_MODEL_ADDR`).
    pub(crate) read_model_addr: Option<std::net::SocketAddr>,
    /// The read model's own pool (`READ_MODEL_MAX_CONNECTIONS`).
    pub(crate) read_model_max_connections: u32,
    pub(crate) worker: WorkerSettings,
    pub(crate) retention: RetentionSettings,
    pub(crate) health_poll_timeout: Duration,
    /// `/readyz` fails once a partition has failed its batch this long.
    pub(crate) partition_stall_timeout: Duration,
    /// The product cache's bound, in MiB of its estimate
    /// (`PRODUCT_CACHE_MIB`).
    pub(crate) product_cache_mib: u32,
}

/// Where PostgreSQL is, and how many connections the worker may open.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub(crate) options: PgConnectOptions,
    pub(crate) max_connections: u32,
}

impl DatabaseSettings {
    /// From the URL in DATABASE_URL (`url`) or in the file DATABASE_URL_FILE
    /// names (`file`): exactly one of them. A blank `url` counts as not set,
    /// as an empty variable in a manifest often is. The URL is never echoed
    /// back: it usually holds a password.
    pub(crate) fn from_url_or_file(
        url: Option<&str>,
        file: Option<&std::path::Path>,
        max_connections: u32,
    ) -> Result<Self, ConfigError> {
        let (setting, url) = database_url(url, file)?;
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
        Ok(Self {
            options,
            max_connections,
        })
    }
}

/// The URL and the setting it came from (for messages).
fn database_url(
    url: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<(&'static str, String), ConfigError> {
    const URL: &str = "DATABASE_URL (--database-url)";
    const FILE: &str = "DATABASE_URL_FILE (--database-url-file)";
    let url = url.filter(|u| !u.trim().is_empty());
    match (url, file) {
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

/// Tuning of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How long a message naming an unknown SKU or batch is retried before it
    /// is dead-lettered (contract §5).
    pub unknown_reference_timeout: Duration,
    /// Bound on finishing in-flight work at shutdown.
    pub shutdown_timeout: Duration,
    /// Most messages of one partition handled in one transaction. 1 gives
    /// one transaction per message.
    pub max_batch_messages: usize,
    /// How long one attempt at a batch (taking a connection, the
    /// transaction, the commit) may last before its connection is given up
    /// as lost and the batch tried again after a back-off.
    pub transaction_timeout: Duration,
}

/// How the commands other than `run` reach the broker
/// (`replay-dead-letters`, and the tools): the same settings as `run`, less
/// the group.
#[derive(Debug, Clone)]
pub struct Connection {
    pub bootstrap_servers: String,
    pub properties: Vec<(String, String)>,
}

impl Connection {
    pub(crate) fn new(
        bootstrap_servers: &str,
        properties: Vec<(String, String)>,
    ) -> Result<Self, ConfigError> {
        non_empty(
            "KAFKA_BOOTSTRAP_SERVERS (--kafka-bootstrap-servers)",
            bootstrap_servers,
        )?;
        Ok(Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            properties,
        })
    }

    /// A client configuration: our `settings` first, the operator's
    /// properties last so that they win.
    pub fn client_config(&self, settings: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set_log_level(RDKafkaLogLevel::Warning);
        for (key, value) in settings {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}
