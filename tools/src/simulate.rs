//! `allocation-tools simulate`: publishes a realistic, seeded stream of ERP
//! messages (see [`generator`](super::generator)) to the three inbound topics,
//! at a steady rate, with an idempotent producer; with `--watch`, shows the
//! live summary of `watch` alongside.
//!
//! Each message carries a `ce_id` header derived from the seed and its
//! position, so the same seed publishes the same stream, and publishing it
//! again is recognised by the worker as already handled.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use crate::generator::{Workload, WorkloadSettings};
use crate::watch::{Progress, WatchSettings, Watcher};
use allocation_worker::adapters::inbound::InboundKind;
use allocation_worker::adapters::kafka::{KafkaSettings, WorkerContext};
use allocation_worker::command_error::CommandError;
use allocation_worker::configuration::Connection;

/// How long `simulate --watch` goes on after its last message when nothing
/// new arrives, unless `--until-idle` says otherwise.
pub const DEFAULT_UNTIL_IDLE: Duration = Duration::from_secs(10);

/// Everything `simulate` needs, validated.
#[derive(Debug, Clone)]
pub struct SimulateSettings {
    pub connection: Connection,
    /// Batch-created, batch-quantity-changed, allocation-required.
    pub topics: [String; 3],
    pub rate: f64,
    /// Messages to publish; `None` until Ctrl-C.
    pub total: Option<u64>,
    pub workload: WorkloadSettings,
    pub watch: Option<WatchSettings>,
}

impl SimulateSettings {
    fn topic(&self, kind: InboundKind) -> &str {
        match kind {
            InboundKind::BatchCreated => &self.topics[0],
            InboundKind::BatchQuantityChanged => &self.topics[1],
            InboundKind::AllocationRequired => &self.topics[2],
        }
    }
}

/// What was published, by topic kind.
#[derive(Debug, Default)]
struct Tally {
    enqueued: [u64; 3],
    malformed: u64,
    first_error: Option<String>,
}

/// `allocation-tools simulate`.
pub async fn run(
    settings: SimulateSettings,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let kafka = KafkaSettings {
        bootstrap_servers: settings.connection.bootstrap_servers.clone(),
        group_id: "allocation-worker-simulate".into(),
        properties: settings.connection.properties.clone(),
    };
    let producer = kafka.producer().map_err(CommandError::refused_property)?;
    check_topics(&producer, &settings.topics).await?;

    let progress = Arc::new(Progress {
        planned: settings.total,
        ..Progress::default()
    });
    let planned = settings
        .total
        .map(|t| {
            format!(
                "{t} messages ({}/s for {:.0}s)",
                settings.rate,
                t as f64 / settings.rate
            )
        })
        .unwrap_or_else(|| format!("messages at {}/s until Ctrl-C", settings.rate));
    // Before the summary draws: a line in the middle would shift it.
    eprintln!(
        "simulate: publishing {planned} to {}, seed {}, {} SKUs",
        settings.topics.join(", "),
        settings.workload.seed,
        settings.workload.skus
    );

    // The summary's consumer is assigned before the first message, so that
    // reading "from the end" misses nothing of this run.
    let watch = match &settings.watch {
        Some(watch) => {
            let watcher = Watcher::start(watch).await?;
            Some(tokio::spawn(
                watcher.run(shutdown.clone(), Some(Arc::clone(&progress))),
            ))
        }
        None => None,
    };
    let ticker = watch
        .is_none()
        .then(|| tokio::spawn(show_progress(Arc::clone(&progress), shutdown.clone())));
    let started = tokio::time::Instant::now();
    let produced = produce(&producer, &settings, &progress, &shutdown).await;
    let elapsed = started.elapsed();
    progress.done.store(true, Ordering::Relaxed);
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    if let Some(watch) = watch {
        let _ = watch.await;
    }
    let tally = produced?;

    let sent = progress.sent.load(Ordering::Relaxed);
    let failed = progress.failed.load(Ordering::Relaxed);
    let mut line = format!(
        "published {sent} messages in {:.1}s ({:.1}/s): {} to {}, {} to {}, {} to {}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64().max(1e-3),
        tally.enqueued[0],
        settings.topics[0],
        tally.enqueued[1],
        settings.topics[1],
        tally.enqueued[2],
        settings.topics[2],
    );
    if tally.malformed > 0 {
        line.push_str(&format!("; {} of them malformed", tally.malformed));
    }
    println!("{line}");
    match tally.first_error {
        Some(error) if failed > 0 => Err(CommandError::Kafka(format!(
            "{failed} messages were not delivered, the first because: {error}"
        ))),
        _ => Ok(()),
    }
}

/// Fails fast, with the topic's name, when an inbound topic is missing.
async fn check_topics(
    producer: &FutureProducer<WorkerContext>,
    topics: &[String; 3],
) -> Result<(), CommandError> {
    let producer = producer.clone();
    let topics = topics.clone();
    tokio::task::spawn_blocking(move || {
        for topic in &topics {
            let metadata = producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(15))
                .map_err(|e| {
                    CommandError::Kafka(format!("cannot reach the broker for {topic}: {e}"))
                })?;
            let exists = metadata
                .topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
            if !exists {
                return Err(CommandError::Kafka(format!(
                    "topic {topic} does not exist (scripts/run.sh creates the default topics)"
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| CommandError::Failed(format!("simulate: {e}")))?
}

/// Publishes the stream at the rate until the total or `shutdown`, then waits
/// for every delivery report.
async fn produce(
    producer: &FutureProducer<WorkerContext>,
    settings: &SimulateSettings,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> Result<Tally, CommandError> {
    let mut workload = Workload::new(settings.workload.clone());
    let mut tally = Tally::default();
    let mut deliveries = FuturesUnordered::new();
    let start = tokio::time::Instant::now();
    let mut n: u64 = 0;
    'produce: while settings.total.is_none_or(|total| n < total) {
        let due = start + Duration::from_secs_f64(n as f64 / settings.rate);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'produce,
                Some(outcome) = deliveries.next() => record_delivery(progress, &mut tally, outcome),
                () = tokio::time::sleep_until(due) => break,
            }
        }
        let Some(message) = workload.next() else {
            break;
        };
        let topic = settings.topic(message.topic_kind);
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(message.ce_id.as_bytes()),
        });
        let mut record = FutureRecord::to(topic)
            .key(message.key.as_str())
            .payload(message.value.as_slice())
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::select! {
                        Some(outcome) = deliveries.next() => record_delivery(progress, &mut tally, outcome),
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
                Err((error, _)) => {
                    return Err(CommandError::Kafka(format!(
                        "cannot publish to {topic}: {error}"
                    )))
                }
            }
        }
        tally.enqueued[match message.topic_kind {
            InboundKind::BatchCreated => 0,
            InboundKind::BatchQuantityChanged => 1,
            InboundKind::AllocationRequired => 2,
        }] += 1;
        tally.malformed += u64::from(message.malformed);
        n += 1;
    }
    // Every message has a delivery report within message.timeout.ms.
    while let Some(outcome) = deliveries.next().await {
        record_delivery(progress, &mut tally, outcome);
    }
    Ok(tally)
}

/// Counts one delivery report.
fn record_delivery(
    progress: &Progress,
    tally: &mut Tally,
    outcome: Result<OwnedDeliveryResult, Canceled>,
) {
    match outcome {
        Ok(Ok(_)) => {
            progress.sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err((error, _))) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            tally.first_error.get_or_insert_with(|| error.to_string());
        }
        Err(Canceled) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            tally
                .first_error
                .get_or_insert_with(|| "the producer went away".into());
        }
    }
}

/// Without `--watch`: how many were published, on one refreshed line on a
/// terminal, one line every 5 s otherwise.
async fn show_progress(progress: Arc<Progress>, shutdown: CancellationToken) {
    let terminal = std::io::stdout().is_terminal();
    let every = Duration::from_secs(if terminal { 1 } else { 5 });
    let started = tokio::time::Instant::now();
    let mut last = (started, 0u64);
    let mut tick = tokio::time::interval_at(started + every, every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if progress.done.load(Ordering::Relaxed) {
            break;
        }
        let now = tokio::time::Instant::now();
        let sent = progress.sent.load(Ordering::Relaxed);
        let rate = (sent - last.1) as f64 / (now - last.0).as_secs_f64();
        last = (now, sent);
        let of = progress
            .planned
            .map(|p| format!("{sent}/{p}"))
            .unwrap_or_else(|| sent.to_string());
        let mut out = std::io::stdout().lock();
        if terminal {
            let _ = write!(out, "\r\x1b[2Kpublished {of} ({rate:.1}/s)");
        } else {
            let _ = writeln!(
                out,
                "t={}s sent={sent} (+{rate:.1}/s)",
                (now - started).as_secs()
            );
        }
        let _ = out.flush();
    }
    if terminal {
        let _ = write!(std::io::stdout().lock(), "\r\x1b[2K");
    }
}
