//! Retention (README "Retention"): state that only serves the delivery
//! guarantees is deleted once it is old enough to serve them no more, so the
//! database does not grow with the message count.
//!
//! - `processed_messages`, the idempotency records: older than
//!   `IDEMPOTENCY_RETENTION` (a redelivery of such a message would be applied
//!   again, so keep them longer than the inbound topics keep messages).
//! - `outbox`: published rows older than `OUTBOX_RETENTION`. A row still in
//!   `outbox_pending` is never deleted, whatever its age: only rows below the
//!   lowest pending id are considered at all. A row the relay quarantined is
//!   no longer pending, so it holds nothing up; its copy in
//!   `outbox_quarantine` stays until an operator retries or discards it.
//!
//! Deletes go a thousand rows per statement, each its own short transaction,
//! oldest first through an index (`processed_messages_processed_at`, the
//! outbox's primary key), with a pause after each batch several times as long
//! as the batch took: the locks are on rows nobody else writes, held for
//! milliseconds, and the cleaner uses one connection a small fraction of the
//! time. One instance cleans at a time (an advisory lock per statement);
//! the others find nothing to do.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, RETENTION_TABLES as TABLES};

/// Rows per delete statement.
const BATCH_ROWS: i64 = 1000;

/// Arbitrary constant naming the cleaner's advisory lock.
const RETENTION_LOCK: i64 = 0x616c_6c6f_7265_746e;

/// After a batch, the cleaner waits this many times as long as the batch
/// took (at least `MIN_PAUSE`): it keeps its connection busy a tenth of the
/// time at most, however far behind it is.
const PAUSE_FACTOR: u32 = 9;
const MIN_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How long idempotency records are kept.
    pub idempotency: Duration,
    /// How long published outbox rows are kept.
    pub outbox: Duration,
}

impl RetentionSettings {
    /// Time between passes: a quarter of the shorter retention, between 1 s
    /// and 1 min. Rows are kept at most that much longer than their retention.
    pub(crate) fn interval(&self) -> Duration {
        (self.idempotency.min(self.outbox) / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Idempotency records, oldest first, through the index on processed_at.
const DELETE_PROCESSED: &str = "\
    DELETE FROM processed_messages WHERE idempotency_key = ANY(ARRAY( \
        SELECT idempotency_key FROM processed_messages \
        WHERE processed_at < now() - make_interval(secs => $1) \
        AND (SELECT pg_try_advisory_xact_lock($3)) \
        ORDER BY processed_at LIMIT $2))";

/// Published outbox rows: the first rows by id below the lowest pending id
/// (a primary-key range scan that stops after `$2` rows), those of them old
/// enough. Ids follow creation, so when the first rows are too young the
/// rest are too; those few created out of order wait for the next pass.
const DELETE_OUTBOX: &str = "\
    DELETE FROM outbox WHERE id = ANY(ARRAY( \
        SELECT id FROM ( \
            SELECT id, created_at FROM outbox \
            WHERE id < (SELECT COALESCE(min(id), 9223372036854775807) FROM outbox_pending) \
            AND (SELECT pg_try_advisory_xact_lock($3)) \
            ORDER BY id LIMIT $2) first_rows \
        WHERE created_at < now() - make_interval(secs => $1)))";

pub struct Retention {
    pool: PgPool,
    settings: RetentionSettings,
    metrics: std::sync::Arc<Metrics>,
}

impl Retention {
    pub fn new(
        pool: PgPool,
        settings: RetentionSettings,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        Self {
            pool,
            settings,
            metrics,
        }
    }

    /// Passes every [`RetentionSettings::interval`] until `shutdown`. An
    /// error (database unreachable, schema not there yet) ends the pass; the
    /// next one tries again.
    pub(crate) async fn run_until_stopped(self, shutdown: CancellationToken) {
        let interval = self.settings.interval();
        tracing::info!(
            idempotency = %humantime::format_duration(self.settings.idempotency),
            outbox = %humantime::format_duration(self.settings.outbox),
            every = %humantime::format_duration(interval),
            "retention running"
        );
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
            let pass = tokio::select! {
                pass = self.pass() => pass,
                _ = shutdown.cancelled() => return,
            };
            match pass {
                Ok((processed, outbox)) if processed + outbox > 0 => {
                    tracing::debug!(processed, outbox, "retention pass")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "retention pass failed; trying again later"),
            }
        }
    }

    /// Deletes what is old enough in both tables, batch after batch, and
    /// updates the gauges. Returns the rows deleted per table.
    pub async fn pass(&self) -> Result<(u64, u64), sqlx::Error> {
        let processed = self
            .delete_all(TABLES[0], DELETE_PROCESSED, self.settings.idempotency)
            .await?;
        let outbox = self
            .delete_all(TABLES[1], DELETE_OUTBOX, self.settings.outbox)
            .await?;
        self.report_kept().await?;
        Ok((processed, outbox))
    }

    async fn delete_all(
        &self,
        table: &str,
        statement: &str,
        retention: Duration,
    ) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        loop {
            let started = std::time::Instant::now();
            let deleted = sqlx::query(statement)
                .bind(retention.as_secs_f64())
                .bind(BATCH_ROWS)
                .bind(RETENTION_LOCK)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += deleted;
            self.metrics
                .retention_removed
                .with_label_values(&[table])
                .inc_by(deleted);
            // A short batch: nothing more is old enough (or another
            // instance holds the lock).
            if deleted < BATCH_ROWS as u64 {
                return Ok(total);
            }
            tokio::time::sleep((started.elapsed() * PAUSE_FACTOR).max(MIN_PAUSE)).await;
        }
    }

    /// The tables' live-row counts from PostgreSQL's statistics: a count(*)
    /// would read millions of rows on every pass.
    async fn report_kept(&self) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT relname::text, n_live_tup FROM pg_stat_user_tables \
             WHERE schemaname = current_schema() AND relname = ANY($1)",
        )
        .bind(&TABLES[..])
        .fetch_all(&self.pool)
        .await?;
        for (table, rows) in rows {
            self.metrics
                .retention_kept
                .with_label_values(&[table.as_str()])
                .set(rows);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RetentionSettings;
    use std::time::Duration;

    fn every(idempotency: u64, outbox: u64) -> Duration {
        RetentionSettings {
            idempotency: Duration::from_secs(idempotency),
            outbox: Duration::from_secs(outbox),
        }
        .interval()
    }

    #[test]
    fn passes_come_every_quarter_of_the_shorter_retention_within_bounds() {
        assert_eq!(every(7 * 86_400, 86_400), Duration::from_secs(60));
        assert_eq!(every(8, 3), Duration::from_secs(1));
        assert_eq!(every(120, 100), Duration::from_secs(25));
    }
}
