//! What `/healthz` and `/readyz` judge by, beyond "the database answers":
//! whether the consumer loop still polls, and whether the database has the
//! schema this binary needs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::postgres::pool::MIGRATOR;

/// When the consumer loop last polled Kafka. The loop calls
/// [`PollClock::polling`] as it starts waiting for a message and
/// [`PollClock::polled`] when one comes: while it waits, idle or not, it
/// counts as polling; it is stuck when it has been away from the consumer
/// (handing a message on, waiting for room in a partition's queue) for
/// longer than the health timeout.
#[derive(Debug)]
pub struct PollClock {
    origin: Instant,
    /// Milliseconds from `origin` to the last poll; 0 before the first.
    last_ms: AtomicU64,
    waiting: AtomicBool,
}

impl Default for PollClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        }
    }
}

impl PollClock {
    fn now_ms(&self) -> u64 {
        // At least 1, so that 0 keeps meaning "never polled".
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The loop is about to wait for the next message.
    pub fn polling(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// The loop got a message (or an error) and goes to hand it on.
    pub fn polled(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// How long the loop has been away from the consumer: zero while it
    /// waits for a message, `None` before it ever polled (the worker is still
    /// starting: waiting for the database, say).
    pub fn away(&self) -> Option<Duration> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        if self.waiting.load(Ordering::Relaxed) {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_millis(self.now_ms().saturating_sub(last)))
    }
}

/// Whether the database has every migration this binary embeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    Current,
    /// Some are missing: the newest applied (`None`: none at all) and the
    /// newest this binary needs.
    Behind {
        at: Option<i64>,
        needs: i64,
    },
    /// The database cannot be asked.
    Unreachable(String),
}

impl Schema {
    /// The reason `/readyz` gives, one line.
    pub fn reason(&self) -> String {
        match self {
            Schema::Current => "schema current".to_owned(),
            Schema::Behind {
                at: Some(at),
                needs,
            } => {
                format!("schema at {at}, needs {needs} (run `allocation-worker migrate`)")
            }
            Schema::Behind { at: None, needs } => {
                format!("schema at none (no migration applied), needs {needs} (run `allocation-worker migrate`)")
            }
            Schema::Unreachable(_) => "database unreachable".to_owned(),
        }
    }
}

/// Compares the applied migrations (`_sqlx_migrations`) with the binary's.
/// A database that also has migrations this binary does not know (a newer
/// version's) counts as current here: whether this binary may still run on
/// it is the upgrade procedure's business (README "Upgrades").
pub async fn schema(pool: &PgPool) -> Schema {
    let needed: BTreeSet<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let Some(&needs) = needed.last() else {
        return Schema::Current;
    };
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await;
    let applied: BTreeSet<i64> = match applied {
        Ok(applied) => applied.into_iter().collect(),
        // undefined_table: never migrated.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => BTreeSet::new(),
        Err(e) => return Schema::Unreachable(e.to_string()),
    };
    if needed.is_subset(&applied) {
        Schema::Current
    } else {
        Schema::Behind {
            at: applied.last().copied(),
            needs,
        }
    }
}
