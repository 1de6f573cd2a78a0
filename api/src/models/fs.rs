//! A virtio-fs device in a config file: Cloud Hypervisor's `--fs` fields (Firecracker has no
//! virtio-fs, and no API route for it: it is configured before boot, by a config file or
//! `kiln run --fs`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ValidationError;
use devices::virtio::fs::{FsConfig, MAX_TAG_LEN, QUEUE_SIZE};

/// A virtio-fs device served by a vhost-user backend (virtiofsd) the user runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsDevice {
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`), 1 to 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues, 1 to 64.
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Each queue's size: a power of two up to 32768.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    QUEUE_SIZE
}

impl FsDevice {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let bad = |why: String| Err(ValidationError::FsDevice(why));
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_LEN || self.tag.contains('\0') {
            return bad(format!(
                "tag {:?} must be 1 to {MAX_TAG_LEN} bytes without NUL",
                self.tag
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(ValidationError::EmptyPath { field: "socket" });
        }
        if self.socket.to_string_lossy().contains('\0') {
            return Err(ValidationError::NulCharacter { field: "socket" });
        }
        if !(1..=64).contains(&self.num_queues) {
            return bad(format!(
                "num_queues must be 1 to 64, not {}",
                self.num_queues
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return bad(format!(
                "queue_size must be a power of two up to 32768, not {}",
                self.queue_size
            ));
        }
        Ok(())
    }

    /// The device's configuration.
    pub fn to_config(&self) -> FsConfig {
        FsConfig {
            tag: self.tag.clone(),
            socket: self.socket.clone(),
            num_request_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// The model of a device's configuration.
    pub fn from_config(config: &FsConfig) -> Self {
        Self {
            tag: config.tag.clone(),
            socket: config.socket.clone(),
            num_queues: config.num_request_queues,
            queue_size: config.queue_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ranges() {
        let fs: FsDevice =
            serde_json::from_str(r#"{"tag":"share","socket":"/tmp/fs.sock"}"#).unwrap();
        assert_eq!((fs.num_queues, fs.queue_size), (1, 1024));
        fs.validate().unwrap();
        assert_eq!(FsDevice::from_config(&fs.to_config()), fs);
        for bad in [
            r#"{"tag":"","socket":"/s"}"#,
            r#"{"tag":"0123456789012345678901234567890123456","socket":"/s"}"#,
            r#"{"tag":"t","socket":""}"#,
            r#"{"tag":"t","socket":"/s","num_queues":0}"#,
            r#"{"tag":"t","socket":"/s","queue_size":1000}"#,
        ] {
            let fs: FsDevice = serde_json::from_str(bad).unwrap();
            assert!(fs.validate().is_err(), "{bad}");
        }
        assert!(
            serde_json::from_str::<FsDevice>(r#"{"tag":"t","socket":"/s","dax":true}"#).is_err()
        );
    }
}
