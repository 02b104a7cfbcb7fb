//! The `allocation-worker` binary: parse settings, set up logging, run.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use allocation_worker::bootstrap;
use allocation_worker::entrypoints::cli::{one_line, Cli, CommandLine};
use allocation_worker::operations::{quarantine, replay, rewind};
use allocation_worker::telemetry;

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

    // At least two worker threads, even under a one-CPU quota: a revocation
    // blocks the thread that polls the consumer while it waits for the
    // partitions' tasks, which need another thread to finish.
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
            CommandLine::Migrate(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                bootstrap::migrate(&settings)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
            CommandLine::Run(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                let shutdown = bootstrap::shutdown_on_signals()
                    .map_err(|e| (1, format!("cannot handle signals: {e}")))?;
                bootstrap::run(settings, shutdown)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
            CommandLine::ReplayDeadLetters(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                replay::run(settings)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
            CommandLine::OutboxQuarantine(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                quarantine::run(settings)
                    .await
                    .map_err(|e| (e.exit_code(), e.to_string()))
            }
            CommandLine::RewindOffsets(args) => {
                let settings = args.settings().map_err(|e| (2, e.to_string()))?;
                rewind::run(settings)
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
            // A bad setting is one line and nothing else (contract §7).
            if code != 2 {
                tracing::error!(error = %message, "exiting");
            }
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}
