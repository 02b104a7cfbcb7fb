//! Deterministic simulation (docs/design.md, "Simulation"): the engine and
//! the relay, unchanged, on in-memory fakes, on one thread, in tokio's
//! paused time, with every choice drawn from one seeded random source. A
//! seed is a whole run, replayed exactly by running it again.
//!
//! `SIMULATION_SEEDS=N` runs N seeds per simulation (a default that fits in
//! CI otherwise), from `SIMULATION_FIRST_SEED` (0); `SIMULATION_SEED=S`
//! runs only seed S. A failing seed's message gives the command that
//! replays it. `scripts/simulate-engine.sh --seeds N` runs many.
//!
//! The simulations need no service. `conformance` runs the same scripts on
//! the fakes and on the real binary, broker and PostgreSQL, so it needs the
//! services of `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`.

mod conformance;
mod engine;
mod engine_fakes;
mod log;
mod relay;

use std::fmt;

/// Why a run broke a promise.
#[derive(Debug)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Seeds per simulation when `SIMULATION_SEEDS` is not set.
const DEFAULT_SEEDS: u64 = 2000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Runs `one` on each seed (see the module's doc); panics at the first
/// failure with the command that replays it. `salt` keeps the seeds of
/// different simulations apart.
pub fn run_seeds(test: &str, salt: u64, one: impl Fn(u64) -> Result<(), Failure>) {
    let seeds: Vec<u64> = match env_u64("SIMULATION_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("SIMULATION_FIRST_SEED").unwrap_or(0);
            let count = env_u64("SIMULATION_SEEDS").unwrap_or(DEFAULT_SEEDS);
            (first..first + count).map(|s| s ^ salt).collect()
        }
    };
    let started = std::time::Instant::now();
    for seed in &seeds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one(*seed)));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(failure)) => failure.0,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into()),
        };
        panic!(
            "seed {seed} failed: {failure}\nreplay it: SIMULATION_SEED={seed} cargo test --test simulation {test} -- --exact"
        );
    }
    eprintln!(
        "{test}: {} seeds passed in {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}
