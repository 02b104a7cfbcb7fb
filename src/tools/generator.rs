//! A seeded, deterministic stream of ERP messages (contract §3), for
//! `allocation-worker simulate` and for benchmarks.
//!
//! [`Workload`] is a pure iterator: no clock, no I/O, no global state. The same
//! [`WorkloadSettings`] always give the same [`GeneratedMessage`]s, byte for
//! byte, on every platform; the pseudo-random numbers come from a small
//! splitmix64 generator in this module (no `rand` dependency). Names carry the
//! seed (`RED-CHAIR-000-S42`, `batch-S42-000-1`, `order-S42-000001`), so streams
//! of different seeds never collide on one broker, while a stream replayed with
//! the same seed is recognised by the worker as already handled (same `ce_id`,
//! same batches, same order lines).
//!
//! The stream starts with the stock: every SKU gets `batches_per_sku` batches,
//! the first warehouse stock (no eta), the others dated shipments two weeks
//! apart. Then, by [`Schedule`]:
//!
//! - [`Schedule::Steady`] (what `simulate` publishes, endless): order lines of
//!   orders of one to three lines, a few SKUs much more popular than the rest,
//!   occasional restocks (a new dated shipment), occasional quantity drops on
//!   a batch that is likely allocated, which force deallocations and
//!   reallocations, and rare bulk orders larger than all the stock of
//!   their SKU, which are out of stock. Restocks keep pace with
//!   demand, so without those a minute may show no `OutOfStock` at all; with
//!   them, a newcomer's first minute shows all three outbound event types.
//! - [`Schedule::Phased`] (finite): `allocations` one-line orders spread evenly
//!   over the SKUs, then `quantity_changes` quantity drops, then the end.
//!
//! **The standard benchmark workload** is expressed with it as N SKUs × 3
//! batches, then allocations, then quantity changes:
//!
//! ```
//! use allocation_worker::adapters::inbound::InboundKind;
//! use allocation_worker::tools::generator::{Workload, WorkloadSettings};
//!
//! // 1000 SKUs × 3 batches, then 20 000 allocations, then 2 000 quantity changes.
//! let settings = WorkloadSettings::benchmark(42, 1_000, 20_000, 2_000);
//! let messages: Vec<_> = Workload::new(settings).collect();
//! assert_eq!(messages.len(), 3_000 + 20_000 + 2_000);
//! assert!(messages[..3_000].iter().all(|m| m.topic_kind == InboundKind::BatchCreated));
//! assert!(messages[3_000..23_000].iter().all(|m| m.topic_kind == InboundKind::AllocationRequired));
//! assert!(messages[23_000..].iter().all(|m| m.topic_kind == InboundKind::BatchQuantityChanged));
//! ```
//!
//! Malformed messages ([`Malformed`]) are inserted after the stock, on top of
//! the stream: the well-formed messages are the same with or without them
//! (only their sequence numbers, hence `ce_id`s, shift).

use std::collections::VecDeque;

use chrono::{Days, NaiveDate};
use serde_json::json;
use uuid::Uuid;

use crate::adapters::inbound::InboundKind;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Endless order lines with, per thousand steps, that many quantity drops
    /// and restocks.
    Steady {
        quantity_drop_per_mille: u32,
        restock_per_mille: u32,
        /// One-line orders of more than the SKU's purchases so far.
        bulk_order_per_mille: u32,
    },
    /// `allocations` one-line orders, then `quantity_changes` quantity drops,
    /// then the stream ends.
    Phased {
        allocations: u64,
        quantity_changes: u64,
    },
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

    /// The standard benchmark workload: `skus` × 3 batches, then
    /// `allocations` one-line orders, then `quantity_changes` quantity drops.
    pub fn benchmark(seed: u64, skus: u32, allocations: u64, quantity_changes: u64) -> Self {
        Self {
            schedule: Schedule::Phased {
                allocations,
                quantity_changes,
            },
            ..Self::steady(seed, skus)
        }
    }

    /// Messages of the stock phase (`skus × batches_per_sku`).
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
    skus: Vec<String>,
    /// Cumulative popularity weights of the SKUs (Zipf, s = 1).
    popularity: Vec<u64>,
    batches: Vec<Vec<BatchState>>,
    /// Next batch of the stock phase: (sku, batch), `None` once done.
    stock_cursor: Option<(usize, u32)>,
    /// Messages after the stock emitted so far, malformed ones included.
    after_stock: u64,
    malformed_emitted: u64,
    orders: u64,
    pending: VecDeque<Body>,
    allocations_left: u64,
    quantity_changes_left: u64,
}

#[derive(Debug, Clone)]
struct BatchState {
    reference: String,
    qty: u32,
    eta: Option<NaiveDate>,
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

const PRODUCTS: [&str; 16] = [
    "RED-CHAIR",
    "OAK-TABLE",
    "BLUE-LAMP",
    "PINE-SHELF",
    "GREY-SOFA",
    "WOOL-RUG",
    "ROUND-MIRROR",
    "STEEL-DESK",
    "BAR-STOOL",
    "WALL-CLOCK",
    "LINEN-CURTAIN",
    "TEAK-BENCH",
    "GLASS-VASE",
    "BRASS-HOOK",
    "CORK-BOARD",
    "SILK-CUSHION",
];

/// Order line quantities and their weights (percent).
const LINE_QTY: [(u32, u64); 6] = [(1, 35), (2, 25), (3, 15), (4, 10), (5, 8), (10, 7)];

/// Keeps the random stream of malformed messages apart from the main one.
const MALFORMED_SALT: u64 = 0x6d61_6c66_6f72_6d65;

impl Workload {
    pub fn new(settings: WorkloadSettings) -> Self {
        let skus_n = settings.skus.max(1) as usize;
        let seed = settings.seed;
        let skus = (0..skus_n)
            .map(|i| format!("{}-{i:03}-S{seed}", PRODUCTS[i % PRODUCTS.len()]))
            .collect();
        let mut total = 0;
        let popularity = (0..skus_n as u64)
            .map(|i| {
                total += (1_000_000 / (i + 1)).max(1);
                total
            })
            .collect();
        let (allocations_left, quantity_changes_left) = match settings.schedule {
            Schedule::Phased {
                allocations,
                quantity_changes,
            } => (allocations, quantity_changes),
            Schedule::Steady { .. } => (0, 0),
        };
        Self {
            rng: Rng::new(seed),
            namespace: Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:allocation-worker:simulate"),
            seq: 0,
            skus,
            popularity,
            batches: vec![Vec::new(); skus_n],
            stock_cursor: Some((0, 0)),
            after_stock: 0,
            malformed_emitted: 0,
            orders: 0,
            pending: VecDeque::new(),
            allocations_left,
            quantity_changes_left,
            settings,
        }
    }

    pub fn settings(&self) -> &WorkloadSettings {
        &self.settings
    }

    /// The SKUs of the stream, in the order their stock is published.
    pub fn skus(&self) -> &[String] {
        &self.skus
    }

    fn stock_batch(&mut self, sku: usize, j: u32) -> Body {
        let (qty, eta) = if j == 0 {
            (self.rng.between(20, 60), None)
        } else {
            let days = u64::from(j - 1) * 14 + u64::from(self.rng.between(0, 6));
            (
                self.rng.between(50, 150),
                self.settings.first_eta.checked_add_days(Days::new(days)),
            )
        };
        let qty = self.stock_scale(sku, qty);
        self.new_batch(sku, qty, eta)
    }

    /// In the steady schedule, popular SKUs are stocked in proportion
    /// (`qty × (1 + share × skus)`, the share of demand of the SKU), as an
    /// ERP would: the demand is not all met at once by the first batches.
    fn stock_scale(&self, sku: usize, qty: u32) -> u32 {
        if !matches!(self.settings.schedule, Schedule::Steady { .. }) {
            return qty;
        }
        let total = *self.popularity.last().expect("at least one SKU");
        let weight = self.popularity[sku] - sku.checked_sub(1).map_or(0, |p| self.popularity[p]);
        let skus = self.skus.len() as u64;
        (u64::from(qty) * (total + weight * skus) / total) as u32
    }

    fn new_batch(&mut self, sku: usize, qty: u32, eta: Option<NaiveDate>) -> Body {
        let serial = self.batches[sku].len();
        let reference = format!("batch-S{}-{sku:03}-{serial}", self.settings.seed);
        self.batches[sku].push(BatchState {
            reference: reference.clone(),
            qty,
            eta,
        });
        let sku = self.skus[sku].clone();
        Body {
            kind: InboundKind::BatchCreated,
            value: json_bytes(json!({
                "ref": reference,
                "sku": sku,
                "qty": qty,
                "eta": eta.map(|d| d.format("%Y-%m-%d").to_string()),
            })),
            key: sku,
        }
    }

    fn popular_sku(&mut self) -> usize {
        let total = *self.popularity.last().expect("at least one SKU");
        let r = self.rng.below(total);
        self.popularity.partition_point(|&c| c <= r)
    }

    fn uniform_sku(&mut self) -> usize {
        self.rng.below(self.skus.len() as u64) as usize
    }

    fn line_qty(&mut self) -> u32 {
        let total: u64 = LINE_QTY.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.below(total);
        for (qty, weight) in LINE_QTY {
            if r < weight {
                return qty;
            }
            r -= weight;
        }
        1
    }

    fn order_line(&mut self, orderid: &str, sku: usize) -> Body {
        let qty = self.line_qty();
        let sku = self.skus[sku].clone();
        Body {
            kind: InboundKind::AllocationRequired,
            value: json_bytes(json!({"orderid": orderid, "sku": sku, "qty": qty})),
            key: sku,
        }
    }

    fn next_orderid(&mut self) -> String {
        self.orders += 1;
        format!("order-S{}-{:06}", self.settings.seed, self.orders)
    }

    /// An order of one to three lines of distinct, mostly popular SKUs.
    fn order(&mut self) {
        let wanted = match self.rng.below(10) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        }
        .min(self.skus.len());
        let mut skus: Vec<usize> = Vec::with_capacity(wanted);
        for _ in 0..wanted * 8 {
            if skus.len() == wanted {
                break;
            }
            let sku = self.popular_sku();
            if !skus.contains(&sku) {
                skus.push(sku);
            }
        }
        let orderid = self.next_orderid();
        for sku in skus {
            let line = self.order_line(&orderid, sku);
            self.pending.push_back(line);
        }
    }

    /// Cuts a batch of `sku` to 20–80 % of its quantity, preferring the
    /// earliest ones (the first to be allocated) that still have stock.
    fn quantity_drop(&mut self, sku: usize) -> Body {
        let batches = &self.batches[sku];
        let candidates: Vec<usize> = (0..batches.len().min(2))
            .filter(|&b| batches[b].qty > 0)
            .collect();
        let b = if candidates.is_empty() {
            self.rng.below(batches.len() as u64) as usize
        } else {
            candidates[self.rng.below(candidates.len() as u64) as usize]
        };
        let percent = u64::from(self.rng.between(20, 80));
        let batch = &mut self.batches[sku][b];
        batch.qty = (u64::from(batch.qty) * percent / 100) as u32;
        Body {
            kind: InboundKind::BatchQuantityChanged,
            value: json_bytes(json!({"ref": batch.reference, "qty": batch.qty})),
            key: batch.reference.clone(),
        }
    }

    /// A one-line order of a uniformly chosen SKU for more than all its
    /// batches' purchased quantities together: no batch can take it, whatever
    /// is allocated, so the worker records `OutOfStock` (and changes nothing).
    fn bulk_order(&mut self) -> Body {
        let sku = self.uniform_sku();
        let bought: u64 = self.batches[sku].iter().map(|b| u64::from(b.qty)).sum();
        let qty = u32::try_from(bought + u64::from(self.rng.between(1, 50))).unwrap_or(u32::MAX);
        let orderid = self.next_orderid();
        let sku = self.skus[sku].clone();
        Body {
            kind: InboundKind::AllocationRequired,
            value: json_bytes(json!({"orderid": orderid, "sku": sku, "qty": qty})),
            key: sku,
        }
    }

    /// A new dated shipment of a (mostly popular) SKU, after its latest one.
    fn restock(&mut self) -> Body {
        let sku = self.popular_sku();
        let latest = self.batches[sku]
            .iter()
            .filter_map(|b| b.eta)
            .max()
            .unwrap_or(self.settings.first_eta);
        let eta = latest.checked_add_days(Days::new(u64::from(self.rng.between(3, 10))));
        let qty = self.rng.between(50, 150);
        self.new_batch(sku, qty, eta)
    }

    /// The next well-formed message, `None` when the schedule is over.
    fn next_body(&mut self) -> Option<Body> {
        if let Some((sku, j)) = self.stock_cursor {
            let per_sku = self.settings.batches_per_sku.max(1);
            self.stock_cursor = if j + 1 < per_sku {
                Some((sku, j + 1))
            } else if sku + 1 < self.skus.len() {
                Some((sku + 1, 0))
            } else {
                None
            };
            return Some(self.stock_batch(sku, j));
        }
        if let Some(body) = self.pending.pop_front() {
            return Some(body);
        }
        match self.settings.schedule {
            Schedule::Steady {
                quantity_drop_per_mille,
                restock_per_mille,
                bulk_order_per_mille,
            } => {
                let r = self.rng.below(1000);
                let restock_end = u64::from(quantity_drop_per_mille + restock_per_mille);
                if r < u64::from(quantity_drop_per_mille) {
                    let sku = self.popular_sku();
                    Some(self.quantity_drop(sku))
                } else if r < restock_end {
                    Some(self.restock())
                } else if r < restock_end + u64::from(bulk_order_per_mille) {
                    Some(self.bulk_order())
                } else {
                    self.order();
                    self.pending.pop_front()
                }
            }
            Schedule::Phased { .. } => {
                if self.allocations_left > 0 {
                    self.allocations_left -= 1;
                    let sku = self.uniform_sku();
                    let orderid = self.next_orderid();
                    Some(self.order_line(&orderid, sku))
                } else if self.quantity_changes_left > 0 {
                    self.quantity_changes_left -= 1;
                    let sku = self.uniform_sku();
                    Some(self.quantity_drop(sku))
                } else {
                    None
                }
            }
        }
    }

    /// Whether the message at `after_stock` is to be a malformed one.
    fn malformed_due(&self) -> bool {
        if self.stock_cursor.is_some() {
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
        let sku = self.skus[rng.below(self.skus.len() as u64) as usize].clone();
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
        let after_stock = self.stock_cursor.is_none();
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

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to make
/// a realistic stream; fully determined by its seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }
}

/// One splitmix64 output for (`seed`, `n`): a random value per position.
fn mix(seed: u64, n: u64) -> u64 {
    Rng::new(seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}
