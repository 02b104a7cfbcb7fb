//! Drawing the summary: redrawn in place on a terminal, one line in a stable
//! format otherwise (see the module documentation of `watch`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::count::{Progress, Totals};
use super::scrape::{Gauges, MetricsState};

/// Per-second rates of the [`Totals`] fields, in the same order.
pub type Rates = [f64; 4];

/// The summary as one line, in the stable format of the module documentation.
pub fn plain_line(
    elapsed: Duration,
    totals: Totals,
    rates: Rates,
    gauges: Option<Gauges>,
    sent: Option<u64>,
) -> String {
    let mut line = format!("t={}s", elapsed.as_secs());
    let names = ["allocated", "deallocated", "out_of_stock", "dead_letters"];
    for ((name, total), rate) in names.iter().zip(totals.as_array()).zip(rates) {
        let _ = write!(line, " {name}={total} (+{rate:.1}/s)");
    }
    match gauges {
        Some(g) => {
            let _ = write!(line, " lag={} backlog={}", g.lag, g.backlog);
        }
        None => line.push_str(" lag=? backlog=?"),
    }
    if let Some(sent) = sent {
        let _ = write!(line, " sent={sent}");
    }
    line
}

/// Draws the summary: in place on a terminal, as lines otherwise.
pub(super) struct Screen {
    pub(super) terminal: bool,
    pub(super) drawn_lines: usize,
    /// Rates are computed over about this long.
    pub(super) window: Duration,
    pub(super) history: VecDeque<(Instant, Totals, u64)>,
    pub(super) metrics_url: String,
    pub(super) from_beginning: bool,
}

impl Screen {
    pub(super) fn draw(
        &mut self,
        started: Instant,
        totals: Totals,
        metrics: &MetricsState,
        progress: Option<&Progress>,
        last: bool,
    ) {
        let now = Instant::now();
        let sent = progress.map(|p| p.sent.load(Ordering::Relaxed));
        if let Some(&(then, old, old_sent)) = self.history.back() {
            // The last line at exit need not repeat one just printed.
            if last
                && !self.terminal
                && (old, old_sent) == (totals, sent.unwrap_or(0))
                && now - then < Duration::from_secs(1)
                && self.history.len() > 1
            {
                return;
            }
        }
        self.history.push_back((now, totals, sent.unwrap_or(0)));
        // Draws come on 200 ms ticks: one just short of a window ago counts.
        while self.history.len() > 2 && now - self.history[1].0 >= self.window.mul_f64(0.9) {
            self.history.pop_front();
        }
        let (then, old, old_sent) = self.history[0];
        let seconds = (now - then).as_secs_f64();
        let rate = |new: u64, old: u64| {
            if seconds > 0.0 {
                new.saturating_sub(old) as f64 / seconds
            } else {
                0.0
            }
        };
        let mut rates = [0.0; 4];
        for (i, (new, old)) in totals
            .as_array()
            .into_iter()
            .zip(old.as_array())
            .enumerate()
        {
            rates[i] = rate(new, old);
        }
        let gauges = match metrics {
            MetricsState::Reachable(g) => Some(*g),
            _ => None,
        };
        let elapsed = now - started;
        let mut out = std::io::stdout().lock();
        if !self.terminal {
            let _ = writeln!(out, "{}", plain_line(elapsed, totals, rates, gauges, sent));
            let _ = out.flush();
            return;
        }
        let mut lines = vec![
            format!(
                "allocation-tools watch · {}s · {}",
                elapsed.as_secs(),
                if last { "stopped" } else { "Ctrl-C to stop" }
            ),
            format!(
                "  {:<16}{:>10}  {:>10}",
                if self.from_beginning {
                    "since the start"
                } else {
                    "since now"
                },
                "total",
                "per second"
            ),
        ];
        let names = ["allocated", "deallocated", "out of stock", "dead letters"];
        for ((name, total), rate) in names.iter().zip(totals.as_array()).zip(rates) {
            lines.push(format!("  {name:<16}{total:>10}  {rate:>10.1}"));
        }
        match (gauges, metrics) {
            (Some(g), _) => {
                lines.push(format!("  {:<16}{:>10}", "consumer lag", g.lag));
                lines.push(format!("  {:<16}{:>10}", "outbox backlog", g.backlog));
            }
            (None, MetricsState::Unreachable(error)) => {
                lines.push(format!(
                    "  {:<16}{:>10}  {} does not answer: {error}",
                    "consumer lag", "?", self.metrics_url
                ));
                lines.push(format!("  {:<16}{:>10}", "outbox backlog", "?"));
            }
            (None, _) => {
                lines.push(format!("  {:<16}{:>10}", "consumer lag", "…"));
                lines.push(format!("  {:<16}{:>10}", "outbox backlog", "…"));
            }
        }
        if let Some(progress) = progress {
            let sent = sent.unwrap_or(0);
            let of = progress
                .planned
                .map(|p| format!("{sent}/{p}"))
                .unwrap_or_else(|| sent.to_string());
            let failed = progress.failed.load(Ordering::Relaxed);
            lines.push(format!(
                "  {:<16}{of:>10}  {:>10.1}{}",
                "published",
                rate(sent, old_sent),
                if failed > 0 {
                    format!("  ({failed} failed)")
                } else {
                    String::new()
                }
            ));
        }
        if self.drawn_lines > 0 {
            let _ = write!(out, "\x1b[{}A", self.drawn_lines);
        }
        for line in &lines {
            // A wrapped line would throw the cursor-up count off.
            let line: String = line.chars().take(79).collect();
            let _ = writeln!(out, "\r\x1b[2K{line}");
        }
        self.drawn_lines = lines.len();
        let _ = out.flush();
    }
}
