//! The transactional outbox: what the worker will publish, as rows written in
//! the same transaction as the change that caused them. This module turns
//! domain events and dead letters into those rows, with their CloudEvents
//! headers (Kafka binding, binary mode) decided once, at decision time. An
//! event's row stores only the headers that differ from event to event; the
//! relay adds the constant ones when it publishes ([`wire_headers`]).

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{SecondsFormat, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::inbound::{InboundMessage, MessageContext};
use crate::domain::Event;
use crate::service_layer::DeadLetterReason;

/// `ce_source` of every event this service publishes.
pub const CE_SOURCE: &str = "allocation-worker";

/// Namespace of the name-based (v5) UUIDs used as `ce_id`.
const CE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c1f_3a8e_0d6b_4f4e_9c1e_2a7b_6d40_a11c);

/// Where a row is published; the topic name is looked up at publish time, so a
/// renamed topic applies to rows not yet sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxKind {
    Allocated,
    Deallocated,
    OutOfStock,
    DeadLetter,
}

impl OutboxKind {
    pub(crate) const ALL: [OutboxKind; 4] = [
        OutboxKind::Allocated,
        OutboxKind::Deallocated,
        OutboxKind::OutOfStock,
        OutboxKind::DeadLetter,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Allocated => "Allocated",
            OutboxKind::Deallocated => "Deallocated",
            OutboxKind::OutOfStock => "OutOfStock",
            OutboxKind::DeadLetter => "DeadLetter",
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == value)
    }

    /// The `ce_type` of an event's kind; `None` for a dead letter, which
    /// carries the inbound message's headers instead.
    pub(crate) fn ce_type(self) -> Option<&'static str> {
        match self {
            OutboxKind::Allocated => Some("allocation.Allocated"),
            OutboxKind::Deallocated => Some("allocation.Deallocated"),
            OutboxKind::OutOfStock => Some("allocation.OutOfStock"),
            OutboxKind::DeadLetter => None,
        }
    }
}

/// One Kafka record to publish, minus its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub kind: OutboxKind,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The record of a domain event. `ce_id` is derived from the inbound message's
/// idempotency key and the event's position among the events it caused, so the
/// same decision always carries the same id, even when decided again after a
/// crash or a concurrency retry.
pub fn event_record(event: &Event, context: &MessageContext, position: usize) -> OutboxRecord {
    let (kind, payload) = match event {
        Event::Allocated(e) => (
            OutboxKind::Allocated,
            json!({"orderid": e.orderid.as_str(), "sku": e.sku.as_str(), "qty": e.qty, "batchref": e.batchref.as_str()}),
        ),
        Event::Deallocated(e) => (
            OutboxKind::Deallocated,
            json!({"orderid": e.orderid.as_str(), "sku": e.sku.as_str(), "qty": e.qty}),
        ),
        Event::OutOfStock(e) => (
            OutboxKind::OutOfStock,
            json!({"sku": e.sku.as_str(), "orderid": e.orderid.as_str(), "qty": e.qty}),
        ),
    };
    let ce_id = Uuid::new_v5(
        &CE_ID_NAMESPACE,
        format!("{}#{position}", context.idempotency_key).as_bytes(),
    );
    // What differs from event to event; wire_headers adds the rest.
    let mut headers = vec![
        ("ce_id".to_owned(), ce_id.to_string().into_bytes()),
        (
            "ce_time".to_owned(),
            Utc::now()
                .to_rfc3339_opts(SecondsFormat::Micros, true)
                .into_bytes(),
        ),
    ];
    if let Some(traceparent) = &context.traceparent {
        headers.push(("traceparent".to_owned(), traceparent.clone()));
        if let Some(tracestate) = &context.tracestate {
            headers.push(("tracestate".to_owned(), tracestate.clone()));
        }
    }
    OutboxRecord {
        kind,
        key: Some(event.sku().as_str().as_bytes().to_vec()),
        payload: Some(payload.to_string().into_bytes()),
        headers,
    }
}

/// The headers of an outbox row as published. An event's row stores
/// `ce_id`, `ce_time` and `traceparent` only; the CloudEvents headers that
/// are the same for every event of its kind (`ce_specversion`, `ce_type`,
/// `ce_source`, `content-type`) are added here, which saves about 130 of a
/// row's 400 bytes. Dead letters, and event rows stored with every header
/// (by versions before this one), are published as stored.
pub fn wire_headers<'a>(
    kind: OutboxKind,
    stored: Vec<(&'a str, &'a [u8])>,
) -> Vec<(&'a str, &'a [u8])> {
    let Some(ce_type) = kind.ce_type() else {
        return stored;
    };
    if stored.iter().any(|(name, _)| *name == "ce_specversion") {
        return stored;
    }
    let mut wire = Vec::with_capacity(stored.len() + 4);
    let (mut id, mut time, mut rest) = (None, None, Vec::new());
    for header in stored {
        match header.0 {
            "ce_id" => id = Some(header),
            "ce_time" => time = Some(header),
            _ => rest.push(header),
        }
    }
    wire.push(("ce_specversion", b"1.0".as_slice()));
    wire.extend(id);
    wire.push(("ce_type", ce_type.as_bytes()));
    wire.push(("ce_source", CE_SOURCE.as_bytes()));
    wire.extend(time);
    wire.push(("content-type", b"application/json".as_slice()));
    wire.extend(rest);
    wire
}

/// The dead letter of `message`: its key, value and headers as they came,
/// plus why it was rejected and where it came from.
pub fn dead_letter_record(
    message: &InboundMessage,
    reason: DeadLetterReason,
    error: &str,
) -> OutboxRecord {
    let mut headers: Vec<(String, Vec<u8>)> = message
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), v.clone().unwrap_or_default()))
        .collect();
    headers.extend([
        ("dlq.reason".to_owned(), reason.as_str().as_bytes().to_vec()),
        (
            "dlq.error".to_owned(),
            truncate(error, MAX_DLQ_ERROR).as_bytes().to_vec(),
        ),
        (
            "dlq.original.topic".to_owned(),
            message.topic.as_bytes().to_vec(),
        ),
        (
            "dlq.original.partition".to_owned(),
            message.partition.to_string().into_bytes(),
        ),
        (
            "dlq.original.offset".to_owned(),
            message.offset.to_string().into_bytes(),
        ),
    ]);
    OutboxRecord {
        kind: OutboxKind::DeadLetter,
        key: message.key.clone(),
        payload: message.payload.clone(),
        headers,
    }
}

/// How many shards the outbox has: the modulus in `outbox_shard()`
/// (migration `20261206000020`). Changing it needs a migration that
/// rewrites the pending rows' shards, with every relay stopped.
pub(crate) const SHARDS: i16 = 32;

/// The outbox shard of a message key, as the database's `outbox_shard()`
/// computes it (migration `20261206000020`): the first byte of the key's
/// SHA-256, modulo [`SHARDS`]. A service test compares the two.
pub fn shard_of(key: Option<&[u8]>) -> i16 {
    let digest = Sha256::digest(key.unwrap_or_default());
    i16::from(digest[0] % SHARDS as u8)
}

// A shard is a bit of a u32 in WrittenShards.
const _: () = assert!(SHARDS as u32 <= u32::BITS);

/// The bit of `shard` in a set of shards ([`WrittenShards`], the relay's).
pub(crate) fn shard_bit(shard: i16) -> u32 {
    1 << (shard as u32 % u32::BITS)
}

/// The shards this process's worker has committed outbox rows to since its
/// relay last looked: a relay that holds every shard asks the database
/// only for those between its periodic passes over all of them (see the
/// relay's `pass`). A commit records its shards after it has committed, before it
/// wakes the relay.
#[derive(Debug, Default)]
pub struct WrittenShards(AtomicU32);

impl WrittenShards {
    /// Records that rows of `shard` were committed.
    pub fn record(&self, shard: i16) {
        self.0.fetch_or(shard_bit(shard), Ordering::Release);
    }

    /// Records the shards of the rows of `records`, once committed.
    pub(crate) fn record_rows(&self, records: &[OutboxRecord]) {
        let mut bits = 0u32;
        for record in records {
            bits |= shard_bit(shard_of(record.key.as_deref()));
        }
        if bits != 0 {
            self.0.fetch_or(bits, Ordering::Release);
        }
    }

    /// The shards recorded since the last call, one bit each; clears them.
    pub(crate) fn take(&self) -> u32 {
        self.0.swap(0, Ordering::Acquire)
    }
}

/// Header added to a dead letter whose value the broker refused as too large
/// (see the relay); the original stays at `dlq.original.*` on its topic.
pub(crate) const VALUE_OMITTED_HEADER: &str = "dlq.value-omitted";

/// Longest `dlq.error`: serde quotes the offending value, which can be huge.
const MAX_DLQ_ERROR: usize = 1024;

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// Outbox records as the columns of one set-based insert.
#[derive(Default)]
pub(crate) struct OutboxColumns<'a> {
    pub(crate) kinds: Vec<&'static str>,
    pub(crate) keys: Vec<Option<&'a [u8]>>,
    pub(crate) payloads: Vec<Option<&'a [u8]>>,
    pub(crate) headers: Vec<Vec<u8>>,
}

impl<'a> OutboxColumns<'a> {
    pub(crate) fn new(records: &'a [OutboxRecord]) -> Result<Self, HeaderTooLarge> {
        let mut columns = Self::default();
        for record in records {
            columns.kinds.push(record.kind.as_str());
            columns.keys.push(record.key.as_deref());
            columns.payloads.push(record.payload.as_deref());
            columns.headers.push(encode_headers(
                record
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_slice())),
            )?);
        }
        Ok(columns)
    }
}

/// A header name or value of 4 GiB or more, which the encoding cannot hold
/// (nor can Kafka).
#[derive(Debug, thiserror::Error)]
#[error("an outbox header of {0} bytes is too large to store")]
pub struct HeaderTooLarge(pub usize);

/// Headers as the outbox's `headers` column stores them: per header, the
/// name's length (u32, big-endian), the name, the value's length, the value.
/// (Migration `20261128000003` defines the same format and a SQL reader.)
pub fn encode_headers<'h>(
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> Result<Vec<u8>, HeaderTooLarge> {
    let mut out = Vec::new();
    for (name, value) in headers {
        for part in [name.as_bytes(), value] {
            let len = u32::try_from(part.len()).map_err(|_| HeaderTooLarge(part.len()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    Ok(out)
}

/// The headers of [`encode_headers`], borrowed from `encoded`; `None` if it
/// is not in that format (cut short, or a name that is not UTF-8).
pub fn decode_headers(encoded: &[u8]) -> Option<Vec<(&str, &[u8])>> {
    fn part<'e>(rest: &mut &'e [u8]) -> Option<&'e [u8]> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if tail.len() < len {
            return None;
        }
        let (part, tail) = tail.split_at(len);
        *rest = tail;
        Some(part)
    }
    let mut rest = encoded;
    let mut headers = Vec::new();
    while !rest.is_empty() {
        let name = std::str::from_utf8(part(&mut rest)?).ok()?;
        let value = part(&mut rest)?;
        headers.push((name, value));
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_published_with_the_constant_headers_and_an_old_row_as_stored() {
        let stored: Vec<(&str, &[u8])> = vec![
            ("ce_id", b"id-1"),
            ("ce_time", b"2026-11-28T12:00:00.000001Z"),
            ("traceparent", b"00-trace"),
        ];
        let wire = wire_headers(OutboxKind::Deallocated, stored.clone());
        let expected: Vec<(&str, &[u8])> = vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", b"id-1"),
            ("ce_type", b"allocation.Deallocated"),
            ("ce_source", CE_SOURCE.as_bytes()),
            ("ce_time", b"2026-11-28T12:00:00.000001Z"),
            ("content-type", b"application/json"),
            ("traceparent", b"00-trace"),
        ];
        assert_eq!(wire, expected);
        // A row written with every header, and a dead letter, go as stored.
        assert_eq!(
            wire_headers(OutboxKind::Deallocated, expected.clone()),
            expected
        );
        assert_eq!(wire_headers(OutboxKind::DeadLetter, stored.clone()), stored);
    }

    #[test]
    fn headers_round_trip_through_their_encoding() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce_id", b"0b5e"),
            ("", b""),
            ("bin\u{e9}", &[0, 255, 7]),
            ("dup", b"1"),
            ("dup", b"2"),
        ];
        let encoded = encode_headers(headers.iter().copied()).unwrap();
        assert_eq!(decode_headers(&encoded), Some(headers));
        assert_eq!(decode_headers(&[]), Some(vec![]));
    }

    #[test]
    fn a_damaged_encoding_is_refused() {
        let encoded = encode_headers([("name", b"value".as_slice())]).unwrap();
        for cut in 1..encoded.len() {
            assert_eq!(decode_headers(&encoded[..cut]), None, "cut at {cut}");
        }
        let not_utf8 = [0, 0, 0, 1, 0xff, 0, 0, 0, 0];
        assert_eq!(decode_headers(&not_utf8), None);
    }
}
