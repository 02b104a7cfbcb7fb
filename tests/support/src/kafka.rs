//! Kafka as a test sees it, apart from the witness: creating topics, reading
//! a topic to its end, and the consumer group's committed offsets.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::{random_hex, Record, TestEnv, DEADLINE, PARTITIONS};

/// Creates `topics` with [`PARTITIONS`] partitions each. It needs no tokio
/// runtime (`futures::executor::block_on` will do): librdkafka bounds the
/// request, broker lookup included.
pub async fn create_topics(bootstrap: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("Kafka admin client");
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .operation_timeout(Some(Duration::from_secs(20)));
    let created = admin
        .create_topics(&new_topics, &options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating topics on {bootstrap}: {e}; is Kafka running? \
                 Run `source scripts/services.sh`."
            )
        });
    for result in created {
        if let Err((topic, code)) = result {
            panic!("creating topic {topic}: {code}");
        }
    }
}

/// Everything on `topic` now: read from the beginning, without a consumer
/// group, up to the first partition-EOF of every partition. Not up to the
/// high watermark: Tansu reports the base offset of the last record batch
/// plus one, short of the end when that batch holds several records. One
/// topic per consumer, because a partition-EOF event names no topic.
///
/// It blocks: call it from a thread of its own or `spawn_blocking`.
pub fn read_to_end(bootstrap: &str, topic: &str) -> Vec<Record> {
    const LIMIT: Duration = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("aw-test-reader-{}", random_hex(12)))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("reader consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("reader partition");
    }
    consumer.assign(&tpl).expect("reader assign");
    let mut seen = Vec::new();
    let mut ended = HashSet::new();
    let deadline = Instant::now() + LIMIT;
    while ended.len() < PARTITIONS as usize {
        assert!(
            Instant::now() < deadline,
            "{topic}: no end of partition after {LIMIT:?}"
        );
        // Copy out at once: the borrowed message dies in this scope.
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => seen.push(Record::from_message(&m)),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    seen
}

// ------------------------------------------------------------- the group

/// A client in the worker's group that never subscribes: it reads and
/// commits the group's offsets without taking part in its rebalances.
pub fn group_consumer(env: &TestEnv) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap_servers)
        .set("group.id", &env.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer in the worker's group")
}

/// Every partition of `topics`, at `offset` if one is given.
fn partitions(topics: &[&str], offset: Option<i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for partition in 0..PARTITIONS {
            match offset {
                Some(o) => tpl
                    .add_partition_offset(topic, partition, Offset::Offset(o))
                    .expect("partition offset"),
                None => {
                    tpl.add_partition(topic, partition);
                }
            }
        }
    }
    tpl
}

/// The group's committed offset of every partition of `topics` (-1: none),
/// asked of the group coordinator.
pub fn committed_offsets(
    env: &TestEnv,
    topics: &[&str],
) -> Result<BTreeMap<(String, i32), i64>, String> {
    let consumer = group_consumer(env);
    let tpl = consumer
        .committed_offsets(partitions(topics, None), Duration::from_secs(20))
        .map_err(|e| format!("committed offsets: {e}"))?;
    Ok(tpl
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            ((e.topic().to_owned(), e.partition()), offset)
        })
        .collect())
}

/// Commits offset 0 for every partition of `topics` in the worker's group
/// (no worker running), and waits until it reads back.
pub async fn rewind_group(env: &TestEnv, topics: &[&str]) {
    env.eventually("the group's offsets rewound to 0", DEADLINE, || async {
        let consumer = group_consumer(env);
        consumer
            .commit(&partitions(topics, Some(0)), CommitMode::Sync)
            .map_err(|e| format!("commit: {e}"))?;
        drop(consumer);
        let now = committed_offsets(env, topics)?;
        Ok::<_, String>(now.values().all(|o| *o == 0).then_some(()))
    })
    .await
}
