//! The command line (contract §7): `run` and `migrate`, every setting a flag with
//! a matching environment variable. Parsing turns flags into typed settings;
//! anything wrong becomes one line naming the setting, and exit code 2.
//!
//! This module is the clap surface: the flags of each command, and how they
//! build its configuration ([`crate::configuration`]) or its settings.

mod connection;
mod quarantine;
mod replay;
mod rewind;
mod run;
mod topics;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

pub use connection::{ConnectionArgs, KafkaPropertyArgs};
pub(crate) use quarantine::QuarantineArgs;
pub(crate) use replay::ReplayArgs;
pub(crate) use rewind::RewindArgs;
pub(crate) use run::{DatabaseArgs, RunArgs};
pub use topics::{InboundTopicArgs, OutboundTopicArgs};

#[derive(Debug, Parser)]
#[command(
    name = "allocation-worker",
    version,
    about = "Allocates ERP order lines to stock and publishes what it decided"
)]
pub struct Cli {
    /// Log output: `text` for people, `json` for machines. Filter with RUST_LOG.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: CommandLine,
}

#[derive(Debug, Subcommand)]
pub enum CommandLine {
    /// Apply the database migrations (unless --skip-migrations) and run the worker.
    Run(Box<RunArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Publish dead letters again to the topic they came from, chosen by
    /// reason, original topic and time; --dry-run lists them.
    ReplayDeadLetters(Box<ReplayArgs>),
    /// Outbox rows the relay could not publish (too large, refused by the
    /// broker): list them, publish them again, or discard them.
    OutboxQuarantine(Box<QuarantineArgs>),
    /// After a restore of the database: move the consumer group's committed
    /// offsets back to where the restored database left off; --dry-run
    /// lists them. Run it while no worker of the group runs.
    RewindOffsets(Box<RewindArgs>),
}

/// A clap error as one line: its message without the usage block.
pub fn one_line(error: &clap::Error) -> String {
    error
        .render()
        .to_string()
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' default topic names are the contract's, as
    /// `Topics::default` has them for the code that runs without the CLI.
    #[test]
    fn the_default_topics_are_the_contracts() {
        let cli = Cli::try_parse_from([
            "allocation-worker",
            "run",
            "--database-url",
            "postgres://u@localhost/db",
            "--kafka-bootstrap-servers",
            "localhost:9092",
        ]);
        let Ok(Cli {
            command: CommandLine::Run(args),
            ..
        }) = cli
        else {
            panic!("run with only the required flags parses: {cli:?}");
        };
        let settings = args.settings().map_err(|e| e.to_string());
        assert_eq!(
            settings.map(|s| s.topics),
            Ok(crate::adapters::kafka::Topics::default())
        );
    }
}
