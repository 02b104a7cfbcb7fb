//! The outbox relay: publishes committed outbox rows, waits for the broker to
//! acknowledge them, then marks them sent. At least once: a crash between
//! publish and mark sends the rows again, with the same `ce_id`.
//!
//! - **Shards.** Every pending row carries its shard, a hash of its message
//!   key (the SKU, for events) into [`SHARDS`] (migration
//!   `20261206000020`). A relay publishes only the shards whose advisory
//!   lock it holds, and each instance's relay takes its share of the shards
//!   (all of them divided by the number of relays running), so several
//!   instances publish at once while one key's rows stay with one relay at a
//!   time, in id order.
//! - **The right to publish outlives the records in flight.** The locks are
//!   session-level, on a connection of the relay's own that is never left in
//!   a transaction, so `idle_in_transaction_session_timeout` cannot end them
//!   while the broker is slow to acknowledge. A pass ends only once every
//!   record it handed over is settled, and shards are given up only between
//!   passes. Should the session end anyway (the server restarted, the route
//!   gone), `outbox_relay_shards` fences the shards: before handing records
//!   over, a pass writes until when they may still be in flight; a relay
//!   that takes a shard over waits until then. At shutdown the pass in hand
//!   is finished, not dropped, within the deadline, then the producer is
//!   flushed; the fence is cleared only if that settled everything.
//! - **Order within a pass.** The rows of one key are sent in id order; rows
//!   of one key bound for the same topic (so the same partition) are
//!   pipelined, which the idempotent producer keeps in order; a row bound for
//!   another topic than the key's previous one waits until that one is
//!   acknowledged. At the first failure of a key, nothing more of that key is
//!   sent in the pass, and its acknowledged rows behind the failed one are
//!   sent again after it.
//! - **Failures are per key.** A failed key backs off alone (100 ms to 5 s),
//!   then tries its failed row alone until it passes or is quarantined,
//!   while the other keys flow; a failure never fails the pass. A row that
//!   can never be published (too large for the broker, a kind this version
//!   does not know, unreadable headers) is quarantined at once, one refused
//!   by the broker (topic missing, not authorised, record refused) after
//!   [`MAX_REFUSALS`] attempts: copied to `outbox_quarantine` and no longer
//!   pending, so it holds up neither its key's later rows nor retention.
//!   Transient failures (timeouts, an unavailable partition, a full queue)
//!   are retried for ever: an outage must lose nothing. What
//!   `allocation-worker outbox-quarantine` does with a quarantined row is in
//!   [`super::quarantine`].
//! - **One relay, two stores.** Every statement the relay runs is a method
//!   of [`RelayStore`]: [`PgRelayStore`] in production, an in-memory store
//!   in the seeded simulation (tests/simulation), which runs this same
//!   `Relay` under a paused clock (docs/design.md, "Simulation: the relay").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::Notify;
// tokio's clock, not std's: a simulation pauses and advances it (tests/simulation).
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::kafka::{Topics, WorkerContext};
use super::metrics::Metrics;
use super::outbox::{
    decode_headers, encode_headers, shard_bit, wire_headers, OutboxKind, WrittenShards, SHARDS,
    VALUE_OMITTED_HEADER,
};
use super::postgres::pool::classify;
use crate::service_layer::RepositoryError;

/// Most bytes of values in one relay pass (beyond its first row), so that a
/// run of large dead letters does not load gigabytes at once.
const MAX_PASS_BYTES: i64 = 16 * 1024 * 1024;

/// The lock of the single relay of versions before the shards, which took
/// it exclusively for each pass. Every relay of this version holds it shared
/// for as long as its session lasts: an earlier version's relay and these
/// never publish at once during a rolling upgrade, and its holders are the
/// relays running, among which the shards are shared.
const RELAY_LOCK: i64 = 0x616c_6c6f_6372_6c79;

/// Shard `s`'s advisory lock is `SHARD_LOCKS + s`.
const SHARD_LOCKS: i64 = 0x616c_6c6f_7368_0000;

/// How often a relay counts the relays and takes or gives up shards: how
/// soon a new instance gets its share, and one that stopped is replaced.
const BALANCE_EVERY: Duration = Duration::from_secs(1);

/// How long after its start a pass may still hand records over. With the
/// producer's delivery timeout (`message.timeout.ms`, 30 s) it bounds how
/// long a pass's records can be in flight, which [`IN_FLIGHT_LEASE`] covers.
const SEND_WINDOW: Duration = Duration::from_secs(10);

/// How long a pass's records may be in flight, as written to
/// `outbox_relay_shards` before they are handed over: more than
/// [`SEND_WINDOW`] plus `message.timeout.ms`. An operator who raises
/// `message.timeout.ms` past 30 s weakens the fence by as much.
const IN_FLIGHT_LEASE: Duration = Duration::from_secs(45);

/// `idle_session_timeout` of the relay's session: a relay that stops
/// talking to PostgreSQL (its host gone, its process frozen) loses its
/// shards' locks after this, and the others take them over once its fence
/// has passed. Above the longest a healthy relay is silent: a pass waiting
/// for acknowledgements ([`SEND_WINDOW`] plus `message.timeout.ms`), since
/// between passes it polls twice a second.
const IDLE_SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts at a row the broker refuses (topic missing or not authorised,
/// record refused) before it is quarantined: a topic being created, or an
/// ACL being granted, gets a few seconds.
pub(crate) const MAX_REFUSALS: u32 = 5;

/// Per-key back-off after a failure: from 100 ms, doubling, to 5 s.
const KEY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const KEY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Gives every relay of the process a holder id of its own (see [`holder_id`]).
static RELAYS_STARTED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] RepositoryError),
}

impl From<sqlx::Error> for RelayError {
    fn from(error: sqlx::Error) -> Self {
        RelayError::Database(classify(error))
    }
}

/// A record on its way out: the relay's view of a Kafka record.
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub(crate) headers: Vec<(&'a str, &'a [u8])>,
}

/// Resolves once the broker acknowledged a record (`Ok`) or its delivery
/// failed for good.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), KafkaError>> + Send>>;

/// What the relay publishes through: the Kafka producer in production, and
/// in tests a double that fails chosen sends.
pub trait Publisher: Send + Sync + 'static {
    /// Hands `record` over; `Err` when it is refused at once.
    fn send(&self, record: OutboundRecord<'_>) -> Result<Delivery, KafkaError>;
    /// Waits up to `timeout` for everything handed over to be delivered.
    fn flush(&self, timeout: Duration) -> Result<(), KafkaError>;
}

impl Publisher for FutureProducer<WorkerContext> {
    fn send(&self, record: OutboundRecord<'_>) -> Result<Delivery, KafkaError> {
        let count = record.headers.len();
        let headers = record.headers.into_iter().fold(
            OwnedHeaders::new_with_capacity(count),
            |hs, (n, v)| {
                hs.insert(Header {
                    key: n,
                    value: Some(v),
                })
            },
        );
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(record.topic).headers(headers);
        if let Some(key) = record.key {
            out = out.key(key);
        }
        if let Some(payload) = record.payload {
            out = out.payload(payload);
        }
        let delivery = self.send_result(out).map_err(|(e, _)| e)?;
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                // The producer was dropped with the record still queued.
                Err(_) => Err(KafkaError::Canceled),
            }
        }))
    }

    fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        Producer::flush(self, timeout)
    }
}

/// What became of one row in a pass.
enum Sent {
    Acknowledged,
    Failed { error: String, verdict: Verdict },
}

/// What a failure means for its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// May pass by itself (a timeout, a partition without a leader, a full
    /// queue): retried for ever, the key backing off.
    Transient,
    /// The broker refuses it (topic missing or not authorised, record
    /// refused): quarantined after [`MAX_REFUSALS`] attempts.
    Refused,
    /// Too large for the broker.
    TooLarge,
    /// Can never be published by this version (unknown kind, unreadable
    /// headers): quarantined at once.
    Unpublishable,
}

/// One pending row of the outbox, as a pass takes it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub message_key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Encoded ([`encode_headers`]).
    pub headers: Vec<u8>,
    pub shard: i16,
    /// How many rows the pass would have taken without its byte bound.
    pub total: i64,
}

/// The relay's session: its own connection (the store's session), which
/// holds the advisory locks.
struct Session<C> {
    conn: C,
    /// Holds [`RELAY_LOCK`] shared: counted among the relays.
    member: bool,
    /// The shards whose lock this session holds.
    held: BTreeSet<i16>,
    /// Shards taken over while the previous holder's records may still be
    /// in flight: not published before the instant given.
    fenced: BTreeMap<i16, Instant>,
    balanced_at: Option<Instant>,
    /// When a pass last asked for every ready shard.
    asked_all_at: Option<Instant>,
    /// The ready shards of the last pass: a pass after a change asks them all.
    ready_before: Vec<i16>,
    /// Shards the last pass left rows in (it was full, or a key failed or
    /// backs off): the next pass asks them again, written or not.
    carry: u32,
}

/// Where one key stands after failures.
#[derive(Debug, Default)]
struct KeyState {
    /// Failures in a row, for the back-off.
    failures: u32,
    retry_at: Option<Instant>,
    /// The row that failed last, and how often in a row the broker refused it.
    row: i64,
    refusals: u32,
}

struct State<C> {
    session: Option<Session<C>>,
    /// Keys that failed and have not succeeded since. Only failing keys are
    /// here, and each leaves at its next success or quarantine. Only looked
    /// up, never iterated: its order decides nothing.
    keys: HashMap<Option<Vec<u8>>, KeyState>,
}

impl<C> Default for State<C> {
    fn default() -> Self {
        Self {
            session: None,
            keys: HashMap::new(),
        }
    }
}

/// A row to quarantine: its id, the attempts made, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub id: i64,
    pub(crate) attempts: u32,
    pub error: String,
}

/// Every database operation of the relay, on its session: PostgreSQL in
/// production ([`PgRelayStore`]), an in-memory store in the simulation
/// (tests/simulation), so that the relay's logic runs unchanged on both.
/// A session holds the advisory locks taken on it until it ends: dropped,
/// closed, or ended by the server. Every method fails only when the
/// database does.
pub trait RelayStore: Send + Sync + 'static {
    /// The relay's own connection.
    type Session: Send + 'static;

    /// Opens a session whose idle sessions the server ends after `idle`.
    fn connect(
        &self,
        idle: Duration,
    ) -> impl Future<Output = Result<Self::Session, RelayError>> + Send;

    /// Takes [`RELAY_LOCK`] shared, without waiting: `false` while an
    /// earlier version's relay holds it exclusively.
    fn join_relays(
        &self,
        session: &mut Self::Session,
    ) -> impl Future<Output = Result<bool, RelayError>> + Send;

    /// How many sessions hold [`RELAY_LOCK`] (the relays running), and how
    /// many rows are quarantined.
    fn census(
        &self,
        session: &mut Self::Session,
    ) -> impl Future<Output = Result<(i64, i64), RelayError>> + Send;

    /// Takes the locks of up to `limit` of `candidates`, in their order,
    /// without waiting; returns the shards taken.
    fn try_lock_shards(
        &self,
        session: &mut Self::Session,
        candidates: &[i16],
        limit: usize,
    ) -> impl Future<Output = Result<Vec<i16>, RelayError>> + Send;

    /// Releases the locks of `shards`.
    fn unlock_shards(
        &self,
        session: &mut Self::Session,
        shards: &[i16],
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// The fences of `shards` written by another holder than `holder` and
    /// not passed yet: per shard, how long until they pass.
    fn fences(
        &self,
        session: &mut Self::Session,
        shards: &[i16],
        holder: i64,
    ) -> impl Future<Output = Result<Vec<(i16, Duration)>, RelayError>> + Send;

    /// The first pending rows of `shards` in id order (at most `limit`, and
    /// `max_bytes` of values beyond the first), and, before they are
    /// returned, the fence of their shards: `holder`'s records may be in
    /// flight for `lease` from now.
    fn take_pending(
        &self,
        session: &mut Self::Session,
        shards: &[i16],
        limit: i64,
        max_bytes: i64,
        holder: i64,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, RelayError>> + Send;

    /// At once: `sent` and the quarantined rows leave the pending ones,
    /// `quarantine` is copied aside, and `holder`'s fence of `shards` is
    /// lifted.
    fn mark(
        &self,
        session: &mut Self::Session,
        sent: &[i64],
        quarantine: &[Quarantine],
        shards: &[i16],
        holder: i64,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Drops row `id`'s value, adding `header` to its headers.
    fn omit_value(
        &self,
        session: &mut Self::Session,
        id: i64,
        header: &[u8],
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Lifts `holder`'s fence of `shards`.
    fn lift_fences(
        &self,
        session: &mut Self::Session,
        shards: &[i16],
        holder: i64,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Ends the session, which releases its locks.
    fn close(&self, session: Self::Session) -> impl Future<Output = ()> + Send;
}

/// The relay's read of a pass: the `limit` lowest pending ids of the shards
/// it holds (rows of an older release, without a shard, found by their
/// key), then those rows up to `max_bytes`, fencing their shards. One text
/// for every shard at once, one for each number of shards fewer
/// ([`take_pending_sql`]).
///
/// The ids are read in id order, as far as the pass takes them: with every
/// shard, from the primary key; with some, from one branch per shard, each
/// reading its shard's index in id order, merged by id (a MergeAppend), each
/// read only as far as the merge takes from it. So a pass reads about
/// `limit` entries however many are pending. A join of the held shards to a
/// subquery per shard (its form until 2026-12-07) read up to `limit` entries
/// of every shard, sorted them all and kept `limit`: up to 32 times `limit`
/// under a backlog, 29–35 ms a pass of 2,000 with 200,000 rows pending where
/// this takes 7 (BENCHMARKS.md, "The relay's read of a pass").
///
/// An older release's rows are read in id order among those of the shards
/// held, as far as the pass needs. The join's form read the `limit` lowest
/// of them whatever their shard and kept the held shards' among those: with
/// more than `limit` such rows pending, a relay holding some shards passed
/// over an older row of its own and took a later one, perhaps of the same
/// key (a service test, `a_pass_takes_the_lowest_pending_ids_of_the_shards_it_holds`,
/// found it). Such rows exist only while instances of an older release
/// write during a rolling upgrade.
struct TakePending {
    every: String,
    /// `some[k - 1]`: for `k` shards.
    some: Vec<String>,
}

static TAKE_PENDING: std::sync::LazyLock<TakePending> = std::sync::LazyLock::new(|| {
    let rows = "taken AS ( \
                    SELECT id, kind, message_key, payload, headers, shard, total FROM ( \
                        SELECT o.id, o.kind, o.message_key, o.payload, o.headers, \
                               outbox_shard(o.message_key) AS shard, \
                               sum(COALESCE(octet_length(o.payload), 0)) OVER (ORDER BY o.id) AS upto, \
                               count(*) OVER () AS total \
                        FROM outbox o WHERE o.id = ANY(ARRAY(SELECT id FROM pending))) r \
                    WHERE upto - COALESCE(octet_length(payload), 0) < $3), \
                fence AS ( \
                    UPDATE outbox_relay_shards \
                    SET holder = $4, in_flight_until = clock_timestamp() + make_interval(secs => $5) \
                    WHERE shard IN (SELECT shard FROM taken) \
                    AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off') \
                SELECT id, kind, message_key, payload, headers, shard, total FROM taken ORDER BY id";
    // Every shard: every pending id is one of them, an older release's too.
    // $1 is bound and unused, so that both texts take the same parameters.
    let every = format!(
        "WITH pending AS ( \
             SELECT id FROM outbox_pending WHERE $1::int2[] IS NOT NULL ORDER BY id LIMIT $2), \
         {rows}"
    );
    let some = (1..SHARDS)
        .map(|shards| {
            let branches: Vec<String> = (1..=shards)
                .map(|k| {
                    format!(
                        "(SELECT id FROM outbox_pending WHERE shard = ($1::int2[])[{k}] \
                         ORDER BY id LIMIT $2)"
                    )
                })
                .collect();
            format!(
                "WITH pending AS ( \
                     SELECT id FROM ( \
                         {} \
                         UNION ALL \
                         (SELECT p.id FROM outbox_pending p JOIN outbox o ON o.id = p.id \
                          WHERE p.shard IS NULL AND outbox_shard(o.message_key) = ANY($1) \
                          ORDER BY p.id LIMIT $2)) ids \
                     ORDER BY id LIMIT $2), \
                 {rows}",
                branches.join(" UNION ALL ")
            )
        })
        .collect();
    TakePending { every, some }
});

/// The text of [`TAKE_PENDING`] for `shards`, distinct; `None` for none.
fn take_pending_sql(shards: &[i16]) -> Option<&'static str> {
    let texts = &*TAKE_PENDING;
    if shards.len() >= SHARDS as usize {
        Some(texts.every.as_str())
    } else {
        shards
            .len()
            .checked_sub(1)
            .and_then(|k| texts.some.get(k))
            .map(String::as_str)
    }
}

/// The relay's database in production: its own connection on the pool's
/// options (the worker's session settings), outside the pool, whose
/// connections never hold the relay's locks.
pub struct PgRelayStore {
    pool: PgPool,
}

impl PgRelayStore {
    /// Public for the service tests, which drive the store's statements
    /// directly.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl RelayStore for PgRelayStore {
    type Session = PgConnection;

    /// The relay's own connection, on the pool's options (the worker's
    /// session settings), outside the pool: its locks must not go back to
    /// the pool with it.
    async fn connect(&self, idle: Duration) -> Result<PgConnection, RelayError> {
        let options = self.pool.connect_options();
        let mut conn = tokio::time::timeout(Duration::from_secs(5), options.connect())
            .await
            .map_err(|_| {
                RelayError::Database(RepositoryError::Unavailable(
                    "connecting the relay's session timed out".into(),
                ))
            })??;
        // Not in the startup options: PostgreSQL before 14 does not know the
        // setting and would refuse the connection; there it is left unset.
        let millis = idle.as_millis().to_string();
        if let Err(error) = sqlx::query("SELECT set_config('idle_session_timeout', $1, false)")
            .bind(&millis)
            .execute(&mut conn)
            .await
        {
            tracing::warn!(%error, "the relay's session has no idle_session_timeout");
        }
        Ok(conn)
    }

    async fn join_relays(&self, session: &mut PgConnection) -> Result<bool, RelayError> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1)")
            .bind(RELAY_LOCK)
            .fetch_one(session)
            .await?)
    }

    async fn census(&self, session: &mut PgConnection) -> Result<(i64, i64), RelayError> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_locks \
                     WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND classid::int8 = $1 AND objid::int8 = $2), \
                    (SELECT count(*) FROM outbox_quarantine)",
        )
        .bind(RELAY_LOCK >> 32)
        .bind(RELAY_LOCK & 0xffff_ffff)
        .fetch_one(session)
        .await?)
    }

    async fn try_lock_shards(
        &self,
        session: &mut PgConnection,
        candidates: &[i16],
        limit: usize,
    ) -> Result<Vec<i16>, RelayError> {
        // The scan stops at the limit: no lock is taken beyond it.
        Ok(sqlx::query_scalar(
            "SELECT s FROM unnest($1::int2[]) AS s \
             WHERE pg_try_advisory_lock($2 + s) LIMIT $3",
        )
        .bind(candidates)
        .bind(SHARD_LOCKS)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(session)
        .await?)
    }

    async fn unlock_shards(
        &self,
        session: &mut PgConnection,
        shards: &[i16],
    ) -> Result<(), RelayError> {
        sqlx::query("SELECT pg_advisory_unlock($1 + s) FROM unnest($2::int2[]) AS s")
            .bind(SHARD_LOCKS)
            .bind(shards)
            .execute(session)
            .await?;
        Ok(())
    }

    async fn fences(
        &self,
        session: &mut PgConnection,
        shards: &[i16],
        holder: i64,
    ) -> Result<Vec<(i16, Duration)>, RelayError> {
        let fences: Vec<(i16, f64)> = sqlx::query_as(
            "SELECT shard, EXTRACT(EPOCH FROM in_flight_until - clock_timestamp())::float8 \
             FROM outbox_relay_shards WHERE shard = ANY($1) \
             AND in_flight_until > clock_timestamp() AND holder IS DISTINCT FROM $2",
        )
        .bind(shards)
        .bind(holder)
        .fetch_all(session)
        .await?;
        Ok(fences
            .into_iter()
            .map(|(shard, seconds)| {
                (
                    shard,
                    Duration::try_from_secs_f64(seconds).unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn take_pending(
        &self,
        session: &mut PgConnection,
        shards: &[i16],
        limit: i64,
        max_bytes: i64,
        holder: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, RelayError> {
        let shards: Vec<i16> = shards
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let Some(sql) = take_pending_sql(&shards) else {
            return Ok(Vec::new());
        };
        Ok(sqlx::query_as(sql)
            .bind(&shards)
            .bind(limit)
            .bind(max_bytes)
            .bind(holder)
            .bind(lease.as_secs_f64())
            .fetch_all(session)
            .await?)
    }

    async fn mark(
        &self,
        session: &mut PgConnection,
        sent: &[i64],
        quarantine: &[Quarantine],
        shards: &[i16],
        holder: i64,
    ) -> Result<(), RelayError> {
        // One statement: the acknowledged ids leave outbox_pending (the rows
        // themselves are never rewritten, migration 20261128000005), the
        // quarantined rows are copied aside and leave it too, and the fence
        // of this pass's shards is lifted: everything it handed over is
        // settled. outbox_relay.marked_at is when marks are written, by
        // whichever relay finds its one row free (the relays never queue for
        // it: it only tells people when the relay last marked). None of
        // it waits for the disk: a mark lost in a crash publishes its row
        // again with the same ce_id, which at-least-once allows; a lost
        // quarantine tries the row again. set_config(…, true) is SET LOCAL.
        let (ids, attempts, errors): (Vec<i64>, Vec<i32>, Vec<String>) = quarantine
            .iter()
            .map(|q| {
                (
                    q.id,
                    i32::try_from(q.attempts).unwrap_or(i32::MAX),
                    q.error.clone(),
                )
            })
            .fold(
                (vec![], vec![], vec![]),
                |(mut a, mut b, mut c), (x, y, z)| {
                    a.push(x);
                    b.push(y);
                    c.push(z);
                    (a, b, c)
                },
            );
        sqlx::query(
            "WITH quarantined AS ( \
                 INSERT INTO outbox_quarantine \
                     (id, kind, message_key, payload, headers, created_at, attempts, error) \
                 SELECT o.id, o.kind, o.message_key, o.payload, o.headers, o.created_at, \
                        q.attempts, q.error \
                 FROM unnest($2::int8[], $3::int4[], $4::text[]) AS q(id, attempts, error) \
                 JOIN outbox o ON o.id = q.id \
                 ON CONFLICT (id) DO NOTHING), \
             marked AS ( \
                 DELETE FROM outbox_pending WHERE id = ANY($1::int8[] || $2::int8[]) \
                 AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'), \
             lifted AS ( \
                 UPDATE outbox_relay_shards SET in_flight_until = NULL \
                 WHERE shard = ANY($5) AND holder = $6) \
             UPDATE outbox_relay SET marked_at = GREATEST(marked_at, statement_timestamp()) \
             WHERE cardinality($1::int8[]) > 0 \
             AND only_row IN (SELECT only_row FROM outbox_relay FOR UPDATE SKIP LOCKED)",
        )
        .bind(sent)
        .bind(&ids)
        .bind(&attempts)
        .bind(&errors)
        .bind(shards)
        .bind(holder)
        .execute(session)
        .await?;
        Ok(())
    }

    async fn omit_value(
        &self,
        session: &mut PgConnection,
        id: i64,
        header: &[u8],
    ) -> Result<(), RelayError> {
        sqlx::query(
            "UPDATE outbox SET payload = NULL, headers = headers || $2 \
             WHERE id = $1 AND payload IS NOT NULL",
        )
        .bind(id)
        .bind(header)
        .execute(session)
        .await?;
        Ok(())
    }

    async fn lift_fences(
        &self,
        session: &mut PgConnection,
        shards: &[i16],
        holder: i64,
    ) -> Result<(), RelayError> {
        sqlx::query(
            "UPDATE outbox_relay_shards SET in_flight_until = NULL \
             WHERE shard = ANY($1) AND holder = $2",
        )
        .bind(shards)
        .bind(holder)
        .execute(session)
        .await?;
        Ok(())
    }

    async fn close(&self, session: PgConnection) {
        if let Err(error) = session.close().await {
            tracing::debug!(%error, "closing the relay's session");
        }
    }
}

pub struct Relay<S: RelayStore = PgRelayStore> {
    /// The relay's database (PostgreSQL in production); its locks live in
    /// the relay's session, never in a pooled connection.
    store: S,
    publisher: Box<dyn Publisher>,
    topics: Topics,
    /// Rung by the worker after each commit, so events leave without waiting
    /// for the next poll.
    wake: Arc<Notify>,
    /// The shards this process's worker committed rows to since the last
    /// pass: while this relay holds every shard, a pass between its passes
    /// over all of them (one each `poll_interval`) asks only for these.
    /// `None` (a relay without a worker beside it, as in tests): every pass
    /// asks every shard.
    written: Option<Arc<WrittenShards>>,
    batch_size: i64,
    /// Set by each pass: it was full, so the next one need not wait.
    more_waiting: AtomicBool,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    /// This relay in `outbox_relay_shards.holder`.
    holder: i64,
    lease: Duration,
    idle_session_timeout: Duration,
    /// A tokio mutex: a pass holds it across its awaits, and passes never
    /// run at once (the loop makes them one after the other).
    state: tokio::sync::Mutex<State<S::Session>>,
}

impl Relay<PgRelayStore> {
    pub fn new(
        pool: PgPool,
        producer: FutureProducer<WorkerContext>,
        topics: Topics,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_publisher(pool, Box::new(producer), topics, wake, metrics)
    }

    /// A relay that publishes through `publisher` (a test double, say).
    pub fn with_publisher(
        pool: PgPool,
        publisher: Box<dyn Publisher>,
        topics: Topics,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Relay::with_store(PgRelayStore::new(pool), publisher, topics, wake, metrics)
    }
}

impl<S: RelayStore> Relay<S> {
    /// A relay on the database `store` (the in-memory one of the simulation,
    /// say), publishing through `publisher`.
    pub fn with_store(
        store: S,
        publisher: Box<dyn Publisher>,
        topics: Topics,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            publisher,
            topics,
            wake,
            written: None,
            batch_size: 2000,
            more_waiting: AtomicBool::new(false),
            poll_interval: Duration::from_millis(500),
            metrics,
            holder: holder_id(),
            lease: IN_FLIGHT_LEASE,
            idle_session_timeout: IDLE_SESSION_TIMEOUT,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// This relay's id in the fence table instead of one made from the pid,
    /// the wall clock and a count (see [`holder_id`]): the simulation draws
    /// it from its seed, since the id also picks where the relay's shard
    /// rotation starts, and a run must be the same for the same seed.
    pub fn with_holder(mut self, holder: i64) -> Self {
        self.holder = holder;
        self
    }

    /// While it holds every shard, asks only those the worker recorded in
    /// `written` between its passes over all of them (see `Relay::pass`).
    pub fn with_written_shards(mut self, written: Arc<WrittenShards>) -> Self {
        self.written = Some(written);
        self
    }

    /// How often a pass asks every shard this relay holds, and how long the
    /// relay waits for a wake before its next pass (500 ms by default).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long this relay's records count as in flight for the others
    /// ([`IN_FLIGHT_LEASE`] by default); tests shorten it.
    pub fn with_in_flight_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long the relay's session may be silent before PostgreSQL ends it
    /// ([`IDLE_SESSION_TIMEOUT`] by default); tests shorten it.
    pub fn with_idle_session_timeout(mut self, timeout: Duration) -> Self {
        self.idle_session_timeout = timeout;
        self
    }

    /// Publishes one batch of the unsent rows of this relay's shards;
    /// returns how many were marked sent. Zero when there was nothing to
    /// send, or no shard is this relay's now. Fails only when the database
    /// does: a row's failure is its key's, never the pass's.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let pass = self.pass(state).await;
        if pass.is_err() {
            // The session may be gone, and its locks with it: the next pass
            // starts from a new one. Nothing of this pass is in flight (a
            // pass settles every record before it marks).
            state.session = None;
        }
        pass
    }

    async fn pass(&self, state: &mut State<S::Session>) -> Result<usize, RelayError> {
        let started = Instant::now();
        if state.session.is_none() {
            state.session = Some(self.connect().await?);
        }
        let Some(session) = state.session.as_mut() else {
            return Ok(0);
        };
        if session
            .balanced_at
            .is_none_or(|at| at.elapsed() >= BALANCE_EVERY)
        {
            self.balance(session).await?;
        }
        let now = Instant::now();
        session.fenced.retain(|_, until| *until > now);
        let ready: Vec<i16> = session
            .held
            .iter()
            .copied()
            .filter(|s| !session.fenced.contains_key(s))
            .collect();
        // Which of them to ask. Asking costs an index scan per shard, and
        // at a steady rate a pass comes after nearly every commit, which
        // wrote to one shard or two of 32: so a relay that holds every shard
        // (the only one running) asks, between its passes over all of them
        // (one each `poll_interval`), only those its own worker committed
        // rows to since the last pass, and those the last pass left rows
        // in. Rows written by anyone else (the quarantine's retry, an
        // earlier version during an upgrade) wait for the pass over every
        // shard, as they waited for the poll before. With several relays,
        // the other instances' workers write into this relay's shards all
        // the time, and their rows must not wait: every pass asks every
        // ready shard, as does a pass after the ready shards changed
        // (taken, fenced, unfenced) or on a new session.
        let written = self.written.as_ref().map(|w| w.take());
        let alone = session.held.len() == SHARDS as usize;
        let ask_all = !alone
            || written.is_none()
            || session.ready_before != ready
            || session
                .asked_all_at
                .is_none_or(|at| at.elapsed() >= self.poll_interval);
        let wanted = written.unwrap_or(0) | std::mem::take(&mut session.carry);
        let asked: Vec<i16> = if ask_all {
            session.asked_all_at = Some(now);
            ready.clone()
        } else {
            ready
                .iter()
                .copied()
                .filter(|s| wanted & shard_bit(*s) != 0)
                .collect()
        };
        session.ready_before = ready;
        if asked.is_empty() {
            self.more_waiting.store(false, Ordering::Relaxed);
            return Ok(0);
        }

        // The pending rows of the ready shards, in id order: per shard the
        // first ones through outbox_pending (shard, id), then the rows
        // looked up by primary key (as a join, the plan hashed the whole
        // outbox). Ids written by an earlier version have no shard: theirs
        // is computed from the row. A pass holds at most `batch_size` rows
        // and, after the first, `MAX_PASS_BYTES` of values: dead letters can
        // carry megabytes each. In the same statement, the fence of the
        // shards about to be published: until when their records may be in
        // flight. It is written before any is handed over, and only when
        // there are rows (a pass with none writes nothing).
        let rows = self
            .store
            .take_pending(
                &mut session.conn,
                &asked,
                self.batch_size,
                MAX_PASS_BYTES,
                self.holder,
                self.lease,
            )
            .await?;
        if rows.is_empty() {
            self.more_waiting.store(false, Ordering::Relaxed);
            return Ok(0);
        }
        let selected = started.elapsed();
        let full = rows.len() as i64 == self.batch_size
            || rows.first().is_some_and(|r| r.total > rows.len() as i64);
        self.more_waiting.store(full, Ordering::Relaxed);
        let shards: BTreeSet<i16> = rows.iter().map(|r| r.shard).collect();
        let shards: Vec<i16> = shards.into_iter().collect();

        // The rows of each key, in id order; keys in order of first row. A
        // key backing off sits this pass out.
        let now = Instant::now();
        let mut chains: Vec<Vec<usize>> = Vec::new();
        // A key that failed and has not succeeded since sends only its
        // first row: what would be pipelined behind it is sent again after
        // it anyway, once per attempt.
        let mut chain_of: HashMap<Option<&[u8]>, Option<(usize, bool)>> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let key = row.message_key.as_deref();
            let chain = *chain_of.entry(key).or_insert_with(|| {
                let failing = state.keys.get(&key.map(<[u8]>::to_vec));
                let waiting = failing.and_then(|k| k.retry_at).is_some_and(|at| at > now);
                (!waiting).then(|| {
                    chains.push(Vec::new());
                    (chains.len() - 1, failing.is_some())
                })
            });
            if let Some((chain, probing)) = chain {
                if !probing || chains[chain].is_empty() {
                    chains[chain].push(i);
                }
            }
        }
        // Every key's rows go out concurrently with the other keys'.
        let outcomes: Vec<Vec<(usize, Sent)>> = futures::future::join_all(
            chains
                .iter()
                .map(|chain| self.send_chain(&rows, chain, started)),
        )
        .await;
        let produced = started.elapsed();

        let mut sent = Vec::with_capacity(rows.len());
        let mut sent_kinds = Vec::with_capacity(rows.len());
        let mut quarantine: Vec<Quarantine> = Vec::new();
        let mut omit_values = Vec::new();
        for chain in outcomes {
            let Some(&(first, _)) = chain.first() else {
                continue;
            };
            let key = rows[first].message_key.clone();
            // Once a row of the key failed: whether what follows it, already
            // acknowledged, counts as sent (yes when the failed row is
            // quarantined: it will never be published in its place).
            let mut after_failure: Option<bool> = None;
            let mut failed_again = false;
            for (i, outcome) in chain {
                let row = &rows[i];
                let (id, kind) = (row.id, OutboxKind::parse(&row.kind));
                match outcome {
                    Sent::Acknowledged => {
                        if after_failure.unwrap_or(true) {
                            sent.push(id);
                            sent_kinds.extend(kind);
                        }
                    }
                    Sent::Failed { error, verdict } => {
                        let entry = state.keys.entry(key.clone()).or_default();
                        if entry.row != id {
                            entry.row = id;
                            entry.refusals = 0;
                        }
                        let too_large_letter = verdict == Verdict::TooLarge
                            && kind == Some(OutboxKind::DeadLetter)
                            && row.payload.is_some();
                        let quarantined = if too_large_letter {
                            // Sent again at once without its value, which
                            // stays readable at dlq.original.* on the
                            // inbound topic.
                            omit_values.push(id);
                            false
                        } else {
                            match verdict {
                                Verdict::Transient => false,
                                Verdict::Refused => {
                                    entry.refusals += 1;
                                    entry.refusals >= MAX_REFUSALS
                                }
                                Verdict::TooLarge | Verdict::Unpublishable => {
                                    entry.refusals += 1;
                                    true
                                }
                            }
                        };
                        if quarantined {
                            tracing::error!(
                                outbox_id = id,
                                attempts = entry.refusals,
                                %error,
                                "outbox row quarantined: it cannot be published \
                                 (allocation-worker outbox-quarantine list)"
                            );
                            quarantine.push(Quarantine {
                                id,
                                attempts: entry.refusals,
                                error,
                            });
                            // Pre-send failures (kind, headers) let the
                            // chain go on, so more may follow.
                            after_failure.get_or_insert(true);
                        } else {
                            if !too_large_letter {
                                failed_again = true;
                                tracing::warn!(outbox_id = id, %error, "publishing an outbox row failed; its key backs off");
                            }
                            after_failure = Some(false);
                        }
                    }
                }
            }
            if failed_again {
                if let Some(entry) = state.keys.get_mut(&key) {
                    let delay = KEY_BACKOFF_MIN
                        .saturating_mul(1 << entry.failures.min(6))
                        .min(KEY_BACKOFF_MAX);
                    entry.failures = entry.failures.saturating_add(1);
                    entry.retry_at = Some(Instant::now() + delay);
                }
            } else if after_failure != Some(false) {
                state.keys.remove(&key);
            }
        }
        // Marked in id order, as the rows were read.
        sent.sort_unstable();
        // What this pass leaves pending in the shards it asked is asked for
        // again by the next: all of them when it was full.
        if full {
            session.carry = asked.iter().fold(0, |bits, s| bits | shard_bit(*s));
        }
        for row in &rows {
            if sent.binary_search(&row.id).is_err() && !quarantine.iter().any(|q| q.id == row.id) {
                session.carry |= shard_bit(row.shard);
            }
        }
        let acknowledged = started.elapsed();

        // One statement (see PgRelayStore::mark).
        self.store
            .mark(&mut session.conn, &sent, &quarantine, &shards, self.holder)
            .await?;
        // A dead letter the broker will never take is sent again without
        // its value (quarantined only if even that is refused).
        for id in omit_values {
            tracing::warn!(
                outbox_id = id,
                "dead letter too large for the broker; omitting its value"
            );
            let Some(size) = rows
                .iter()
                .find(|r| r.id == id)
                .and_then(|r| r.payload.as_ref())
                .map(|p| format!("{} bytes", p.len()))
            else {
                continue;
            };
            let header = encode_headers([(VALUE_OMITTED_HEADER, size.as_bytes())])
                .map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
            self.store
                .omit_value(&mut session.conn, id, &header)
                .await?;
        }
        tracing::debug!(
            rows = rows.len(),
            ?selected,
            ?produced,
            ?acknowledged,
            marked = ?started.elapsed(),
            "relay pass"
        );
        for kind in sent_kinds {
            self.metrics
                .events_published
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        if !quarantine.is_empty() {
            self.metrics
                .outbox_quarantined_total
                .inc_by(quarantine.len() as u64);
            // The gauge now, rather than at the next balance.
            session.balanced_at = None;
        }
        Ok(sent.len())
    }

    /// The relay's own session, with no shard yet.
    async fn connect(&self) -> Result<Session<S::Session>, RelayError> {
        let conn = self.store.connect(self.idle_session_timeout).await?;
        Ok(Session {
            conn,
            member: false,
            held: BTreeSet::new(),
            fenced: BTreeMap::new(),
            balanced_at: None,
            asked_all_at: None,
            ready_before: Vec::new(),
            carry: 0,
        })
    }

    /// Counts the relays and takes or gives up shards to hold an even share;
    /// updates the quarantine gauge. Runs between passes, when nothing of
    /// this relay is in flight.
    async fn balance(&self, session: &mut Session<S::Session>) -> Result<(), RelayError> {
        session.balanced_at = Some(Instant::now());
        if !session.member {
            // Fails while an earlier version's relay is in a pass.
            session.member = self.store.join_relays(&mut session.conn).await?;
            if !session.member {
                return Ok(());
            }
        }
        let (relays, quarantined) = self.store.census(&mut session.conn).await?;
        self.metrics.outbox_quarantined.set(quarantined);
        let relays = relays.max(1);
        let share = usize::try_from((i64::from(SHARDS) + relays - 1) / relays).unwrap_or(1);
        let held = session.held.len();
        if held > share {
            // The last ones: each relay keeps the start of its rotation.
            let extra: Vec<i16> = session
                .held
                .iter()
                .rev()
                .take(held - share)
                .copied()
                .collect();
            self.store.unlock_shards(&mut session.conn, &extra).await?;
            for s in &extra {
                session.held.remove(s);
                session.fenced.remove(s);
            }
            tracing::info!(relays, released = ?extra, "outbox relay gave shards up");
        } else if held < share {
            // Free shards in an order of this relay's own, so that relays
            // starting together do not all contend for the same ones. The
            // scan stops at the limit: no lock is taken beyond it.
            let start = self.holder.rem_euclid(i64::from(SHARDS)) as i16;
            let candidates: Vec<i16> = (0..SHARDS)
                .map(|i| (start + i) % SHARDS)
                .filter(|s| !session.held.contains(s))
                .collect();
            let taken = self
                .store
                .try_lock_shards(&mut session.conn, &candidates, share - held)
                .await?;
            if taken.is_empty() {
                return Ok(());
            }
            // Shards another relay may still have records in flight for.
            let fences = self
                .store
                .fences(&mut session.conn, &taken, self.holder)
                .await?;
            let now = Instant::now();
            for (shard, wait) in &fences {
                session.fenced.insert(*shard, now + *wait);
            }
            session.held.extend(taken.iter().copied());
            if !fences.is_empty() {
                tracing::warn!(
                    fenced = ?fences,
                    "outbox relay took shards whose previous relay may have records in flight; \
                     publishing them once those are settled"
                );
            }
            tracing::info!(relays, taken = ?taken, held = session.held.len(), "outbox relay took shards");
        }
        Ok(())
    }

    /// Gives up every shard: lifts their fence when nothing of this relay
    /// can be in flight any more (`settled`), then ends the session, which
    /// releases the locks.
    async fn release(&self, settled: bool) {
        let mut state = self.state.lock().await;
        let Some(mut session) = state.session.take() else {
            return;
        };
        if settled && !session.held.is_empty() {
            let held: Vec<i16> = session.held.iter().copied().collect();
            let lifted = self
                .store
                .lift_fences(&mut session.conn, &held, self.holder)
                .await;
            if let Err(error) = lifted {
                tracing::warn!(%error, "outbox relay could not lift its shards' fence; they wait for it to pass");
            }
        }
        self.store.close(session.conn).await;
    }

    /// Sends the rows `chain` of one key, in order: pipelined while they go
    /// to the same topic, waiting for the acknowledgements before a row for
    /// another topic, and nothing more after the first failure (bar a row
    /// that can never be published, which is quarantined and passed over).
    /// Hands nothing over once the pass is [`SEND_WINDOW`] old. Returns the
    /// outcome of every row tried, in chain order.
    async fn send_chain(
        &self,
        rows: &[OutboxRow],
        chain: &[usize],
        started: Instant,
    ) -> Vec<(usize, Sent)> {
        let mut outcomes = Vec::with_capacity(chain.len());
        let mut in_flight: Vec<(usize, Delivery)> = Vec::new();
        let mut topic_in_flight: Option<&str> = None;
        for &i in chain {
            if started.elapsed() > SEND_WINDOW {
                break;
            }
            let OutboxRow {
                id,
                kind,
                message_key: key,
                payload,
                headers,
                ..
            } = &rows[i];
            // Written by a newer version, or damaged: it can never be
            // published by this one.
            let Some(kind) = OutboxKind::parse(kind) else {
                let error = format!("outbox row {id} has unknown kind {kind:?}");
                outcomes.push((
                    i,
                    Sent::Failed {
                        error,
                        verdict: Verdict::Unpublishable,
                    },
                ));
                continue;
            };
            let Some(headers) = decode_headers(headers) else {
                let error = format!("outbox row {id} has unreadable headers");
                outcomes.push((
                    i,
                    Sent::Failed {
                        error,
                        verdict: Verdict::Unpublishable,
                    },
                ));
                continue;
            };
            let topic = self.topics.outbound(kind);
            if topic_in_flight.is_some_and(|t| t != topic) {
                if !settle(&mut in_flight, &mut outcomes).await {
                    break;
                }
                // Waiting for those acknowledgements can take up to the
                // delivery timeout: the window is checked again, or this
                // record could still be in flight after the fence written
                // for the pass (found by the simulation, seed 6130).
                if started.elapsed() > SEND_WINDOW {
                    break;
                }
            }
            let record = OutboundRecord {
                topic,
                key: key.as_deref(),
                payload: payload.as_deref(),
                headers: wire_headers(kind, headers),
            };
            match self.publisher.send(record) {
                Ok(delivery) => {
                    in_flight.push((i, delivery));
                    topic_in_flight = Some(topic);
                }
                Err(e) => {
                    settle(&mut in_flight, &mut outcomes).await;
                    outcomes.push((i, failed(&e)));
                    break;
                }
            }
        }
        settle(&mut in_flight, &mut outcomes).await;
        outcomes
    }

    /// Publishes until `shutdown`, then finishes the pass in hand, makes a
    /// last pass and flushes the producer, all before the deadline that
    /// `deadline` yields once `shutdown` fired; then gives its shards up.
    /// The deadline is any instant tokio's clock reads (a std one in
    /// production and the real-database tests, a tokio one in the
    /// simulation, whose clock is paused).
    pub async fn run_until_stopped<D: Into<Instant>>(
        self,
        shutdown: CancellationToken,
        deadline: tokio::sync::oneshot::Receiver<D>,
    ) {
        type Pass<'a> = Pin<Box<dyn Future<Output = Result<usize, RelayError>> + Send + 'a>>;
        let mut backoff = Backoff::default();
        // The pass in hand is kept, not dropped, when shutdown comes: its
        // records are in flight and its shards' right must outlive them.
        let mut in_hand: Option<Pass<'_>> = None;
        loop {
            let pass = in_hand.get_or_insert_with(|| Box::pin(self.publish_pending()));
            // Every select here is biased: the order of the branches, not
            // tokio's random pick (which no seed controls), decides between
            // two ready at once, so a simulation replays the same run. A
            // finished pass is taken before a shutdown.
            let pass = tokio::select! {
                biased;
                pass = pass => pass,
                _ = shutdown.cancelled() => break,
            };
            in_hand = None;
            let more = match pass {
                Ok(n) => {
                    if backoff.failures() > 0 {
                        tracing::info!("outbox relay recovered");
                    }
                    backoff.reset();
                    n > 0 && self.more_waiting.load(Ordering::Relaxed)
                }
                // Only the database fails a pass.
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "outbox relay failed; backing off");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    false
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if !more {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
        let deadline = deadline
            .await
            .map_or_else(|_| Instant::now() + Duration::from_secs(1), Into::into);
        // The pass in hand, then what the worker committed last, published
        // now rather than at restart.
        let last_passes = async {
            if let Some(pass) = in_hand {
                let _ = pass.await;
            }
            while let Ok(n) = self.publish_pending().await {
                if n == 0 {
                    break;
                }
            }
        };
        let flush_reserve = Duration::from_millis(500);
        let pass_deadline = deadline.checked_sub(flush_reserve).unwrap_or(deadline);
        if tokio::time::timeout_at(pass_deadline, last_passes)
            .await
            .is_err()
        {
            tracing::warn!(
                "outbox relay stopped before the outbox was empty; the rest is sent on restart"
            );
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        // flush blocks its thread; block_in_place lets the runtime move other
        // work away. It panics on a current-thread runtime (the
        // simulation's), where there is no other thread to move work to.
        let flush = || self.publisher.flush(remaining);
        let flushed = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => flush(),
            _ => tokio::task::block_in_place(flush),
        };
        let settled = match flushed {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "producer flush did not complete; the shards stay fenced for the others \
                     until these records' delivery timeout has passed"
                );
                false
            }
        };
        let grace = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(200));
        if tokio::time::timeout(grace, self.release(settled))
            .await
            .is_err()
        {
            tracing::warn!("outbox relay could not give its shards up in time; its session ends with the process");
        }
        tracing::info!("outbox relay stopped");
    }
}

/// A holder id for `outbox_relay_shards`, distinct for every relay of every
/// process: the pid, the time and a count of the relays of this process.
fn holder_id() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let count = RELAYS_STARTED.fetch_add(1, Ordering::Relaxed);
    let mixed = (u64::from(std::process::id()) << 32) ^ (u64::from(nanos) << 8) ^ count;
    // Positive, so that its remainder picks a shard.
    (mixed & (i64::MAX as u64)) as i64
}

/// Waits for the deliveries in flight, in order, and records their outcomes;
/// `false` when one failed.
async fn settle(in_flight: &mut Vec<(usize, Delivery)>, outcomes: &mut Vec<(usize, Sent)>) -> bool {
    let mut all_acknowledged = true;
    for (i, delivery) in in_flight.drain(..) {
        match delivery.await {
            Ok(()) => outcomes.push((i, Sent::Acknowledged)),
            Err(e) => {
                all_acknowledged = false;
                outcomes.push((i, failed(&e)));
            }
        }
    }
    all_acknowledged
}

fn failed(error: &KafkaError) -> Sent {
    let verdict = verdict(error);
    let error = match verdict {
        Verdict::TooLarge => format!("refused by the broker as too large: {error}"),
        Verdict::Refused => format!("refused by the broker: {error}"),
        Verdict::Transient | Verdict::Unpublishable => error.to_string(),
    };
    Sent::Failed { error, verdict }
}

/// What a producer or broker error means for the record (see [`Verdict`]).
fn verdict(error: &KafkaError) -> Verdict {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => Verdict::TooLarge,
        Some(
            RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::InvalidMessage,
        ) => Verdict::Refused,
        _ => Verdict::Transient,
    }
}

/// Unsent outbox rows and the age of the oldest, in seconds. Looked up by
/// primary key, like the relay's rows, not joined: the outbox keeps every row
/// ever written.
pub(crate) async fn outbox_backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 \
         FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM outbox_pending))",
    )
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_is_too_large_a_topic_refused_and_a_timeout_transient() {
        let e = |code| KafkaError::MessageProduction(code);
        assert_eq!(
            verdict(&e(RDKafkaErrorCode::MessageSizeTooLarge)),
            Verdict::TooLarge
        );
        assert_eq!(
            verdict(&e(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Verdict::Refused
        );
        assert_eq!(
            verdict(&e(RDKafkaErrorCode::UnknownTopic)),
            Verdict::Refused
        );
        assert_eq!(
            verdict(&e(RDKafkaErrorCode::MessageTimedOut)),
            Verdict::Transient
        );
        assert_eq!(verdict(&e(RDKafkaErrorCode::QueueFull)), Verdict::Transient);
        assert_eq!(verdict(&KafkaError::Canceled), Verdict::Transient);
    }

    #[test]
    fn holder_ids_differ_and_are_positive() {
        let (a, b) = (holder_id(), holder_id());
        assert_ne!(a, b);
        assert!(a >= 0 && b >= 0);
    }
}
