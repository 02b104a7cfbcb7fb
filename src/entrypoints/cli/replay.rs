//! The flags of `replay-dead-letters`, and the settings they build.

use clap::Args;

use super::ConnectionArgs;
use crate::configuration::{time, topic, ConfigError};
use crate::operations::replay::{ReplaySettings, Selection};
use crate::service_layer::DeadLetterReason;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub(crate) connection: ConnectionArgs,

    #[arg(
        long,
        env = "TOPIC_DEAD_LETTER",
        default_value = "allocation.dead-letter"
    )]
    pub(crate) topic_dead_letter: String,

    /// Only letters with this `dlq.reason` (repeat, or separate with commas):
    /// malformed-json, invalid-message, unknown-sku, unknown-batch,
    /// duplicate-batch, duplicate-line, unknown-topic.
    #[arg(long, value_delimiter = ',', value_name = "REASON")]
    pub(crate) reason: Vec<String>,

    /// Only letters that came from this topic (`dlq.original.topic`; repeat,
    /// or separate with commas).
    #[arg(long, value_delimiter = ',', value_name = "TOPIC")]
    pub(crate) topic: Vec<String>,

    /// Only letters dead-lettered at or after this time: RFC 3339
    /// (2026-11-29T10:00:00Z) or a UTC date (2026-11-29).
    #[arg(long, value_name = "TIME")]
    pub(crate) since: Option<String>,

    /// Only letters dead-lettered before this time: RFC 3339 or a UTC date
    /// (the start of that day).
    #[arg(long, value_name = "TIME")]
    pub(crate) until: Option<String>,

    /// List the selected letters, one a line, and send nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

impl ReplayArgs {
    pub fn settings(&self) -> Result<ReplaySettings, ConfigError> {
        let connection = self.connection.settings()?;
        let dead_letter_topic = topic(
            "TOPIC_DEAD_LETTER (--topic-dead-letter)",
            &self.topic_dead_letter,
        )?;
        let mut reasons = Vec::new();
        for reason in self
            .reason
            .iter()
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
        {
            if !DeadLetterReason::ALL.iter().any(|r| r.as_str() == reason) {
                let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
                return Err(ConfigError {
                    setting: "--reason",
                    reason: format!("{reason:?} is not one of {}", known.join(", ")),
                });
            }
            reasons.push(reason.to_owned());
        }
        let topics = self
            .topic
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| topic("--topic", t))
            .collect::<Result<Vec<_>, _>>()?;
        let since = self
            .since
            .as_deref()
            .map(|t| time("--since", t))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|t| time("--until", t))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until) {
            if since >= until {
                return Err(ConfigError {
                    setting: "--since / --until",
                    reason: "--since must be before --until".into(),
                });
            }
        }
        Ok(ReplaySettings {
            connection,
            dead_letter_topic,
            selection: Selection {
                reasons,
                topics,
                since,
                until,
            },
            dry_run: self.dry_run,
        })
    }
}
