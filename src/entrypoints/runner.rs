//! How a binary of this workspace runs a command, the same for the worker's
//! and the tools': parse the command line, set up logging, run the command
//! on the async runtime, and turn how it ended into an exit code. A bad
//! setting is exit code 2 and one line, before anything is touched
//! (contract §7); any other failure is exit code 1 (or the command's own)
//! and is logged too.

use std::future::Future;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use crate::bootstrap::BootstrapError;
use crate::command_error::CommandError;
use crate::configuration::ConfigError;
use crate::entrypoints::cli::one_line;
use crate::telemetry::{self, LogFormat};

/// How a command ended badly: its exit code and its one-line message.
pub type Failed = (u8, String);

/// The errors the commands end with, each with its exit code.
pub trait Failure: std::fmt::Display {
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

/// `error` as the command's end.
pub fn failure(error: impl Failure) -> Failed {
    (error.exit_code(), error.to_string())
}

/// One command: its settings first (a bad one is exit code 2), then `run`
/// on them.
pub async fn command<S, F>(
    settings: Result<S, ConfigError>,
    run: impl FnOnce(S) -> F,
) -> Result<(), Failed>
where
    F: Future<Output = Result<(), Failed>>,
{
    let settings = settings.map_err(|e| (2, e.to_string()))?;
    run(settings).await
}

/// A binary's `main`: parses `C`, sets up logging in the format
/// `log_format` reads from it, runs `run` on a multi-thread runtime, and
/// returns the exit code.
pub fn main<C, F>(log_format: impl FnOnce(&C) -> LogFormat, run: impl FnOnce(C) -> F) -> ExitCode
where
    C: Parser,
    F: Future<Output = Result<(), Failed>>,
{
    let cli = match C::try_parse() {
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
    let telemetry = match telemetry::init(log_format(&cli)) {
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
    let result = runtime.block_on(run(cli));
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
