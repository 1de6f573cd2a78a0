//! `PUT /serial`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_path, TokenBucketConfig, ValidationError};

/// The body of `PUT /serial`: where the guest's serial console output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// File or named pipe receiving the console output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Token bucket (in bytes) on console output; output over the rate is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucketConfig>,
}

impl SerialDevice {
    /// Checks the path and that the bucket is consistent (a size needs a refill time and the
    /// other way round), as for device rate limiters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(path) = &self.serial_out_path {
            check_path("serial_out_path", path)?;
        }
        if let Some(bucket) = self.rate_limiter {
            let as_limiter = super::RateLimiterConfig {
                bandwidth: Some(bucket),
                ops: None,
            };
            super::check_rate_limiter("rate_limiter", Some(&as_limiter))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_shape() {
        let s: SerialDevice = serde_json::from_str("{}").unwrap();
        s.validate().unwrap();
        let s: SerialDevice = serde_json::from_str(
            r#"{"serial_out_path":"/tmp/console","rate_limiter":{"size":4096,"refill_time":100}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.serial_out_path, Some(PathBuf::from("/tmp/console")));
        let s: SerialDevice =
            serde_json::from_str(r#"{"rate_limiter":{"size":4096,"refill_time":0}}"#).unwrap();
        assert!(s.validate().is_err());
        let err = serde_json::from_str::<SerialDevice>(r#"{"path":"/x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `path`"), "{err}");
    }
}
