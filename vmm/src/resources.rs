//! What a microVM is made of before it starts, however it was described: built up by the API,
//! read from a config file, or given as `kiln run`'s flags.
//!
//! Firecracker's model: each pre-boot `PUT` sets or replaces one resource (a drive by its id, the
//! boot source, the machine config...), `GET /vm/config` reads them all back, and `InstanceStart`
//! turns them into a VM. Each device is held as the one config type it keeps from the edge to the
//! device ([`DriveConfig`], [`NetConfig`], ...): an API body is converted once, here, and
//! converted back only for `GET /vm/config`. Bodies reach this module already parsed and
//! validated by the `api` crate; the checks here are the ones that need the other resources (one
//! root drive, unique ids), and [`VmResources::vm_config`] checks the whole against the host.

use api::models::{
    Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, EntropyDevice, FsDevice,
    FullVmConfiguration, Logger, MacAddr, MachineConfiguration, MachineConfigurationPatch, Metrics,
    MmdsConfig, NetworkInterface, SerialDevice, Vsock,
};

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::BalloonConfig;
use devices::virtio::fs::FsConfig;

use crate::config::{
    check_balloon_size, ConfigError, ConsoleConfig, HostLimits, SerialConfig, VmConfig,
    DEFAULT_CMDLINE,
};
use crate::device_config::{DriveConfig, NetConfig, RngConfig, VsockConfig};

/// A resource change that does not fit with the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// A second root drive (Firecracker's text).
    #[error("A root block device already exists!")]
    RootExists,
    /// A network interface's TAP is already used by another interface.
    #[error("The host device name {0} is already in use.")]
    TapInUse(String),
    /// A guest MAC already used by another interface.
    #[error("The guest MAC address {0} is already in use.")]
    MacInUse(String),
    /// A `PATCH /machine-config` that leaves an invalid configuration.
    #[error("{0}")]
    InvalidMachineConfig(String),
    /// A balloon request without a balloon (Firecracker's text).
    #[error("No balloon device found.")]
    NoBalloon,
    /// A balloon bigger than the guest's memory.
    #[error("{0}")]
    BalloonTooLarge(String),
    /// `PUT /mmds/config` naming an interface that is not configured (Firecracker's text).
    #[error(
        "The list of network interface IDs provided contains at least one ID that does not \
         correspond to any existing network interface: {0}."
    )]
    MmdsUnknownInterface(String),
}

/// The pre-boot resources of one microVM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmResources {
    /// Kernel, initrd and command line.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    pub machine_config: MachineConfiguration,
    /// Block devices in the order they were first put (a re-`PUT` keeps the place).
    pub drives: Vec<DriveConfig>,
    /// Network interfaces in the order they were first put.
    pub nets: Vec<NetConfig>,
    /// The vsock device.
    pub vsock: Option<VsockConfig>,
    /// The entropy device.
    pub rng: Option<RngConfig>,
    /// The balloon device.
    pub balloon: Option<BalloonConfig>,
    /// virtio-fs devices (vhost-user), in attach order; set by a config file or `kiln run`.
    pub fs: Vec<FsConfig>,
    /// MMDS's interfaces, address and version (the document itself is not a resource: it
    /// lives on, and changes, after the start).
    pub mmds_config: Option<MmdsConfig>,
    /// Where the serial console goes, and how fast it may write.
    pub serial: SerialConfig,
    /// Logger settings.
    pub logger: Option<Logger>,
    /// Metrics settings.
    pub metrics: Option<Metrics>,
    /// Firecracker's boot-timer device (`--boot-timer`, a process flag: not in the API).
    pub boot_timer: bool,
}

/// Replaces the element `same` picks, or appends `item`.
fn put<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|existing| same(existing)) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
}

impl VmResources {
    /// Builds the resources a config file (or `GET /vm/config`) describes, applying each part as
    /// its `PUT` would.
    pub fn from_full_config(config: FullVmConfiguration) -> Result<Self, ResourceError> {
        let mut resources = Self {
            boot_source: config.boot_source,
            machine_config: config.machine_config.unwrap_or_default(),
            vsock: config.vsock.map(vsock_config),
            rng: config.entropy.map(rng_config),
            logger: config.logger,
            metrics: config.metrics,
            fs: config.fs.iter().map(FsDevice::to_config).collect(),
            ..Self::default()
        };
        if let Some(serial) = config.serial {
            resources.put_serial(serial)?;
        }
        if let Some(balloon) = config.balloon {
            resources.put_balloon(&balloon)?;
        }
        for drive in config.drives {
            resources.put_drive(drive)?;
        }
        for net in config.network_interfaces {
            resources.put_net(net)?;
        }
        if let Some(mmds) = config.mmds_config {
            resources.put_mmds_config(mmds)?;
        }
        Ok(resources)
    }

    /// Reads the text of a `--config-file` (the shape of `GET /vm/config`): JSON into
    /// [`FullVmConfiguration`], its validation, then [`Self::from_full_config`]. The error is one
    /// line without the file's name. The `config_file` fuzz target (fuzz/) calls this directly.
    pub fn from_config_json(text: &str) -> Result<Self, String> {
        let config: FullVmConfiguration = serde_json::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Self::from_full_config(config).map_err(|e| e.to_string())
    }

    /// The resources in `GET /vm/config`'s shape.
    pub fn full_config(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            drives: self.drives.iter().map(drive_model).collect(),
            boot_source: self.boot_source.clone(),
            logger: self.logger.clone(),
            machine_config: Some(self.machine_config.clone()),
            metrics: self.metrics.clone(),
            network_interfaces: self.nets.iter().map(net_model).collect(),
            vsock: self.vsock.as_ref().map(vsock_model),
            entropy: self.rng.as_ref().map(rng_model),
            serial: serial_model(&self.serial),
            balloon: self.balloon.as_ref().map(balloon_model),
            mmds_config: self.mmds_config.clone(),
            fs: self.fs.iter().map(FsDevice::from_config).collect(),
        }
    }

    /// True once anything that only a boot uses has been configured: a snapshot load is then
    /// refused (Firecracker's rule; the logger, metrics and console may be set first).
    pub fn configured_for_boot(&self) -> bool {
        self.boot_source.is_some()
            || self.machine_config != MachineConfiguration::default()
            || !self.drives.is_empty()
            || !self.nets.is_empty()
            || self.vsock.is_some()
            || self.rng.is_some()
            || self.balloon.is_some()
            || !self.fs.is_empty()
            || self.mmds_config.is_some()
    }

    /// `PUT /mmds/config`: every interface it names must be configured already.
    pub fn put_mmds_config(&mut self, config: MmdsConfig) -> Result<(), ResourceError> {
        if let Some(unknown) = config.network_interfaces.iter().find(|id| {
            !self
                .nets
                .iter()
                .any(|n| n.id.as_deref() == Some(id.as_str()))
        }) {
            return Err(ResourceError::MmdsUnknownInterface(unknown.clone()));
        }
        self.mmds_config = Some(config);
        Ok(())
    }

    /// `PUT /balloon`: adds the balloon or replaces its settings.
    pub fn put_balloon(&mut self, balloon: &Balloon) -> Result<(), ResourceError> {
        self.check_balloon_size(balloon.amount_mib)?;
        self.balloon = Some(balloon_config(balloon));
        Ok(())
    }

    /// `PATCH /balloon` before boot: a new size.
    pub fn patch_balloon(&mut self, update: &BalloonUpdate) -> Result<(), ResourceError> {
        self.check_balloon_size(update.amount_mib)?;
        self.balloon_mut()?.amount_mib = update.amount_mib;
        Ok(())
    }

    /// `PATCH /balloon/statistics` before boot: a new interval (0 turns statistics off).
    pub fn patch_balloon_stats(
        &mut self,
        update: &BalloonStatsUpdate,
    ) -> Result<(), ResourceError> {
        self.balloon_mut()?.stats_polling_interval_s = update.stats_polling_interval_s;
        Ok(())
    }

    /// The balloon's settings, for `GET /balloon`.
    pub fn balloon(&self) -> Result<Balloon, ResourceError> {
        self.balloon
            .as_ref()
            .map(balloon_model)
            .ok_or(ResourceError::NoBalloon)
    }

    fn balloon_mut(&mut self) -> Result<&mut BalloonConfig, ResourceError> {
        self.balloon.as_mut().ok_or(ResourceError::NoBalloon)
    }

    /// Refuses a balloon bigger than the configured memory (InstanceStart checks again, in case
    /// the memory shrinks afterwards).
    pub fn check_balloon_size(&self, amount_mib: u32) -> Result<(), ResourceError> {
        check_balloon_size(amount_mib, self.machine_config.mem_size_mib)
            .map_err(|e| ResourceError::BalloonTooLarge(e.to_string()))
    }

    /// `PUT /drives/{id}`: adds the drive or replaces the one with its id.
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ResourceError> {
        let drive = drive_config(drive);
        let other_root = self.drives.iter().any(|d| d.root && d.id != drive.id);
        if drive.root && other_root {
            return Err(ResourceError::RootExists);
        }
        let id = drive.id.clone();
        put(&mut self.drives, drive, |d| d.id == id);
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds the interface or replaces the one with its id.
    pub fn put_net(&mut self, net: NetworkInterface) -> Result<(), ResourceError> {
        let net = net_config(net);
        let others = || self.nets.iter().filter(|n| n.id != net.id);
        if others().any(|n| n.tap == net.tap) {
            return Err(ResourceError::TapInUse(net.tap));
        }
        if let Some(mac) = net.mac {
            if others().any(|n| n.mac == Some(mac)) {
                return Err(ResourceError::MacInUse(MacAddr(mac).to_string()));
            }
        }
        let id = net.id.clone();
        put(&mut self.nets, net, |n| n.id == id);
        Ok(())
    }

    /// `PUT /vsock`: replaces any earlier one (its socket is bound at `InstanceStart`).
    pub fn put_vsock(&mut self, vsock: Vsock) {
        self.vsock = Some(vsock_config(vsock));
    }

    /// `PUT /entropy`: the entropy device.
    pub fn put_entropy(&mut self, entropy: EntropyDevice) {
        self.rng = Some(rng_config(entropy));
    }

    /// `PUT /serial`: where the guest's console goes, and how fast it may write.
    pub fn put_serial(&mut self, serial: SerialDevice) -> Result<(), ResourceError> {
        self.serial = SerialConfig {
            console: match serial.serial_out_path {
                Some(path) => ConsoleConfig::File(path),
                None => ConsoleConfig::Stdout,
            },
            rate_limit: serial.rate_limiter,
        };
        Ok(())
    }

    /// `PATCH /machine-config`: changes only the given fields.
    pub fn patch_machine_config(
        &mut self,
        patch: &MachineConfigurationPatch,
    ) -> Result<(), ResourceError> {
        let patched = patch
            .apply_to(&self.machine_config)
            .and_then(|patched| patched.validate().map(|()| patched))
            .map_err(|e| ResourceError::InvalidMachineConfig(e.to_string()))?;
        self.machine_config = patched;
        Ok(())
    }

    /// The VM these resources describe, checked against the host: what the builder builds.
    pub fn vm_config(&self, limits: HostLimits) -> Result<VmConfig, ConfigError> {
        let boot = self.boot_source.as_ref().ok_or(ConfigError::NoBootSource)?;
        VmConfig {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            cmdline: boot
                .boot_args
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus: self.machine_config.vcpu_count,
            mem_mib: self.machine_config.mem_size_mib,
            console: self.serial.console.clone(),
            console_rate_limit: self.serial.rate_limit,
            drives: self.drives.clone(),
            nets: self.nets.clone(),
            rng: self.rng.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon,
            fs: self.fs.clone(),
            mmds: self.mmds_config.clone(),
            boot_timer: self.boot_timer,
            track_dirty_pages: self.machine_config.track_dirty_pages,
        }
        .validate(limits)
    }
}

// The conversions between the API's wire types and the devices' config types: the only place
// either is turned into the other.

fn drive_config(drive: Drive) -> DriveConfig {
    DriveConfig {
        read_only: drive.read_only(),
        id: Some(drive.drive_id),
        // Validation in the api crate refuses a drive without one.
        path: drive.path_on_host.unwrap_or_default(),
        root: drive.is_root_device,
        partuuid: drive.partuuid,
        cache_type: drive.cache_type,
        io_engine: drive.io_engine,
        rate_limiter: drive.rate_limiter.unwrap_or_default(),
    }
}

/// A drive as `GET /vm/config` shows it.
pub fn drive_model(drive: &DriveConfig) -> Drive {
    Drive {
        drive_id: drive.id.clone().unwrap_or_default(),
        partuuid: drive.partuuid.clone(),
        is_root_device: drive.root,
        cache_type: drive.cache_type,
        is_read_only: Some(drive.read_only),
        path_on_host: Some(drive.path.clone()),
        rate_limiter: limiter_model(drive.rate_limiter),
        io_engine: drive.io_engine,
        socket: None,
    }
}

fn net_config(net: NetworkInterface) -> NetConfig {
    NetConfig {
        id: Some(net.iface_id),
        tap: net.host_dev_name,
        mac: net.guest_mac.map(|mac| mac.bytes()),
        mtu: net.mtu,
        rx_rate_limiter: net.rx_rate_limiter.unwrap_or_default(),
        tx_rate_limiter: net.tx_rate_limiter.unwrap_or_default(),
    }
}

/// An interface as `GET /vm/config` shows it.
pub fn net_model(net: &NetConfig) -> NetworkInterface {
    NetworkInterface {
        iface_id: net.id.clone().unwrap_or_default(),
        host_dev_name: net.tap.clone(),
        guest_mac: net.mac.map(MacAddr),
        mtu: net.mtu,
        rx_rate_limiter: limiter_model(net.rx_rate_limiter),
        tx_rate_limiter: limiter_model(net.tx_rate_limiter),
    }
}

/// No limit is shown as no `rate_limiter` at all.
fn limiter_model(limiter: RateLimiterConfig) -> Option<RateLimiterConfig> {
    (limiter != RateLimiterConfig::default()).then_some(limiter)
}

fn vsock_config(vsock: Vsock) -> VsockConfig {
    VsockConfig {
        vsock_id: vsock.vsock_id,
        guest_cid: u64::from(vsock.guest_cid),
        uds_path: vsock.uds_path,
    }
}

fn vsock_model(vsock: &VsockConfig) -> Vsock {
    Vsock {
        vsock_id: vsock.vsock_id.clone(),
        // The API and `--vsock` both keep it to 3 ..= 2^32 - 2.
        guest_cid: u32::try_from(vsock.guest_cid).unwrap_or(u32::MAX),
        uds_path: vsock.uds_path.clone(),
    }
}

fn rng_config(entropy: EntropyDevice) -> RngConfig {
    RngConfig {
        rate_limiter: entropy.rate_limiter.unwrap_or_default(),
    }
}

fn rng_model(rng: &RngConfig) -> EntropyDevice {
    EntropyDevice {
        rate_limiter: limiter_model(rng.rate_limiter),
    }
}

/// The console as `GET /vm/config` shows it: nothing for the default (stdout, no limit).
fn serial_model(serial: &SerialConfig) -> Option<SerialDevice> {
    if *serial == SerialConfig::default() {
        return None;
    }
    Some(SerialDevice {
        serial_out_path: match &serial.console {
            ConsoleConfig::File(path) => Some(path.clone()),
            ConsoleConfig::Stdout | ConsoleConfig::None => None,
        },
        rate_limiter: serial.rate_limit,
    })
}

/// The API's balloon as the device takes it.
fn balloon_config(balloon: &Balloon) -> BalloonConfig {
    BalloonConfig {
        amount_mib: balloon.amount_mib,
        deflate_on_oom: balloon.deflate_on_oom,
        stats_polling_interval_s: balloon.stats_polling_interval_s,
        free_page_hinting: balloon.free_page_hinting,
        free_page_reporting: balloon.free_page_reporting,
    }
}

/// The device's settings as the API shows them.
pub fn balloon_model(config: &BalloonConfig) -> Balloon {
    Balloon {
        amount_mib: config.amount_mib,
        deflate_on_oom: config.deflate_on_oom,
        stats_polling_interval_s: config.stats_polling_interval_s,
        free_page_hinting: config.free_page_hinting,
        free_page_reporting: config.free_page_reporting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 64,
        mem_mib: 1 << 20,
    };

    fn drive(id: &str, root: bool) -> Drive {
        serde_json::from_value(serde_json::json!({
            "drive_id": id,
            "path_on_host": format!("/images/{id}.img"),
            "is_root_device": root,
            "is_read_only": !root,
        }))
        .unwrap()
    }

    fn net(id: &str, tap: &str, mac: &str) -> NetworkInterface {
        serde_json::from_value(serde_json::json!({
            "iface_id": id, "host_dev_name": tap, "guest_mac": mac,
        }))
        .unwrap()
    }

    #[test]
    fn balloon_put_patch_and_size_rule() {
        let mut r = VmResources::default();
        let update = BalloonUpdate { amount_mib: 8 };
        assert_eq!(r.patch_balloon(&update), Err(ResourceError::NoBalloon));
        assert_eq!(r.balloon(), Err(ResourceError::NoBalloon));
        let balloon = Balloon {
            amount_mib: 16,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            ..Default::default()
        };
        r.put_balloon(&balloon).unwrap();
        r.patch_balloon(&update).unwrap();
        r.patch_balloon_stats(&BalloonStatsUpdate {
            stats_polling_interval_s: 0,
        })
        .unwrap();
        let now = r.balloon().unwrap();
        assert_eq!((now.amount_mib, now.stats_polling_interval_s), (8, 0));
        assert!(now.deflate_on_oom);
        let too_big = BalloonUpdate {
            amount_mib: r.machine_config.mem_size_mib as u32 + 1,
        };
        assert!(matches!(
            r.patch_balloon(&too_big),
            Err(ResourceError::BalloonTooLarge(_))
        ));
        assert_eq!(r.full_config().balloon, Some(now));
        let back = VmResources::from_full_config(r.full_config()).unwrap();
        assert_eq!(back.balloon, r.balloon);
        assert_eq!(r.vm_config(LIMITS).err(), Some(ConfigError::NoBootSource));
    }

    #[test]
    fn drives_keep_their_place_and_one_root() {
        let mut r = VmResources::default();
        r.put_drive(drive("rootfs", true)).unwrap();
        r.put_drive(drive("drive1", false)).unwrap();
        assert_eq!(
            r.put_drive(drive("drive2", true)),
            Err(ResourceError::RootExists)
        );
        // Re-putting the root drive itself is fine and keeps its place.
        let mut rw_root = drive("rootfs", true);
        rw_root.is_read_only = Some(true);
        r.put_drive(rw_root).unwrap();
        let ids: Vec<&str> = r.drives.iter().filter_map(|d| d.id.as_deref()).collect();
        assert_eq!(ids, ["rootfs", "drive1"]);
        assert!(r.drives[0].read_only);
    }

    #[test]
    fn nets_cannot_share_a_tap_or_mac() {
        let mut r = VmResources::default();
        r.put_net(net("eth0", "tap0", "02:00:00:00:00:01")).unwrap();
        assert_eq!(
            r.put_net(net("eth1", "tap0", "02:00:00:00:00:02")),
            Err(ResourceError::TapInUse("tap0".into()))
        );
        assert!(matches!(
            r.put_net(net("eth1", "tap1", "02:00:00:00:00:01")),
            Err(ResourceError::MacInUse(_))
        ));
        r.put_net(net("eth0", "tap0", "02:00:00:00:00:03")).unwrap();
        assert_eq!(r.nets.len(), 1);
    }

    #[test]
    fn start_needs_a_boot_source_and_maps_everything() {
        let mut r = VmResources::default();
        assert_eq!(r.vm_config(LIMITS), Err(ConfigError::NoBootSource));
        r.boot_source = Some(
            serde_json::from_value(serde_json::json!({
                "kernel_image_path": "/k", "boot_args": "console=ttyS0"
            }))
            .unwrap(),
        );
        r.put_drive(drive("rootfs", true)).unwrap();
        r.put_net(net("eth0", "tap0", "02:00:00:00:00:01")).unwrap();
        r.put_entropy(EntropyDevice { rate_limiter: None });
        let req = r.vm_config(LIMITS).unwrap();
        assert_eq!(req.kernel, std::path::PathBuf::from("/k"));
        assert_eq!(req.cmdline, "console=ttyS0");
        assert_eq!((req.vcpus, req.mem_mib), (1, 128));
        assert_eq!(req.drives[0].id.as_deref(), Some("rootfs"));
        assert!(req.drives[0].root && !req.drives[0].read_only);
        assert_eq!(req.nets[0].mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(req.rng.is_some());
        assert_eq!(req.console, ConsoleConfig::Stdout);
    }

    #[test]
    fn config_file_round_trips_through_get_vm_config() {
        let mut r = VmResources::default();
        r.put_drive(drive("rootfs", true)).unwrap();
        r.put_net(net("eth0", "tap0", "02:00:00:00:00:01")).unwrap();
        let again = VmResources::from_full_config(r.full_config()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn every_api_field_comes_back_in_get_vm_config() {
        let full: FullVmConfiguration = serde_json::from_value(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "drives": [{
                "drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                "is_read_only": true, "partuuid": "0eaa91a0-01", "cache_type": "Writeback",
                "io_engine": "Async",
                "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}
            }],
            "network-interfaces": [{
                "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01",
                "mtu": 1400, "tx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}
            }],
            "vsock": {"vsock_id": "v", "guest_cid": 3, "uds_path": "/v.sock"},
            "entropy": {"rate_limiter": {"bandwidth": {"size": 64, "refill_time": 100}}},
            "serial": {"serial_out_path": "/console.log"},
            "balloon": {"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1}
        }))
        .unwrap();
        let r = VmResources::from_full_config(full.clone()).unwrap();
        let back = serde_json::to_value(r.full_config()).unwrap();
        let sent = serde_json::to_value(&full).unwrap();
        for part in [
            "boot-source",
            "drives",
            "network-interfaces",
            "vsock",
            "entropy",
            "serial",
        ] {
            assert_eq!(back[part], sent[part], "{part}");
        }
        assert_eq!(r.drives[0].partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(r.serial.console, ConsoleConfig::File("/console.log".into()));
        let config = r.vm_config(LIMITS).unwrap();
        assert_eq!(config.console, ConsoleConfig::File("/console.log".into()));
        assert_eq!(config.balloon.map(|b| b.amount_mib), Some(8));
    }

    #[test]
    fn machine_config_patch_is_checked() {
        let mut r = VmResources::default();
        let patch: MachineConfigurationPatch =
            serde_json::from_value(serde_json::json!({"vcpu_count": 2})).unwrap();
        r.patch_machine_config(&patch).unwrap();
        assert_eq!(r.machine_config.vcpu_count, 2);
        let bad: MachineConfigurationPatch =
            serde_json::from_value(serde_json::json!({"smt": true})).unwrap();
        assert!(r.patch_machine_config(&bad).is_err());
        assert_eq!(r.machine_config.vcpu_count, 2);
    }
}
