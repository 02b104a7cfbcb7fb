//! What a test reads from a topic: a record with its key, value and headers,
//! and the deliveries of what it produced.

use std::collections::HashSet;

use rdkafka::message::{Headers, Message};
use serde_json::Value;

/// One record read back from Kafka, owned (no borrowed message outlives a poll).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// `None` is a header with a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub(crate) fn from_message<M: Message>(m: &M) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The first header of that name, as (lossy) UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }

    /// How many headers have that name.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }

    /// The value as JSON, `Value::Null` if it is not JSON.
    pub fn json(&self) -> Value {
        self.value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or(Value::Null)
    }

    /// A JSON string field of the value, "" if absent.
    pub fn field(&self, name: &str) -> String {
        match self.json().get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }

    pub fn ce_id(&self) -> Option<String> {
        self.header("ce_id")
    }

    /// One line for failure messages.
    pub fn summary(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| {
                format!(
                    "{n}={}",
                    String::from_utf8_lossy(v.as_deref().unwrap_or_default())
                )
            })
            .collect();
        format!(
            "{}[{}]@{} key={:?} value={} headers={{{}}}",
            self.topic,
            self.partition,
            self.offset,
            self.key_str(),
            self.value_str(),
            headers.join(", ")
        )
    }
}

/// The records of one topic.
pub fn on<'a>(records: &'a [Record], topic: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
    records.iter().filter(move |r| r.topic == topic)
}

/// The distinct `ce_id`s on one topic.
pub fn distinct_ids(records: &[Record], topic: &str) -> HashSet<String> {
    on(records, topic).filter_map(Record::ce_id).collect()
}

/// Where the producer put a message, from its delivery report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}
