//! Day-two operations on the real binary: retention of the idempotency
//! records and the published outbox, honest probes (`/readyz` knows the
//! schema, `/healthz` knows a stuck consumer loop), build info, and a lag
//! gauge measured from the worker's position.
//!
//! Needs the services: `source scripts/services.sh` (or `scripts/test.sh`).
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure).

use std::collections::HashSet;
use std::time::{Duration, Instant};
use testkit::{check, check_eq};

use allocation_worker::adapters::postgres::pool::MIGRATOR;
use testkit::kafka::committed_offsets;
use testkit::{http_get, http_until, metrics_until, sample, unique, TestEnv, DEADLINE};

// ------------------------------------------------------------------ helpers

/// Whether the idempotency record of each key is there.
async fn keys_present(env: &TestEnv, keys: &[String]) -> i64 {
    // A message's idempotency key is its ce_id, so prefixed.
    let keys: Vec<String> = keys.iter().map(|k| format!("ce_id:{k}")).collect();
    sqlx::query_scalar("SELECT count(*) FROM processed_messages WHERE idempotency_key = ANY($1)")
        .bind(&keys)
        .fetch_one(&env.db)
        .await
        .expect("count idempotency records")
}

/// Runs `allocation-worker <args>` on the test's database, with `extra`
/// variables, to its end.
async fn command(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_allocation-worker"))
        .args(args)
        .env_clear()
        .env("DATABASE_URL", &env.database_url)
        .env("RUST_LOG", "info")
        .envs(extra.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run allocation-worker {args:?}: {e}"))
}

// ---------------------------------------------------------------- retention

/// IDEMPOTENCY_RETENTION and OUTBOX_RETENTION of a few seconds: a burst of
/// messages fills both tables, then, while messages keep flowing, the
/// burst's rows are deleted and only recent ones stay. Every outbox row was
/// published before it went (the witness saw every event), and a redelivery
/// inside the retention is still recognised and applies nothing.
#[tokio::test]
async fn retention_trims_old_idempotency_records_and_published_outbox_rows() {
    let env = TestEnv::new().await;
    let worker =
        env.spawn_worker_with(&[("IDEMPOTENCY_RETENTION", "8s"), ("OUTBOX_RETENTION", "3s")]);
    let addr = worker.http_addr;
    let t = env.topics.clone();
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 1_000_000, None).await;
    env.wait_batch(&batch).await;

    // The burst: each message carries its own ce_id, its idempotency key.
    let burst: Vec<String> = (0..60)
        .map(|i| format!("{}-burst-{i}", env.suffix))
        .collect();
    let mut orders = Vec::new();
    for key in &burst {
        let order = unique("o");
        env.allocation_required(&order, &sku, 1, &[("ce_id", key)])
            .await;
        orders.push(order);
    }
    env.eventually("the burst is processed", DEADLINE, || async {
        Ok::<_, String>((keys_present(&env, &burst).await == burst.len() as i64).then_some(()))
    })
    .await;

    // A redelivery inside the retention (8 s; the burst was just recorded):
    // recognised as a duplicate, nothing applied.
    let last = burst.last().expect("a burst");
    env.allocation_required(
        orders.last().expect("an order"),
        &sku,
        1,
        &[("ce_id", last)],
    )
    .await;
    let consumed =
        |outcome: &str| format!("outcome=\"{outcome}\",topic=\"{}\"", t.allocation_required);
    let duplicate = consumed("duplicate");
    metrics_until(&env, addr, "the redelivery counted as a duplicate", |m| {
        sample(m, "allocation_messages_consumed_total", &duplicate) == Some(1.0)
    })
    .await;
    let outbox_after_burst = env.count("SELECT count(*) FROM outbox").await;
    check!(
        env,
        outbox_after_burst >= burst.len() as i64,
        "the burst's events are in the outbox: {outbox_after_burst}"
    );
    let burst_outbox_max: i64 = env.count("SELECT COALESCE(max(id), 0) FROM outbox").await;

    // Messages keep flowing, a few a second, until the burst's rows are gone.
    let started = Instant::now();
    let mut flow = Vec::new();
    loop {
        let key = format!("{}-flow-{}", env.suffix, flow.len());
        let order = unique("o");
        env.allocation_required(&order, &sku, 1, &[("ce_id", &key)])
            .await;
        flow.push(key);
        orders.push(order);
        let burst_left = keys_present(&env, &burst).await;
        let outbox_left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id <= $1")
            .bind(burst_outbox_max)
            .fetch_one(&env.db)
            .await
            .expect("count outbox rows");
        if burst_left == 0 && outbox_left == 0 {
            env.note(&format!(
                "the burst's rows are gone after {:?}, {} messages later",
                started.elapsed(),
                flow.len()
            ));
            break;
        }
        check!(
            env,
            started.elapsed() < DEADLINE,
            "after {:?}, {burst_left} idempotency records and {outbox_left} outbox rows of the \
             burst are still there",
            started.elapsed()
        );
        // The pace of the flow, not a wait for a result.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The flow's recent records are kept: the tables shrank back, they were
    // not emptied.
    let recent = &flow[flow.len().saturating_sub(3)..];
    env.eventually("the latest messages are recorded", DEADLINE, || async {
        Ok::<_, String>((keys_present(&env, recent).await == recent.len() as i64).then_some(()))
    })
    .await;
    let processed = env.count("SELECT count(*) FROM processed_messages").await;
    let too_old = env
        .count(
            "SELECT count(*) FROM processed_messages \
             WHERE processed_at < now() - interval '30 seconds'",
        )
        .await;
    check_eq!(
        env,
        too_old,
        0,
        "idempotency records well past the retention"
    );
    check!(
        env,
        processed < (burst.len() + flow.len()) as i64,
        "{processed} idempotency records for {} messages",
        burst.len() + flow.len() + 1
    );

    // Nothing unpublished was deleted: every decision reached its topic.
    let wanted: HashSet<&String> = orders.iter().collect();
    env.wait_for("an Allocated event for every order", DEADLINE, |rs| {
        let seen: HashSet<String> = rs
            .iter()
            .filter(|r| r.topic == t.allocated)
            .map(|r| r.field("orderid"))
            .collect();
        wanted.iter().all(|o| seen.contains(*o))
    })
    .await;

    // Counted: rows removed per table, rows kept per table.
    let metrics = metrics_until(&env, addr, "retention metrics", |m| {
        sample(
            m,
            "allocation_retention_removed_rows_total",
            "table=\"processed_messages\"",
        )
        .is_some_and(|v| v >= burst.len() as f64)
            && sample(
                m,
                "allocation_retention_removed_rows_total",
                "table=\"outbox\"",
            )
            .is_some_and(|v| v >= burst.len() as f64)
            && sample(m, "allocation_retention_kept_rows", "table=\"outbox\"").is_some()
            && sample(
                m,
                "allocation_retention_kept_rows",
                "table=\"processed_messages\"",
            )
            .is_some()
    })
    .await;
    env.note(&format!(
        "retention metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("allocation_retention"))
            .collect::<Vec<_>>()
            .join("\n")
    ));

    // The flip side: once its record is gone, the same key is applied as new.
    let applied_before = sample(
        &metrics,
        "allocation_messages_consumed_total",
        &consumed("applied"),
    )
    .expect("applied count");
    env.allocation_required(&orders[burst.len() - 1], &sku, 1, &[("ce_id", last)])
        .await;
    let applied = consumed("applied");
    metrics_until(&env, addr, "the expired key applied again", |m| {
        sample(m, "allocation_messages_consumed_total", &applied) == Some(applied_before + 1.0)
    })
    .await;
    drop(worker);
    env.finish().await;
}

// ------------------------------------------------------------------ probes

/// Polls /readyz until it answers 503 with `reason` in its body.
async fn readyz_503_saying(env: &TestEnv, addr: std::net::SocketAddr, reason: &str) {
    let body = env
        .eventually(&format!("readyz 503 says {reason:?}"), DEADLINE, || async {
            Ok::<_, String>(match http_get(addr, "/readyz").await {
                Some((503, body)) if body.contains(reason) => Some(body),
                _ => None,
            })
        })
        .await;
    env.note(&format!("readyz: {}", body.trim()));
}

/// With SKIP_MIGRATIONS=true on a database without any migration, /readyz
/// says so; three migrations applied, it says which schema it found and
/// which it needs; `allocation-worker migrate` brings it up to date and the
/// same process becomes ready, and handles what arrived meanwhile.
#[tokio::test]
async fn readyz_names_the_missing_schema_until_migrated_without_a_restart() {
    let env = TestEnv::new().await;
    let needs = MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .expect("migrations");
    let mut worker = env.spawn_worker_with(&[("SKIP_MIGRATIONS", "true")]);
    let addr = worker.http_addr;
    readyz_503_saying(
        &env,
        addr,
        &format!("schema at none (no migration applied), needs {needs}"),
    )
    .await;

    // The schema of three migrations ago.
    let dir = std::env::temp_dir().join(format!("aw_migrations_{}", env.suffix));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for file in [
        "20261128000001_initial.sql",
        "20261128000002_product_revision.sql",
        "20261128000003_outbox_headers_column.sql",
    ] {
        std::fs::copy(source.join(file), dir.join(file)).expect("copy a migration");
    }
    let before = sqlx::migrate::Migrator::new(dir.as_path())
        .await
        .expect("read the old migrations");
    before.run(&env.db).await.expect("old migrations apply");
    std::fs::remove_dir_all(&dir).expect("remove the temp dir");

    let want = format!("schema at 20261128000003, needs {needs}");
    readyz_503_saying(&env, addr, &want).await;
    // It stays so: the worker does not pretend.
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 5, None).await;
    let body = http_until(&env, addr, "/readyz", 503).await;
    check!(env, body.contains(&want), "still {want:?}: {body:?}");
    check_eq!(
        env,
        http_get(addr, "/healthz").await.map(|r| r.0),
        Some(200),
        "alive all the same"
    );

    let migrate = command(&env, &["migrate"], &[]).await;
    check!(
        env,
        migrate.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    http_until(&env, addr, "/readyz", 200).await;
    worker.assert_running();
    // What came while the schema was missing is applied now.
    env.wait_batch(&batch).await;
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

/// HEALTH_POLL_TIMEOUT of 1 s. Idle, the loop waits in its poll and is
/// healthy; with one partition stuck on a row lock it still polls and is
/// healthy. Held in a rebalance callback that waits for that partition's
/// task (a real stall of the loop, a few seconds long), /healthz answers
/// 503 with the reason; then 200 again.
#[tokio::test]
async fn healthz_fails_while_the_consumer_loop_cannot_poll() {
    let env = TestEnv::new().await;
    let worker =
        env.spawn_worker_with(&[("HEALTH_POLL_TIMEOUT", "1s"), ("MAX_BATCH_MESSAGES", "1")]);
    let addr = worker.http_addr;
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 1_000, None).await;
    env.wait_batch(&batch).await;
    http_until(&env, addr, "/readyz", 200).await;

    // Idle for more than twice the timeout: still healthy.
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(2_500) {
        let answer = http_get(addr, "/healthz").await;
        check_eq!(
            env,
            answer.as_ref().map(|a| a.0),
            Some(200),
            "idle, {:?} in: {answer:?}",
            idle.elapsed()
        );
        // The probes' pace over the observed 2.5 s, not a wait for a result.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A locked product no longer stops the loop: its partition is paused
    // and the loop goes on polling (no partition holds up the others).
    let lock = env.lock_products(std::slice::from_ref(&sku)).await;
    let orders: Vec<String> = (0..100).map(|_| unique("o")).collect();
    for order in &orders {
        env.allocation_required(order, &sku, 1, &[]).await;
    }
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_millis(2_500) {
        let answer = http_get(addr, "/healthz").await;
        check_eq!(
            env,
            answer.as_ref().map(|a| a.0),
            Some(200),
            "one partition stuck on a lock, {:?} in: {answer:?}",
            busy.elapsed()
        );
        // The probes' pace over the observed 2.5 s, not a wait for a result.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // What does stop the loop: a rebalance. Its revocation callback runs
    // inside the consumer's poll and waits (a few seconds at most) for the
    // stuck partition's task to finish or abandon its transaction, longer
    // than the 1 s timeout. A second member joining the group brings it.
    let second = env.spawn_worker();
    let body = http_until(&env, addr, "/healthz", 503).await;
    check!(
        env,
        body.contains("has not polled"),
        "healthz says why: {body:?}"
    );
    http_until(&env, addr, "/healthz", 200).await;
    lock.rollback().await.expect("release the lock");
    env.eventually("every order allocated", DEADLINE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations WHERE sku = $1")
            .bind(&sku)
            .fetch_one(&env.db)
            .await?;
        Ok::<_, sqlx::Error>((n == orders.len() as i64).then_some(()))
    })
    .await;
    drop(second);
    drop(worker);
    env.finish().await;
}

// -------------------------------------------------------------- build info

/// allocation_build_info{version, revision} is 1, and the first line the
/// worker logs names both. The revision is the commit HEAD names (when this
/// is a git checkout and the build was not given one).
#[tokio::test]
async fn build_info_names_the_version_and_revision() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker();
    let addr = worker.http_addr;
    let version = env!("CARGO_PKG_VERSION");
    let revision = allocation_worker::REVISION;
    check!(env, !revision.is_empty(), "the build recorded a revision");
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let overridden = std::env::var_os("ALLOCATION_WORKER_REVISION").is_some();
    if let Ok(out) = git {
        if out.status.success() && !overridden {
            let head = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            check_eq!(
                env,
                revision,
                head.as_str(),
                "the revision is HEAD's commit"
            );
        }
    }
    let labels = format!("revision=\"{revision}\",version=\"{version}\"");
    metrics_until(&env, addr, "allocation_build_info", |m| {
        sample(m, "allocation_build_info", &labels) == Some(1.0)
    })
    .await;
    let log = std::fs::read_to_string(&worker.log).expect("the worker log");
    // Lines starting with "# " are the harness's record of the settings.
    let first = log
        .lines()
        .find(|l| !l.starts_with("# "))
        .expect("the worker logged");
    check!(
        env,
        first.contains(&format!("version=\"{version}\""))
            || first.contains(&format!("version={version}")),
        "the first line names the version: {first}"
    );
    check!(
        env,
        first.contains(revision),
        "the first line names the revision {revision}: {first}"
    );
    drop(worker);
    env.finish().await;
}

// --------------------------------------------------------------------- lag

/// The lag gauge counts from the worker's position, not the committed
/// offset. Auto-commit every 10 minutes here, so the committed offset stays
/// where it was for the whole test: once the worker has caught up, the
/// gauge reads 0 for every partition all the same.
#[tokio::test]
async fn lag_is_counted_from_the_position_the_worker_stored() {
    let env = TestEnv::new().await;
    let properties = format!(
        "{},auto.commit.interval.ms=600000,statistics.interval.ms=1000",
        testkit::WORKER_KAFKA_PROPERTIES
    );
    let worker = env.spawn_worker_with(&[("KAFKA_PROPERTIES", &properties)]);
    let addr = worker.http_addr;
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 1_000, None).await;
    env.wait_batch(&batch).await;
    let n = 40;
    let mut partition = 0;
    for _ in 0..n {
        // All on the SKU's partition (keyed by SKU).
        partition = env
            .allocation_required(&unique("o"), &sku, 1, &[])
            .await
            .partition;
    }
    env.wait_processed(n + 1, DEADLINE).await;
    let topic = env.topics.allocation_required.clone();
    let labels = format!("partition=\"{partition}\",topic=\"{topic}\"");
    let metrics = metrics_until(&env, addr, "lag 0 on the partition of the messages", |m| {
        sample(m, "allocation_consumer_lag_messages", &labels) == Some(0.0)
    })
    .await;
    // Nothing was committed: a lag from the committed offset would read n.
    let committed = committed_offsets(&env, &[&topic]).unwrap_or_else(|e| panic!("{e}"));
    check!(
        env,
        committed.values().all(|o| *o <= 0),
        "no offset committed during the test: {committed:?}\n{metrics}"
    );
    drop(worker);
    env.finish().await;
}

// ----------------------------------------------------------------- rollback

/// A rollback: the database was migrated by a newer release, whose
/// migration (additive, as every migration must be) this binary does not
/// know. This binary's `migrate` applies nothing and succeeds (sqlx's
/// default refuses with "VersionMissing", which left an older image's init
/// container failing after `kubectl rollout undo`), and its worker starts,
/// is ready, and allocates on the newer schema.
#[tokio::test]
async fn an_older_binary_migrates_and_runs_on_a_database_a_newer_one_migrated() {
    let env = TestEnv::new().await;
    MIGRATOR
        .run(&env.db)
        .await
        .expect("this binary's migrations");
    // What a newer release would have added: a column with a default and a
    // table, recorded as applied under a version this binary does not have.
    let newer: i64 = 99_991_231_000_001;
    sqlx::raw_sql(
        "ALTER TABLE batches ADD COLUMN from_a_newer_release TEXT NOT NULL DEFAULT 'x'; \
         CREATE TABLE from_a_newer_release (id BIGINT PRIMARY KEY);",
    )
    .execute(&env.db)
    .await
    .expect("the newer release's schema change");
    sqlx::query(
        "INSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer release', TRUE, '\\x00'::bytea, 1)",
    )
    .bind(newer)
    .execute(&env.db)
    .await
    .expect("record the newer migration");

    let migrate = command(&env, &["migrate"], &[]).await;
    check!(
        env,
        migrate.status.success(),
        "migrate on a newer schema must succeed: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let mut worker = env.spawn_worker();
    let addr = worker.http_addr;
    http_until(&env, addr, "/readyz", 200).await;
    let sku = unique("SKU");
    let batch = unique("b");
    let order = unique("o");
    env.batch_created(&batch, &sku, 5, None).await;
    env.allocation_required(&order, &sku, 2, &[]).await;
    let allocated = env
        .wait_for("the Allocated event", DEADLINE, |r| {
            r.iter()
                .any(|r| r.topic == env.topics.allocated && r.value_str().contains(order.as_str()))
        })
        .await;
    check!(env, !allocated.is_empty(), "allocated on the newer schema");
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

// ---------------------------------------------------------- backup, restore

/// Runs a PostgreSQL client tool (`pg_dump`, `pg_restore`) to success.
async fn pg_tool(env: &TestEnv, program: &str, args: &[&str]) {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/services.sh installs PostgreSQL's client")
        });
    check!(
        env,
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// How many order lines are allocated, by the database.
async fn allocated_lines(db: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM allocations_view")
        .fetch_one(db)
        .await
}

/// Backup and restore (docs/design.md, "Backup and restore"): a dump taken
/// mid-stream, 20 order lines in; 20 more after it; then the database is
/// restored from the dump, so it has forgotten the last 20 while the
/// group's committed offsets are past them. `rewind-offsets` moves the
/// group back to the position the restored database recorded, and a new
/// worker applies the 20 again: every line is allocated once, to the one
/// batch, and the events published are those of a run without the restore
/// (by ce_id). Without the rewind the last 20 would never come back.
#[tokio::test]
async fn a_restored_database_catches_up_once_the_group_is_rewound() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker();
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 1_000, None).await;
    env.wait_batch(&batch).await;
    let orders: Vec<String> = (0..40).map(|_| unique("o")).collect();
    for order in &orders[..20] {
        env.allocation_required(order, &sku, 1, &[]).await;
    }
    let db = env.db.clone();
    env.eventually("20 lines allocated", DEADLINE, || {
        let db = db.clone();
        async move { Ok::<_, sqlx::Error>((allocated_lines(&db).await? == 20).then_some(())) }
    })
    .await;

    let dump = std::env::temp_dir().join(format!("aw_backup_{}.dump", env.suffix));
    let dump_path = dump.to_string_lossy().into_owned();
    pg_tool(
        &env,
        "pg_dump",
        &["--format=custom", "--file", &dump_path, &env.database_url],
    )
    .await;

    for order in &orders[20..] {
        env.allocation_required(order, &sku, 1, &[]).await;
    }
    let events_of = |records: &[testkit::Record]| -> HashSet<String> {
        records
            .iter()
            .filter(|r| r.topic == env.topics.allocated)
            .filter_map(|r| r.ce_id())
            .collect()
    };
    let before_restore = env
        .wait_for("40 Allocated events", DEADLINE, |r| {
            events_of(r).len() >= 40
        })
        .await;
    let published = events_of(&before_restore);
    check!(
        env,
        worker.terminate(Duration::from_secs(30)).await.success(),
        "the first worker stops cleanly"
    );

    // The restore: the database as the dump has it.
    testkit::database::drop_database(&env.admin_database_url, &env.db_name)
        .await
        .expect("drop the database");
    testkit::database::create_database(&env.admin_database_url, &env.db_name).await;
    pg_tool(
        &env,
        "pg_restore",
        &[
            "--no-owner",
            "--no-privileges",
            "--dbname",
            &env.database_url,
            &dump_path,
        ],
    )
    .await;
    let _ = std::fs::remove_file(&dump);
    let restored = env
        .eventually("the restored database answers", DEADLINE, || {
            let db = db.clone();
            async move { allocated_lines(&db).await.map(Some) }
        })
        .await;
    check_eq!(env, restored, 20, "the dump holds the first 20 lines");

    let rewind = command(
        &env,
        &["rewind-offsets"],
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", env.bootstrap_servers.as_str()),
            ("KAFKA_GROUP_ID", env.group_id.as_str()),
        ],
    )
    .await;
    let said = String::from_utf8_lossy(&rewind.stdout).into_owned();
    env.note(&format!("rewind-offsets said:\n{said}"));
    check!(
        env,
        rewind.status.success() && said.contains("rewind to"),
        "rewind-offsets rewinds: {said} {}",
        String::from_utf8_lossy(&rewind.stderr)
    );

    let mut worker = env.spawn_worker();
    env.eventually("40 lines allocated again", DEADLINE, || {
        let db = db.clone();
        async move { Ok::<_, sqlx::Error>((allocated_lines(&db).await? == 40).then_some(())) }
    })
    .await;
    let per_order: Vec<(String, i64)> = sqlx::query_as(
        "SELECT orderid, count(*) FROM allocations_view WHERE sku = $1 GROUP BY orderid",
    )
    .bind(&sku)
    .fetch_all(&env.db)
    .await
    .expect("allocations by order");
    let allocated: HashSet<String> = per_order.iter().map(|(o, _)| o.clone()).collect();
    let wanted: HashSet<String> = orders.iter().cloned().collect();
    check_eq!(env, allocated, wanted, "every order line is allocated");
    check!(
        env,
        per_order.iter().all(|(_, n)| *n == 1),
        "each once: {per_order:?}"
    );
    let available: i64 = sqlx::query_scalar(
        "SELECT (b.purchased_quantity - coalesce(sum(a.qty), 0))::int8 \
         FROM batches b LEFT JOIN allocations a ON a.batch_id = b.id \
         WHERE b.reference = $1 GROUP BY b.purchased_quantity",
    )
    .bind(&batch)
    .fetch_one(&env.db)
    .await
    .expect("the batch's availability");
    check_eq!(env, available, 960, "the batch gave 40 units, once each");
    // Republished events keep their ce_id: the set is the same as before.
    let after = env
        .wait_for("the same 40 Allocated events", DEADLINE, |r| {
            events_of(r).len() >= 40
        })
        .await;
    check_eq!(
        env,
        events_of(&after),
        published,
        "no event beyond the run's own"
    );
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

// ------------------------------------------------- the read model's listener

/// READ_MODEL_ADDR: the read model on a listener of its own, whose /readyz
/// judges the database and schema only. With the broker unreachable the
/// consumer never joins its group: /readyz on HTTP_ADDR says so (503), the
/// read model's says 200 and serves /allocations, which HTTP_ADDR no longer
/// does. /metrics there has the pool's gauges.
#[tokio::test]
async fn the_read_model_listener_is_ready_while_the_consumer_is_out_of_its_group() {
    let env = TestEnv::new().await;
    let read_model = std::net::SocketAddr::from(([127, 0, 0, 1], testkit::containers::free_port()));
    let nowhere = format!("127.0.0.1:{}", testkit::containers::free_port());
    let read_model_addr = read_model.to_string();
    let mut worker = env.spawn_worker_with(&[
        ("READ_MODEL_ADDR", read_model_addr.as_str()),
        ("KAFKA_BOOTSTRAP_SERVERS", nowhere.as_str()),
    ]);
    let addr = worker.http_addr;
    http_until(&env, read_model, "/readyz", 200).await;
    // "consumer not running" or "not in its group", by the last poll.
    readyz_503_saying(&env, addr, "consumer not").await;

    let order = unique("o");
    let path = format!("/allocations/{order}");
    let served = http_get(read_model, &path).await;
    check!(
        env,
        matches!(&served, Some((404, body)) if body.contains("no allocations")),
        "the read model answers for an order it does not have: {served:?}"
    );
    let elsewhere = http_get(addr, &path).await;
    check!(
        env,
        matches!(&elsewhere, Some((404, body)) if !body.contains("no allocations")),
        "HTTP_ADDR no longer serves the read model: {elsewhere:?}"
    );
    let metrics = metrics_until(&env, addr, "the pool's gauges", |m| {
        sample(m, "allocation_db_pool_max_connections", "").is_some()
    })
    .await;
    check_eq!(
        env,
        sample(&metrics, "allocation_db_pool_max_connections", ""),
        Some(10.0),
        "the pool's limit, DATABASE_MAX_CONNECTIONS's default"
    );
    check!(
        env,
        sample(&metrics, "allocation_db_pool_connections", "state=\"idle\"").is_some()
            && sample(&metrics, "allocation_db_pool_waiting", "").is_some(),
        "the pool's connections and waiters are exposed"
    );
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

/// PARTITION_STALL_TIMEOUT of 2 s: a product's row held locked by another
/// session, and an order line for it. Its partition's batch fails at every
/// attempt (lock_timeout) while the database answers the probe: /readyz
/// says which partition has failed and why, and is ready again once the
/// lock goes and the batch commits.
#[tokio::test]
async fn readyz_names_a_partition_whose_batch_keeps_failing() {
    let env = TestEnv::new().await;
    let url = format!(
        "{}{}options=-c%20lock_timeout%3D1s",
        env.database_url,
        if env.database_url.contains('?') {
            "&"
        } else {
            "?"
        }
    );
    let mut worker = env.spawn_worker_with(&[
        ("DATABASE_URL", url.as_str()),
        ("PARTITION_STALL_TIMEOUT", "2s"),
    ]);
    let addr = worker.http_addr;
    let sku = unique("SKU");
    let batch = unique("b");
    env.batch_created(&batch, &sku, 10, None).await;
    env.wait_batch(&batch).await;
    http_until(&env, addr, "/readyz", 200).await;

    let lock = env.lock_products(std::slice::from_ref(&sku)).await;
    let order = unique("o");
    env.allocation_required(&order, &sku, 1, &[]).await;
    readyz_503_saying(&env, addr, "has failed its batch for").await;
    let body = http_get(addr, "/readyz")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    check!(
        env,
        body.contains(&env.topics.allocation_required) && body.contains("lock"),
        "names the partition and the error: {body:?}"
    );
    lock.rollback().await.expect("release the lock");
    http_until(&env, addr, "/readyz", 200).await;
    env.wait_for("the order allocated", DEADLINE, |r| {
        r.iter()
            .any(|r| r.topic == env.topics.allocated && r.value_str().contains(order.as_str()))
    })
    .await;
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

/// Issue 22, probes: a consumer error (here: an inbound topic that does
/// not exist yet, as when the ERP has not created it) marks the consumer
/// not running. Once the topic exists, nothing is produced: on such idle
/// topics no message comes to clear the mark, and /readyz must turn 200 by
/// itself.
#[tokio::test]
async fn readyz_recovers_after_a_consumer_error_on_idle_topics() {
    let env = TestEnv::new().await;
    let late = format!("erp.batch-quantity-changed.late.{}", env.suffix);
    let mut worker = env.spawn_worker_with(&[("TOPIC_BATCH_QUANTITY_CHANGED", late.as_str())]);
    let addr = worker.http_addr;
    env.eventually(
        "a consumer error for the missing topic",
        DEADLINE,
        || async {
            Ok::<_, String>((!worker.log_lines_after(0, "consumer error").is_empty()).then_some(()))
        },
    )
    .await;
    readyz_503_saying(&env, addr, "consumer not").await;
    testkit::kafka::create_topics(&env.bootstrap_servers, &[late.as_str()]).await;
    let created = Instant::now();
    http_until(&env, addr, "/readyz", 200).await;
    env.note(&format!(
        "ready {:?} after the topic was created, no message produced",
        created.elapsed()
    ));
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    env.finish().await;
}

// -------------------------------------------------------- outbox quarantine

/// `outbox-quarantine list|retry|discard` on the real binary: a line per row
/// and one with the count; an id that is not quarantined refused with exit 1
/// and nothing done; a retried row pending again, in its SKU's shard; a
/// command without a choice of rows is a setting error (exit 2).
#[tokio::test]
async fn outbox_quarantine_lists_retries_and_discards_from_the_command_line() {
    let env = TestEnv::new().await;
    MIGRATOR.run(&env.db).await.expect("migrations apply");
    sqlx::query(
        "INSERT INTO outbox_quarantine \
             (id, kind, message_key, payload, headers, created_at, attempts, error) \
         VALUES (41, 'Allocated', 'SKU-1', '{\"orderid\": \"o1\"}', '', now(), 1, \
                 'refused by the broker as too large'), \
                (42, 'Reallocated', 'SKU-2', '{}', '', now(), 1, 'unknown kind \"Reallocated\"')",
    )
    .execute(&env.db)
    .await
    .expect("quarantined rows");
    let url = env.database_url.clone();
    let run = |args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let out = testkit::binary::run_binary(
                args,
                &[("DATABASE_URL", url.as_str())],
                Duration::from_secs(30),
            );
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        })
    };

    let (code, stdout, stderr) = run(&["outbox-quarantine", "list"]).await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("id=41 kind=Allocated key=\"SKU-1\""),
        "{stdout}"
    );
    assert!(lines[0].contains("too large"), "{stdout}");
    assert!(lines[1].starts_with("id=42 kind=Reallocated"), "{stdout}");
    assert_eq!(lines[2], "2 quarantined");

    let (code, _, stderr) = run(&["outbox-quarantine", "retry", "--id", "41,99"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("99"),
        "{stderr}"
    );
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_quarantine")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(kept, 2, "nothing done");

    let (code, stdout, stderr) = run(&["outbox-quarantine", "retry", "--id", "41"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("retried 41 as outbox row "), "{stdout}");
    assert!(stdout.ends_with("1 retried\n"), "{stdout}");
    let pending: Vec<(String, bool)> = sqlx::query_as(
        "SELECT convert_from(o.message_key, 'UTF8'), p.shard = outbox_shard(o.message_key) \
         FROM outbox_pending p JOIN outbox o USING (id)",
    )
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(pending, [("SKU-1".to_owned(), true)]);

    let (code, stdout, stderr) = run(&["outbox-quarantine", "discard", "--all"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "discarded 42\n1 discarded\n");

    let (code, _, stderr) = run(&["outbox-quarantine", "discard"]).await.unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    env.finish().await;
}
