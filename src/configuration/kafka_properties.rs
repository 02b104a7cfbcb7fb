//! librdkafka properties the operator passes through (TLS, SASL, timeouts):
//! how each of the four forms is read, the order they apply in, and the
//! properties refused because the delivery guarantees rest on them.

use super::ConfigError;

/// Prefix of the variables that each set one librdkafka property.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// Every property given, in the order they apply, so that the last one given
/// wins: the `file` (`KAFKA_PROPERTIES_FILE`), the `list`
/// (`KAFKA_PROPERTIES`), one `KAFKA_PROPERTY_<NAME>` variable of `vars` per
/// property, then the `--kafka-property` `flags`. Values are never echoed.
pub fn kafka_properties(
    file: Option<&std::path::Path>,
    list: Option<&str>,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    flags: &[String],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut properties = properties_file(file)?;
    if let Some(list) = list {
        properties.extend(key_values(
            "KAFKA_PROPERTIES (--kafka-properties)",
            &split_property_list(list),
        )?);
    }
    properties.extend(property_variables(vars)?);
    properties.extend(key_values("--kafka-property", flags)?);
    Ok(properties)
}

/// A `KAFKA_PROPERTIES` value as entries: one per line when it has several
/// lines (so that values may hold commas: `debug=broker,topic`), otherwise
/// comma-separated, as before lines were read. Lines starting with `#` are
/// comments.
fn split_property_list(list: &str) -> Vec<String> {
    if list.trim().contains('\n') {
        list.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect()
    } else {
        list.split(',').map(str::to_owned).collect()
    }
}

/// `KAFKA_PROPERTY_<NAME>=value` variables as properties, sorted by name.
/// The name is lower-cased and `_` read as `.`; `__` stands for a literal
/// `_` (the convention of Confluent's images).
fn property_variables(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut properties = Vec::new();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(property) = name.strip_prefix(KAFKA_PROPERTY_PREFIX) else {
            continue;
        };
        let error = |reason: String| ConfigError {
            setting: "KAFKA_PROPERTY_<NAME>",
            reason,
        };
        if property.is_empty() {
            return Err(error(format!("{name} names no property")));
        }
        let value = value
            .into_string()
            .map_err(|_| error(format!("{name} is not valid UTF-8")))?;
        let property = property
            .to_ascii_lowercase()
            .split("__")
            .map(|part| part.replace('_', "."))
            .collect::<Vec<_>>()
            .join("_");
        properties.push((property, value));
    }
    properties.sort();
    Ok(properties)
}

/// `KEY=VALUE` librdkafka properties; blank entries are skipped. The value
/// is never echoed back: it may be a password.
fn key_values(setting: &'static str, raw: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    raw.iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => Err(ConfigError {
                setting,
                reason: format!(
                    "expected KEY=VALUE, got {:?}",
                    p.split('=').next().unwrap_or_default()
                ),
            }),
        })
        .collect()
}

/// A librdkafka property that the delivery guarantees rest on: `allowed`
/// says which values keep them (the worker's own, in librdkafka's spellings).
struct Guarded {
    name: &'static str,
    allowed: fn(&str) -> bool,
    why: &'static str,
}

fn is_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "t" | "1")
}

fn is_false(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "f" | "0")
}

const GUARDED: &[Guarded] = &[
    Guarded {
        name: "group.id",
        allowed: |_| false,
        why: "must not be set as a property: it is KAFKA_GROUP_ID (--kafka-group-id)",
    },
    Guarded {
        name: "enable.auto.offset.store",
        allowed: is_false,
        why: "must be false: an offset is stored only once the message's effects are committed",
    },
    Guarded {
        name: "enable.auto.commit",
        allowed: is_true,
        why: "must be true: the offsets the worker stores are committed in the background",
    },
    // The legacy consumer's spelling of enable.auto.commit.
    Guarded {
        name: "auto.commit.enable",
        allowed: is_true,
        why: "must be true: the offsets the worker stores are committed in the background",
    },
    // 0 switches auto commit off.
    Guarded {
        name: "auto.commit.interval.ms",
        allowed: |v| v.trim().parse::<u64>().is_ok_and(|ms| ms > 0),
        why: "must be a positive number of milliseconds (0 switches committing off)",
    },
    Guarded {
        name: "offset.store.method",
        allowed: |v| v.trim() == "broker",
        why: "must be broker: offsets are committed to the consumer group",
    },
    Guarded {
        name: "auto.offset.reset",
        allowed: |v| matches!(v.trim(), "earliest" | "smallest" | "beginning"),
        why: "must be earliest: a group with no committed offset must not skip what was published before",
    },
    // Each partition's end would come back as a consumer error: the worker
    // would report itself not ready and back off at every one.
    Guarded {
        name: "enable.partition.eof",
        allowed: is_false,
        why: "must be false: the end of a partition is not an error to the worker",
    },
    // The unknown-reference window counts time only while fresh statistics
    // show the worker caught up: without them it would never close, and a
    // reference that never comes would wait for ever.
    Guarded {
        name: "statistics.interval.ms",
        allowed: |v| v.trim().parse::<u64>().is_ok_and(|ms| (1..=5_000).contains(&ms)),
        why: "must be between 1 and 5000 ms: the unknown-reference window reads the consumer's statistics",
    },
    Guarded {
        name: "enable.idempotence",
        allowed: is_true,
        why: "must be true: the producer's retries must never duplicate or reorder events",
    },
    Guarded {
        name: "acks",
        allowed: |v| matches!(v.trim(), "all" | "-1"),
        why: "must be all: an event is marked sent only once every in-sync replica has it",
    },
    Guarded {
        name: "request.required.acks",
        allowed: |v| matches!(v.trim(), "all" | "-1"),
        why: "must be all: an event is marked sent only once every in-sync replica has it",
    },
];

/// Refuses a property that would break a delivery guarantee (offset
/// storing, auto commit, group id, offset reset, the producer's
/// idempotence): one line naming it. Its value is not echoed.
pub fn refuse_guarantee_breakers(properties: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, value) in properties {
        if let Some(guarded) = GUARDED.iter().find(|g| g.name == name) {
            if !(guarded.allowed)(value) {
                return Err(ConfigError {
                    setting: "Kafka property",
                    reason: format!("{name} {} (refused)", guarded.why),
                });
            }
        }
    }
    Ok(())
}

/// The properties of a KAFKA_PROPERTIES_FILE, if one is named. A line is
/// `KEY=VALUE`, both trimmed; blank lines and lines starting with `#` or `!`
/// are skipped. Values are never echoed back: they are secrets.
fn properties_file(path: Option<&std::path::Path>) -> Result<Vec<(String, String)>, ConfigError> {
    const SETTING: &str = "KAFKA_PROPERTIES_FILE (--kafka-properties-file)";
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        setting: SETTING,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let mut from_file = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                from_file.push((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => {
                return Err(ConfigError {
                    setting: SETTING,
                    reason: format!("{} line {}: expected KEY=VALUE", path.display(), number + 1),
                })
            }
        }
    }
    Ok(from_file)
}
