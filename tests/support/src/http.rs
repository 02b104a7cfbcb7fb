//! The worker's HTTP surface as a test sees it: a plain GET, polling until
//! an answer, and reading samples out of the Prometheus text exposition.

use std::net::SocketAddr;
use std::time::Duration;

use super::{TestEnv, DEADLINE};

/// A plain HTTP/1.1 GET: status and body. `None` while nothing listens or
/// answers (bounded at 10 s, so that a probe of a frozen process gives up).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

/// Polls `path` until it answers with `status`; returns the body. A failure
/// names the last answer.
pub async fn http_until(env: &TestEnv, addr: SocketAddr, path: &str, status: u16) -> String {
    env.eventually(
        &format!("GET {path} answers {status}"),
        DEADLINE,
        || async {
            match http_get(addr, path).await {
                Some((s, body)) if s == status => Ok(Some(body)),
                Some((s, body)) => Err(format!("{s}: {}", body.trim())),
                None => Ok(None),
            }
        },
    )
    .await
}

/// Polls `path` until it answers 200 with a body for which `done` holds;
/// returns that body.
pub async fn http_until_ok<F>(
    env: &TestEnv,
    addr: SocketAddr,
    path: &str,
    what: &str,
    done: F,
) -> String
where
    F: Fn(&str) -> bool,
{
    env.eventually(what, DEADLINE, || async {
        let Some((200, body)) = http_get(addr, path).await else {
            return Ok::<_, String>(None);
        };
        Ok(done(&body).then_some(body))
    })
    .await
}

/// Polls `/metrics` until `done` holds for the exposition; returns it.
pub async fn metrics_until<F>(env: &TestEnv, addr: SocketAddr, what: &str, done: F) -> String
where
    F: Fn(&str) -> bool,
{
    http_until_ok(env, addr, "/metrics", what, done).await
}

/// The value of the sample `name{labels}` in a Prometheus text exposition;
/// `labels` is the exact label string, e.g. `reason="malformed-json"`.
pub fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == wanted).then(|| value.parse().ok()).flatten()
    })
}

/// Every sample of the metric `name`, whatever its labels (a labelled
/// metric with no series yet has none).
pub fn samples(metrics: &str, name: &str) -> Vec<f64> {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

/// The sum of every sample of the metric `name`.
pub fn sample_sum(metrics: &str, name: &str) -> f64 {
    samples(metrics, name).iter().sum()
}
