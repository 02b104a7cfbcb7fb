//! The `allocation-worker` binary: its commands, run as every binary of
//! this workspace runs one ([`allocation_worker::entrypoints::runner`]).

use std::process::ExitCode;

use allocation_worker::bootstrap;
use allocation_worker::entrypoints::cli::{Cli, CommandLine};
use allocation_worker::entrypoints::runner::{self, command, failure};
use allocation_worker::operations::{quarantine, replay, rewind};

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
