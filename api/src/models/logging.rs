//! `PUT /logger` and `PUT /metrics`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{check_path, ValidationError};

/// A log level filter. Parsed case-insensitively, as in Firecracker; `"Warn"` is accepted as an
/// alias of `"Warning"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Log nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// Also informational messages (the default).
    #[default]
    Info,
    /// Also debug messages.
    Debug,
    /// Everything.
    Trace,
}

/// The spellings listed in "unknown variant" errors.
const LOG_LEVELS: &[&str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];

impl LogLevel {
    /// The canonical JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "Off",
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
            Self::Debug => "Debug",
            Self::Trace => "Trace",
        }
    }

    /// Parses a level ignoring ASCII case; `None` for an unknown level.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warning" | "warn" => Self::Warning,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::unknown_variant(&s, LOG_LEVELS))
    }
}

/// The body of `PUT /logger`. Every field is optional; absent fields keep their current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Named pipe or file for the human readable log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Level filter (`Info` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level on each line (`false` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the file and line of each message's origin (`false` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log messages from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Checks the path, if given.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(path) = &self.log_path {
            check_path("log_path", path)?;
        }
        Ok(())
    }
}

/// The body of `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Named pipe or file receiving one JSON object per flush.
    pub metrics_path: PathBuf,
    /// Emit the instance ID as a top-level `"id"` on each line (`false` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    /// Key-value pairs emitted under a top-level `"properties"` on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

impl Metrics {
    /// Checks the path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_path("metrics_path", &self.metrics_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_case_insensitive() {
        for (s, level) in [
            ("Info", LogLevel::Info),
            ("info", LogLevel::Info),
            ("WARNING", LogLevel::Warning),
            ("Warn", LogLevel::Warning),
            ("Debug", LogLevel::Debug),
            ("trace", LogLevel::Trace),
            ("Error", LogLevel::Error),
            ("off", LogLevel::Off),
        ] {
            let l: Logger = serde_json::from_str(&format!(r#"{{"level":"{s}"}}"#)).unwrap();
            assert_eq!(l.level, Some(level), "{s}");
        }
        let err = serde_json::from_str::<Logger>(r#"{"level":"Loud"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `Loud`"), "{err}");
        let err = serde_json::from_str::<Logger>(r#"{"level":3}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type: integer"), "{err}");
        assert_eq!(
            serde_json::to_string(&LogLevel::Warning).unwrap(),
            r#""Warning""#
        );
    }

    #[test]
    fn logger_bodies() {
        let l: Logger = serde_json::from_str(
            r#"{"log_path":"/tmp/log.fifo","level":"Debug","show_level":true,
                "show_log_origin":false,"module":"api_server::request"}"#,
        )
        .unwrap();
        l.validate().unwrap();
        let l: Logger = serde_json::from_str("{}").unwrap();
        assert_eq!(l, Logger::default());
        // Pre-1.0 Firecracker fields are gone from the schema.
        let err = serde_json::from_str::<Logger>(r#"{"log_fifo":"/x"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `log_fifo`"),
            "{err}"
        );
    }

    #[test]
    fn metrics_bodies() {
        let m: Metrics = serde_json::from_str(r#"{"metrics_path":"/tmp/m"}"#).unwrap();
        m.validate().unwrap();
        let m: Metrics = serde_json::from_str(
            r#"{"metrics_path":"/tmp/m","emit_id":true,"properties":{"az":"eu-1"}}"#,
        )
        .unwrap();
        assert_eq!(m.properties.unwrap()["az"], "eu-1");
        let err = serde_json::from_str::<Metrics>("{}").unwrap_err();
        assert!(
            err.to_string().contains("missing field `metrics_path`"),
            "{err}"
        );
        let err = serde_json::from_str::<Metrics>(r#"{"metrics_path":"/m","properties":{"a":1}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("invalid type: integer"), "{err}");
        let m: Metrics = serde_json::from_str(r#"{"metrics_path":""}"#).unwrap();
        assert!(m.validate().is_err());
    }
}
