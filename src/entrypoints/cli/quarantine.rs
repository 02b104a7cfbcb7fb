//! The flags of `outbox-quarantine`, and the settings they build.

use clap::{Args, Subcommand};

use super::DatabaseArgs;
use crate::adapters::quarantine::Which;
use crate::configuration::ConfigError;
use crate::operations::quarantine::{QuarantineAction, QuarantineSettings};

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    pub(crate) action: QuarantineCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum QuarantineCommand {
    /// List the quarantined outbox rows, one a line.
    List(DatabaseArgs),
    /// Publish quarantined rows again, once their cause is fixed: each
    /// becomes a new pending outbox row, after the later rows of its key.
    Retry(ChosenRows),
    /// Delete quarantined rows for good.
    Discard(ChosenRows),
}

#[derive(Debug, Args)]
pub(crate) struct ChosenRows {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,

    /// The rows' ids, as `list` shows them (repeat, or separate with commas).
    #[arg(
        long = "id",
        value_delimiter = ',',
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub(crate) ids: Vec<i64>,

    /// Every quarantined row.
    #[arg(long)]
    pub(crate) all: bool,
}

impl ChosenRows {
    fn which(&self) -> Which {
        if self.all {
            Which::All
        } else {
            Which::Ids(self.ids.clone())
        }
    }
}

impl QuarantineArgs {
    pub fn settings(&self) -> Result<QuarantineSettings, ConfigError> {
        let (database, action) = match &self.action {
            QuarantineCommand::List(database) => (database, QuarantineAction::List),
            QuarantineCommand::Retry(rows) => {
                (&rows.database, QuarantineAction::Retry(rows.which()))
            }
            QuarantineCommand::Discard(rows) => {
                (&rows.database, QuarantineAction::Discard(rows.which()))
            }
        };
        Ok(QuarantineSettings {
            database: database.settings()?,
            action,
        })
    }
}
