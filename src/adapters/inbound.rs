//! The ERP's messages as they arrive: an owned, Kafka-type-free copy of each
//! ([`InboundMessage`]), what it contributes to the records it causes (its
//! idempotency key and trace context), where it stands in its partition's
//! order, and its decoding (contract §3) into domain commands, at the edge:
//! past this point nothing is bytes or JSON, and every name is valid.

use chrono::NaiveDate;
use serde::Deserialize;

use crate::domain::commands::{Allocate, ChangeBatchQuantity, CreateBatch};
use crate::domain::{BatchRef, Command, InvalidName, OrderId, Sku};
use crate::service_layer::Idempotent;

/// The header a replayed message carries (set by `replay-dead-letters`):
/// where it was first read, `topic/partition/offset`.
pub(crate) const REPLAY_ORIGINAL_POSITION_HEADER: &str = "replay.original-position";

/// Where a message stands in the order of its partition: its own offset, or,
/// for a replay back to the partition it was first read from, the offset it
/// was first read at (its `replay.original-position`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderPosition {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// True for a replay: it may be older than what was applied since.
    pub(crate) replayed: bool,
}

/// An inbound Kafka message as the worker keeps it: owned, Kafka-type free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// `None` is a header with a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl InboundMessage {
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Where the message stands in its partition's order (see
    /// [`OrderPosition`]). A `replay.original-position` that does not parse,
    /// or names another topic or partition, is ignored: the message then
    /// counts as read where it is.
    pub(crate) fn order_position(&self) -> OrderPosition {
        let original = self
            .header(REPLAY_ORIGINAL_POSITION_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (rest, offset) = v.trim().rsplit_once('/')?;
                let (topic, partition) = rest.rsplit_once('/')?;
                let partition: i32 = partition.parse().ok()?;
                let offset: i64 = offset.parse().ok()?;
                (topic == self.topic && partition == self.partition && offset >= 0)
                    .then_some(offset)
            });
        OrderPosition {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: original.unwrap_or(self.offset),
            replayed: original.is_some(),
        }
    }

    /// `ce_id` when the producer set one (so a re-publish is recognised),
    /// otherwise the message's position, which a redelivery shares.
    pub(crate) fn context(&self) -> MessageContext {
        // A ce_id that is not clean text (invalid UTF-8 would collide once
        // converted; NUL cannot be stored) identifies nothing: use the position.
        let ce_id = self
            .header("ce_id")
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|id| !id.trim().is_empty() && !id.contains('\0') && id.len() <= 1024);
        let idempotency_key = match ce_id {
            Some(id) => format!("ce_id:{id}"),
            None => format!("{}/{}/{}", self.topic, self.partition, self.offset),
        };
        MessageContext {
            idempotency_key,
            traceparent: self.header("traceparent").map(<[u8]>::to_vec),
            tracestate: self.header("tracestate").map(<[u8]>::to_vec),
        }
    }
}

/// What the inbound message contributes to the records it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageContext {
    /// `ce_id` header when present, otherwise `topic/partition/offset`.
    pub idempotency_key: String,
    /// W3C trace context, carried to every event the message causes: the
    /// inbound `traceparent`, or the worker's span of the message when traces
    /// are exported.
    pub traceparent: Option<Vec<u8>>,
    /// W3C `tracestate`, carried with `traceparent`.
    pub tracestate: Option<Vec<u8>>,
}

impl Idempotent for MessageContext {
    fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }
}

/// The three inbound message types, one per inbound topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InboundKind {
    BatchCreated,
    BatchQuantityChanged,
    AllocationRequired,
}

impl InboundKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            InboundKind::BatchCreated => "BatchCreated",
            InboundKind::BatchQuantityChanged => "BatchQuantityChanged",
            InboundKind::AllocationRequired => "AllocationRequired",
        }
    }
}

/// Why a payload is not a command. Both are permanent: the message is
/// dead-lettered, with `malformed-json` or `invalid-message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value is not a JSON document: {0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct BatchCreatedDto {
    #[serde(rename = "ref")]
    reference: String,
    sku: String,
    qty: i64,
    #[serde(default)]
    eta: Option<String>,
}

#[derive(Deserialize)]
struct BatchQuantityChangedDto {
    #[serde(rename = "ref", alias = "batchref")]
    reference: String,
    qty: i64,
}

#[derive(Deserialize)]
struct AllocationRequiredDto {
    orderid: String,
    sku: String,
    qty: i64,
}

/// Decodes the value of a message of `kind`. Unknown fields are ignored.
pub fn decode(kind: InboundKind, payload: Option<&[u8]>) -> Result<Command, DecodeError> {
    let payload =
        payload.ok_or_else(|| DecodeError::Malformed("the message has no value".into()))?;
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        // Well-formed JSON that serde_json cannot hold (a number such as 1e400)
        // is an invalid message, not a malformed one: skimming it without
        // building values tells the two apart.
        // Skimming does not check that strings are UTF-8, so that is checked
        // on its own: invalid UTF-8 after the number is still malformed
        // (found by tests/unit/decode_props.rs).
        let out_of_range = e.to_string().starts_with("number out of range");
        if out_of_range
            && std::str::from_utf8(payload).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
        {
            DecodeError::Invalid(format!("{}: {e}", kind.as_str()))
        } else {
            DecodeError::Malformed(e.to_string())
        }
    })?;
    if !value.is_object() {
        return Err(DecodeError::Invalid(format!(
            "{} must be a JSON object",
            kind.as_str()
        )));
    }
    let invalid = |e: serde_json::Error| DecodeError::Invalid(format!("{}: {e}", kind.as_str()));
    match kind {
        InboundKind::BatchCreated => {
            let dto: BatchCreatedDto = serde_json::from_value(value).map_err(invalid)?;
            let eta = match dto.eta.as_deref() {
                None => None,
                Some(text) => Some(parse_eta(text)?),
            };
            Ok(Command::CreateBatch(CreateBatch {
                reference: name("ref", BatchRef::parse(dto.reference))?,
                sku: name("sku", Sku::parse(dto.sku))?,
                qty: quantity(dto.qty, 0)?,
                eta,
            }))
        }
        InboundKind::BatchQuantityChanged => {
            let dto: BatchQuantityChangedDto = serde_json::from_value(value).map_err(invalid)?;
            Ok(Command::ChangeBatchQuantity(ChangeBatchQuantity {
                reference: name("ref", BatchRef::parse(dto.reference))?,
                qty: quantity(dto.qty, 0)?,
            }))
        }
        InboundKind::AllocationRequired => {
            let dto: AllocationRequiredDto = serde_json::from_value(value).map_err(invalid)?;
            Ok(Command::Allocate(Allocate {
                orderid: name("orderid", OrderId::parse(dto.orderid))?,
                sku: name("sku", Sku::parse(dto.sku))?,
                qty: quantity(dto.qty, 1)?,
            }))
        }
    }
}

/// Exactly `YYYY-MM-DD`: chrono alone would also take "2011-1-2", a leading
/// space or a signed year, which the contract does not allow.
fn parse_eta(text: &str) -> Result<NaiveDate, DecodeError> {
    let invalid =
        |why: String| DecodeError::Invalid(format!("eta {text:?} is not a YYYY-MM-DD date{why}"));
    let shape_ok = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(invalid(String::new()));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|e| invalid(format!(": {e}")))
}

fn name<T>(field: &str, parsed: Result<T, InvalidName>) -> Result<T, DecodeError> {
    parsed.map_err(|e| DecodeError::Invalid(format!("{field} {e}")))
}

fn quantity(qty: i64, min: i64) -> Result<u32, DecodeError> {
    if qty < min {
        return Err(DecodeError::Invalid(format!(
            "qty {qty} is less than {min}"
        )));
    }
    u32::try_from(qty).map_err(|_| DecodeError::Invalid(format!("qty {qty} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_str(kind: InboundKind, s: &str) -> Result<Command, DecodeError> {
        decode(kind, Some(s.as_bytes()))
    }

    #[test]
    fn decodes_each_message_and_ignores_unknown_fields() {
        let c = decode_str(
            InboundKind::BatchCreated,
            r#"{"ref":"b1","sku":"LAMP","qty":10,"eta":"2011-01-02","extra":[1]}"#,
        )
        .unwrap();
        let Command::CreateBatch(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!(c.eta, NaiveDate::from_ymd_opt(2011, 1, 2));
        let c = decode_str(
            InboundKind::BatchCreated,
            r#"{"ref":"b1","sku":"LAMP","qty":0,"eta":null}"#,
        )
        .unwrap();
        let Command::CreateBatch(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!((c.qty, c.eta), (0, None));
        let c = decode_str(
            InboundKind::BatchQuantityChanged,
            r#"{"batchref":"b1","qty":5}"#,
        )
        .unwrap();
        assert!(matches!(
            c,
            Command::ChangeBatchQuantity(ChangeBatchQuantity { qty: 5, .. })
        ));
        let c = decode_str(
            InboundKind::AllocationRequired,
            r#"{"orderid":"o1","sku":"LAMP","qty":1}"#,
        )
        .unwrap();
        assert!(matches!(c, Command::Allocate(Allocate { qty: 1, .. })));
    }

    #[test]
    fn tells_malformed_from_invalid() {
        let malformed = [&b"{not json"[..], b"\xff\xfe", b""];
        for bytes in malformed {
            let r = decode(InboundKind::BatchCreated, Some(bytes));
            assert!(
                matches!(r, Err(DecodeError::Malformed(_))),
                "{bytes:?}: {r:?}"
            );
        }
        assert!(matches!(
            decode(InboundKind::BatchCreated, None),
            Err(DecodeError::Malformed(_))
        ));
        let invalid = [
            (InboundKind::BatchCreated, r#"[1,2]"#),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":-1}"#,
            ),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":"3"}"#,
            ),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":1.5}"#,
            ),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":99999999999999999999}"#,
            ),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":4294967296}"#,
            ),
            (
                InboundKind::BatchCreated,
                r#"{"ref":"b","sku":"s","qty":1,"eta":"2011-13-01"}"#,
            ),
            (InboundKind::BatchCreated, r#"{"ref":"","sku":"s","qty":1}"#),
            (InboundKind::BatchCreated, r#"{"sku":"s","qty":1}"#),
            (
                InboundKind::BatchQuantityChanged,
                r#"{"ref":"b","batchref":"b","qty":1}"#,
            ),
            (
                InboundKind::AllocationRequired,
                r#"{"orderid":"o","sku":"s","qty":0}"#,
            ),
            (
                InboundKind::AllocationRequired,
                r#"{"orderid":1,"sku":"s","qty":1}"#,
            ),
        ];
        for (kind, s) in invalid {
            let r = decode_str(kind, s);
            assert!(matches!(r, Err(DecodeError::Invalid(_))), "{s}: {r:?}");
        }
        let long = format!(r#"{{"orderid":"{}","sku":"s","qty":1}}"#, "o".repeat(256));
        assert!(matches!(
            decode_str(InboundKind::AllocationRequired, &long),
            Err(DecodeError::Invalid(_))
        ));
    }
}
