//! Scraping the worker's `/metrics` for the two gauges the summary shows:
//! the sum of `allocation_consumer_lag_messages` and
//! `allocation_outbox_backlog_events`. The request is reqwest's; when nobody
//! answers, the summary says so and goes on.
//!
//! The text is read by [`parse_gauges`], a few lines that know two metric
//! names and skip the labels, quotes and escapes included. No crate was a
//! better fit: `prometheus-parse` (last release 2023) splits labels on `,`,
//! `=` and `}` without regard to quotes, so a sample whose label value holds
//! one of them is lost without a word, and a fix has waited unmerged since
//! 2024; `openmetrics-parser` is LGPL-3.0.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::ACCEPT;
use reqwest::{StatusCode, Url};
use tokio_util::sync::CancellationToken;

/// How long one scrape may take, connecting and reading included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Far more than the worker's few hundred lines: a bigger page is not its.
const MAX_BODY: usize = 16 << 20;

/// An `http://` URL (the worker serves no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUrl {
    /// As given, for messages.
    pub text: String,
    url: Url,
}

impl FromStr for MetricsUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        if url.scheme() != "http" {
            return Err(format!("{text:?} is not an http:// URL"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{text:?} has no host"));
        }
        Ok(Self {
            text: text.to_owned(),
            url,
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

/// A client for [`fetch_gauges`]: no proxy (the worker is reached
/// directly), [`SCRAPE_TIMEOUT`] per scrape.
pub fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(SCRAPE_TIMEOUT)
        .user_agent("allocation-worker-watch")
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {}", describe(&e)))
}

/// `GET url`: the gauges of a `200` answer.
pub async fn fetch_gauges(client: &reqwest::Client, url: &MetricsUrl) -> Result<Gauges, String> {
    let mut response = client
        .get(url.url.clone())
        .header(ACCEPT, "text/plain")
        .send()
        .await
        .map_err(|e| describe(&e))?;
    if response.status() != StatusCode::OK {
        return Err(format!("it answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("its answer is over {} MiB", MAX_BODY >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    parse_gauges(&String::from_utf8_lossy(&body))
}

/// A reqwest error in a few words: its innermost cause says what happened
/// (`Connection refused`), the outer ones mostly repeat the URL.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {}s", SCRAPE_TIMEOUT.as_secs());
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if error.is_connect() {
        format!("cannot connect: {cause}")
    } else {
        cause.to_string()
    }
}

/// The latest scrape, as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MetricsState {
    NotYet,
    Reachable(Gauges),
    Unreachable(String),
}

/// Scrapes every second until `stop`, keeping the latest answer in `state`.
pub(super) async fn poll_metrics(
    url: MetricsUrl,
    state: Arc<Mutex<MetricsState>>,
    stop: CancellationToken,
) {
    let client = match client() {
        Ok(client) => client,
        Err(error) => {
            *state.lock().expect("metrics state") = MetricsState::Unreachable(error);
            return;
        }
    };
    loop {
        let next = match fetch_gauges(&client, &url).await {
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
