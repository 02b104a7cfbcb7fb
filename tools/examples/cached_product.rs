//! The heap a cached product takes (BENCHMARKS.md, "A wide catalogue in a
//! burst"). Builds products of three open batches as the PostgreSQL
//! repository's load does (`Product::restore_some` from batch summaries, a
//! name parsed for each batch's reference, the ids of the batches by
//! reference beside it) and keeps them, as the product cache keeps them,
//! with their lines forgotten. A counting allocator reports the bytes
//! asked for and the allocations per product: once with each batch holding
//! a SKU parsed from its own row, once with the batches sharing the
//! product's SKU.
//!
//!   cargo run --release -p allocation-tools --example cached_product [PRODUCTS]
//!
//! A measurement, not a test. The cache's own overhead per entry (its slot
//! and key) and the allocator's rounding come on top.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use allocation_worker::domain::{Batch, BatchRef, Product, Sku};

/// The system allocator, counting the bytes and allocations live.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BATCHES: usize = 3;

type Cached = (Box<Product>, HashMap<BatchRef, i64>);

fn product(n: usize, shared_sku: bool) -> Result<Cached, Box<dyn std::error::Error>> {
    let name = format!("SKU-{n:06}-WIDE-CATALOGUE");
    let sku = Sku::parse(name.clone())?;
    let mut batches = Vec::with_capacity(BATCHES);
    let mut ids = HashMap::with_capacity(BATCHES);
    for b in 0..BATCHES {
        let reference = BatchRef::parse(format!("batch-{n:06}-{b}"))?;
        let batch_sku = if shared_sku {
            sku.clone()
        } else {
            Sku::parse(name.clone())?
        };
        let id = (n * BATCHES + b) as i64;
        ids.insert(reference.clone(), id);
        batches.push((
            id,
            Batch::restore_summary(reference, batch_sku, 100, None, 3),
        ));
    }
    let mut product = Product::restore_some(sku, 1, batches);
    product.forget_lines();
    Ok((Box::new(product), ids))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = match std::env::args().nth(1) {
        Some(text) => text.parse().map_err(|_| "PRODUCTS must be a count")?,
        None => 10_000,
    };
    for shared_sku in [false, true] {
        let mut kept: Vec<Cached> = Vec::with_capacity(count);
        let (bytes, allocations) = (
            LIVE_BYTES.load(Ordering::Relaxed),
            LIVE_ALLOCATIONS.load(Ordering::Relaxed),
        );
        for n in 0..count {
            kept.push(product(n, shared_sku)?);
        }
        let per_product = |now: usize, before: usize| (now - before) as f64 / count as f64;
        println!(
            "{BATCHES} batches, {}: {:.0} bytes and {:.1} allocations per product",
            if shared_sku {
                "the batches sharing the product's SKU"
            } else {
                "a SKU parsed for each batch"
            },
            per_product(LIVE_BYTES.load(Ordering::Relaxed), bytes),
            per_product(LIVE_ALLOCATIONS.load(Ordering::Relaxed), allocations),
        );
        drop(kept);
    }
    Ok(())
}
