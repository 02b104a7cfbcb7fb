//! How far the whole consumer group has read a topic: the messages between
//! the group's committed offset and the end of each partition of it, summed.
//! The unknown-reference window asks this of the topic that brings
//! references (contract §5): an instance that holds none of its partitions,
//! or only some, must not count time while another member has not read
//! them (a restart, a backlog, a member that lags).
//!
//! Committed offsets trail what was handled by the auto-commit interval, so
//! this errs on the side of "not caught up" for a few seconds after a
//! member handled something; a broker whose end offsets lag the true end
//! (by a batch, seen here) errs the other way, for as long as that lag.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

/// Unread messages of `topic` for the consumer's group, on the partitions
/// other members hold (or nobody does): for each, its end minus the group's
/// committed offset (from its start when nothing is committed), summed.
/// The partitions assigned to this consumer are left out: what it has read
/// of them is known sooner from its own position (the caller's statistics)
/// than from commits, which trail it by the auto-commit interval.
/// Blocking: a metadata request, an offset fetch, and a watermark request
/// per partition, each bounded by `timeout`.
pub(crate) fn group_unread<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i64, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mine: Vec<i32> = consumer
        .assignment()?
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| !mine.contains(p))
        .collect();
    if partitions.is_empty() {
        // All of them here, or the topic is not there (yet): the consumer's
        // own statistics and errors speak of those.
        return Ok(0);
    }
    let mut asked = TopicPartitionList::new();
    for partition in &partitions {
        asked.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(asked, timeout)?;
    let mut unread = 0;
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        let from = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low);
        unread += partition_unread(from.max(low), high);
    }
    Ok(unread)
}

fn partition_unread(from: i64, end: i64) -> i64 {
    (end - from).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_read_to_its_end_or_past_it_has_nothing_unread() {
        assert_eq!(partition_unread(10, 10), 0);
        assert_eq!(partition_unread(12, 10), 0, "an end that lags the commit");
        assert_eq!(partition_unread(7, 10), 3);
    }
}
