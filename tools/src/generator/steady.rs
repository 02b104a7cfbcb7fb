//! The steady stream `simulate` publishes, endless: the stock, then order
//! lines of orders of one to three lines, a few SKUs much more popular than
//! the rest, occasional restocks (a new dated shipment), occasional quantity
//! drops on a batch that is likely allocated, which force deallocations and
//! reallocations, and rare bulk orders larger than all the stock of their
//! SKU, which are out of stock. Restocks keep pace with demand, so without
//! those a minute may show no `OutOfStock` at all; with them, a newcomer's
//! first minute shows all three outbound event types.

use std::collections::VecDeque;

use chrono::{Days, NaiveDate};
use serde_json::json;

use super::rng::Rng;
use super::{json_bytes, Body};
use allocation_worker::adapters::inbound::InboundKind;

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

/// Per thousand steps after the stock: how many are quantity drops,
/// restocks and bulk orders; the others are orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mix {
    pub(super) quantity_drop_per_mille: u32,
    pub(super) restock_per_mille: u32,
    pub(super) bulk_order_per_mille: u32,
}

#[derive(Debug, Clone)]
struct BatchState {
    reference: String,
    qty: u32,
    eta: Option<NaiveDate>,
}

#[derive(Debug, Clone)]
pub(super) struct Steady {
    seed: u64,
    batches_per_sku: u32,
    first_eta: NaiveDate,
    mix: Mix,
    skus: Vec<String>,
    /// Cumulative popularity weights of the SKUs (Zipf, s = 1).
    popularity: Vec<u64>,
    batches: Vec<Vec<BatchState>>,
    /// Next batch of the stock phase: (sku, batch), `None` once done.
    stock_cursor: Option<(usize, u32)>,
    orders: u64,
    pending: VecDeque<Body>,
}

impl Steady {
    pub(super) fn new(
        seed: u64,
        skus: u32,
        batches_per_sku: u32,
        first_eta: NaiveDate,
        mix: Mix,
    ) -> Self {
        let skus_n = skus.max(1) as usize;
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
        Self {
            seed,
            batches_per_sku: batches_per_sku.max(1),
            first_eta,
            mix,
            skus,
            popularity,
            batches: vec![Vec::new(); skus_n],
            stock_cursor: Some((0, 0)),
            orders: 0,
            pending: VecDeque::new(),
        }
    }

    pub(super) fn skus(&self) -> &[String] {
        &self.skus
    }

    /// Still publishing the stock.
    pub(super) fn in_stock(&self) -> bool {
        self.stock_cursor.is_some()
    }

    /// The next message; the stream never ends.
    pub(super) fn next_body(&mut self, rng: &mut Rng) -> Body {
        if let Some((sku, j)) = self.stock_cursor {
            self.stock_cursor = if j + 1 < self.batches_per_sku {
                Some((sku, j + 1))
            } else if sku + 1 < self.skus.len() {
                Some((sku + 1, 0))
            } else {
                None
            };
            return self.stock_batch(rng, sku, j);
        }
        if let Some(body) = self.pending.pop_front() {
            return body;
        }
        let Mix {
            quantity_drop_per_mille,
            restock_per_mille,
            bulk_order_per_mille,
        } = self.mix;
        let r = rng.below(1000);
        let restock_end = u64::from(quantity_drop_per_mille + restock_per_mille);
        if r < u64::from(quantity_drop_per_mille) {
            let sku = self.popular_sku(rng);
            self.quantity_drop(rng, sku)
        } else if r < restock_end {
            self.restock(rng)
        } else if r < restock_end + u64::from(bulk_order_per_mille) {
            self.bulk_order(rng)
        } else {
            self.order(rng)
        }
    }

    fn stock_batch(&mut self, rng: &mut Rng, sku: usize, j: u32) -> Body {
        let (qty, eta) = if j == 0 {
            (rng.between(20, 60), None)
        } else {
            let days = u64::from(j - 1) * 14 + u64::from(rng.between(0, 6));
            (
                rng.between(50, 150),
                self.first_eta.checked_add_days(Days::new(days)),
            )
        };
        let qty = self.stock_scale(sku, qty);
        self.new_batch(sku, qty, eta)
    }

    /// Popular SKUs are stocked in proportion (`qty × (1 + share × skus)`,
    /// the share of demand of the SKU), as an ERP would: the demand is not
    /// all met at once by the first batches.
    fn stock_scale(&self, sku: usize, qty: u32) -> u32 {
        let total = *self.popularity.last().expect("at least one SKU");
        let weight = self.popularity[sku] - sku.checked_sub(1).map_or(0, |p| self.popularity[p]);
        let skus = self.skus.len() as u64;
        (u64::from(qty) * (total + weight * skus) / total) as u32
    }

    fn new_batch(&mut self, sku: usize, qty: u32, eta: Option<NaiveDate>) -> Body {
        let serial = self.batches[sku].len();
        let reference = format!("batch-S{}-{sku:03}-{serial}", self.seed);
        self.batches[sku].push(BatchState {
            reference: reference.clone(),
            qty,
            eta,
        });
        let sku = self.skus[sku].clone();
        Body::batch_created(&reference, sku, qty, eta)
    }

    fn popular_sku(&self, rng: &mut Rng) -> usize {
        let total = *self.popularity.last().expect("at least one SKU");
        let r = rng.below(total);
        self.popularity.partition_point(|&c| c <= r)
    }

    fn uniform_sku(&self, rng: &mut Rng) -> usize {
        rng.below(self.skus.len() as u64) as usize
    }

    fn line_qty(rng: &mut Rng) -> u32 {
        let total: u64 = LINE_QTY.iter().map(|(_, w)| w).sum();
        let mut r = rng.below(total);
        for (qty, weight) in LINE_QTY {
            if r < weight {
                return qty;
            }
            r -= weight;
        }
        1
    }

    fn next_orderid(&mut self) -> String {
        self.orders += 1;
        format!("order-S{}-{:06}", self.seed, self.orders)
    }

    /// An order of one to three lines of distinct, mostly popular SKUs: its
    /// first line, the others queued behind it.
    fn order(&mut self, rng: &mut Rng) -> Body {
        let wanted = match rng.below(10) {
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
            let sku = self.popular_sku(rng);
            if !skus.contains(&sku) {
                skus.push(sku);
            }
        }
        let orderid = self.next_orderid();
        for sku in skus {
            let qty = Self::line_qty(rng);
            let sku = self.skus[sku].clone();
            self.pending.push_back(Body {
                kind: InboundKind::AllocationRequired,
                value: json_bytes(json!({"orderid": orderid, "sku": sku, "qty": qty})),
                key: sku,
            });
        }
        self.pending
            .pop_front()
            .expect("an order has at least one line")
    }

    /// Cuts a batch of `sku` to 20–80 % of its quantity, preferring the
    /// earliest ones (the first to be allocated) that still have stock.
    fn quantity_drop(&mut self, rng: &mut Rng, sku: usize) -> Body {
        let batches = &self.batches[sku];
        let candidates: Vec<usize> = (0..batches.len().min(2))
            .filter(|&b| batches[b].qty > 0)
            .collect();
        let b = if candidates.is_empty() {
            rng.below(batches.len() as u64) as usize
        } else {
            candidates[rng.below(candidates.len() as u64) as usize]
        };
        let percent = u64::from(rng.between(20, 80));
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
    fn bulk_order(&mut self, rng: &mut Rng) -> Body {
        let sku = self.uniform_sku(rng);
        let bought: u64 = self.batches[sku].iter().map(|b| u64::from(b.qty)).sum();
        let qty = u32::try_from(bought + u64::from(rng.between(1, 50))).unwrap_or(u32::MAX);
        let orderid = self.next_orderid();
        let sku = self.skus[sku].clone();
        Body {
            kind: InboundKind::AllocationRequired,
            value: json_bytes(json!({"orderid": orderid, "sku": sku, "qty": qty})),
            key: sku,
        }
    }

    /// A new dated shipment of a (mostly popular) SKU, after its latest one.
    fn restock(&mut self, rng: &mut Rng) -> Body {
        let sku = self.popular_sku(rng);
        let latest = self.batches[sku]
            .iter()
            .filter_map(|b| b.eta)
            .max()
            .unwrap_or(self.first_eta);
        let eta = latest.checked_add_days(Days::new(u64::from(rng.between(3, 10))));
        let qty = rng.between(50, 150);
        self.new_batch(sku, qty, eta)
    }
}
