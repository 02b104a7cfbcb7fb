//! The `allocation-tools` binary: `simulate` and `watch`, run as every
//! binary of this workspace runs a command
//! ([`allocation_worker::entrypoints::runner`]): logging set up as the
//! worker's, a bad setting one line and exit code 2.

use std::process::ExitCode;

use allocation_worker::bootstrap;
use allocation_worker::entrypoints::runner::{self, command, failure};

use allocation_tools::cli::{Cli, Command};
use allocation_tools::{simulate, watch};

fn main() -> ExitCode {
    runner::main(
        |cli: &Cli| cli.log_format,
        |cli| async move {
            match cli.command {
                Command::Simulate(args) => {
                    command(args.settings(), |s| async move {
                        let shutdown = bootstrap::shutdown_on_signals()
                            .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                        simulate::run(s, shutdown).await.map_err(failure)
                    })
                    .await
                }
                Command::Watch(args) => {
                    command(args.settings(), |s| async move {
                        let shutdown = bootstrap::shutdown_on_signals()
                            .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                        watch::run(s, shutdown).await.map_err(failure)
                    })
                    .await
                }
            }
        },
    )
}
