//! The `allocation-worker` binary: parse settings, set up logging, run.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use allocation_worker::bootstrap::{self, BootstrapError};
use allocation_worker::command_error::CommandError;
use allocation_worker::configuration::ConfigError;
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

/// How a command ended badly: its exit code and its one-line message.
type Failed = (u8, String);

/// Runs one command: its settings first (a bad one is exit code 2, before
/// anything is touched), then `run` on them.
async fn command<S, F>(
    settings: Result<S, ConfigError>,
    run: impl FnOnce(S) -> F,
) -> Result<(), Failed>
where
    F: std::future::Future<Output = Result<(), Failed>>,
{
    let settings = settings.map_err(|e| (2, e.to_string()))?;
    run(settings).await
}

/// The errors the commands end with, each with its exit code.
trait Failure: std::fmt::Display {
    fn exit_code(&self) -> u8;
}

impl Failure for BootstrapError {
    fn exit_code(&self) -> u8 {
        BootstrapError::exit_code(self)
    }
}

impl Failure for CommandError {
    fn exit_code(&self) -> u8 {
        CommandError::exit_code(self)
    }
}

fn failure(error: impl Failure) -> Failed {
    (error.exit_code(), error.to_string())
}
