//! What the commands that read topics without joining a group share
//! (`replay-dead-letters`, and `watch` among the tools): their consumers
//! `assign` partitions and poll for each one's end, so the end of a
//! partition is news to them, not an error.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Sends librdkafka's logs and errors to `tracing`, but for the end of a
/// partition, which these readers poll for.
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::kafka::log_to_tracing(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::warn!(target: "librdkafka", %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for ReaderContext {}

/// The settings of a reader: a consumer that is given its partitions
/// (`assign`) and never joins `group` (librdkafka requires one all the
/// same), stores and commits nothing, and reports the end of each partition.
/// Properties the operator passes are set after these, and win.
pub fn reader_settings(group: &str) -> [(&'static str, &str); 5] {
    [
        ("group.id", group),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "true"),
        ("fetch.wait.max.ms", "100"),
    ]
}

/// Why the partitions of a topic could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0} does not exist (scripts/run.sh creates the default topics)")]
    Missing(String),
    #[error("cannot read topic {topic}: {reason}")]
    Unreadable { topic: String, reason: String },
}

/// The partitions of `topic`; an error naming it when it does not exist.
/// Blocking (a metadata request of at most 15 s).
pub fn partition_ids(
    consumer: &BaseConsumer<ReaderContext>,
    topic: &str,
) -> Result<Vec<i32>, TopicError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(|e| TopicError::Unreadable {
            topic: topic.to_owned(),
            reason: e.to_string(),
        })?;
    let missing = || TopicError::Missing(topic.to_owned());
    let meta = metadata.topics().first().ok_or_else(missing)?;
    if let Some(error) = meta.error() {
        let code = RDKafkaErrorCode::from(error);
        return Err(if code == RDKafkaErrorCode::UnknownTopicOrPartition {
            missing()
        } else {
            TopicError::Unreadable {
                topic: topic.to_owned(),
                reason: code.to_string(),
            }
        });
    }
    let ids: Vec<i32> = meta.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        return Err(missing());
    }
    Ok(ids)
}
