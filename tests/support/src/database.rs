//! Test databases and what tests read from them: creating and dropping a
//! database of one test, the counts and rows that assertions look at, and
//! row locks a test holds to make the worker wait.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::{Record, TestEnv, DEADLINE};

/// Creates the database `name` on the server of `admin_url`, whose role needs
/// CREATEDB.
pub async fn create_database(admin_url: &str, name: &str) {
    let mut admin = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to DATABASE_URL ({e}); is PostgreSQL running? \
                 Run `source scripts/services.sh`."
        )
    });
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} (the role needs CREATEDB): {e}"));
    let _ = admin.close().await;
}

/// Drops the database `name` on the server of `admin_url`, ending its
/// sessions. Left behind, test databases add up, and PostgreSQL's autovacuum
/// launcher visits every database, which slows every later run.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    // FORCE cannot end an autovacuum worker, which runs as the superuser,
    // for a role without pg_signal_backend (SQLSTATE 42501): wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dropped = loop {
        let dropped = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await;
        match dropped {
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42501") && Instant::now() < deadline =>
            {
                // Poll interval of the deadline above.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    let _ = admin.close().await;
    dropped.map(|_| ())
}

/// `url` with its database name replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_and_path = &base[scheme_end..];
    let authority = match authority_and_path.find('/') {
        Some(i) => &authority_and_path[..i],
        None => authority_and_path,
    };
    let mut out = format!("{}{}/{}", &base[..scheme_end], authority, db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestEnv {
    /// The one number a query returns, e.g. `SELECT count(*) FROM outbox`.
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// How many messages the worker recorded as processed.
    pub async fn processed(&self) -> i64 {
        self.count("SELECT count(*) FROM processed_messages").await
    }

    /// The purchased quantity of a batch, `None` while it does not exist.
    pub async fn purchased(&self, reference: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT purchased_quantity FROM batches WHERE reference = $1")
            .bind(reference)
            .fetch_optional(&self.db)
            .await
            .expect("query batches")
    }

    /// Polls until the batch exists with that purchased quantity.
    pub async fn wait_purchased(&self, reference: &str, qty: i64, timeout: Duration) {
        self.eventually(
            &format!("batch {reference} has purchased quantity {qty}"),
            timeout,
            || async {
                let got: Option<i64> = sqlx::query_scalar(
                    "SELECT purchased_quantity FROM batches WHERE reference = $1",
                )
                .bind(reference)
                .fetch_optional(&self.db)
                .await?;
                Ok::<_, sqlx::Error>((got == Some(qty)).then_some(()))
            },
        )
        .await
    }

    /// (batch reference, qty) of the allocation rows of an order line.
    pub async fn allocation_rows(&self, orderid: &str, sku: &str) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT b.reference, a.qty FROM allocations a JOIN batches b ON b.id = a.batch_id \
             WHERE a.orderid = $1 AND a.sku = $2 ORDER BY a.id",
        )
        .bind(orderid)
        .bind(sku)
        .fetch_all(&self.db)
        .await
        .expect("query allocations")
    }

    /// Batches whose allocated quantity exceeds the purchased one.
    pub async fn over_allocated(&self) -> Vec<(String, i64, i64)> {
        sqlx::query_as(
            "SELECT b.reference, b.purchased_quantity, sum(a.qty)::BIGINT FROM batches b \
             JOIN allocations a ON a.batch_id = b.id GROUP BY b.id \
             HAVING sum(a.qty) > b.purchased_quantity",
        )
        .fetch_all(&self.db)
        .await
        .expect("query over-allocation")
    }

    // ---------------------------------------------------------------- outbox

    /// Waits until the outbox has no unsent row; returns how many rows it has.
    pub async fn wait_outbox_sent(&self, timeout: Duration) -> i64 {
        self.eventually("the outbox fully sent", timeout, || async {
            let (unsent, total): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM outbox_pending), (SELECT count(*) FROM outbox)",
            )
            .fetch_one(&self.db)
            .await?;
            Ok::<_, sqlx::Error>((unsent == 0).then_some(total))
        })
        .await
    }

    /// The `ce_id` of every event in the outbox (a dead letter carries its
    /// original's headers, so its `ce_id` is not one of the worker's).
    pub async fn outbox_ce_ids(&self) -> Vec<String> {
        let rows: Vec<Option<Vec<u8>>> = sqlx::query_scalar(
            "SELECT (SELECT value FROM outbox_headers(headers) WHERE name = 'ce_id') \
             FROM outbox WHERE kind <> 'DeadLetter' ORDER BY id",
        )
        .fetch_all(&self.db)
        .await
        .expect("outbox headers");
        rows.into_iter()
            .flatten()
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .collect()
    }

    /// Waits until the outbox has no unsent row and the witness has seen every
    /// event's `ce_id` and as many dead letters as the outbox holds (the
    /// database says what to expect, never the broker's watermarks); returns
    /// the witness's records.
    pub async fn wait_outbox_published(&self, timeout: Duration) -> Vec<Record> {
        let rows = self.wait_outbox_sent(timeout).await;
        let ids = self.outbox_ce_ids().await;
        let dead_letters = self
            .count("SELECT count(*) FROM outbox WHERE kind = 'DeadLetter'")
            .await;
        let dead_letter_topic = self.topics.dead_letter.clone();
        self.wait_for(
            &format!("the {rows} outbox rows on the outbound topics"),
            timeout,
            |rs| {
                let seen: HashSet<String> = rs
                    .iter()
                    .filter(|r| r.topic != dead_letter_topic)
                    .filter_map(Record::ce_id)
                    .collect();
                ids.iter().all(|id| seen.contains(id))
                    && rs.iter().filter(|r| r.topic == dead_letter_topic).count() as i64
                        >= dead_letters
            },
        )
        .await
    }

    // ----------------------------------------------------------------- locks

    /// A transaction of the test holding the rows of these products (`FOR
    /// UPDATE`) until it ends: a worker transaction on them waits for it.
    pub async fn lock_products(&self, skus: &[String]) -> Transaction<'static, Postgres> {
        let mut holder = self
            .db
            .begin()
            .await
            .expect("begin the locking transaction");
        let locked: Vec<String> =
            sqlx::query_scalar("SELECT sku FROM products WHERE sku = ANY($1) FOR UPDATE")
                .bind(skus)
                .fetch_all(&mut *holder)
                .await
                .expect("lock the product rows");
        assert_eq!(locked.len(), skus.len(), "products to lock: {skus:?}");
        holder
    }

    /// Worker sessions of the test database waiting on a lock.
    pub async fn workers_waiting_on_a_lock(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'allocation-worker' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&self.db)
        .await
    }

    /// Waits until a worker session waits on a lock (of [`Self::lock_products`]).
    pub async fn wait_worker_on_a_lock(&self) {
        self.eventually(
            "a worker transaction waiting on the lock",
            DEADLINE,
            || async {
                Ok::<_, sqlx::Error>((self.workers_waiting_on_a_lock().await? > 0).then_some(()))
            },
        )
        .await
    }
}
