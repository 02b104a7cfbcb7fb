//! `allocation-worker watch`: a live summary of what the worker decides, for a
//! person at a terminal or a log file.
//!
//! It counts the records on the outbound topics and the dead-letter topic
//! (consumers of its own that `assign` every partition, from the end at
//! start or from the beginning; no consumer group, so nothing to join and
//! nothing committed; the end is where a partition-EOF says it is, see
//! `Counter`), and reads two gauges from the worker's `/metrics`: the
//! sum of `allocation_consumer_lag_messages` and
//! `allocation_outbox_backlog_events` (a minimal HTTP/1.1 GET; when nobody
//! answers it says so and goes on).
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

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::adapters::topic_reader::{partition_ids, ReaderContext};
use crate::command_error::CommandError;
use crate::configuration::Connection;

// ---------------------------------------------------------------- settings

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

// ----------------------------------------------------------------- metrics

/// An `http://host[:port][/path]` URL; nothing more is needed to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUrl {
    /// As given, for messages.
    pub text: String,
    host: String,
    port: u16,
    /// `host:port` as sent in the `Host` header.
    authority: String,
    path: String,
}

impl FromStr for MetricsUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("{text:?} is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // [IPv6]:port
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(port) => port
                .parse()
                .map_err(|_| format!("{text:?}: {port:?} is not a port"))?,
        };
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        Ok(Self {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// The two gauges of the worker the summary shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Sum of `allocation_consumer_lag_messages` over its partitions.
    pub lag: i64,
    /// `allocation_outbox_backlog_events`.
    pub backlog: i64,
}

/// Reads [`Gauges`] from a Prometheus text exposition; an error when it has
/// no `allocation_outbox_backlog_events` (it is not the worker's).
pub fn parse_gauges(text: &str) -> Result<Gauges, String> {
    let mut lag = 0.0;
    let mut backlog = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if let Some(v) = sample_value(line, "allocation_consumer_lag_messages") {
            lag += v;
        } else if let Some(v) = sample_value(line, "allocation_outbox_backlog_events") {
            backlog = Some(v);
        }
    }
    let backlog = backlog.ok_or_else(|| {
        "it has no allocation_outbox_backlog_events: is it the worker's /metrics?".to_owned()
    })?;
    Ok(Gauges {
        lag: lag.round() as i64,
        backlog: backlog.round() as i64,
    })
}

/// The value of a sample line of metric `name` (`name{labels} value [ts]`).
fn sample_value(line: &str, name: &str) -> Option<f64> {
    let rest = line.strip_prefix(name)?;
    let rest = if let Some(labels) = rest.strip_prefix('{') {
        // Skip the labels; a quoted value may contain `}`.
        let (mut quoted, mut escaped, mut end) = (false, false, None);
        for (i, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        &labels[end? + 1..]
    } else if rest.starts_with([' ', '\t']) {
        rest
    } else {
        return None; // another metric whose name starts the same
    };
    rest.split_whitespace().next()?.parse().ok()
}

/// `GET url` with HTTP/1.1 over a plain TCP connection, at most 2 s.
pub async fn fetch_gauges(url: &MetricsUrl) -> Result<Gauges, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\n\
             User-Agent: allocation-worker-watch\r\nConnection: close\r\n\r\n",
            url.path, url.authority
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // 16 MiB is far more than the worker's few hundred lines.
        stream.take(16 << 20).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| "no answer within 2s".to_owned())?
        .map_err(|e| e.to_string())?;
    parse_gauges(&http_body(&response)?)
}

/// The body of a `200` HTTP/1.x response, de-chunked if need be.
fn http_body(response: &[u8]) -> Result<String, String> {
    let split = find(response, b"\r\n\r\n").ok_or("an incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("it answered {status:?}"));
    }
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = &response[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = find(body, b"\r\n").ok_or("a truncated chunked body")?;
        let size = String::from_utf8_lossy(&body[..end]);
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "a bad chunk size")?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("a truncated chunk")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MetricsState {
    NotYet,
    Reachable(Gauges),
    Unreachable(String),
}

/// Scrapes every second until `stop`, keeping the latest answer in `state`.
async fn poll_metrics(url: MetricsUrl, state: Arc<Mutex<MetricsState>>, stop: CancellationToken) {
    loop {
        let next = match fetch_gauges(&url).await {
            Ok(gauges) => MetricsState::Reachable(gauges),
            Err(error) => MetricsState::Unreachable(error),
        };
        *state.lock().expect("metrics state") = next;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

// ----------------------------------------------------------------- summary

/// Records seen on the four watched topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub allocated: u64,
    pub deallocated: u64,
    pub out_of_stock: u64,
    pub dead_letters: u64,
}

impl Totals {
    fn as_array(self) -> [u64; 4] {
        [
            self.allocated,
            self.deallocated,
            self.out_of_stock,
            self.dead_letters,
        ]
    }
}

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

/// What a simulator running alongside has done, shared with the summary.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages the broker acknowledged.
    pub sent: AtomicU64,
    /// Messages that could not be delivered.
    pub failed: AtomicU64,
    /// How many will be sent, when known.
    pub planned: Option<u64>,
    /// Set once the last message was delivered (or given up on).
    pub done: AtomicBool,
}

/// Counts the records of the watched topics: one consumer per topic (a
/// partition-EOF event names only the partition), each on its own thread.
///
/// Where a partition ends is learnt from the consumer's first partition-EOF
/// event, not from the broker's high watermark: Tansu reports the base offset
/// of the last record batch plus one, short of the real end when that batch
/// holds several records. From the end, records before the first EOF were
/// there at start and are not counted.
struct Counter {
    counts: Arc<[AtomicU64; 4]>,
    /// Partitions whose end (as of start) was reached.
    ended: Arc<AtomicU64>,
    partitions: u64,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Counter {
    /// Assigns every partition of `topics`, from the beginning or the end.
    /// Blocking (metadata requests).
    fn start(
        connection: &Connection,
        topics: &[String; 4],
        from_beginning: bool,
    ) -> Result<Self, CommandError> {
        let group = format!(
            "allocation-worker-watch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let ended = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut consumers = Vec::new();
        let mut partitions = 0;
        for (index, topic) in topics.iter().enumerate() {
            let consumer: BaseConsumer<ReaderContext> = connection
                .client_config(&[
                    // Required by librdkafka, never joined: assign(), no subscribe().
                    ("group.id", &group),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("enable.partition.eof", "true"),
                    ("fetch.wait.max.ms", "100"),
                ])
                .create_with_context(ReaderContext)
                .map_err(CommandError::refused_property)?;
            let ids = partition_ids(&consumer, topic)?;
            let mut assignment = TopicPartitionList::new();
            let offset = if from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            };
            for id in &ids {
                assignment
                    .add_partition_offset(topic, *id, offset)
                    .map_err(|e| CommandError::Kafka(e.to_string()))?;
            }
            consumer.assign(&assignment).map_err(|e| {
                CommandError::Kafka(format!("cannot assign the partitions of {topic}: {e}"))
            })?;
            partitions += ids.len() as u64;
            consumers.push((index, consumer, ids));
        }
        let mut threads = Vec::new();
        for (index, consumer, ids) in consumers {
            let (counts, ended, stop) = (counts.clone(), ended.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("watch-{index}"))
                .spawn(move || {
                    let mut at_end: HashMap<i32, bool> = ids.iter().map(|&p| (p, false)).collect();
                    let mut last_error = String::new();
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(100)) {
                            None => {}
                            Some(Ok(message)) => {
                                // Only the partition is kept: no borrowed
                                // message outlives the poll.
                                let reached = at_end.get(&message.partition()).copied();
                                if from_beginning || reached == Some(true) {
                                    counts[index].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Err(KafkaError::PartitionEOF(partition))) => {
                                if let Some(reached @ false) = at_end.get_mut(&partition) {
                                    *reached = true;
                                    ended.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Err(error)) => {
                                let error = error.to_string();
                                if error != last_error {
                                    tracing::warn!(%error, "watch: reading the topics");
                                    last_error = error;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| CommandError::Failed(format!("cannot start a thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            counts,
            ended,
            partitions,
            stop,
            threads,
        })
    }

    fn totals(&self) -> Totals {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Totals {
            allocated: c(0),
            deallocated: c(1),
            out_of_stock: c(2),
            dead_letters: c(3),
        }
    }

    /// Every partition was read up to where it ended at start.
    fn caught_up(&self) -> bool {
        self.ended.load(Ordering::Relaxed) >= self.partitions
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
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

/// Draws the summary: in place on a terminal, as lines otherwise.
struct Screen {
    terminal: bool,
    drawn_lines: usize,
    /// Rates are computed over about this long.
    window: Duration,
    history: VecDeque<(Instant, Totals, u64)>,
    metrics_url: String,
    from_beginning: bool,
}

impl Screen {
    fn draw(
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
                "allocation-worker watch · {}s · {}",
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

/// `allocation-worker watch`.
pub async fn run(settings: WatchSettings, shutdown: CancellationToken) -> Result<(), CommandError> {
    let watcher = Watcher::start(&settings).await?;
    watcher.run(shutdown, None).await;
    Ok(())
}
