//! The `allocation-worker` binary: its commands, run as every binary of
//! this workspace runs one ([`allocation_worker::entrypoints::runner`]).

use std::process::ExitCode;

use allocation_worker::bootstrap;
use allocation_worker::entrypoints::cli::{Cli, CommandLine};
use allocation_worker::entrypoints::runner::{self, command, failure};
use allocation_worker::operations::{quarantine, replay, rewind};

/// Every allocation of the process, librdkafka's included, goes to jemalloc
/// (Cargo.toml).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts; `MALLOC_CONF` in the
/// environment overrides any of them.
///
/// - `narenas:1`: one arena rather than one for each of four times the
///   cores. The worker's threads are few and allocate little at a time
///   (each keeps a thread cache in front of the arena), and every arena
///   would keep freed pages of its own.
/// - `dirty_decay_ms:0,muzzy_decay_ms:0`: pages freed go back to the system
///   at once, not over jemalloc's default ten seconds. The worker's peaks
///   are bursts (a backlog prefetched by librdkafka, a batch's writes); with
///   the C library's malloc its RSS stayed at the highest of them, with
///   jemalloc's defaults it rose above it for the ten seconds. Measured in
///   BENCHMARKS.md, "The allocator": peak RSS about 8 MiB lower, CPU the
///   same.
///
/// A thin pointer to a C string, as jemalloc declares it
/// (`const char *malloc_conf`).
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8; 44] = b"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    runner::main(
        |cli: &Cli| cli.log_format,
        |cli| async move {
            match cli.command {
                CommandLine::Migrate(args) => {
                    command(args.settings(), |s| async move {
                        bootstrap::migrate(&s).await.map_err(failure)
                    })
                    .await
                }
                CommandLine::Run(args) => {
                    command(args.settings(), |s| async move {
                        let shutdown = bootstrap::shutdown_on_signals()
                            .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                        bootstrap::run(s, shutdown).await.map_err(failure)
                    })
                    .await
                }
                CommandLine::ReplayDeadLetters(args) => {
                    command(args.settings(), |s| async {
                        replay::run(s).await.map_err(failure)
                    })
                    .await
                }
                CommandLine::OutboxQuarantine(args) => {
                    command(args.settings(), |s| async {
                        quarantine::run(s).await.map_err(failure)
                    })
                    .await
                }
                CommandLine::RewindOffsets(args) => {
                    command(args.settings(), |s| async {
                        rewind::run(s).await.map_err(failure)
                    })
                    .await
                }
            }
        },
    )
}
