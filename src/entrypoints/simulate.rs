//! `allocation-worker simulate`: publishes a realistic, seeded stream of ERP
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

use clap::Args;
use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use crate::adapters::inbound::InboundKind;
use crate::adapters::kafka::{KafkaSettings, WorkerContext};
use crate::configuration::{distinct_inbound, topic, ConfigError, Connection};
use crate::entrypoints::generator::{Malformed, Workload, WorkloadSettings};
use crate::entrypoints::watch::{
    kafka_config_error, ConnectionArgs, Progress, SummaryArgs, ToolError, WatchSettings, Watcher,
};

/// How long `simulate --watch` goes on after its last message when nothing
/// new arrives, unless `--until-idle` says otherwise.
pub const DEFAULT_UNTIL_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[arg(long, env = "TOPIC_BATCH_CREATED", default_value = "erp.batch-created")]
    pub topic_batch_created: String,
    #[arg(
        long,
        env = "TOPIC_BATCH_QUANTITY_CHANGED",
        default_value = "erp.batch-quantity-changed"
    )]
    pub topic_batch_quantity_changed: String,
    #[arg(
        long,
        env = "TOPIC_ALLOCATION_REQUIRED",
        default_value = "erp.allocation-required"
    )]
    pub topic_allocation_required: String,

    /// Messages per second.
    #[arg(long, env = "SIMULATE_RATE", default_value_t = 50.0)]
    pub rate: f64,

    /// How long to publish: seconds (15) or e.g. 60s, 5m; 0 publishes until
    /// Ctrl-C.
    #[arg(long, env = "SIMULATE_DURATION", default_value = "60s", value_parser = crate::configuration::duration)]
    pub duration: Duration,

    /// Number of products; each starts with warehouse stock and two dated shipments.
    #[arg(long, env = "SIMULATE_SKUS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub skus: u32,

    /// The same seed publishes the same stream; another seed, other products
    /// and orders.
    #[arg(long, env = "SIMULATE_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Deliberately malformed messages, which the worker dead-letters: a
    /// fraction (0.01 or 1%) or a count spread over the run (5).
    #[arg(long, env = "SIMULATE_MALFORMED", default_value = "0", value_parser = parse_malformed, value_name = "FRACTION|COUNT")]
    pub malformed: MalformedArg,

    /// Show the live summary of `allocation-worker watch` while publishing,
    /// and after it until the worker has been idle for --until-idle.
    #[arg(long)]
    pub watch: bool,

    #[command(flatten, next_help_heading = "Summary (with --watch)")]
    pub summary: SummaryArgs,
}

/// `--malformed`: a fraction of the messages or a number of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MalformedArg {
    Fraction(f64),
    Count(u64),
}

/// `0.01`, `1%` (fractions) or `5` (a count).
pub fn parse_malformed(text: &str) -> Result<MalformedArg, String> {
    let text = text.trim();
    let fraction = if let Some(percent) = text.strip_suffix('%') {
        percent.trim().parse::<f64>().map(|p| p / 100.0)
    } else if text.contains(['.', 'e', 'E']) {
        text.parse::<f64>()
    } else {
        return text
            .parse()
            .map(MalformedArg::Count)
            .map_err(|_| format!("{text:?} is neither a fraction (0.01, 1%) nor a count (5)"));
    };
    match fraction {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(MalformedArg::Fraction(f)),
        _ => Err(format!(
            "{text:?} is not a fraction between 0 and 1 (or 0% and 100%)"
        )),
    }
}

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

impl SimulateArgs {
    pub fn settings(&self) -> Result<SimulateSettings, ConfigError> {
        let connection = self.connection.settings()?;
        let topics = [
            topic("TOPIC_BATCH_CREATED", &self.topic_batch_created)?,
            topic(
                "TOPIC_BATCH_QUANTITY_CHANGED",
                &self.topic_batch_quantity_changed,
            )?,
            topic("TOPIC_ALLOCATION_REQUIRED", &self.topic_allocation_required)?,
        ];
        distinct_inbound([&topics[0], &topics[1], &topics[2]])?;
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1_000_000.0) {
            return Err(ConfigError {
                setting: "SIMULATE_RATE (--rate)",
                reason: format!(
                    "{} must be more than 0 and at most 1000000 (messages/s)",
                    self.rate
                ),
            });
        }
        let total = (!self.duration.is_zero())
            .then(|| ((self.rate * self.duration.as_secs_f64()).round() as u64).max(1));
        let mut workload = WorkloadSettings::steady(self.seed, self.skus);
        workload.malformed = match self.malformed {
            MalformedArg::Fraction(f) if f > 0.0 => Malformed::Fraction(f),
            MalformedArg::Fraction(_) | MalformedArg::Count(0) => Malformed::None,
            MalformedArg::Count(count) => Malformed::Count {
                count,
                // Spread over the run; until Ctrl-C, one every 100 messages.
                over: total
                    .map(|t| t.saturating_sub(workload.stock_len()))
                    .filter(|&over| over > 0)
                    .unwrap_or(count.saturating_mul(100)),
            },
        };
        let watch = if self.watch {
            let mut watch = self.summary.settings(connection.clone())?;
            watch.until_idle = watch.until_idle.or(Some(DEFAULT_UNTIL_IDLE));
            Some(watch)
        } else {
            None
        };
        Ok(SimulateSettings {
            connection,
            topics,
            rate: self.rate,
            total,
            workload,
            watch,
        })
    }
}

/// What was published, by topic kind.
#[derive(Debug, Default)]
struct Tally {
    enqueued: [u64; 3],
    malformed: u64,
    first_error: Option<String>,
}

/// `allocation-worker simulate`.
pub async fn run(settings: SimulateSettings, shutdown: CancellationToken) -> Result<(), ToolError> {
    let kafka = KafkaSettings {
        bootstrap_servers: settings.connection.bootstrap_servers.clone(),
        group_id: "allocation-worker-simulate".into(),
        properties: settings.connection.properties.clone(),
    };
    let producer = kafka.producer().map_err(kafka_config_error)?;
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
        Some(error) if failed > 0 => Err(ToolError::Kafka(format!(
            "{failed} messages were not delivered, the first because: {error}"
        ))),
        _ => Ok(()),
    }
}

/// Fails fast, with the topic's name, when an inbound topic is missing.
async fn check_topics(
    producer: &FutureProducer<WorkerContext>,
    topics: &[String; 3],
) -> Result<(), ToolError> {
    let producer = producer.clone();
    let topics = topics.clone();
    tokio::task::spawn_blocking(move || {
        for topic in &topics {
            let metadata = producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(15))
                .map_err(|e| {
                    ToolError::Kafka(format!("cannot reach the broker for {topic}: {e}"))
                })?;
            let exists = metadata
                .topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
            if !exists {
                return Err(ToolError::Kafka(format!(
                    "topic {topic} does not exist (scripts/run.sh creates the default topics)"
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| ToolError::Failed(format!("simulate: {e}")))?
}

/// Publishes the stream at the rate until the total or `shutdown`, then waits
/// for every delivery report.
async fn produce(
    producer: &FutureProducer<WorkerContext>,
    settings: &SimulateSettings,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> Result<Tally, ToolError> {
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
                    return Err(ToolError::Kafka(format!(
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
