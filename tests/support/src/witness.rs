//! The witness: a consumer that reads every outbound topic of a test from
//! the beginning, for assertions on what the worker published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::{random_hex, Record, PARTITIONS};

/// Reads every partition of the outbound topics from the beginning, on its own
/// thread, without a consumer group (plain `assign`), and keeps every record
/// in arrival order.
pub struct Witness {
    records: Arc<Mutex<Vec<Record>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Witness {
    pub(crate) fn start(bootstrap: &str, topics: &[&str]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            // Required by librdkafka, never used to join: no subscribe().
            .set("group.id", format!("aw-test-witness-{}", random_hex(12)))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("witness consumer");
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..PARTITIONS {
                tpl.add_partition_offset(topic, partition, Offset::Beginning)
                    .expect("witness partition");
            }
        }
        consumer.assign(&tpl).expect("witness assign");
        drop(tpl);

        let records = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (records, errors, stop) = (records.clone(), errors.clone(), stop.clone());
            std::thread::Builder::new()
                .name("e2e-witness".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Copy out at once: the borrowed message dies in this scope.
                        match consumer.poll(Duration::from_millis(100)) {
                            None => {}
                            Some(Ok(m)) => records.lock().unwrap().push(Record::from_message(&m)),
                            Some(Err(e)) => errors.lock().unwrap().push(e.to_string()),
                        }
                    }
                    drop(consumer);
                })
                .expect("witness thread")
        };
        Self {
            records,
            errors,
            stop,
            thread: Some(thread),
        }
    }

    /// Everything seen so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop();
    }
}
