//! `GET /vm/config`, which is also the shape of a `--config-file`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{
    Balloon, BootSource, Drive, EntropyDevice, FsDevice, Logger, MachineConfiguration, Metrics,
    MmdsConfig, NetworkInterface, SerialDevice, ValidationError, Vsock,
};

/// The whole configuration of a microVM, with Firecracker's kebab-case top-level keys
/// (`"boot-source"`, `"machine-config"`, `"network-interfaces"`, ...).
///
/// Differences from Firecracker's config file: every key is optional (Firecracker requires
/// `boot-source` and `drives`; whoever boots checks that a boot source exists), unknown keys —
/// including the Firecracker features Kiln lacks, such as `cpu-config` and `pmem` — are
/// refused instead of ignored, and `serial` is accepted as it is by `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// Configurations for all block devices, in attach order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Kernel, command line and initrd.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Logger configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// vCPUs and memory; Firecracker's defaults when absent.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    /// Metrics configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Configurations for all net devices, in attach order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// The serial console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialDevice>,
    /// The balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// MMDS: which interfaces reach it, at which address, which version.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    /// Kiln's extension (Cloud Hypervisor's `fs`): virtio-fs devices served by vhost-user
    /// backends, in attach order. Left out of `GET /vm/config` when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsDevice>,
}

impl FullVmConfiguration {
    /// Validates every part, then the list-wide rules: IDs are unique within `drives` and within
    /// `network-interfaces`, and at most one drive is the root device.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(boot) = &self.boot_source {
            boot.validate()?;
        }
        if let Some(machine) = &self.machine_config {
            machine.validate()?;
        }
        if let Some(mmds) = &self.mmds_config {
            mmds.validate()?;
        }
        let mut ids = HashSet::new();
        let mut has_root = false;
        for drive in &self.drives {
            drive.validate()?;
            if !ids.insert(drive.drive_id.as_str()) {
                return Err(ValidationError::DuplicateId {
                    list: "drives",
                    id: drive.drive_id.clone(),
                });
            }
            if drive.is_root_device {
                if has_root {
                    return Err(ValidationError::SecondRootDevice);
                }
                has_root = true;
            }
        }
        let mut ids = HashSet::new();
        for iface in &self.network_interfaces {
            iface.validate()?;
            if !ids.insert(iface.iface_id.as_str()) {
                return Err(ValidationError::DuplicateId {
                    list: "network-interfaces",
                    id: iface.iface_id.clone(),
                });
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(entropy) = &self.entropy {
            entropy.validate()?;
        }
        if let Some(logger) = &self.logger {
            logger.validate()?;
        }
        if let Some(metrics) = &self.metrics {
            metrics.validate()?;
        }
        if let Some(serial) = &self.serial {
            serial.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate()?;
        }
        let mut tags = HashSet::new();
        for fs in &self.fs {
            fs.validate()?;
            if !tags.insert(fs.tag.as_str()) {
                return Err(ValidationError::DuplicateId {
                    list: "fs",
                    id: fs.tag.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRECRACKER_CONFIG_FILE: &str = r#"{
      "boot-source": {
        "kernel_image_path": "vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": null
      },
      "drives": [
        {
          "drive_id": "rootfs",
          "partuuid": null,
          "is_root_device": true,
          "cache_type": "Unsafe",
          "is_read_only": false,
          "path_on_host": "bionic.rootfs.ext4",
          "io_engine": "Sync",
          "rate_limiter": null,
          "socket": null
        }
      ],
      "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None"
      },
      "network-interfaces": [
        {"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
      ],
      "vsock": {"guest_cid": 3, "uds_path": "./v.sock"},
      "entropy": {},
      "logger": {"log_path": "log.fifo", "level": "Info"},
      "metrics": {"metrics_path": "metrics.fifo"},
      "serial": {"serial_out_path": "console.log"}
    }"#;

    #[test]
    fn firecracker_config_file_parses_and_round_trips() {
        let c: FullVmConfiguration = serde_json::from_str(FIRECRACKER_CONFIG_FILE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.drives.len(), 1);
        assert_eq!(c.network_interfaces.len(), 1);
        assert_eq!(c.machine_config.as_ref().map(|m| m.vcpu_count), Some(2));
        let back: FullVmConfiguration =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn empty_config_serializes_lists_only() {
        let c: FullVmConfiguration = serde_json::from_str("{}").unwrap();
        assert_eq!(c, FullVmConfiguration::default());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"drives":[],"network-interfaces":[]}"#
        );
    }

    #[test]
    fn balloon_section_as_firecracker_writes_it() {
        let c: FullVmConfiguration = serde_json::from_str(
            r#"{"balloon":{"amount_mib":32,"deflate_on_oom":true,"stats_polling_interval_s":1}}"#,
        )
        .unwrap();
        let balloon = c.balloon.unwrap();
        assert_eq!(
            (balloon.amount_mib, balloon.stats_polling_interval_s),
            (32, 1)
        );
        c.validate().unwrap();
    }

    #[test]
    fn unsupported_keys_and_list_rules() {
        for key in ["cpu-config", "pmem", "memory-hotplug", "boot_source"] {
            let err = serde_json::from_str::<FullVmConfiguration>(&format!(r#"{{"{key}":{{}}}}"#))
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!("unknown field `{key}`")),
                "{err}"
            );
        }
        let drive = |id: &str, root: bool| {
            serde_json::from_str::<Drive>(&format!(
                r#"{{"drive_id":"{id}","path_on_host":"/x","is_root_device":{root}}}"#
            ))
            .unwrap()
        };
        let c = FullVmConfiguration {
            drives: vec![drive("a", false), drive("a", false)],
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ValidationError::DuplicateId { list: "drives", .. })
        ));
        let c = FullVmConfiguration {
            drives: vec![drive("a", true), drive("b", true)],
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ValidationError::SecondRootDevice)
        ));
    }
}
