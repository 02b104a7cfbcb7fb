//! The check at start that idempotency records outlive what Kafka can
//! redeliver (contract §7, `IDEMPOTENCY_RETENTION`). Kafka deletes whole
//! segments, so a message can be read up to `retention.ms` plus `segment.ms`
//! after it was written; a redelivery of it after its idempotency record is
//! gone would be applied again. The topics' settings are read from the
//! broker (DescribeConfigs).
//!
//! - Shorter or equal: refused, a configuration error (exit code 2).
//! - `retention.ms = -1` (kept for ever): no finite retention covers it,
//!   and refusing would forbid such topics altogether. Only a rewind of the
//!   group (an operator's act, such as after a restore) redelivers a message
//!   older than a few seconds, so this is a warning, naming the rewind as the
//!   risk.
//! - The broker does not say (it refuses or does not implement the request,
//!   or leaves the entries out), or cannot be reached in time: a warning;
//!   the worker starts.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ConfigResourceResult, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::configuration::ConfigError;

/// How long the broker has to answer.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The setting the check is about, as the error names it.
pub(crate) const SETTING: &str = "IDEMPOTENCY_RETENTION (--idempotency-retention)";

/// What one topic says of how long it keeps messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Redelivery {
    /// Up to this long after they were written: retention plus segment time.
    Within(Duration),
    /// For ever (`retention.ms = -1`).
    Unbounded,
    /// The broker did not say; why.
    Unknown(String),
}

/// Reads what `retention.ms` and `segment.ms` of a topic come to.
pub(crate) fn redelivery_of(result: &ConfigResourceResult) -> Redelivery {
    let resource = match result {
        Ok(resource) => resource,
        Err(code) => return Redelivery::Unknown(format!("the broker answered {code}")),
    };
    let read = |name: &str| -> Result<i64, String> {
        let entry = resource
            .get(name)
            .ok_or_else(|| format!("the broker does not report {name}"))?;
        let value = entry
            .value
            .as_deref()
            .ok_or_else(|| format!("the broker reports no value for {name}"))?;
        value
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{name} = {value:?} is not a number of milliseconds"))
    };
    let retention = match read("retention.ms") {
        Ok(ms) => ms,
        Err(why) => return Redelivery::Unknown(why),
    };
    if retention < 0 {
        return Redelivery::Unbounded;
    }
    let segment = match read("segment.ms") {
        Ok(ms) if ms >= 0 => ms,
        Ok(ms) => return Redelivery::Unknown(format!("segment.ms = {ms}")),
        Err(why) => return Redelivery::Unknown(why),
    };
    let total = u64::try_from(retention.saturating_add(segment)).unwrap_or(u64::MAX);
    Redelivery::Within(Duration::from_millis(total))
}

/// The decision for one topic: `Err` when `idempotency` is not longer than
/// what the topic can redeliver; otherwise a warning to log, if any.
pub(crate) fn judge(
    topic: &str,
    redelivery: &Redelivery,
    idempotency: Duration,
) -> Result<Option<String>, ConfigError> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    match redelivery {
        Redelivery::Within(span) if idempotency <= *span => Err(ConfigError {
            setting: SETTING,
            reason: format!(
                "{} is not longer than what topic {topic} can redeliver: its retention.ms plus \
                 segment.ms come to {} (Kafka deletes whole segments); a message redelivered \
                 after its idempotency record is removed would be applied again",
                human(idempotency),
                human(*span)
            ),
        }),
        Redelivery::Within(_) => Ok(None),
        Redelivery::Unbounded => Ok(Some(format!(
            "topic {topic} keeps its messages for ever (retention.ms = -1): a rewind of the \
             consumer group past {} ago would apply messages again",
            human(idempotency)
        ))),
        Redelivery::Unknown(why) => Ok(Some(format!(
            "cannot check {SETTING} against topic {topic}'s retention ({why}): keep it longer \
             than the topic's retention.ms plus segment.ms"
        ))),
    }
}

/// Checks `idempotency` against every topic of `topics`, with `admin`.
/// `Err` refuses the start; otherwise the warnings to log.
pub(crate) async fn check(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
    idempotency: Duration,
) -> Result<Vec<String>, ConfigError> {
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
    let described = tokio::time::timeout(
        DESCRIBE_TIMEOUT + Duration::from_secs(2),
        admin.describe_configs(&specifiers, &options),
    )
    .await;
    let judged: Vec<Result<Option<String>, ConfigError>> = match described {
        Ok(Ok(results)) => topics
            .iter()
            .zip(&results)
            .map(|(topic, result)| {
                // Not logged here: this runs before the log's first line,
                // which names the build (what it finds comes back as
                // warnings, logged after that line).
                let redelivery = redelivery_of(result);
                judge(topic, &redelivery, idempotency)
            })
            .collect(),
        Ok(Err(error)) => {
            let why = Redelivery::Unknown(format!("DescribeConfigs failed: {error}"));
            topics.iter().map(|t| judge(t, &why, idempotency)).collect()
        }
        Err(_) => {
            let why = Redelivery::Unknown(format!(
                "no answer to DescribeConfigs within {DESCRIBE_TIMEOUT:?}"
            ));
            topics.iter().map(|t| judge(t, &why, idempotency)).collect()
        }
    };
    // A refusal first, alone: a bad setting is one line and nothing else.
    let warnings = judged.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(warnings.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn retention_not_longer_than_retention_plus_segment_is_refused() {
        let kafka_default = Redelivery::Within(14 * DAY);
        let refused = judge("erp.x", &kafka_default, 7 * DAY).unwrap_err();
        assert_eq!(refused.setting, SETTING);
        assert!(refused.reason.contains("erp.x"), "{}", refused.reason);
        assert!(judge("erp.x", &kafka_default, 14 * DAY).is_err(), "equal");
        assert_eq!(judge("erp.x", &kafka_default, 15 * DAY).ok(), Some(None));
    }

    #[test]
    fn infinite_or_unknown_retention_is_a_warning() {
        assert!(judge("t", &Redelivery::Unbounded, DAY)
            .is_ok_and(|w| w.is_some_and(|w| w.contains("for ever"))));
        assert!(judge("t", &Redelivery::Unknown("no".into()), DAY)
            .is_ok_and(|w| w.is_some_and(|w| w.contains("cannot check"))));
    }
}
