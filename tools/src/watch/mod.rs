//! `allocation-tools watch`: a live summary of what the worker decides, for a
//! person at a terminal or a log file.
//!
//! Three jobs, a file each, run by [`Watcher`] here:
//!
//! - `count`: the records on the outbound topics and the dead-letter topic,
//!   read by consumers of its own that `assign` every partition, from the
//!   end at start or from the beginning (no consumer group, so nothing to
//!   join and nothing committed; the end is where a partition-EOF says it
//!   is);
//! - `scrape`: two gauges from the worker's `/metrics`, the sum of
//!   `allocation_consumer_lag_messages` and `allocation_outbox_backlog_events`
//!   (when nobody answers it says so and goes on);
//! - `draw`: the summary, on a terminal or as lines.
//!
//! On a terminal the summary is redrawn in place every second. Otherwise it is
//! one line every `--interval` (and a last one at exit), in a stable format:
//!
//! ```text
//! t=10s allocated=123 (+12.4/s) deallocated=4 (+0.4/s) out_of_stock=2 (+0.2/s) dead_letters=1 (+0.1/s) lag=0 backlog=0
//! ```
//!
//! `lag` and `backlog` are `?` while `/metrics` does not answer; `simulate
//! --watch` appends ` sent=N`. Notes (metrics unreachable, what is watched)
//! go to stderr.

mod count;
mod draw;
mod scrape;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use allocation_worker::command_error::CommandError;
use allocation_worker::configuration::Connection;

pub use count::{Progress, Totals};
pub use draw::{plain_line, Rates};
pub use scrape::{fetch_gauges, parse_gauges, Gauges, MetricsUrl};

use count::Counter;
use draw::Screen;
use scrape::{poll_metrics, MetricsState};

/// Everything the summary needs, validated.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub connection: Connection,
    /// Allocated, deallocated, out-of-stock, dead-letter, in that order.
    pub topics: [String; 4],
    pub metrics_url: MetricsUrl,
    pub from_beginning: bool,
    pub interval: Duration,
    pub exit_after: Option<Duration>,
    pub until_idle: Option<Duration>,
}

/// A started summary: its consumer is assigned, so nothing published from
/// now on is missed; [`Watcher::run`] shows it.
pub struct Watcher {
    settings: WatchSettings,
    counter: Counter,
}

impl Watcher {
    pub async fn start(settings: &WatchSettings) -> Result<Self, CommandError> {
        let (connection, topics, from_beginning) = (
            settings.connection.clone(),
            settings.topics.clone(),
            settings.from_beginning,
        );
        let counter = tokio::task::spawn_blocking(move || {
            Counter::start(&connection, &topics, from_beginning)
        })
        .await
        .map_err(|e| CommandError::Failed(format!("watch: {e}")))??;
        if !settings.from_beginning {
            // "From the end" is where each partition ends once reached; wait
            // for that, so that what is published after `start` is counted.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !counter.caught_up() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Self {
            settings: settings.clone(),
            counter,
        })
    }

    /// Shows the summary until `shutdown`, `--exit-after` or `--until-idle`
    /// (idleness counts only once `progress`, if any, is done). Returns the
    /// final totals.
    pub async fn run(self, shutdown: CancellationToken, progress: Option<Arc<Progress>>) -> Totals {
        let Self { settings, counter } = self;
        let terminal = std::io::stdout().is_terminal();
        let started = Instant::now();
        let metrics = Arc::new(Mutex::new(MetricsState::NotYet));
        let stop_metrics = CancellationToken::new();
        let poller = tokio::spawn(poll_metrics(
            settings.metrics_url.clone(),
            Arc::clone(&metrics),
            stop_metrics.clone(),
        ));
        if !terminal {
            eprintln!(
                "watch: counting {} ({} partitions) from the {}; lag and backlog from {}",
                settings.topics.join(", "),
                counter.partitions,
                if settings.from_beginning {
                    "beginning"
                } else {
                    "end"
                },
                settings.metrics_url.text
            );
        }
        let mut screen = Screen {
            terminal,
            drawn_lines: 0,
            window: if terminal {
                Duration::from_secs(5)
            } else {
                settings.interval
            },
            // Rates of the first draw are counted from the start.
            history: VecDeque::from([(started, counter.totals(), 0)]),
            metrics_url: settings.metrics_url.text.clone(),
            from_beginning: settings.from_beginning,
        };
        let draw_every = if terminal {
            Duration::from_secs(1)
        } else {
            settings.interval
        };
        let mut next_draw = started + draw_every;
        let mut last_totals = counter.totals();
        let mut last_change = started;
        let mut was_producing = progress
            .as_ref()
            .is_some_and(|p| !p.done.load(Ordering::Relaxed));
        let mut reported: Option<bool> = None; // last reachability told on stderr
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if terminal {
            screen.draw(
                started,
                counter.totals(),
                &MetricsState::NotYet,
                progress.as_deref(),
                false,
            );
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let totals = counter.totals();
            if totals != last_totals {
                last_totals = totals;
                last_change = now;
            }
            let producing = progress
                .as_ref()
                .is_some_and(|p| !p.done.load(Ordering::Relaxed));
            if was_producing && !producing {
                last_change = now; // idleness counts from the simulator's end
            }
            was_producing = producing;
            let state = metrics.lock().expect("metrics state").clone();
            if !terminal {
                match &state {
                    MetricsState::Unreachable(error) if reported != Some(false) => {
                        eprintln!(
                            "watch: cannot read {} ({error}); lag and backlog show as ?",
                            settings.metrics_url.text
                        );
                        reported = Some(false);
                    }
                    MetricsState::Reachable(_) if reported == Some(false) => {
                        eprintln!("watch: {} answers again", settings.metrics_url.text);
                        reported = Some(true);
                    }
                    _ => {}
                }
            }
            if settings
                .exit_after
                .is_some_and(|limit| now - started >= limit)
            {
                break;
            }
            if let Some(idle) = settings.until_idle {
                let quiet_for = now - last_change;
                let worker_quiet = match &state {
                    MetricsState::Reachable(g) => g.lag == 0 && g.backlog == 0,
                    _ => true,
                };
                // A lag gauge that never comes down must not keep us forever.
                if !producing
                    && counter.caught_up()
                    && quiet_for >= idle
                    && (worker_quiet || quiet_for >= idle * 3)
                {
                    break;
                }
            }
            if now >= next_draw {
                screen.draw(started, totals, &state, progress.as_deref(), false);
                next_draw += draw_every;
                if next_draw < now {
                    next_draw = now + draw_every;
                }
            }
        }
        // Not awaited: a scrape in progress may take its full 2 s.
        stop_metrics.cancel();
        poller.abort();
        let totals = counter.totals();
        let state = metrics.lock().expect("metrics state").clone();
        screen.draw(started, totals, &state, progress.as_deref(), true);
        counter.stop().await;
        totals
    }
}

/// `allocation-tools watch`.
pub async fn run(settings: WatchSettings, shutdown: CancellationToken) -> Result<(), CommandError> {
    let watcher = Watcher::start(&settings).await?;
    watcher.run(shutdown, None).await;
    Ok(())
}
