//! Wiring: builds the adapters from validated settings, applies migrations,
//! starts the outbox relay and runs the worker until the shutdown token fires.
//! Stops in order: the worker (stop fetching, finish, commit offsets), then the
//! relay (publish what was committed, flush), then the database pool.

use std::future::IntoFuture;
use std::sync::Arc;

use sqlx::migrate::MigrateError;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::adapters::backoff::Backoff;
use crate::adapters::health::Health;
use crate::adapters::kafka::KafkaConsumer;
use crate::adapters::metrics::Metrics;
use crate::adapters::outbox::WrittenShards;
use crate::adapters::postgres::pool::{lazy_pool, worker_connect_options, MIGRATOR};
use crate::adapters::postgres::unit_of_work::PgStore;
use crate::adapters::relay::Relay;
use crate::adapters::retention::Retention;
use crate::adapters::topic_retention;
use crate::configuration::{ConfigError, DatabaseSettings, RunSettings};
use crate::engine::processor::Processor;
use crate::engine::worker::Worker;
use crate::entrypoints::http::{self, HttpState};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A setting the clients refused (say, an unknown librdkafka property).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database migration failed: {0}")]
    Migration(#[from] MigrateError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on HTTP_ADDR {0}: {1}")]
    Http(std::net::SocketAddr, #[source] std::io::Error),
    #[error("cannot listen on READ_MODEL_ADDR {0}: {1}")]
    ReadModel(std::net::SocketAddr, #[source] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
}

impl BootstrapError {
    /// Exit code: 2 for a bad setting (contract §7), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            BootstrapError::Config(_) => 2,
            _ => 1,
        }
    }
}

fn kafka_config_error(error: rdkafka::error::KafkaError) -> BootstrapError {
    ConfigError::refused_property(error).into()
}

/// `allocation-worker migrate`: fails at once if the database is unreachable.
pub async fn migrate(settings: &DatabaseSettings) -> Result<(), BootstrapError> {
    let pool = lazy_pool(settings.options.clone(), 1);
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// Applies migrations, waiting out a database that is not up yet.
async fn migrate_when_reachable(
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<(), BootstrapError> {
    let mut backoff = Backoff::default();
    loop {
        // Waiting for a connection takes seconds; a SIGTERM must not.
        let migrated = tokio::select! {
            migrated = MIGRATOR.run(pool) => migrated,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match migrated {
            Ok(()) => return Ok(()),
            Err(MigrateError::Execute(
                error @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)),
            )) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "database unreachable; waiting to migrate");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// `allocation-worker run`.
pub async fn run(settings: RunSettings, shutdown: CancellationToken) -> Result<(), BootstrapError> {
    let metrics = Arc::new(Metrics::new().map_err(BootstrapError::Metrics)?);
    // Clients first: a bad librdkafka property is a configuration error and
    // must stop the binary before it touches anything.
    let health = Arc::new(Health::default());
    let consumer = settings
        .kafka
        .consumer(Arc::clone(&metrics), Arc::clone(&health))
        .map_err(kafka_config_error)?;
    let producer = settings.kafka.producer().map_err(kafka_config_error)?;
    // Idempotency records must outlive what the broker can redeliver
    // (adapters::topic_retention); checked before anything else starts.
    let admin = settings.kafka.admin().map_err(kafka_config_error)?;
    let retention_warnings = topic_retention::check(
        &admin,
        &settings.topics.inbound(),
        settings.retention.idempotency,
    )
    .await?;
    drop(admin);
    // The first line of the log says which build this is; not before the
    // clients accepted the settings: a bad setting is one line and nothing
    // else.
    tracing::info!(
        version = crate::VERSION,
        revision = crate::REVISION,
        "allocation-worker starting"
    );
    for warning in retention_warnings {
        tracing::warn!("{warning}");
    }
    let pool = lazy_pool(
        worker_connect_options(settings.database.options.clone()),
        settings.database.max_connections,
    );

    // HTTP first, so /healthz answers and /readyz says "not ready" while the
    // database is still being waited for.
    let listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .map_err(|e| BootstrapError::Http(settings.http_addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| BootstrapError::Http(settings.http_addr, e))?;
    tracing::info!(addr = %bound, "http listening");
    let http_stop = CancellationToken::new();
    let read_pool = lazy_pool(
        worker_connect_options(settings.database.options.clone()),
        settings.read_model_max_connections,
    );
    let http_state = HttpState {
        read_pool: read_pool.clone(),
        partition_stall_timeout: settings.partition_stall_timeout,
        pool: pool.clone(),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        health_poll_timeout: settings.health_poll_timeout,
    };
    let (app, read_model) = match settings.read_model_addr {
        None => (http::router(http_state), None),
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| BootstrapError::ReadModel(addr, e))?;
            let bound = listener
                .local_addr()
                .map_err(|e| BootstrapError::ReadModel(addr, e))?;
            tracing::info!(addr = %bound, "read model listening");
            let app = http::read_model_router(http_state.clone());
            (http::operations_router(http_state), Some((listener, app)))
        }
    };
    let http_task = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(http_stop.clone().cancelled_owned())
            .into_future(),
    );
    let read_model_task = read_model.map(|(listener, app)| {
        tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(http_stop.clone().cancelled_owned())
                .into_future(),
        )
    });

    if settings.migrate {
        // A connection of its own, without the worker's statement and lock
        // timeouts: a migration may rewrite a large table, or wait for the
        // locks of instances still running the previous version.
        let migrations = lazy_pool(settings.database.options.clone(), 1);
        let migrated = migrate_when_reachable(&migrations, &shutdown).await;
        migrations.close().await;
        migrated?;
        if shutdown.is_cancelled() {
            http_stop.cancel();
            return Ok(());
        }
        tracing::info!("migrations applied");
    }

    let wake = Arc::new(Notify::new());
    // What the worker's commits wrote, for the relay beside it.
    let written = Arc::new(WrittenShards::default());
    let relay = Relay::new(
        pool.clone(),
        producer,
        settings.topics.clone(),
        Arc::clone(&wake),
        Arc::clone(&metrics),
    )
    .with_written_shards(Arc::clone(&written));
    let relay_stop = CancellationToken::new();
    let (relay_deadline, relay_deadline_rx) = tokio::sync::oneshot::channel();
    let relay_task = tokio::spawn(relay.run_until_stopped(relay_stop.clone(), relay_deadline_rx));

    let retention_stop = CancellationToken::new();
    let retention_task = tokio::spawn(
        Retention::new(pool.clone(), settings.retention, Arc::clone(&metrics))
            .run_until_stopped(retention_stop.clone()),
    );

    let settings_shutdown_timeout = settings.worker.shutdown_timeout;
    let store = PgStore::new(pool.clone())
        .with_product_cache_mib(settings.product_cache_mib)
        .with_waiting_gauge(metrics.db_pool_waiting.clone())
        .with_cache_lookups(&metrics.product_cache_lookups)
        .with_written_shards(written);
    let processor = Processor::with_store(store, settings.topics, wake, metrics);
    let worker = Worker::new(
        processor,
        KafkaConsumer::new(consumer),
        settings.worker,
        health,
    );
    let result = worker.run_until_stopped(shutdown).await;
    retention_stop.cancel();
    if let Err(error) = retention_task.await {
        tracing::error!(%error, "retention task failed");
    }

    let deadline = match &result {
        Ok(deadline) => *deadline,
        Err(_) => tokio::time::Instant::now() + settings_shutdown_timeout,
    };
    let _ = relay_deadline.send(deadline);
    relay_stop.cancel();
    if let Err(error) = relay_task.await {
        tracing::error!(%error, "outbox relay task failed");
    }
    http_stop.cancel();
    for task in std::iter::once(http_task).chain(read_model_task) {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "http server failed"),
            Err(error) => tracing::warn!(%error, "http task failed"),
        }
    }
    read_pool.close().await;
    // Closing waits for every connection to come back: one still held by a
    // partition stuck past its deadline (on a lock) would hold the exit up.
    // It is dropped with the process instead, which rolls its transaction back.
    let at_least = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
    if tokio::time::timeout_at(deadline.max(at_least), pool.close())
        .await
        .is_err()
    {
        tracing::warn!(
            "database connections still in use at the deadline; closing them with the process"
        );
    }
    tracing::info!("stopped");
    result.map(|_| ()).map_err(BootstrapError::from)
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        trigger.cancel();
    });
    Ok(token)
}
