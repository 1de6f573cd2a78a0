//! `PUT|PATCH|GET /balloon`, `GET|PATCH /balloon/statistics` and `/balloon/hinting/*`.
//!
//! The bodies are Firecracker's; the statistics and the hinting status are the device's own
//! types, which already serialize in Firecracker's shape.

use serde::{Deserialize, Serialize};

pub use ::devices::virtio::balloon::{BalloonStats, HintingStatus};

use super::ValidationError;

/// The largest balloon in MiB: its size in 4 KiB pages must fit the device's 32-bit counter.
pub const MAX_BALLOON_MIB: u32 = u32::MAX / 256;

/// The body of `PUT /balloon` (and the answer of `GET /balloon`, the config file's `balloon`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Whether the guest may deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 (the default) turns statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Whether free page hinting is offered to the guest.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Whether free page reporting is offered to the guest.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Balloon {
    /// Checks the size fits the device's page counter.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_amount(self.amount_mib)
    }
}

/// The body of `PATCH /balloon`: a new target size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
}

impl BalloonUpdate {
    /// Checks the size fits the device's page counter.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_amount(self.amount_mib)
    }
}

/// The body of `PATCH /balloon/statistics`: a new polling interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics updates.
    pub stats_polling_interval_s: u16,
}

/// The (optional) body of `PATCH /balloon/hinting/start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    /// Whether the VMM acknowledges the guest's "done" itself, ending the run.
    #[serde(default)]
    pub acknowledge_on_stop: bool,
}

fn check_amount(amount_mib: u32) -> Result<(), ValidationError> {
    if amount_mib > MAX_BALLOON_MIB {
        return Err(ValidationError::BalloonTooLarge(amount_mib));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_required_fields() {
        let b: Balloon =
            serde_json::from_str(r#"{"amount_mib":64,"deflate_on_oom":true}"#).unwrap();
        assert_eq!(
            b,
            Balloon {
                amount_mib: 64,
                deflate_on_oom: true,
                ..Default::default()
            }
        );
        b.validate().unwrap();
        let err = serde_json::from_str::<Balloon>(r#"{"amount_mib":64}"#).unwrap_err();
        assert!(err.to_string().contains("deflate_on_oom"), "{err}");
        let err = serde_json::from_str::<Balloon>(
            r#"{"amount_mib":1,"deflate_on_oom":false,"stats_polling_interval_s":65536}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("u16"), "{err}");
        let err = serde_json::from_str::<Balloon>(
            r#"{"amount_mib":1,"deflate_on_oom":false,"must_tell_host":true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn a_size_past_the_page_counter_is_refused() {
        let too_big = BalloonUpdate {
            amount_mib: MAX_BALLOON_MIB + 1,
        };
        assert!(matches!(
            too_big.validate(),
            Err(ValidationError::BalloonTooLarge(_))
        ));
        BalloonUpdate {
            amount_mib: MAX_BALLOON_MIB,
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn start_cmd_defaults_to_no_acknowledge() {
        let cmd: BalloonStartCmd = serde_json::from_str("{}").unwrap();
        assert!(!cmd.acknowledge_on_stop);
    }
}
