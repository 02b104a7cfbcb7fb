//! The rules single values are checked by: topic names, durations, times,
//! and the few settings that must not be empty or zero.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::ConfigError;

/// Kafka's own rule for topic names: 1–249 of `[a-zA-Z0-9._-]`.
pub fn topic(setting: &'static str, name: &str) -> Result<String, ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(ConfigError {
            setting,
            reason: format!("{name:?} is not a valid Kafka topic name"),
        })
    }
}

/// The three inbound topics (batch created, batch quantity changed,
/// allocation required) must be three topics: the worker tells the
/// messages apart by the topic they come from.
pub fn distinct_inbound(topics: [&str; 3]) -> Result<(), ConfigError> {
    if topics[0] == topics[1] || topics[0] == topics[2] || topics[1] == topics[2] {
        return Err(ConfigError {
            setting:
                "TOPIC_BATCH_CREATED / TOPIC_BATCH_QUANTITY_CHANGED / TOPIC_ALLOCATION_REQUIRED",
            reason: "the three inbound topics must be different".into(),
        });
    }
    Ok(())
}

/// Every duration setting: a bare number is seconds (`15`, `2.5`), as an
/// operator reads "--duration 15"; otherwise a humantime string such as
/// `30s`, `2m`, `1h 30m` or `7d`. Negative, NaN or unbounded numbers are
/// refused rather than wrapped. The clap value parser of every duration flag.
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return text
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("{text:?} is not a number of seconds"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write seconds (15) or e.g. 15s, 2m, 1h")
    })
}

/// A duration that must be longer than zero.
pub fn positive(setting: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError {
            setting,
            reason: "must be longer than 0".into(),
        });
    }
    Ok(value)
}

pub fn non_empty(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError {
            setting,
            reason: "must not be empty".into(),
        })
    } else {
        Ok(())
    }
}

/// A point in time: RFC 3339, or `YYYY-MM-DD` for midnight UTC of that day.
pub fn time(setting: &'static str, text: &str) -> Result<DateTime<Utc>, ConfigError> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(midnight) = date.and_hms_opt(0, 0, 0) {
            return Ok(midnight.and_utc());
        }
    }
    Err(ConfigError {
        setting,
        reason: format!(
            "{text:?} is neither an RFC 3339 time (2026-11-29T10:00:00Z) nor a date (2026-11-29)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_dates() {
        assert_eq!(
            time("--since", "2026-11-29").unwrap(),
            time("--since", "2026-11-29T00:00:00Z").unwrap()
        );
        assert_eq!(
            time("--since", "2026-11-29T01:00:00+01:00").unwrap(),
            time("--since", "2026-11-29").unwrap()
        );
        let error = time("--until", "yesterday").unwrap_err().to_string();
        assert!(error.starts_with("invalid setting --until:"), "{error}");
    }
}
