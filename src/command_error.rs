//! The error of the commands besides `run` and `migrate`
//! (`replay-dead-letters`, and the tools `simulate` and `watch`), and its
//! exit code.

use crate::adapters::topic_reader::TopicError;
use crate::configuration::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("kafka: {0}")]
    Topic(#[from] TopicError),
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// 2 for a bad setting (as `run`), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Config(_) => 2,
            _ => 1,
        }
    }

    /// librdkafka refused the connection's properties.
    pub fn refused_property(error: rdkafka::error::KafkaError) -> Self {
        CommandError::Config(ConfigError::refused_property(error))
    }
}
