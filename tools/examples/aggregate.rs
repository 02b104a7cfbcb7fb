//! The aggregate alone, in memory: what one decision costs as a product's
//! batches pile up (BENCHMARKS.md, "A product's batches"). A product is
//! restored from summaries with `N` batches already taken in full (its
//! history of restocks) and one with stock, then takes lines one
//! transaction at a time, as the PostgreSQL repository drives it between
//! two transactions of the cache: tell it the line is not allocated,
//! allocate, take the events and changes, forget the lines.
//!
//!   cargo run --release -p allocation-tools --example aggregate [ROUNDS]
//!
//! Prints nanoseconds per transaction for each `N`. A measurement, not a
//! test: it checks only that every line went to the batch with stock.

use std::time::Instant;

use allocation_worker::domain::{Batch, BatchRef, OrderId, OrderLine, Product, Sku};
use chrono::NaiveDate;

const HISTORIES: [usize; 5] = [0, 100, 1_000, 10_000, 100_000];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(text) => text.parse().map_err(|_| "ROUNDS must be a count")?,
        None => 20_000,
    };
    let sku = Sku::parse("POPULAR-LAMP".to_owned())?;
    let day = |n: u64| NaiveDate::from_ymd_opt(2026, 1, 1).map(|d| d + chrono::Days::new(n));
    println!("batches taken in full    ns per transaction ({rounds} transactions)");
    for history in HISTORIES {
        let mut batches = Vec::with_capacity(history + 1);
        for n in 0..history {
            let reference = BatchRef::parse(format!("restock-{n:06}"))?;
            // Dated shipments, each taken in full: what a popular product
            // keeps of its restocks.
            batches.push(Batch::restore_summary(
                reference,
                sku.clone(),
                50,
                day(n as u64 % 365),
                50,
            ));
        }
        let open = BatchRef::parse("latest-restock".to_owned())?;
        batches.push(Batch::restore_summary(
            open.clone(),
            sku.clone(),
            u32::MAX,
            day(400),
            0,
        ));
        let mut product = Product::restore(sku.clone(), 1, batches);
        let lines: Vec<OrderLine> = (0..rounds)
            .map(|n| {
                Ok(OrderLine {
                    orderid: OrderId::parse(format!("order-{n:08}"))?,
                    sku: sku.clone(),
                    qty: 1,
                })
            })
            .collect::<Result<_, allocation_worker::domain::InvalidName>>()?;
        let started = Instant::now();
        for line in lines {
            product.learn_line(line.orderid.clone(), None);
            let chosen = product.allocate(line)?;
            if chosen.as_ref() != Some(&open) {
                return Err(format!("a line went to {chosen:?}, not to {open}").into());
            }
            std::hint::black_box(product.take_events());
            std::hint::black_box(product.take_changes());
            product.forget_lines();
        }
        let per = started.elapsed().as_nanos() / rounds.max(1) as u128;
        println!("{history:>22}    {per:>10}");
    }
    Ok(())
}
