//! How a command reaches the broker: the bootstrap servers and any
//! librdkafka property, the same flags for every command.

use clap::Args;

use crate::configuration::{kafka_properties, ConfigError, Connection};

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
    pub(crate) flags: Vec<String>,

    /// librdkafka properties as one list: one KEY=VALUE per line (values may
    /// hold commas), or, on a single line, comma-separated.
    #[arg(
        long = "kafka-properties",
        env = "KAFKA_PROPERTIES",
        hide_env_values = true,
        value_name = "LIST"
    )]
    pub(crate) list: Option<String>,

    /// A file of librdkafka properties, one KEY=VALUE a line (`#` starts a
    /// comment), e.g. a mounted Kubernetes Secret with SASL credentials.
    /// Applied first: the other forms win.
    #[arg(
        long = "kafka-properties-file",
        env = "KAFKA_PROPERTIES_FILE",
        value_name = "PATH"
    )]
    pub(crate) file: Option<std::path::PathBuf>,
}

impl KafkaPropertyArgs {
    /// Every property given, in the order they apply; values never echoed.
    pub(crate) fn properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        kafka_properties(
            self.file.as_deref(),
            self.list.as_deref(),
            std::env::vars_os(),
            &self.flags,
        )
    }
}

/// How to reach the broker: the same settings as `run`.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Kafka bootstrap servers, host:port[,host:port...]
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub(crate) kafka_bootstrap_servers: String,

    #[command(flatten)]
    pub(crate) kafka_properties: KafkaPropertyArgs,
}

impl ConnectionArgs {
    pub fn settings(&self) -> Result<Connection, ConfigError> {
        Connection::new(
            &self.kafka_bootstrap_servers,
            self.kafka_properties.properties()?,
        )
    }
}
