//! The outbox quarantine: rows the relay could not publish after bounded
//! attempts (too large, refused by the broker, a kind this version does not
//! know), copied to `outbox_quarantine` and no longer pending (see
//! [`super::relay`]). An operator lists them, publishes them again once the
//! cause is fixed, or discards them (`allocation-worker outbox-quarantine`).
//!
//! A retried row becomes a new outbox row, pending like any other, with the
//! same key, value and headers (so the same `ce_id`): its new id puts it
//! after every row of its key written since, so consumers receive it after
//! them, out of its original order. Each command is one transaction.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One quarantined row as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct QuarantinedRow {
    /// Its id in the outbox when it was quarantined.
    pub id: i64,
    pub(crate) kind: String,
    pub(crate) message_key: Option<Vec<u8>>,
    /// Value and headers, in bytes.
    pub(crate) bytes: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) quarantined_at: DateTime<Utc>,
    pub(crate) attempts: i32,
    pub(crate) error: String,
}

/// Which quarantined rows a command acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    All,
    /// These ids; each must be quarantined, or nothing is done.
    Ids(Vec<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("no quarantined outbox row with id {}; nothing done", list_ids(.0))]
    NotFound(Vec<i64>),
}

fn list_ids(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every quarantined row, by id.
pub async fn list(pool: &PgPool) -> Result<Vec<QuarantinedRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kind, message_key, \
                (COALESCE(octet_length(payload), 0) + octet_length(headers))::int8 AS bytes, \
                created_at, quarantined_at, attempts, error \
         FROM outbox_quarantine ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Makes the chosen rows pending again, as new outbox rows; returns each
/// quarantined id with its new outbox id.
pub async fn retry(pool: &PgPool, which: &Which) -> Result<Vec<(i64, i64)>, QuarantineError> {
    let mut tx = pool.begin().await?;
    let ids = chosen(&mut tx, which).await?;
    let mut retried = Vec::with_capacity(ids.len());
    for id in ids {
        // The shard as the worker writes it (src/adapters/postgres/writes.rs).
        let new_id: i64 = sqlx::query_scalar(
            "WITH q AS (DELETE FROM outbox_quarantine WHERE id = $1 \
                        RETURNING kind, message_key, payload, headers), \
                  r AS (INSERT INTO outbox (kind, message_key, payload, headers) \
                        SELECT kind, message_key, payload, headers FROM q \
                        RETURNING id, outbox_shard(message_key) AS shard), \
                  p AS (INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM r) \
             SELECT id FROM r",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        retried.push((id, new_id));
    }
    tx.commit().await?;
    Ok(retried)
}

/// Deletes the chosen rows for good; returns their ids.
pub async fn discard(pool: &PgPool, which: &Which) -> Result<Vec<i64>, QuarantineError> {
    let mut tx = pool.begin().await?;
    let ids = chosen(&mut tx, which).await?;
    sqlx::query("DELETE FROM outbox_quarantine WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids)
}

/// The ids `which` names, locked for this transaction; an error naming the
/// ones that are not quarantined.
async fn chosen(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    which: &Which,
) -> Result<Vec<i64>, QuarantineError> {
    let (all, wanted) = match which {
        Which::All => (true, Vec::new()),
        Which::Ids(ids) => (false, ids.clone()),
    };
    let found: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM outbox_quarantine WHERE $1 OR id = ANY($2) ORDER BY id FOR UPDATE",
    )
    .bind(all)
    .bind(&wanted)
    .fetch_all(&mut **tx)
    .await?;
    let mut missing: Vec<i64> = wanted
        .into_iter()
        .filter(|id| !found.contains(id))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(QuarantineError::NotFound(missing))
    }
}
