//! What a message costs as the history behind it grows (contract §6.9), on
//! the processor alone: no broker, so the figures are the worker's and its
//! PostgreSQL backends' own. On a fresh database it makes `--products P`
//! products, each with one batch and `--history N` allocated lines (through
//! the processor, as messages), then times `--messages M` allocations of new
//! lines spread over the products, in batches of 100 messages, and
//! quantity changes, 25 per product (of 200 at most), each freeing about ten lines. The
//! allocations run on a cache warmed up by one line per product (a running
//! worker); the changes on a cold one, as after a restart or an eviction.
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example history_cost -- --history 10000 --products 20
//! ```
//!
//! It prints, per 1,000 messages of the timed phase: wall time, the
//! worker's CPU (this process, from /proc/self/stat) and the CPU of its
//! PostgreSQL backends (from /proc/PID/stat of the sessions of its
//! database: the server must run on this machine), and the same for the
//! quantity changes.

use std::sync::Arc;
use std::time::Instant;

use allocation_worker::adapters::inbound::InboundMessage;
use allocation_worker::adapters::kafka::Topics;
use allocation_worker::adapters::metrics::Metrics;
use allocation_worker::adapters::postgres::pool::{lazy_pool, MIGRATOR};
use allocation_worker::engine::processor::Processor;
use allocation_worker::service_layer::chunk::Outcome;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Quantity drops per product in the change phase, of the first
/// `CHANGED_PRODUCTS` products.
const CHANGE_ROUNDS: usize = 25;
const CHANGED_PRODUCTS: usize = 200;

struct Args {
    history: usize,
    products: usize,
    messages: usize,
}

fn args() -> Result<Args, Failure> {
    let mut args = Args {
        history: 1000,
        products: 20,
        messages: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .ok_or_else(|| format!("{flag} needs a number"))?
            .parse()?;
        match flag.as_str() {
            "--history" => args.history = value,
            "--products" => args.products = value.max(1),
            "--messages" => args.messages = value,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn topics() -> Topics {
    Topics::default()
}

fn message(topic: &str, offset: i64, value: serde_json::Value) -> InboundMessage {
    InboundMessage {
        topic: topic.into(),
        partition: 0,
        offset,
        key: None,
        payload: Some(value.to_string().into_bytes()),
        headers: vec![],
    }
}

/// User + system CPU of a process, in clock ticks (100 a second on Linux).
fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    field(11) + field(12)
}

async fn backends_ticks(pool: &PgPool) -> Result<u64, Failure> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(pool)
            .await?;
    Ok(pids.iter().map(|p| cpu_ticks(&p.to_string())).sum())
}

struct Sample {
    at: Instant,
    worker: u64,
    backends: u64,
}

async fn sample(pool: &PgPool) -> Result<Sample, Failure> {
    Ok(Sample {
        at: Instant::now(),
        worker: cpu_ticks("self"),
        backends: backends_ticks(pool).await?,
    })
}

fn report(what: &str, n: usize, from: &Sample, to: &Sample) {
    let per = 1000.0 / n.max(1) as f64;
    let ms = |ticks: u64| ticks as f64 * 10.0 * per;
    println!(
        "{what}: {n} messages, per 1,000: wall {:.0} ms, worker CPU {:.0} ms, PostgreSQL CPU {:.0} ms",
        to.at.duration_since(from.at).as_secs_f64() * 1000.0 * per,
        ms(to.worker.saturating_sub(from.worker)),
        ms(to.backends.saturating_sub(from.backends)),
    );
}

async fn run_batches(p: &Processor, messages: &[InboundMessage]) -> Result<(), Failure> {
    for chunk in messages.chunks(100) {
        let batch: Vec<(&InboundMessage, bool)> = chunk.iter().map(|m| (m, true)).collect();
        let outcomes = p.process_batch(&batch).await?;
        if let Some(o) = outcomes.iter().find(|o| **o != Outcome::Applied) {
            return Err(format!("a message was not applied: {o:?}").into());
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Failure> {
    let args = args()?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let base: PgConnectOptions = url.parse()?;
    let name = format!("aw_history_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect_with(&base).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let pool = lazy_pool(base.clone().database(&name), 8);
    MIGRATOR.run(&pool).await?;
    let t = topics();
    let new_processor = || {
        Processor::new(
            pool.clone(),
            topics(),
            Arc::new(Notify::new()),
            Arc::new(Metrics::new().expect("metrics register")),
        )
    };

    let setup = new_processor();
    let qty = args.history + args.messages + 1000;
    let mut offset = 0;
    let mut next = |topic: &str, value: serde_json::Value| {
        offset += 1;
        message(topic, offset, value)
    };
    let batches: Vec<InboundMessage> = (0..args.products)
        .map(|i| {
            next(
                &t.batch_created,
                json!({"ref": format!("b{i}"), "sku": format!("SKU-{i}"), "qty": qty}),
            )
        })
        .collect();
    run_batches(&setup, &batches).await?;
    let started = Instant::now();
    let mut line = 0usize;
    let mut allocations =
        |count: usize, next: &mut dyn FnMut(&str, serde_json::Value) -> InboundMessage| {
            (0..count)
                .map(|_| {
                    line += 1;
                    let sku = format!("SKU-{}", line % args.products);
                    next(
                        &t.allocation_required,
                        json!({"orderid": format!("o{line}"), "sku": sku, "qty": 1}),
                    )
                })
                .collect::<Vec<_>>()
        };
    let history = allocations(args.history * args.products, &mut next);
    run_batches(&setup, &history).await?;
    println!(
        "history: {} products x {} lines written in {:?}",
        args.products,
        args.history,
        started.elapsed()
    );
    drop(setup);

    // A new processor (an empty cache), warmed up by a line for every
    // product: the steady state of a running worker, in which a product
    // is read again only when its cache entry was evicted.
    let timed = new_processor();
    let warm_up = allocations(args.products, &mut next);
    run_batches(&timed, &warm_up).await?;
    let phase = allocations(args.messages, &mut next);
    let before = sample(&pool).await?;
    run_batches(&timed, &phase).await?;
    let after = sample(&pool).await?;
    report("allocate", args.messages, &before, &after);

    // Each batch's quantity drops, CHANGE_ROUNDS times, to ten below what
    // is allocated: about ten lines freed each time (out of stock then,
    // being the product's only batch).
    let per_product = args.history + 1 + args.messages / args.products;
    let changes: Vec<InboundMessage> = (1..=CHANGE_ROUNDS)
        .flat_map(|round| (0..args.products.min(CHANGED_PRODUCTS)).map(move |i| (round, i)))
        .map(|(round, i)| {
            let qty = per_product.saturating_sub(10 * round);
            next(
                &t.batch_quantity_changed,
                json!({"ref": format!("b{i}"), "qty": qty}),
            )
        })
        .collect();
    let fresh = new_processor();
    let before = sample(&pool).await?;
    run_batches(&fresh, &changes).await?;
    let after = sample(&pool).await?;
    report("change quantity (cold)", changes.len(), &before, &after);

    drop((timed, fresh));
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}
