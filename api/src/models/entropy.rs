//! `PUT /entropy`.

use serde::{Deserialize, Serialize};

use super::{check_rate_limiter, RateLimiterConfig, ValidationError};

/// The body of `PUT /entropy`: a virtio-rng device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter on the bytes handed to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyDevice {
    /// Checks the rate limiter.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_rate_limiter("rate_limiter", self.rate_limiter.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_limited_bodies() {
        let e: EntropyDevice = serde_json::from_str("{}").unwrap();
        assert_eq!(e, EntropyDevice::default());
        e.validate().unwrap();
        let e: EntropyDevice = serde_json::from_str(
            r#"{"rate_limiter":{"bandwidth":{"size":0,"one_time_burst":0,"refill_time":0},
                "ops":{"size":0,"one_time_burst":0,"refill_time":0}}}"#,
        )
        .unwrap();
        e.validate().unwrap();
        let err =
            serde_json::from_str::<EntropyDevice>(r#"{"rate_limiter":{"iops":{}}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `iops`"), "{err}");
    }
}
