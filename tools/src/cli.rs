//! The command line of `allocation-tools`: `simulate` and `watch`, their
//! flags, and the settings they build. The connection and topic flags are
//! the worker's own (`allocation_worker::entrypoints::cli`), so a tool takes
//! the same flags and environment variables as the worker it feeds.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use allocation_worker::configuration::{duration, ConfigError, Connection};
use allocation_worker::entrypoints::cli::{ConnectionArgs, InboundTopicArgs, OutboundTopicArgs};
use allocation_worker::telemetry::LogFormat;

use crate::generator::{Malformed, WorkloadSettings};
use crate::simulate::{SimulateSettings, DEFAULT_UNTIL_IDLE};
use crate::watch::WatchSettings;

#[derive(Debug, Parser)]
#[command(
    name = "allocation-tools",
    version,
    about = "Developer tools of allocation-worker: feed it a simulated ERP and watch what it decides"
)]
pub struct Cli {
    /// Log output: `text` for people, `json` for machines. Filter with RUST_LOG.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a realistic, seeded stream of ERP messages to the inbound topics.
    Simulate(Box<SimulateArgs>),
    /// Live summary of what the worker decides: outbound topics, dead letters,
    /// consumer lag and outbox backlog.
    Watch(Box<WatchArgs>),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub inbound_topics: InboundTopicArgs,

    /// Messages per second.
    #[arg(long, env = "SIMULATE_RATE", default_value_t = 50.0)]
    pub rate: f64,

    /// How long to publish: seconds (15) or e.g. 60s, 5m; 0 publishes until
    /// Ctrl-C.
    #[arg(long, env = "SIMULATE_DURATION", default_value = "60s", value_parser = duration)]
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

    /// Show the live summary of `allocation-tools watch` while publishing,
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

impl SimulateArgs {
    pub fn settings(&self) -> Result<SimulateSettings, ConfigError> {
        let connection = self.connection.settings()?;
        let topics = self.inbound_topics.names()?;
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

/// What the summary reads, and when it stops.
#[derive(Debug, Clone, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub outbound_topics: OutboundTopicArgs,

    /// The worker's Prometheus endpoint, for consumer lag and outbox backlog.
    #[arg(
        long,
        env = "METRICS_URL",
        default_value = "http://127.0.0.1:9464/metrics"
    )]
    pub metrics_url: String,

    /// Count what is already on the topics too (default: from the end at start).
    #[arg(long)]
    pub from_beginning: bool,

    /// Time between two summary lines when stdout is not a terminal (a
    /// terminal is redrawn every second): seconds (5) or e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub interval: Duration,

    /// Stop after this long: seconds (30) or e.g. 30s, 2m.
    #[arg(long, value_parser = duration)]
    pub exit_after: Option<Duration>,

    /// Stop once nothing new arrived for this long, everything present at
    /// start was read, and the worker reports no lag and no backlog (when its
    /// /metrics answers). `simulate --watch` uses 10s when not given, counted
    /// from its last message.
    #[arg(long, value_parser = duration)]
    pub until_idle: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(flatten)]
    pub summary: SummaryArgs,
}

impl WatchArgs {
    pub fn settings(&self) -> Result<WatchSettings, ConfigError> {
        self.summary.settings(self.connection.settings()?)
    }
}

impl SummaryArgs {
    pub fn settings(&self, connection: Connection) -> Result<WatchSettings, ConfigError> {
        let topics = self.outbound_topics.names()?;
        let metrics_url = self.metrics_url.parse().map_err(|reason| ConfigError {
            setting: "METRICS_URL (--metrics-url)",
            reason,
        })?;
        if self.interval.is_zero() {
            return Err(ConfigError {
                setting: "--interval",
                reason: "must be more than 0".into(),
            });
        }
        Ok(WatchSettings {
            connection,
            topics,
            metrics_url,
            from_beginning: self.from_beginning,
            interval: self.interval,
            exit_after: self.exit_after,
            until_idle: self.until_idle,
        })
    }
}
