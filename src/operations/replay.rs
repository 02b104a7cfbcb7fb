//! `allocation-worker replay-dead-letters`: publish dead letters again to the
//! topic they came from, once their cause is fixed (a product created late, a
//! corrected ERP record).
//!
//! - **Reading.** A consumer of its own `assign`s every partition of the
//!   dead-letter topic from the beginning: no consumer group is joined and
//!   nothing is committed, so a replay can be repeated, and two operators do
//!   not steal partitions from each other. A partition is read to its first
//!   partition-EOF, which is where the broker says it ends when the replay
//!   starts (Tansu's high watermark from ListOffsets can be short of the end,
//!   so it is only a fallback, see [`read_letters`]). A letter written while
//!   the replay runs may be missed: run it again.
//! - **Selecting.** `--reason`, `--topic` (the original topic), `--since`
//!   (inclusive) and `--until` (exclusive) on the dead letter's record
//!   timestamp; every filter given must match.
//! - **Publishing.** Everything is read before anything is sent, so a letter
//!   dead-lettered again during the replay is never replayed in the same run.
//!   Each selected letter goes to `dlq.original.topic`, partition
//!   `dlq.original.partition`, with its key, value and headers minus the
//!   `dlq.*` ones, a `ce_id` derived from the original message (UUIDv5 of
//!   its own `ce_id` when it had one, else of its original
//!   `topic/partition/offset`): the worker's idempotency key, so a letter
//!   that is in the dead-letter topic twice (publishing is at least once),
//!   or is replayed twice, is applied once. It also gets `replayed-from:
//!   topic/partition/offset` (the dead letter) and
//!   `replay.original-position: topic/partition/offset` (where the message
//!   was first read, kept across replays), by which the worker never lets a
//!   replayed quantity change overwrite a later one. Every delivery report
//!   is awaited; the last line on stdout says how many were sent.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::adapters::kafka::to_inbound;
use crate::adapters::topic_reader::{partition_ids, reader_settings, ReaderContext};
use crate::command_error::CommandError;
use crate::configuration::{topic, Connection};

/// The header that names the dead letter a replayed message came from.
pub(crate) const REPLAYED_FROM_HEADER: &str = "replayed-from";

/// The header that says where a replayed message was first read
/// (`topic/partition/offset`), kept when it is dead-lettered and replayed
/// again. The worker compares it with the last quantity change it applied to
/// the batch (contract §7).
pub(crate) use crate::adapters::inbound::REPLAY_ORIGINAL_POSITION_HEADER;

/// Namespace of the replayed messages' `ce_id`s (UUIDv5), distinct from the
/// one of the events the worker publishes.
const REPLAY_CE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7e2d_91c4_3b5a_4c0f_8d36_1f9e_52a8_d0b7);

/// How long reading may go without a record or an end of partition before
/// the replay gives up (the broker is unreachable, or the topic stalled).
const READ_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a partition that has reached the high watermark read at start may
/// stay silent before it counts as read, when no partition-EOF comes.
const QUIET_AT_WATERMARK: Duration = Duration::from_secs(5);

/// Which letters to replay. An empty list selects any value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    pub(crate) reasons: Vec<String>,
    pub(crate) topics: Vec<String>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) until: Option<DateTime<Utc>>,
}

/// Everything the replay needs, validated.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub(crate) connection: Connection,
    pub(crate) dead_letter_topic: String,
    pub(crate) selection: Selection,
    pub(crate) dry_run: bool,
}

// ------------------------------------------------------------------ letters

/// One record of the dead-letter topic, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Letter {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The record's timestamp: when it was dead-lettered.
    pub(crate) time: Option<DateTime<Utc>>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    /// `None` is a header with a null value.
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Letter {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.header("dlq.reason")
    }

    pub(crate) fn original_topic(&self) -> Option<String> {
        self.header("dlq.original.topic")
    }

    fn original_partition(&self) -> Option<i32> {
        self.header("dlq.original.partition")?.trim().parse().ok()
    }

    /// Whether `selection` picks this letter.
    pub(crate) fn selected_by(&self, selection: &Selection) -> bool {
        let reason_ok = selection.reasons.is_empty()
            || self
                .reason()
                .is_some_and(|r| selection.reasons.contains(&r));
        let topic_ok = selection.topics.is_empty()
            || self
                .original_topic()
                .is_some_and(|t| selection.topics.contains(&t));
        let since_ok = selection
            .since
            .is_none_or(|since| self.time.is_some_and(|t| t >= since));
        let until_ok = selection
            .until
            .is_none_or(|until| self.time.is_some_and(|t| t < until));
        reason_ok && topic_ok && since_ok && until_ok
    }

    /// Why this letter cannot be published again, if it cannot.
    pub(crate) fn unreplayable(&self) -> Option<&'static str> {
        match self.original_topic() {
            None => Some("no dlq.original.topic header"),
            Some(t) if topic("", &t).is_err() => Some("dlq.original.topic is not a topic name"),
            Some(_) if self.header("dlq.value-omitted").is_some() => {
                Some("its value was too large for the dead-letter topic (dlq.value-omitted)")
            }
            Some(_) => None,
        }
    }

    /// The `ce_id` of this letter's replay, derived from the original
    /// message: its own `ce_id` when it had one, else its original
    /// `topic/partition/offset`; the same for every copy of the letter and
    /// on every replay. Not the original `ce_id` itself: the worker recorded
    /// that one as handled when it dead-lettered the message. A letter that
    /// names no origin falls back to its own position.
    pub(crate) fn replay_ce_id(&self, dead_letter_topic: &str) -> String {
        let name = match (self.original_ce_id(), self.original_position()) {
            (Some(id), _) => format!("ce_id:{id}"),
            (None, Some(position)) => position,
            (None, None) => self.position(dead_letter_topic),
        };
        Uuid::new_v5(&REPLAY_CE_ID_NAMESPACE, name.as_bytes()).to_string()
    }

    /// The original message's `ce_id`, when it had a usable one (as the
    /// worker reads it: clean text, not blank).
    fn original_ce_id(&self) -> Option<String> {
        let (_, value) = self.headers.iter().find(|(n, _)| n == "ce_id")?;
        let id = std::str::from_utf8(value.as_deref()?).ok()?;
        (!id.trim().is_empty() && !id.contains('\0') && id.len() <= 1024).then(|| id.to_owned())
    }

    /// `topic/partition/offset` the dead-lettered message was read at.
    fn original_position(&self) -> Option<String> {
        let offset: i64 = self.header("dlq.original.offset")?.trim().parse().ok()?;
        Some(format!(
            "{}/{}/{offset}",
            self.original_topic()?,
            self.original_partition()?
        ))
    }

    /// Where the message was first read: carried over from an earlier
    /// replay, else the letter's original position.
    fn first_position(&self) -> Option<String> {
        self.header(REPLAY_ORIGINAL_POSITION_HEADER)
            .or_else(|| self.original_position())
    }

    /// `topic/partition/offset` of the dead letter.
    pub(crate) fn position(&self, dead_letter_topic: &str) -> String {
        format!("{dead_letter_topic}/{}/{}", self.partition, self.offset)
    }

    /// The headers of the replayed message: the letter's without `dlq.*`,
    /// and without the `ce_id`, `replayed-from` and original position of an
    /// earlier life, then the new `ce_id`, `replayed-from` and the first
    /// original position.
    pub(crate) fn replay_headers(&self, dead_letter_topic: &str) -> Vec<(String, Option<Vec<u8>>)> {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = self
            .headers
            .iter()
            .filter(|(name, _)| {
                !name.starts_with("dlq.")
                    && name != "ce_id"
                    && name != REPLAYED_FROM_HEADER
                    && name != REPLAY_ORIGINAL_POSITION_HEADER
            })
            .cloned()
            .collect();
        headers.push((
            "ce_id".to_owned(),
            Some(self.replay_ce_id(dead_letter_topic).into_bytes()),
        ));
        headers.push((
            REPLAYED_FROM_HEADER.to_owned(),
            Some(self.position(dead_letter_topic).into_bytes()),
        ));
        if let Some(first) = self.first_position() {
            headers.push((
                REPLAY_ORIGINAL_POSITION_HEADER.to_owned(),
                Some(first.into_bytes()),
            ));
        }
        headers
    }

    /// One line for the listing: position, time, reason, original position,
    /// error.
    pub(crate) fn line(&self, dead_letter_topic: &str) -> String {
        let unknown = || "?".to_owned();
        format!(
            "{} {} {} {}/{}/{} {}",
            self.position(dead_letter_topic),
            self.time
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
                .unwrap_or_else(unknown),
            self.reason().unwrap_or_else(unknown),
            self.original_topic().unwrap_or_else(unknown),
            self.header("dlq.original.partition")
                .unwrap_or_else(unknown),
            self.header("dlq.original.offset").unwrap_or_else(unknown),
            self.header("dlq.error")
                .unwrap_or_default()
                .replace(['\n', '\r'], " "),
        )
    }
}

// ----------------------------------------------------------------- reading

/// Every letter of the dead-letter topic, up to where each partition ended
/// when reading began. Blocking.
///
/// A partition is read when its first partition-EOF arrives. Should none
/// come, a partition whose position reached the high watermark fetched at
/// start and that stayed silent for [`QUIET_AT_WATERMARK`] counts as read too.
fn read_letters(
    connection: &Connection,
    dead_letter_topic: &str,
) -> Result<Vec<Letter>, CommandError> {
    let group = format!(
        "allocation-worker-replay-{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let consumer: BaseConsumer<ReaderContext> = connection
        .client_config(&reader_settings(&group))
        .create_with_context(ReaderContext)
        .map_err(CommandError::refused_property)?;
    let ids = partition_ids(&consumer, dead_letter_topic)?;
    let mut high = HashMap::new();
    for id in &ids {
        let (_, h) = consumer
            .fetch_watermarks(dead_letter_topic, *id, Duration::from_secs(15))
            .map_err(|e| {
                CommandError::Kafka(format!(
                    "cannot read the end of {dead_letter_topic}/{id}: {e}"
                ))
            })?;
        high.insert(*id, h);
    }
    let mut assignment = TopicPartitionList::new();
    for id in &ids {
        assignment
            .add_partition_offset(dead_letter_topic, *id, Offset::Beginning)
            .map_err(|e| CommandError::Kafka(e.to_string()))?;
    }
    consumer.assign(&assignment).map_err(|e| {
        CommandError::Kafka(format!(
            "cannot assign the partitions of {dead_letter_topic}: {e}"
        ))
    })?;

    // Next offset to read, per partition not yet read to its end.
    let mut reading: HashMap<i32, i64> = ids.iter().map(|&id| (id, 0)).collect();
    let mut letters = Vec::new();
    let mut last_progress = Instant::now();
    let mut last_error = String::new();
    while !reading.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                last_progress = Instant::now();
                // Copied at once: no borrowed message outlives the poll. Header
                // names are read as the worker reads them (a producer's name
                // that is not UTF-8 would make rdkafka's iterator panic).
                let time = message
                    .timestamp()
                    .to_millis()
                    .and_then(DateTime::<Utc>::from_timestamp_millis);
                let record = to_inbound(&message);
                let letter = Letter {
                    partition: record.partition,
                    offset: record.offset,
                    time,
                    key: record.key,
                    value: record.payload,
                    headers: record.headers,
                };
                if let Some(next) = reading.get_mut(&letter.partition) {
                    *next = letter.offset + 1;
                    letters.push(letter);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                last_progress = Instant::now();
                reading.remove(&partition);
            }
            Some(Err(error)) => {
                let error = error.to_string();
                if error != last_error {
                    tracing::warn!(%error, "reading the dead-letter topic");
                    last_error = error;
                }
            }
        }
        let quiet = last_progress.elapsed();
        if quiet >= QUIET_AT_WATERMARK {
            reading.retain(|id, next| *next < high.get(id).copied().unwrap_or(0));
        }
        if !reading.is_empty() && quiet >= READ_STALL_TIMEOUT {
            let mut left: Vec<String> = reading
                .keys()
                .map(|id| format!("{dead_letter_topic}/{id}"))
                .collect();
            left.sort();
            return Err(CommandError::Kafka(format!(
                "nothing read for {READ_STALL_TIMEOUT:?} before the end of {}{}",
                left.join(", "),
                if last_error.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last_error})")
                }
            )));
        }
    }
    letters.sort_by_key(|l| (l.partition, l.offset));
    Ok(letters)
}

// -------------------------------------------------------------- publishing

/// Sends every letter and waits for every delivery report; returns how many
/// the broker acknowledged and the first error.
async fn publish(
    settings: &ReplaySettings,
    letters: &[&Letter],
) -> Result<(usize, Option<String>), CommandError> {
    let producer: FutureProducer = settings
        .connection
        .client_config(&[
            // Retries never duplicate nor reorder within a partition.
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("message.max.bytes", "16777216"),
            ("message.timeout.ms", "30000"),
        ])
        .create()
        .map_err(CommandError::refused_property)?;
    let topic = &settings.dead_letter_topic;
    // Owned here: every record borrows its topic until it is queued.
    let targets: Vec<(&Letter, String)> = letters
        .iter()
        .filter_map(|l| Some((*l, l.original_topic()?)))
        .collect();
    let mut deliveries = Vec::with_capacity(targets.len());
    let mut first_error: Option<String> = None;
    for (letter, original_topic) in &targets {
        let headers = letter.replay_headers(topic);
        let owned = headers.iter().fold(
            OwnedHeaders::new_with_capacity(headers.len()),
            |hs, (name, value)| {
                hs.insert(Header {
                    key: name.as_str(),
                    value: value.as_deref(),
                })
            },
        );
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(original_topic).headers(owned);
        // Back where it came from; the partitioner decides only when the
        // letter does not say.
        if let Some(partition) = letter.original_partition() {
            record = record.partition(partition);
        }
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &letter.value {
            record = record.payload(value.as_slice());
        }
        let position = letter.position(topic);
        // Queued at once, all of them; the reports are awaited below. A full
        // queue drains as the broker acknowledges.
        let queued_by = Instant::now() + Duration::from_secs(30);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push((position, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < queued_by =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((error, _)) => {
                    tracing::error!(%error, letter = %position, "replay not queued");
                    first_error.get_or_insert_with(|| format!("{position}: {error}"));
                    break;
                }
            }
        }
    }
    let mut sent = 0;
    for (position, delivery) in deliveries {
        let error = match delivery.await {
            Ok(Ok(_)) => {
                sent += 1;
                continue;
            }
            Ok(Err((error, _))) => error.to_string(),
            Err(_) => "the producer went away".to_owned(),
        };
        tracing::error!(%error, letter = %position, "replay not delivered");
        first_error.get_or_insert_with(|| format!("{position}: {error}"));
    }
    Ok((sent, first_error))
}

/// `allocation-worker replay-dead-letters`.
pub async fn run(settings: ReplaySettings) -> Result<(), CommandError> {
    let reader_settings = settings.clone();
    let letters = tokio::task::spawn_blocking(move || {
        read_letters(
            &reader_settings.connection,
            &reader_settings.dead_letter_topic,
        )
    })
    .await
    .map_err(|e| CommandError::Failed(format!("the reader failed: {e}")))??;
    let topic = &settings.dead_letter_topic;
    let selected: Vec<&Letter> = letters
        .iter()
        .filter(|l| l.selected_by(&settings.selection))
        .collect();
    let mut stdout = std::io::stdout().lock();
    let mut replayable = Vec::with_capacity(selected.len());
    for letter in &selected {
        match letter.unreplayable() {
            Some(why) => {
                let _ = writeln!(stdout, "skip {} ({why})", letter.line(topic));
            }
            None => {
                let _ = writeln!(stdout, "{}", letter.line(topic));
                replayable.push(*letter);
            }
        }
    }
    let skipped = selected.len() - replayable.len();
    if settings.dry_run {
        let _ = writeln!(
            stdout,
            "dry run: {} of {} dead letters selected, {skipped} of them cannot be replayed; sent 0",
            selected.len(),
            letters.len()
        );
        return Ok(());
    }
    drop(stdout);
    let (sent, error) = publish(&settings, &replayable).await?;
    println!(
        "sent {sent} of {} selected dead letters ({} read, {skipped} skipped)",
        selected.len(),
        letters.len()
    );
    match error {
        None => Ok(()),
        Some(error) => Err(CommandError::Failed(format!(
            "{} dead letters not delivered, first: {error}; replaying again is safe",
            replayable.len() - sent
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(headers: &[(&str, &str)], millis: i64) -> Letter {
        Letter {
            partition: 2,
            offset: 17,
            time: DateTime::from_timestamp_millis(millis),
            key: Some(b"sku-1".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    const DEAD: &[(&str, &str)] = &[
        ("traceparent", "00-abc"),
        ("ce_id", "erp-1"),
        ("dlq.reason", "unknown-sku"),
        ("dlq.error", "no product sku-1"),
        ("dlq.original.topic", "erp.allocation-required"),
        ("dlq.original.partition", "1"),
        ("dlq.original.offset", "40"),
    ];

    #[test]
    fn replay_headers_drop_dlq_and_carry_a_stable_ce_id_and_the_position() {
        let l = letter(DEAD, 0);
        let headers = l.replay_headers("allocation.dead-letter");
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "traceparent",
                "ce_id",
                "replayed-from",
                "replay.original-position"
            ]
        );
        assert_eq!(
            headers[3].1.as_deref(),
            Some(b"erp.allocation-required/1/40".as_slice())
        );
        assert_eq!(
            headers[2].1.as_deref(),
            Some(b"allocation.dead-letter/2/17".as_slice())
        );
        let id = l.replay_ce_id("allocation.dead-letter");
        assert_eq!(headers[1].1.as_deref(), Some(id.as_bytes()));
        assert_eq!(id, letter(DEAD, 99).replay_ce_id("allocation.dead-letter"));
        assert_ne!(id, "erp-1", "the original ce_id is recorded as handled");
    }

    #[test]
    fn the_replay_ce_id_comes_from_the_original_message_not_the_letter() {
        let l = letter(DEAD, 0);
        let mut copy = letter(DEAD, 0);
        copy.partition = 0;
        copy.offset = 99;
        // Another copy of the same letter, elsewhere in the dead-letter topic.
        assert_eq!(
            l.replay_ce_id("allocation.dead-letter"),
            copy.replay_ce_id("allocation.dead-letter")
        );
        // Without a ce_id: the original position decides.
        let no_id: Vec<(&str, &str)> = DEAD
            .iter()
            .copied()
            .filter(|(n, _)| *n != "ce_id")
            .collect();
        let (a, mut b) = (letter(&no_id, 0), letter(&no_id, 0));
        b.offset = 3;
        assert_eq!(a.replay_ce_id("d"), b.replay_ce_id("d"));
        let mut moved = no_id.clone();
        moved.retain(|(n, _)| *n != "dlq.original.offset");
        moved.push(("dlq.original.offset", "41"));
        assert_ne!(a.replay_ce_id("d"), letter(&moved, 0).replay_ce_id("d"));
        // A replay dead-lettered again gets a new ce_id (the first is
        // recorded as handled) and keeps its first original position.
        let again: Vec<(String, Option<Vec<u8>>)> = l.replay_headers("d");
        let mut second = letter(&[], 0);
        second.headers = again;
        for (n, v) in [
            ("dlq.reason", "unknown-sku"),
            ("dlq.original.topic", "erp.allocation-required"),
            ("dlq.original.partition", "1"),
            ("dlq.original.offset", "77"),
        ] {
            second
                .headers
                .push((n.to_owned(), Some(v.as_bytes().to_vec())));
        }
        assert_ne!(second.replay_ce_id("d"), l.replay_ce_id("d"));
        let headers = second.replay_headers("d");
        let first: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n == REPLAY_ORIGINAL_POSITION_HEADER)
            .collect();
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].1.as_deref(),
            Some(b"erp.allocation-required/1/40".as_slice())
        );
        assert_eq!(l.original_partition(), Some(1));
    }

    #[test]
    fn every_filter_given_must_match() {
        let l = letter(DEAD, 1_000);
        let at = |ms| DateTime::from_timestamp_millis(ms);
        let mut s = Selection::default();
        assert!(l.selected_by(&s));
        s.reasons = vec!["unknown-batch".into(), "unknown-sku".into()];
        assert!(l.selected_by(&s));
        s.topics = vec!["erp.batch-created".into()];
        assert!(!l.selected_by(&s));
        s.topics.push("erp.allocation-required".into());
        assert!(l.selected_by(&s));
        s.since = at(1_000);
        s.until = at(1_001);
        assert!(l.selected_by(&s), "since inclusive");
        s.until = at(1_000);
        assert!(!l.selected_by(&s), "until exclusive");
        s.until = None;
        s.since = at(1_001);
        assert!(!l.selected_by(&s));
    }

    #[test]
    fn a_letter_without_origin_or_value_is_not_replayed() {
        assert_eq!(letter(DEAD, 0).unreplayable(), None);
        assert!(letter(&[("dlq.reason", "unknown-sku")], 0)
            .unreplayable()
            .is_some());
        let mut omitted = DEAD.to_vec();
        omitted.push(("dlq.value-omitted", "2000000 bytes"));
        assert!(letter(&omitted, 0).unreplayable().is_some());
    }
}
