//! What `/healthz` and `/readyz` judge by, beyond "the database answers"
//! ([`Health`]): whether the consumer runs and holds partitions, whether its
//! loop still polls, whether a partition keeps failing, and whether the
//! database has the schema this binary needs.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::postgres::pool::MIGRATOR;

/// What the probes judge the worker by, written by the consumer, its loop
/// and the partitions' tasks: one per worker, shared.
#[derive(Debug, Default)]
pub struct Health {
    /// True while the loop runs and the consumer is healthy.
    pub consumer_running: AtomicBool,
    /// True between an assignment and the next revocation. A frozen or
    /// lost broker shows here (the session times out and the assignment is
    /// lost) long before it shows as a consumer error.
    pub consumer_assigned: AtomicBool,
    /// When the loop last polled the consumer, for `/healthz`.
    pub poll_clock: PollClock,
    /// Partitions whose batch keeps failing, for `/readyz`.
    pub failing: FailingPartitions,
}

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
    pub(crate) fn polling(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// The loop got a message (or an error) and goes to hand it on.
    pub(crate) fn polled(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// How long the loop has been away from the consumer: zero while it
    /// waits for a message, `None` before it ever polled (the worker is still
    /// starting: waiting for the database, say).
    pub(crate) fn away(&self) -> Option<Duration> {
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

/// Partitions whose batch keeps failing (a statement that times out on one
/// product, a lock never released, conflicts that do not end), which
/// `/readyz` reports once one has failed for long enough: the database
/// answers the probe, yet that partition makes no progress. A partition is
/// in it from its first failed attempt at a batch until an attempt
/// succeeds or its task stops.
#[derive(Debug, Default)]
pub struct FailingPartitions {
    failing: Mutex<HashMap<(String, i32), (Instant, String)>>,
}

/// A partition that has failed for a while: since how long, and its last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stalled {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) for_: Duration,
    pub(crate) error: String,
}

impl FailingPartitions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), (Instant, String)>> {
        // A panic while holding it cannot leave the map inconsistent.
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt at a batch of `topic`/`partition` failed with `error`.
    pub(crate) fn failed(&self, topic: &str, partition: i32, error: &str) {
        let mut failing = self.lock();
        let entry = failing
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| (Instant::now(), String::new()));
        error.clone_into(&mut entry.1);
    }

    /// The partition's batch committed, or its task stopped.
    pub(crate) fn recovered(&self, topic: &str, partition: i32) {
        let mut failing = self.lock();
        // Called after every batch; nearly always there is nothing to
        // remove, and no key need be made.
        if !failing.is_empty() {
            failing.remove(&(topic.to_owned(), partition));
        }
    }

    /// The partition failing the longest, if it has failed for at least
    /// `longer_than`.
    pub(crate) fn stalled(&self, longer_than: Duration) -> Option<Stalled> {
        let failing = self.lock();
        let ((topic, partition), (since, error)) =
            failing.iter().min_by_key(|(_, (since, _))| *since)?;
        let for_ = since.elapsed();
        (for_ >= longer_than).then(|| Stalled {
            topic: topic.clone(),
            partition: *partition,
            for_,
            error: error.clone(),
        })
    }
}

/// Whether the database has every migration this binary embeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Schema {
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
    pub(crate) fn reason(&self) -> String {
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
pub(crate) async fn schema(pool: &PgPool) -> Schema {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_counts_as_stalled_from_its_first_failure_until_it_recovers() {
        let failing = FailingPartitions::default();
        assert_eq!(failing.stalled(Duration::ZERO), None);
        failing.failed("t", 1, "first");
        failing.failed("t", 1, "second");
        let stalled = failing.stalled(Duration::ZERO).expect("failing");
        assert_eq!((stalled.topic.as_str(), stalled.partition), ("t", 1));
        assert_eq!(
            stalled.error, "second",
            "the last error, since the first failure"
        );
        assert_eq!(
            failing.stalled(Duration::from_secs(3600)),
            None,
            "not for long yet"
        );
        failing.recovered("t", 1);
        assert_eq!(failing.stalled(Duration::ZERO), None);
    }
}
