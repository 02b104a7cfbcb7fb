//! Connecting to PostgreSQL: the session settings of the worker's
//! connections, a pool that connects lazily, connections kept out of the
//! pool from one transaction to the next, and the embedded migrations; and
//! what a database error, or stored data that no longer parses, means to the
//! service layer ([`RepositoryError`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Postgres;

use crate::service_layer::RepositoryError;

/// The migrations under `migrations/`, embedded in the binary.
///
/// Migrations applied by a newer release that this binary does not know are
/// accepted (`ignore_missing`), so that a rollback works: after `kubectl
/// rollout undo`, the older image's `migrate` step finds the newer
/// migrations, applies nothing and succeeds, and the older worker runs on the
/// newer schema. That is safe only because every migration is additive
/// (docs/design.md, "Rollback"; `tests/migrations.rs` checks the rule). sqlx's
/// default refuses such a database with `VersionMissing`.
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator
    });

/// Session settings of the worker's connections, each unless DATABASE_URL
/// sets it already (`application_name=…`, or `options=-c name=value`):
///
/// - `application_name`: the worker, in `pg_stat_activity` and the logs;
/// - `statement_timeout`: no statement of the worker takes seconds (none
///   reads more than what its messages need: see docs/design.md, "The
///   aggregate's storage"); one that runs away is cancelled, counted
///   (`allocation_db_statement_timeouts_total`) and its transaction retried
///   after a back-off, like an outage;
/// - `lock_timeout`: a transaction waiting for a row lock (another session
///   holding a product) gives up, hands its connection back and is retried
///   after a back-off, rather than holding a connection for as long as the
///   lock is held;
/// - `idle_in_transaction_session_timeout`: a session that leaves a
///   transaction open (the worker stuck between two statements) loses it and
///   its locks. The relay never waits for the broker inside a transaction
///   (its shards' locks are its session's, see `adapters::relay`).
///
/// They go in the startup packet's `options`, set once per connection at no
/// cost per transaction. A pooler in transaction mode (PgBouncer) refuses
/// that parameter unless told to ignore it (`ignore_startup_parameters =
/// options`); set them on the database role instead then (`ALTER ROLE …
/// SET lock_timeout = '10s'`). Migrations run without them (see bootstrap).
pub fn worker_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    let options = match options.get_application_name() {
        Some(_) => options,
        None => options.application_name(APPLICATION_NAME),
    };
    let given = options.get_options().unwrap_or_default().to_owned();
    let missing: Vec<(&str, &str)> = SESSION_TIMEOUTS
        .iter()
        .filter(|(name, _)| !given.contains(&format!("{name}=")))
        .copied()
        .collect();
    if missing.is_empty() {
        options
    } else {
        options.options(missing)
    }
}

/// `application_name` of the worker's connections.
pub(crate) const APPLICATION_NAME: &str = "allocation-worker";

/// See [`worker_connect_options`].
pub(crate) const SESSION_TIMEOUTS: [(&str, &str); 3] = [
    ("statement_timeout", "30s"),
    ("lock_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "2min"),
];

/// A pool that does not connect until first used, so that the worker can start,
/// report not-ready and back off while the database is down.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        // sqlx pings a connection on every acquire by default: a round trip
        // before each transaction. Only a connection that sat idle is
        // checked; a broken busy one fails its first statement, which is
        // retried like any outage, and sqlx drops it on release.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

/// How long a pooled connection may sit unused before it is checked on
/// acquire.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections kept out of the pool from one transaction to the next. sqlx
/// 0.8 pings every connection the pool takes back, a round trip per
/// transaction that cannot be switched off; a caller that begins its next
/// transaction soon after reuses the connection of its last one instead.
/// Only a connection whose transaction committed should be kept: one that
/// failed goes back to the pool, which checks it. One found, at the next
/// acquire, to have been kept for `IDLE_BEFORE_PING` or longer goes back to
/// the pool too instead of being used, so a connection that sat idle is
/// checked as any other. Until then, kept connections count as in use.
pub(crate) struct KeptConnections {
    pool: PgPool,
    kept: Mutex<Vec<(PoolConnection<Postgres>, std::time::Instant)>>,
    most: usize,
    /// Set by [`Self::close`]: nothing is kept any more.
    closed: AtomicBool,
}

impl KeptConnections {
    /// Keeps at most `most` connections, which the pool counts as in use:
    /// leave it some for the others (the HTTP probes).
    pub(crate) fn new(pool: PgPool, most: usize) -> Self {
        Self {
            pool,
            kept: Mutex::new(Vec::with_capacity(most)),
            most,
            closed: AtomicBool::new(false),
        }
    }

    /// The most recently kept connection, or one from the pool.
    pub(crate) async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        loop {
            let next = self.lock().pop();
            match next {
                Some((conn, since)) if since.elapsed() < IDLE_BEFORE_PING => return Ok(conn),
                // Dropped: back to the pool, which checks it.
                Some(_) => continue,
                None => return self.pool.acquire().await,
            }
        }
    }

    /// Keeps `conn` for the next [`Self::acquire`]; hands it back to the pool
    /// when enough are kept.
    pub(crate) fn keep(&self, conn: PoolConnection<Postgres>) {
        let mut kept = self.lock();
        if kept.len() < self.most && !self.closed.load(Ordering::Relaxed) {
            kept.push((conn, std::time::Instant::now()));
        }
    }

    /// Hands every kept connection back to the pool, and keeps none from now
    /// on: closing the pool waits for all its connections, and a task still
    /// running at shutdown (a message stuck on a lock) keeps this alive.
    pub(crate) fn close(&self) {
        let mut kept = self.lock();
        self.closed.store(true, Ordering::Relaxed);
        kept.clear();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, std::time::Instant)>> {
        // A panic while holding it cannot leave the list inconsistent.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Maps a database error to the service layer's transient kinds. Unique
/// violations, serialization failures and deadlocks mean another transaction
/// won a race; a statement cancelled by `statement_timeout` (57014,
/// `query_canceled`, which a cancel request also gives) is `TimedOut`, so
/// that it is counted and reported rather than retried unseen; anything else
/// means the database is not usable right now.
pub(crate) fn classify(error: sqlx::Error) -> RepositoryError {
    if let sqlx::Error::Database(db) = &error {
        match db.code().as_deref() {
            Some("23505" | "40001" | "40P01") => {
                return RepositoryError::Conflict(db.message().to_owned())
            }
            Some(STATEMENT_TIMEOUT) => return RepositoryError::TimedOut(Box::new(error)),
            _ => {}
        }
    }
    RepositoryError::Unavailable(Box::new(error))
}

/// SQLSTATE `query_canceled`: what a statement cancelled by
/// `statement_timeout` fails with.
pub(crate) const STATEMENT_TIMEOUT: &str = "57014";

/// Stored names were validated on the way in; one that no longer parses means
/// the data was changed by hand, which retrying will not fix but must not panic.
pub(super) fn stored_name<T>(
    parsed: Result<T, crate::domain::InvalidName>,
) -> Result<T, RepositoryError> {
    parsed.map_err(|e| RepositoryError::Unavailable(format!("invalid stored name: {e}").into()))
}

pub(super) fn stored_qty(value: i64) -> Result<u32, RepositoryError> {
    u32::try_from(value).map_err(|_| {
        RepositoryError::Unavailable(format!("invalid stored quantity {value}").into())
    })
}

/// The rule that makes a rollback safe (docs/design.md, "Rollback"): every
/// migration after the last one released before the rule is additive, so
/// that the previous release still runs on the schema it leaves. Checked on
/// the text of each migration, comments removed; a migration that must
/// break the rule says so on a line `-- not additive: <why>`, and its
/// release note then says to stop the old instances first.
#[cfg(test)]
mod additive_migrations {
    /// Migrations up to this version predate the rule (README, "Upgrades",
    /// lists the three that were not additive).
    const RULE_SINCE: i64 = 20_261_129_000_007;

    /// What would break an older binary still running on the new schema:
    /// something it reads or writes gone, renamed or retyped, or a new
    /// constraint its writes do not know to satisfy.
    const FORBIDDEN: [(&str, &str); 8] = [
        ("DROP TABLE", "drops a table"),
        ("DROP VIEW", "drops a view"),
        ("DROP COLUMN", "drops a column"),
        ("DROP FUNCTION", "drops a function"),
        ("RENAME", "renames something"),
        ("TRUNCATE", "empties a table"),
        ("SET NOT NULL", "makes a column required"),
        ("ADD CONSTRAINT", "adds a constraint older writes may break"),
    ];

    /// Each offence of one migration's SQL, as a reason.
    fn offences(sql: &str) -> Vec<String> {
        let text: String = sql
            .lines()
            .map(|line| line.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
            .to_uppercase();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut found: Vec<String> = FORBIDDEN
            .iter()
            .filter(|(needle, _)| text.contains(needle))
            .map(|(needle, why)| format!("{why} ({})", needle.trim()))
            .collect();
        // A required column without a default refuses the older binary's
        // inserts, which do not name it.
        for statement in text.split(';') {
            if let Some((_, column)) = statement.split_once("ADD COLUMN") {
                if column.contains("NOT NULL") && !column.contains("DEFAULT") {
                    found.push("adds a NOT NULL column without a DEFAULT".to_owned());
                }
            }
            if let Some((_, column)) = statement.split_once("ALTER COLUMN") {
                if column.contains(" TYPE ") {
                    found.push("changes a column's type (ALTER COLUMN ... TYPE)".to_owned());
                }
            }
        }
        found
    }

    #[test]
    fn every_migration_since_the_rule_is_additive() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut checked = 0;
        let mut broken = Vec::new();
        for migration in super::MIGRATOR.iter() {
            if migration.version <= RULE_SINCE {
                continue;
            }
            checked += 1;
            let sql = migration.sql.as_ref();
            if sql
                .lines()
                .any(|l| l.trim_start().starts_with("-- not additive:"))
            {
                continue;
            }
            for why in offences(sql) {
                broken.push(format!(
                    "{} {}: {why}",
                    migration.version, migration.description
                ));
            }
        }
        assert!(
            broken.is_empty(),
            "migrations in {} that an older release could not run on (make them additive, \
             or mark the file `-- not additive: <why>` and write the upgrade note):\n{}",
            dir.display(),
            broken.join("\n")
        );
        eprintln!("{checked} migration(s) since {RULE_SINCE} checked");
    }

    #[test]
    fn the_rule_catches_what_breaks_an_older_release() {
        assert!(offences("CREATE TABLE t (id BIGINT PRIMARY KEY);").is_empty());
        assert!(offences("ALTER TABLE t ADD COLUMN c TEXT NOT NULL DEFAULT 'x';").is_empty());
        assert!(offences("CREATE INDEX t_c ON t (c); -- DROP TABLE t is not run").is_empty());
        assert!(offences("CREATE TYPE mood AS ENUM ('a', 'b');").is_empty());
        assert_eq!(offences("ALTER TABLE t DROP COLUMN c;").len(), 1);
        assert_eq!(offences("alter table t\n  rename column c to d;").len(), 1);
        assert_eq!(
            offences("ALTER TABLE t ALTER COLUMN c TYPE BIGINT;").len(),
            1
        );
        assert_eq!(
            offences("ALTER TABLE t ADD COLUMN c TEXT NOT NULL;").len(),
            1
        );
        assert_eq!(offences("DROP VIEW v; DROP TABLE t;").len(), 2);
    }
}
