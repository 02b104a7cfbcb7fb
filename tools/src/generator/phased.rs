//! The phased stream: [`Phase`]s one after the other, then the end. This is
//! the benchmark's workload (BENCHMARKS.md), drawn exactly as
//! `examples/bench.rs` drew it with its own splitmix64 before it used this
//! module: same seed, same messages.
//!
//! - **stock**: `skus` SKUs `{prefix}-SKU-0000`… × `batches_per_sku`
//!   batches `{prefix}-batch-0000-0`…: the first warehouse stock (no eta),
//!   the others dated shipments two weeks apart; each purchased quantity
//!   uniform in 50..=120;
//! - **allocations**: one-line orders `{orderid_prefix}000000`…, each of a
//!   uniformly chosen SKU of the latest stock, quantity uniform in 1..=4;
//! - **quantity changes**: each lowers a uniformly chosen batch of the latest
//!   stock by 5..=15 (never below 0).

use std::collections::VecDeque;

use chrono::{Days, NaiveDate};
use serde_json::json;

use super::rng::Rng;
use super::{json_bytes, Body};
use allocation_worker::adapters::inbound::InboundKind;

/// One phase of a [`Schedule::Phased`](super::Schedule::Phased) workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// New stock, `skus × batches_per_sku` batches; later phases use it.
    Stock { prefix: String },
    /// One-line orders of the latest stock's SKUs (none before any stock).
    Allocations { orderid_prefix: String, count: u64 },
    /// Quantity drops on the latest stock's batches (none before any stock).
    QuantityChanges { count: u64 },
}

impl Phase {
    /// The benchmark's three timed phases: stock `bench`, `allocations`
    /// orders `order-000000`…, then `quantity_changes` quantity drops.
    pub fn benchmark(allocations: u64, quantity_changes: u64) -> Vec<Phase> {
        vec![
            Phase::Stock {
                prefix: "bench".into(),
            },
            Phase::Allocations {
                orderid_prefix: "order-".into(),
                count: allocations,
            },
            Phase::QuantityChanges {
                count: quantity_changes,
            },
        ]
    }
}

/// What the next message of the current phase is made of.
enum Step {
    Stock { prefix: String, n: u64 },
    Allocation { orderid_prefix: String, n: u64 },
    QuantityChange,
}

#[derive(Debug, Clone)]
pub(super) struct Phased {
    skus_per_stock: u32,
    batches_per_sku: u32,
    first_eta: NaiveDate,
    /// The current phase first.
    phases: VecDeque<Phase>,
    /// Messages of the current phase so far.
    done: u64,
    /// The latest stock: its SKUs, and its batches with their quantities.
    skus: Vec<String>,
    batches: Vec<(String, u32)>,
}

impl Phased {
    pub(super) fn new(
        skus_per_stock: u32,
        batches_per_sku: u32,
        first_eta: NaiveDate,
        phases: Vec<Phase>,
    ) -> Self {
        Self {
            skus_per_stock: skus_per_stock.max(1),
            batches_per_sku: batches_per_sku.max(1),
            first_eta,
            phases: phases.into(),
            done: 0,
            skus: Vec::new(),
            batches: Vec::new(),
        }
    }

    /// The latest stock's SKUs.
    pub(super) fn skus(&self) -> &[String] {
        &self.skus
    }

    /// Publishing a stock phase (its last message not given yet).
    pub(super) fn in_stock(&self) -> bool {
        matches!(self.phases.front(), Some(Phase::Stock { .. })) && self.done < self.stock_len()
    }

    /// The next message, `None` once the last phase is over.
    pub(super) fn next_body(&mut self, rng: &mut Rng) -> Option<Body> {
        let step = self.next_step()?;
        Some(match step {
            Step::Stock { prefix, n } => self.stock_batch(rng, &prefix, n),
            Step::Allocation { orderid_prefix, n } => self.allocation(rng, &orderid_prefix, n),
            Step::QuantityChange => self.quantity_change(rng),
        })
    }

    /// Moves on to the next phase when the current one is over.
    fn next_step(&mut self) -> Option<Step> {
        loop {
            let n = self.done;
            let step = match self.phases.front()? {
                Phase::Stock { prefix } if n < self.stock_len() => Step::Stock {
                    prefix: prefix.clone(),
                    n,
                },
                Phase::Allocations {
                    orderid_prefix,
                    count,
                } if n < *count && !self.skus.is_empty() => Step::Allocation {
                    orderid_prefix: orderid_prefix.clone(),
                    n,
                },
                Phase::QuantityChanges { count } if n < *count && !self.batches.is_empty() => {
                    Step::QuantityChange
                }
                _ => {
                    self.phases.pop_front();
                    self.done = 0;
                    continue;
                }
            };
            self.done += 1;
            return Some(step);
        }
    }

    fn stock_len(&self) -> u64 {
        u64::from(self.skus_per_stock) * u64::from(self.batches_per_sku)
    }

    fn stock_batch(&mut self, rng: &mut Rng, prefix: &str, n: u64) -> Body {
        if n == 0 {
            self.skus.clear();
            self.batches.clear();
        }
        let per_sku = u64::from(self.batches_per_sku);
        let (i, j) = (n / per_sku, n % per_sku);
        let sku = format!("{prefix}-SKU-{i:04}");
        if j == 0 {
            self.skus.push(sku.clone());
        }
        let reference = format!("{prefix}-batch-{i:04}-{j}");
        let qty = rng.between(50, 120);
        let eta = (j > 0)
            .then(|| {
                let days = (j - 1) * 14 + u64::from(rng.between(0, 6));
                self.first_eta.checked_add_days(Days::new(days))
            })
            .flatten();
        self.batches.push((reference.clone(), qty));
        Body::batch_created(&reference, sku, qty, eta)
    }

    fn allocation(&mut self, rng: &mut Rng, orderid_prefix: &str, n: u64) -> Body {
        let sku = self.skus[rng.below(self.skus.len() as u64) as usize].clone();
        let qty = rng.between(1, 4);
        let orderid = format!("{orderid_prefix}{n:06}");
        Body {
            kind: InboundKind::AllocationRequired,
            value: json_bytes(json!({"orderid": orderid, "sku": sku, "qty": qty})),
            key: sku,
        }
    }

    fn quantity_change(&mut self, rng: &mut Rng) -> Body {
        let b = rng.below(self.batches.len() as u64) as usize;
        let cut = rng.between(5, 15);
        let (reference, qty) = &mut self.batches[b];
        *qty = qty.saturating_sub(cut);
        Body {
            kind: InboundKind::BatchQuantityChanged,
            value: json_bytes(json!({"ref": reference, "qty": *qty})),
            key: reference.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GeneratedMessage, Workload, WorkloadSettings};
    use super::Phase;
    use allocation_worker::adapters::inbound::InboundKind;

    /// FNV-1a over each message's kind, key, value and orderid (`-` when it
    /// has none), every field closed by a 0xff; and how many there were.
    fn fingerprint(messages: &[GeneratedMessage]) -> (u64, usize) {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes.iter().chain(&[0xff]) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x100_0000_01b3);
            }
        };
        for m in messages {
            let value: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
            eat(format!("{:?}", m.topic_kind).as_bytes());
            eat(m.key.as_bytes());
            eat(&m.value);
            eat(value["orderid"].as_str().unwrap_or("-").as_bytes());
        }
        (hash, messages.len())
    }

    /// The benchmark's figures (BENCHMARKS.md) compare runs of one workload,
    /// so it must not drift. The fingerprint was computed from the stream
    /// `examples/bench.rs` drew with its own splitmix64 before it used this
    /// module: seed 42, the full sizes, then the latency run's stock and
    /// 10,000 orders (prefixed `lat-x-` here; the benchmark's prefix is
    /// random).
    #[test]
    fn the_benchmark_workload_is_the_one_benchmarked_before() {
        let mut phases = Phase::benchmark(20_000, 2_000);
        phases.push(Phase::Stock {
            prefix: "lat".into(),
        });
        phases.push(Phase::Allocations {
            orderid_prefix: "lat-x-".into(),
            count: 10_000,
        });
        let messages: Vec<_> = Workload::new(WorkloadSettings::phased(42, 200, phases)).collect();
        assert_eq!(fingerprint(&messages), (0xb717_e1e2_ab29_2119, 33_200));

        let qty = |m: &GeneratedMessage| {
            let value: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
            value["qty"].as_u64().unwrap()
        };
        let (stock, rest) = messages.split_at(600);
        assert!(stock
            .iter()
            .all(|m| m.topic_kind == InboundKind::BatchCreated));
        assert!(stock.iter().all(|m| (50..=120).contains(&qty(m))));
        let (allocations, rest) = rest.split_at(20_000);
        assert!(allocations
            .iter()
            .all(|m| m.topic_kind == InboundKind::AllocationRequired && (1..=4).contains(&qty(m))));
        assert!(rest[..2_000]
            .iter()
            .all(|m| m.topic_kind == InboundKind::BatchQuantityChanged));
    }
}
