//! The flags of `rewind-offsets`, and the settings they build.

use clap::Args;

use super::{ConnectionArgs, DatabaseArgs};
use crate::configuration::{non_empty, refuse_guarantee_breakers, ConfigError};
use crate::operations::rewind::RewindSettings;

#[derive(Debug, Args)]
pub struct RewindArgs {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,

    #[command(flatten)]
    pub(crate) connection: ConnectionArgs,

    /// Consumer group of the worker's instances, whose offsets are rewound.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "allocation-worker")]
    pub(crate) kafka_group_id: String,

    /// List each partition's committed offset and the database's position,
    /// and commit nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

impl RewindArgs {
    pub fn settings(&self) -> Result<RewindSettings, ConfigError> {
        non_empty("KAFKA_GROUP_ID (--kafka-group-id)", &self.kafka_group_id)?;
        let connection = self.connection.settings()?;
        // A group.id among the properties would rewind another group.
        refuse_guarantee_breakers(&connection.properties)?;
        Ok(RewindSettings {
            database: self.database.settings()?,
            connection,
            group_id: self.kafka_group_id.clone(),
            dry_run: self.dry_run,
        })
    }
}
