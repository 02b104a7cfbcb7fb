//! `allocation-worker rewind-offsets`: after the database was restored to an
//! earlier point, moves the consumer group's committed offsets back to where
//! the restored database left off (`partition_positions`, written with every
//! batch), so that the messages applied after the backup are read and
//! applied again instead of skipped. What is read twice is recognised by
//! the idempotency keys the same snapshot holds (docs/design.md, "Backup
//! and restore").
//!
//! It only ever moves an offset back, and only while no worker of the group
//! runs: a member would commit its own position over it.

use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;

use crate::adapters::topic_reader::ReaderContext;
use crate::command_error::CommandError;
use crate::configuration::{Connection, DatabaseSettings};

/// What the command needs, validated.
#[derive(Debug, Clone)]
pub struct RewindSettings {
    pub(crate) database: DatabaseSettings,
    pub(crate) connection: Connection,
    pub(crate) group_id: String,
    pub(crate) dry_run: bool,
}

/// One partition's recorded position in the restored database.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Position {
    topic: String,
    partition: i32,
    next_offset: i64,
}

/// What the command decides for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The group has committed past the database's position: move it back.
    Rewind { from: i64, to: i64 },
    /// The group is at or behind the database's position (or has no offset,
    /// and starts from the earliest message): nothing to do.
    Keep { committed: Option<i64>, at: i64 },
}

fn verdict(committed: Option<i64>, recorded: i64) -> Verdict {
    match committed {
        Some(from) if from > recorded => Verdict::Rewind { from, to: recorded },
        committed => Verdict::Keep {
            committed,
            at: recorded,
        },
    }
}

/// Bound on each request to the broker.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

async fn recorded_positions(database: &DatabaseSettings) -> Result<Vec<Position>, CommandError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(database.options.clone())
        .await
        .map_err(|e| CommandError::Failed(format!("cannot connect to DATABASE_URL: {e}")))?;
    let rows = sqlx::query_as::<_, Position>(
        "SELECT topic, partition, next_offset FROM partition_positions ORDER BY topic, partition",
    )
    .fetch_all(&pool)
    .await;
    pool.close().await;
    rows.map_err(|e| match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => CommandError::Failed(
            "the database has no partition_positions table: it was not migrated by a release \
             that records positions, so it cannot tell where to rewind to"
                .to_owned(),
        ),
        other => CommandError::Failed(format!("cannot read partition_positions: {other}")),
    })
}

/// Refuses while the group has members: they would commit their positions
/// over the rewind. A broker that cannot describe groups is warned about;
/// committing for a group with members is refused by Kafka all the same.
fn refuse_active_group(
    consumer: &BaseConsumer<ReaderContext>,
    group: &str,
) -> Result<(), CommandError> {
    match consumer.fetch_group_list(Some(group), KAFKA_TIMEOUT) {
        Ok(list) => {
            let members: usize = list.groups().iter().map(|g| g.members().len()).sum();
            if members > 0 {
                return Err(CommandError::Failed(format!(
                    "consumer group {group} has {members} member(s): stop every worker of the group first"
                )));
            }
            Ok(())
        }
        Err(error) => {
            tracing::warn!(%error, group, "cannot describe the consumer group; make sure no worker runs");
            Ok(())
        }
    }
}

/// Blocking: reads the committed offsets and commits the rewinds.
fn rewind_group(
    settings: &RewindSettings,
    positions: &[Position],
) -> Result<Vec<(Position, Verdict)>, CommandError> {
    let consumer: BaseConsumer<ReaderContext> = settings
        .connection
        .client_config(&[
            ("group.id", settings.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
        ])
        .create_with_context(ReaderContext)
        .map_err(CommandError::refused_property)?;
    refuse_active_group(&consumer, &settings.group_id)?;
    let mut asked = TopicPartitionList::new();
    for p in positions {
        asked.add_partition(&p.topic, p.partition);
    }
    let committed = consumer
        .committed_offsets(asked, KAFKA_TIMEOUT)
        .map_err(|e| {
            CommandError::Kafka(format!("cannot read the group's committed offsets: {e}"))
        })?;
    let mut verdicts = Vec::with_capacity(positions.len());
    let mut rewinds = TopicPartitionList::new();
    for p in positions {
        let at = committed
            .find_partition(&p.topic, p.partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let verdict = verdict(at, p.next_offset);
        if let Verdict::Rewind { to, .. } = verdict {
            rewinds
                .add_partition_offset(&p.topic, p.partition, Offset::Offset(to))
                .map_err(|e| CommandError::Kafka(e.to_string()))?;
        }
        verdicts.push((p.clone(), verdict));
    }
    if !settings.dry_run && rewinds.count() > 0 {
        consumer
            .commit(&rewinds, CommitMode::Sync)
            .map_err(|e| CommandError::Kafka(format!("cannot commit the rewound offsets: {e}")))?;
    }
    Ok(verdicts)
}

/// `allocation-worker rewind-offsets`.
pub async fn run(settings: RewindSettings) -> Result<(), CommandError> {
    let positions = recorded_positions(&settings.database).await?;
    let kafka_settings = settings.clone();
    let kafka_positions = positions.clone();
    let verdicts =
        tokio::task::spawn_blocking(move || rewind_group(&kafka_settings, &kafka_positions))
            .await
            .map_err(|e| CommandError::Failed(format!("the Kafka client failed: {e}")))??;
    let mut stdout = std::io::stdout().lock();
    let mut rewound = 0;
    for (p, verdict) in &verdicts {
        let line = match verdict {
            Verdict::Rewind { from, to } => {
                rewound += 1;
                format!(
                    "{}/{}: committed {from}, database at {to}: rewind to {to}",
                    p.topic, p.partition
                )
            }
            Verdict::Keep {
                committed: Some(c),
                at,
            } => {
                format!(
                    "{}/{}: committed {c}, database at {at}: keep",
                    p.topic, p.partition
                )
            }
            Verdict::Keep {
                committed: None,
                at,
            } => {
                format!(
                    "{}/{}: nothing committed, database at {at}: keep",
                    p.topic, p.partition
                )
            }
        };
        let _ = writeln!(stdout, "{line}");
    }
    let _ = if settings.dry_run {
        writeln!(
            stdout,
            "dry run: {rewound} of {} partition(s) would be rewound",
            verdicts.len()
        )
    } else {
        writeln!(
            stdout,
            "rewound {rewound} of {} partition(s) for group {}",
            verdicts.len(),
            settings.group_id
        )
    };
    if positions.is_empty() {
        let _ = writeln!(
            stdout,
            "the database records no position: no batch was committed by a release that records them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_offset_past_the_database_is_moved_back() {
        assert_eq!(
            verdict(Some(120), 100),
            Verdict::Rewind { from: 120, to: 100 }
        );
        assert_eq!(
            verdict(Some(100), 100),
            Verdict::Keep {
                committed: Some(100),
                at: 100
            }
        );
        assert_eq!(
            verdict(Some(90), 100),
            Verdict::Keep {
                committed: Some(90),
                at: 100
            }
        );
        assert_eq!(
            verdict(None, 100),
            Verdict::Keep {
                committed: None,
                at: 100
            }
        );
    }
}
