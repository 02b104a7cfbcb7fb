//! `allocation-worker outbox-quarantine list|retry|discard`: what an operator
//! does with the outbox rows the relay quarantined (docs/design.md, "Relay").
//! One line per row on stdout, then one line saying how many; an error is
//! one line on stderr and exit code 1 (2 for a bad setting).

use std::io::Write as _;

use crate::adapters::postgres::pool::lazy_pool;
use crate::adapters::quarantine::{self, QuarantineError, QuarantinedRow, Which};
use crate::command_error::CommandError;
use crate::configuration::DatabaseSettings;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QuarantineAction {
    List,
    Retry(Which),
    Discard(Which),
}

#[derive(Debug, Clone)]
pub struct QuarantineSettings {
    pub(crate) database: DatabaseSettings,
    pub(crate) action: QuarantineAction,
}

pub async fn run(settings: QuarantineSettings) -> Result<(), CommandError> {
    let pool = lazy_pool(settings.database.options, 1);
    let mut lines = Vec::new();
    let done = match &settings.action {
        QuarantineAction::List => quarantine::list(&pool)
            .await
            .map_err(QuarantineError::from)
            .map(|rows| {
                lines.extend(rows.iter().map(describe));
                format!("{} quarantined", rows.len())
            }),
        QuarantineAction::Retry(which) => quarantine::retry(&pool, which).await.map(|retried| {
            lines.extend(
                retried
                    .iter()
                    .map(|(old, new)| format!("retried {old} as outbox row {new}")),
            );
            format!("{} retried", retried.len())
        }),
        QuarantineAction::Discard(which) => {
            quarantine::discard(&pool, which).await.map(|discarded| {
                lines.extend(discarded.iter().map(|id| format!("discarded {id}")));
                format!("{} discarded", discarded.len())
            })
        }
    };
    pool.close().await;
    let done = done.map_err(|e| CommandError::Failed(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    for line in lines.iter().chain([&done]) {
        writeln!(out, "{line}").map_err(|e| CommandError::Failed(format!("stdout: {e}")))?;
    }
    Ok(())
}

/// One row on one line: the error last, as it may be long.
fn describe(row: &QuarantinedRow) -> String {
    let key = row.message_key.as_deref().map_or_else(
        || "-".to_owned(),
        |k| String::from_utf8_lossy(k).into_owned(),
    );
    format!(
        "id={} kind={} key={:?} bytes={} created={} quarantined={} attempts={} error={:?}",
        row.id,
        row.kind,
        key,
        row.bytes,
        row.created_at.to_rfc3339(),
        row.quarantined_at.to_rfc3339(),
        row.attempts,
        row.error
    )
}
