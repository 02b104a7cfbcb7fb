//! A seeded, deterministic stream of ERP messages (contract §3), for
//! `allocation-tools simulate` and for benchmarks.
//!
//! [`Workload`] is a pure iterator: no clock, no I/O, no global state. The same
//! [`WorkloadSettings`] always give the same [`GeneratedMessage`]s, byte for
//! byte, on every platform; the pseudo-random numbers come from a small
//! splitmix64 generator (`rng.rs`, no `rand` dependency).
//!
//! What the messages are depends on the [`Schedule`], a file each:
//!
//! - [`Schedule::Steady`] (`steady.rs`, what `simulate` publishes, endless):
//!   the stock (every SKU gets `batches_per_sku` batches, the first warehouse
//!   stock, the others dated shipments two weeks apart), then orders of one to
//!   three lines, mostly of a few popular SKUs, with restocks, quantity drops
//!   and rare bulk orders that are out of stock. Names carry the seed
//!   (`RED-CHAIR-000-S42`, `batch-S42-000-1`, `order-S42-000001`), so streams
//!   of different seeds never collide on one broker, while a stream replayed
//!   with the same seed is recognised by the worker as already handled (same
//!   `ce_id`, same batches, same order lines).
//! - [`Schedule::Phased`] (`phased.rs`, finite): [`Phase`]s of stock,
//!   one-line orders and quantity drops, one after the other. **The standard
//!   benchmark workload** (BENCHMARKS.md, `tools/examples/bench.rs`) is N SKUs × 3
//!   batches, then allocations, then quantity changes:
//!
//! ```
//! use allocation_worker::adapters::inbound::InboundKind;
//! use allocation_tools::generator::{Workload, WorkloadSettings};
//!
//! // 200 SKUs × 3 batches, then 20 000 allocations, then 2 000 quantity changes.
//! let settings = WorkloadSettings::benchmark(42, 200, 20_000, 2_000);
//! let messages: Vec<_> = Workload::new(settings).collect();
//! assert_eq!(messages.len(), 600 + 20_000 + 2_000);
//! assert!(messages[..600].iter().all(|m| m.topic_kind == InboundKind::BatchCreated));
//! assert!(messages[600..20_600].iter().all(|m| m.topic_kind == InboundKind::AllocationRequired));
//! assert!(messages[20_600..].iter().all(|m| m.topic_kind == InboundKind::BatchQuantityChanged));
//! ```
//!
//! Malformed messages ([`Malformed`]) are inserted after the stock (never
//! within a stock phase), on top of the stream: the well-formed messages are
//! the same with or without them (only their sequence numbers, hence
//! `ce_id`s, shift).

mod phased;
mod rng;
mod steady;

use chrono::NaiveDate;
use serde_json::json;
use uuid::Uuid;

use allocation_worker::adapters::inbound::InboundKind;

pub use phased::Phase;

use phased::Phased;
use rng::{mix, Rng};
use steady::{Mix, Steady};

/// One message to publish: to the topic of `topic_kind`, with this key, value
/// and a `ce_id` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedMessage {
    /// Position in the stream, from 0.
    pub seq: u64,
    pub topic_kind: InboundKind,
    /// The SKU, or the batch reference for a quantity change (contract §3).
    pub key: String,
    /// The JSON value (not JSON, or not a valid message, when `malformed`).
    pub value: Vec<u8>,
    /// Idempotency key: a UUID (v5) derived from the seed and `seq` only.
    pub ce_id: String,
    /// Deliberately malformed: the worker dead-letters it
    /// (`malformed-json` or `invalid-message`).
    pub malformed: bool,
}

/// What follows the stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// The stock of `skus` SKUs, then endless order lines with, per thousand
    /// steps, that many quantity drops and restocks (see `steady.rs`).
    Steady {
        quantity_drop_per_mille: u32,
        restock_per_mille: u32,
        /// One-line orders of more than the SKU's purchases so far.
        bulk_order_per_mille: u32,
    },
    /// These phases one after the other, each stock of `skus` SKUs, then the
    /// stream ends: the benchmark's workload (see [`Phase`]).
    Phased(Vec<Phase>),
}

/// Deliberately malformed messages, inserted after the stock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Malformed {
    None,
    /// Each message after the stock is malformed with this probability (0..=1).
    Fraction(f64),
    /// `count` malformed messages spread evenly over the first `over`
    /// messages after the stock.
    Count {
        count: u64,
        over: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSettings {
    pub seed: u64,
    /// Number of products (at least 1).
    pub skus: u32,
    /// Batches of each SKU in the stock phase (at least 1): the first is
    /// warehouse stock, the others dated shipments.
    pub batches_per_sku: u32,
    /// Eta of the first dated shipments; later ones are two weeks apart.
    pub first_eta: NaiveDate,
    pub schedule: Schedule,
    pub malformed: Malformed,
}

impl WorkloadSettings {
    /// The stream `simulate` publishes: `skus` × 3 batches, then steady order
    /// lines with, per thousand draws, 20 quantity drops, 40 restocks and 5
    /// bulk orders (about 14 out-of-stock lines in the default minute).
    pub fn steady(seed: u64, skus: u32) -> Self {
        Self {
            seed,
            skus,
            batches_per_sku: 3,
            first_eta: NaiveDate::from_ymd_opt(2026, 3, 2).expect("a valid date"),
            schedule: Schedule::Steady {
                quantity_drop_per_mille: 20,
                restock_per_mille: 40,
                bulk_order_per_mille: 5,
            },
            malformed: Malformed::None,
        }
    }

    /// `phases` over stocks of `skus` SKUs × 3 batches.
    pub fn phased(seed: u64, skus: u32, phases: Vec<Phase>) -> Self {
        Self {
            schedule: Schedule::Phased(phases),
            ..Self::steady(seed, skus)
        }
    }

    /// The standard benchmark workload (BENCHMARKS.md): `skus` × 3 batches,
    /// then `allocations` one-line orders, then `quantity_changes` quantity
    /// drops.
    pub fn benchmark(seed: u64, skus: u32, allocations: u64, quantity_changes: u64) -> Self {
        Self::phased(seed, skus, Phase::benchmark(allocations, quantity_changes))
    }

    /// Messages of a stock (`skus × batches_per_sku`).
    pub fn stock_len(&self) -> u64 {
        u64::from(self.skus.max(1)) * u64::from(self.batches_per_sku.max(1))
    }
}

/// The stream of [`WorkloadSettings`]; see the module documentation.
#[derive(Debug, Clone)]
pub struct Workload {
    settings: WorkloadSettings,
    rng: Rng,
    namespace: Uuid,
    seq: u64,
    stream: Stream,
    /// Messages after the stock emitted so far, malformed ones included.
    after_stock: u64,
    malformed_emitted: u64,
}

/// The well-formed messages, by schedule.
#[derive(Debug, Clone)]
enum Stream {
    Steady(Steady),
    Phased(Phased),
}

/// A message before it gets its sequence number and `ce_id`.
#[derive(Debug, Clone)]
struct Body {
    kind: InboundKind,
    key: String,
    value: Vec<u8>,
}

fn json_bytes(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).expect("JSON values serialize")
}

impl Body {
    /// A BatchCreated, keyed by its SKU as the ERP keys them.
    fn batch_created(reference: &str, sku: String, qty: u32, eta: Option<NaiveDate>) -> Self {
        Body {
            kind: InboundKind::BatchCreated,
            value: json_bytes(serde_json::json!({
                "ref": reference,
                "sku": sku,
                "qty": qty,
                "eta": eta.map(|d| d.format("%Y-%m-%d").to_string()),
            })),
            key: sku,
        }
    }
}

/// Keeps the random stream of malformed messages apart from the main one.
const MALFORMED_SALT: u64 = 0x6d61_6c66_6f72_6d65;

impl Workload {
    pub fn new(settings: WorkloadSettings) -> Self {
        let stream = match &settings.schedule {
            Schedule::Steady {
                quantity_drop_per_mille,
                restock_per_mille,
                bulk_order_per_mille,
            } => Stream::Steady(Steady::new(
                settings.seed,
                settings.skus,
                settings.batches_per_sku,
                settings.first_eta,
                Mix {
                    quantity_drop_per_mille: *quantity_drop_per_mille,
                    restock_per_mille: *restock_per_mille,
                    bulk_order_per_mille: *bulk_order_per_mille,
                },
            )),
            Schedule::Phased(phases) => Stream::Phased(Phased::new(
                settings.skus,
                settings.batches_per_sku,
                settings.first_eta,
                phases.clone(),
            )),
        };
        Self {
            rng: Rng::new(settings.seed),
            namespace: Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:allocation-worker:simulate"),
            seq: 0,
            stream,
            after_stock: 0,
            malformed_emitted: 0,
            settings,
        }
    }

    pub fn settings(&self) -> &WorkloadSettings {
        &self.settings
    }

    /// The SKUs of the stream (of the latest stock, when phased), in the
    /// order their stock is published.
    pub fn skus(&self) -> &[String] {
        match &self.stream {
            Stream::Steady(steady) => steady.skus(),
            Stream::Phased(phased) => phased.skus(),
        }
    }

    fn in_stock(&self) -> bool {
        match &self.stream {
            Stream::Steady(steady) => steady.in_stock(),
            Stream::Phased(phased) => phased.in_stock(),
        }
    }

    /// The next well-formed message, `None` when the schedule is over.
    fn next_body(&mut self) -> Option<Body> {
        match &mut self.stream {
            Stream::Steady(steady) => Some(steady.next_body(&mut self.rng)),
            Stream::Phased(phased) => phased.next_body(&mut self.rng),
        }
    }
    /// Whether the message at `after_stock` is to be a malformed one.
    fn malformed_due(&self) -> bool {
        if self.in_stock() {
            return false;
        }
        match self.settings.malformed {
            Malformed::None => false,
            Malformed::Fraction(f) => {
                let h = mix(self.settings.seed ^ MALFORMED_SALT, self.after_stock);
                ((h >> 11) as f64 / (1u64 << 53) as f64) < f
            }
            Malformed::Count { count, over } => {
                if self.malformed_emitted >= count {
                    return false;
                }
                let k = u128::from(self.malformed_emitted + 1);
                let position = (k * u128::from(over) / u128::from(count + 1)) as u64;
                self.after_stock >= position
            }
        }
    }

    /// A message the worker cannot decode, from its own random stream.
    fn malformed(&self) -> Body {
        let mut rng = Rng::new(mix(self.settings.seed ^ MALFORMED_SALT, !self.seq));
        let skus = self.skus();
        let sku = skus
            .get(rng.below(skus.len() as u64) as usize)
            .cloned()
            .unwrap_or_default();
        let orderid = format!("order-S{}-bad-{:06}", self.settings.seed, self.seq);
        let (kind, value) = match rng.below(4) {
            // Cut short in transit: not JSON.
            0 => (
                InboundKind::AllocationRequired,
                format!(r#"{{"orderid":"{orderid}","sku":"{sku}","qty":"#),
            ),
            // Not JSON at all.
            1 => (
                InboundKind::AllocationRequired,
                format!("orderid={orderid};sku={sku};qty=3"),
            ),
            // JSON, but a negative quantity.
            2 => (
                InboundKind::BatchCreated,
                json!({"ref": format!("batch-S{}-bad-{}", self.settings.seed, self.seq), "sku": sku, "qty": -5, "eta": null}).to_string(),
            ),
            // JSON, but the SKU is missing.
            _ => (
                InboundKind::AllocationRequired,
                json!({"orderid": orderid, "qty": 2}).to_string(),
            ),
        };
        Body {
            kind,
            key: sku,
            value: value.into_bytes(),
        }
    }
}

impl Iterator for Workload {
    type Item = GeneratedMessage;

    fn next(&mut self) -> Option<GeneratedMessage> {
        let after_stock = !self.in_stock();
        let (body, malformed) = if self.malformed_due() {
            self.malformed_emitted += 1;
            (self.malformed(), true)
        } else {
            (self.next_body()?, false)
        };
        if after_stock {
            self.after_stock += 1;
        }
        let seq = self.seq;
        self.seq += 1;
        let ce_id = Uuid::new_v5(
            &self.namespace,
            format!("{}/{seq}", self.settings.seed).as_bytes(),
        );
        Some(GeneratedMessage {
            seq,
            topic_kind: body.kind,
            key: body.key,
            value: body.value,
            ce_id: ce_id.to_string(),
            malformed,
        })
    }
}
