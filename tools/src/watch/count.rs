//! Counting: the records on the four watched topics, read by consumers of
//! the watch's own, and the progress of a simulator running alongside.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use allocation_worker::adapters::topic_reader::{partition_ids, reader_settings, ReaderContext};
use allocation_worker::command_error::CommandError;
use allocation_worker::configuration::Connection;

/// Records seen on the four watched topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub allocated: u64,
    pub deallocated: u64,
    pub out_of_stock: u64,
    pub dead_letters: u64,
}

impl Totals {
    pub(super) fn as_array(self) -> [u64; 4] {
        [
            self.allocated,
            self.deallocated,
            self.out_of_stock,
            self.dead_letters,
        ]
    }
}

/// What a simulator running alongside has done, shared with the summary.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages the broker acknowledged.
    pub sent: AtomicU64,
    /// Messages that could not be delivered.
    pub failed: AtomicU64,
    /// How many will be sent, when known.
    pub planned: Option<u64>,
    /// Set once the last message was delivered (or given up on).
    pub done: AtomicBool,
}

/// Counts the records of the watched topics: one consumer per topic (a
/// partition-EOF event names only the partition), each on its own thread.
///
/// Where a partition ends is learnt from the consumer's first partition-EOF
/// event, not from the broker's high watermark: Tansu reports the base offset
/// of the last record batch plus one, short of the real end when that batch
/// holds several records. From the end, records before the first EOF were
/// there at start and are not counted.
pub(super) struct Counter {
    counts: Arc<[AtomicU64; 4]>,
    /// Partitions whose end (as of start) was reached.
    ended: Arc<AtomicU64>,
    pub(super) partitions: u64,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Counter {
    /// Assigns every partition of `topics`, from the beginning or the end.
    /// Blocking (metadata requests).
    pub(super) fn start(
        connection: &Connection,
        topics: &[String; 4],
        from_beginning: bool,
    ) -> Result<Self, CommandError> {
        let group = format!(
            "allocation-worker-watch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let ended = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut consumers = Vec::new();
        let mut partitions = 0;
        for (index, topic) in topics.iter().enumerate() {
            let consumer: BaseConsumer<ReaderContext> = connection
                .client_config(&reader_settings(&group))
                .create_with_context(ReaderContext)
                .map_err(CommandError::refused_property)?;
            let ids = partition_ids(&consumer, topic)?;
            let mut assignment = TopicPartitionList::new();
            let offset = if from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            };
            for id in &ids {
                assignment
                    .add_partition_offset(topic, *id, offset)
                    .map_err(|e| CommandError::Kafka(e.to_string()))?;
            }
            consumer.assign(&assignment).map_err(|e| {
                CommandError::Kafka(format!("cannot assign the partitions of {topic}: {e}"))
            })?;
            partitions += ids.len() as u64;
            consumers.push((index, consumer, ids));
        }
        let mut threads = Vec::new();
        for (index, consumer, ids) in consumers {
            let (counts, ended, stop) = (counts.clone(), ended.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("watch-{index}"))
                .spawn(move || {
                    let mut at_end: HashMap<i32, bool> = ids.iter().map(|&p| (p, false)).collect();
                    let mut last_error = String::new();
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(100)) {
                            None => {}
                            Some(Ok(message)) => {
                                // Only the partition is kept: no borrowed
                                // message outlives the poll.
                                let reached = at_end.get(&message.partition()).copied();
                                if from_beginning || reached == Some(true) {
                                    counts[index].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Err(KafkaError::PartitionEOF(partition))) => {
                                if let Some(reached @ false) = at_end.get_mut(&partition) {
                                    *reached = true;
                                    ended.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Err(error)) => {
                                let error = error.to_string();
                                if error != last_error {
                                    tracing::warn!(%error, "watch: reading the topics");
                                    last_error = error;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| CommandError::Failed(format!("cannot start a thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            counts,
            ended,
            partitions,
            stop,
            threads,
        })
    }

    pub(super) fn totals(&self) -> Totals {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Totals {
            allocated: c(0),
            deallocated: c(1),
            out_of_stock: c(2),
            dead_letters: c(3),
        }
    }

    /// Every partition was read up to where it ended at start.
    pub(super) fn caught_up(&self) -> bool {
        self.ended.load(Ordering::Relaxed) >= self.partitions
    }

    pub(super) async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}
