//! The `allocation-tools` binary: `simulate` and `watch`. Parses the command
//! line, sets up logging as the worker does, runs the command.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use allocation_worker::bootstrap;
use allocation_worker::entrypoints::cli::one_line;
use allocation_worker::telemetry;

use allocation_tools::cli::{Cli, Command};
use allocation_tools::{simulate, watch};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(cli.log_format) {
        Ok(telemetry) => telemetry,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };

    // The worker's runtime (src/main.rs), as these commands ran in it before
    // they moved here: at least two worker threads.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Simulate(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                let shutdown = bootstrap::shutdown_on_signals()
                    .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                simulate::run(settings, shutdown)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
            Command::Watch(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                let shutdown = bootstrap::shutdown_on_signals()
                    .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                watch::run(settings, shutdown)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
        }
    });
    // Dropping a runtime waits for every blocking task; one stuck in
    // librdkafka on an unreachable broker must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The last spans, outside the runtime: the exporter's client blocks.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            // A bad setting is one line and nothing else, as the worker's.
            if code != 2 {
                tracing::error!(error = %message, "exiting");
            }
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}
