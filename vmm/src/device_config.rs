//! Virtio device settings as the user gives them on the command line (`key=value,flag,...`),
//! parsed into typed configs.
//!
//! Formats:
//! - `--drive path=FILE[,id=ID][,ro][,root][,partuuid=UUID][,RATE...]`
//! - `--net tap=NAME[,id=ID][,mac=MAC][,mtu=N][,rx_RATE...][,tx_RATE...]`
//! - `--rng [RATE...]`
//! - `--vsock cid=N,uds=PATH`
//! - `--balloon amount_mib=N[,deflate_on_oom][,stats_polling_interval_s=S][,free_page_hinting]`
//!   `[,free_page_reporting]` (Firecracker's field names; flags take `=on|off`)
//!
//! where RATE is a rate limiter key (Cloud Hypervisor's names): `bw_size`, `bw_one_time_burst`,
//! `bw_refill_time`, `ops_size`, `ops_one_time_burst`, `ops_refill_time` (sizes in bytes or
//! operations, times in milliseconds).

use std::path::PathBuf;
use std::str::FromStr;

use api::models::{CacheType, IoEngine};
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::BalloonConfig;

/// Errors in a device option string.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeviceOptionError {
    /// A key the device does not know.
    #[error("unknown option '{0}'")]
    UnknownKey(String),
    /// A required key is missing.
    #[error("'{0}=' is required")]
    Missing(&'static str),
    /// A key was given twice.
    #[error("'{0}' given twice")]
    Repeated(String),
    /// A value that does not parse.
    #[error("bad value for '{key}': '{value}' ({reason})")]
    BadValue {
        /// The option's key.
        key: String,
        /// The value given for it.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// Rate limiter settings that do not fit together.
    #[error("rate limiter: {0}")]
    RateLimiter(String),
    /// Settings that parse but are out of range.
    #[error("{0}")]
    Invalid(String),
}

/// A block device: what `PUT /drives/{id}`, a config file's `drives` and `--drive` all become,
/// from the edge to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// The drive's id (also its GET_ID serial). Always set for a drive from the API or a config
    /// file; `None` for a `--drive` without `id=`, until the VM config names it `drive<N>`.
    pub id: Option<String>,
    /// The image file.
    pub path: PathBuf,
    /// Refuse every write.
    pub read_only: bool,
    /// Boot from this drive: the command line gets `root=/dev/vda ro|rw` (or
    /// `root=PARTUUID=<partuuid>` when the partition is named).
    pub root: bool,
    /// The root partition's unique id (Firecracker's `partuuid`), for a partitioned root drive.
    pub partuuid: Option<String>,
    /// Firecracker's flush setting, kept to be reported back. Kiln offers `VIRTIO_BLK_F_FLUSH`
    /// and syncs the image on every flush either way: a flush the guest was answered is on disk.
    pub cache_type: CacheType,
    /// Firecracker's I/O engine, kept to be reported back; Kiln serves both synchronously.
    pub io_engine: IoEngine,
    /// Bandwidth and IOPS limits.
    pub rate_limiter: RateLimiterConfig,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's id; `None` until the VM config names it.
    pub id: Option<String>,
    /// The host TAP device's name.
    pub tap: String,
    /// The guest's MAC address (the guest picks a random one without it).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered to the guest.
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on what the guest sends.
    pub tx_rate_limiter: RateLimiterConfig,
}

/// The entropy device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// Bandwidth limit on the entropy the guest can draw.
    pub rate_limiter: RateLimiterConfig,
}

/// The vsock device: the guest's CID and the host Unix socket (Firecracker's hybrid vsock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Firecracker's deprecated `vsock_id`, kept to be reported back.
    pub vsock_id: Option<String>,
    /// The guest's context id, 3 ..= 2^32 - 2.
    pub guest_cid: u64,
    /// Where host clients connect; guest connections to port P reach `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Splits `a=b,c,d=e` into (key, optional value) pairs, refusing repeated keys.
fn options(s: &str) -> Result<Vec<(&str, Option<&str>)>, DeviceOptionError> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for item in s.split(',').filter(|item| !item.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if seen.contains(&key) {
            return Err(DeviceOptionError::Repeated(key.to_string()));
        }
        seen.push(key);
        out.push((key, value));
    }
    Ok(out)
}

fn bad_value(key: &str, value: &str, reason: impl Into<String>) -> DeviceOptionError {
    DeviceOptionError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn required<'a>(key: &str, value: Option<&'a str>) -> Result<&'a str, DeviceOptionError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(bad_value(key, value.unwrap_or(""), "a value is needed")),
    }
}

fn flag(key: &str, value: Option<&str>) -> Result<bool, DeviceOptionError> {
    match value {
        None | Some("on") | Some("true") => Ok(true),
        Some("off") | Some("false") => Ok(false),
        Some(v) => Err(bad_value(key, v, "use on or off")),
    }
}

/// Feeds a rate limiter key to `config`; `Ok(false)` when it is not a rate limiter key.
fn rate_key(
    config: &mut RateLimiterConfig,
    key: &str,
    value: Option<&str>,
) -> Result<bool, DeviceOptionError> {
    config
        .parse_cli_key(key, value.unwrap_or(""))
        .map_err(|e| bad_value(key, value.unwrap_or(""), e.to_string()))
}

fn check_rate(config: &RateLimiterConfig) -> Result<(), DeviceOptionError> {
    config
        .validate()
        .map_err(|e| DeviceOptionError::RateLimiter(e.to_string()))
}

/// Checks a device id: 1..=64 characters from `[A-Za-z0-9_-]` (Firecracker's rule).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("id '{id}' must be 1 to 64 characters long"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "id '{id}' may only contain letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

fn parse_id(value: Option<&str>) -> Result<String, DeviceOptionError> {
    let id = required("id", value)?;
    check_id(id).map_err(|reason| bad_value("id", id, reason))?;
    Ok(id.to_string())
}

impl FromStr for DriveConfig {
    type Err = DeviceOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut config = DriveConfig {
            id: None,
            path: PathBuf::new(),
            read_only: false,
            root: false,
            partuuid: None,
            cache_type: CacheType::default(),
            io_engine: IoEngine::default(),
            rate_limiter: RateLimiterConfig::default(),
        };
        for (key, value) in options(s)? {
            match key {
                "path" => path = Some(PathBuf::from(required(key, value)?)),
                "id" => config.id = Some(parse_id(value)?),
                "ro" | "readonly" => config.read_only = flag(key, value)?,
                "root" => config.root = flag(key, value)?,
                "partuuid" => {
                    let v = required(key, value)?;
                    config.partuuid = Some(parse_partuuid(v)?);
                }
                _ => {
                    if !rate_key(&mut config.rate_limiter, key, value)? {
                        return Err(DeviceOptionError::UnknownKey(key.to_string()));
                    }
                }
            }
        }
        config.path = path.ok_or(DeviceOptionError::Missing("path"))?;
        check_rate(&config.rate_limiter)?;
        Ok(config)
    }
}

/// A partition UUID as the kernel's `root=PARTUUID=` takes it: hex digits and dashes (a GPT
/// UUID, or an MBR disk signature with a partition number), nothing that could end the
/// command-line parameter.
pub fn parse_partuuid(v: &str) -> Result<String, DeviceOptionError> {
    if !api::models::is_partuuid(v) {
        return Err(bad_value(
            "partuuid",
            v,
            "hex digits and dashes, such as 0eaa91a0-01",
        ));
    }
    Ok(v.to_string())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or("a MAC has six parts")?;
        if part.len() != 2 {
            return Err("each MAC part is two hex digits".into());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| "not hex".to_string())?;
    }
    if parts.next().is_some() {
        return Err("a MAC has six parts".into());
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast MAC cannot be an interface's address".into());
    }
    Ok(mac)
}

impl FromStr for NetConfig {
    type Err = DeviceOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut config = NetConfig {
            id: None,
            tap: String::new(),
            mac: None,
            mtu: None,
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: RateLimiterConfig::default(),
        };
        for (key, value) in options(s)? {
            match key {
                "tap" => tap = Some(required(key, value)?.to_string()),
                "id" => config.id = Some(parse_id(value)?),
                "mac" => {
                    let v = required(key, value)?;
                    config.mac = Some(parse_mac(v).map_err(|r| bad_value(key, v, r))?);
                }
                "mtu" => {
                    let v = required(key, value)?;
                    let mtu: u16 = v
                        .parse()
                        .map_err(|_| bad_value(key, v, "a number up to 65535"))?;
                    if mtu < 68 {
                        return Err(bad_value(key, v, "the smallest IPv4 MTU is 68"));
                    }
                    config.mtu = Some(mtu);
                }
                _ => {
                    let handled = if let Some(rate) = key.strip_prefix("rx_") {
                        rate_key(&mut config.rx_rate_limiter, rate, value)?
                    } else if let Some(rate) = key.strip_prefix("tx_") {
                        rate_key(&mut config.tx_rate_limiter, rate, value)?
                    } else {
                        false
                    };
                    if !handled {
                        return Err(DeviceOptionError::UnknownKey(key.to_string()));
                    }
                }
            }
        }
        config.tap = tap.ok_or(DeviceOptionError::Missing("tap"))?;
        check_rate(&config.rx_rate_limiter)?;
        check_rate(&config.tx_rate_limiter)?;
        Ok(config)
    }
}

impl FromStr for RngConfig {
    type Err = DeviceOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut config = RngConfig::default();
        for (key, value) in options(s)? {
            if !rate_key(&mut config.rate_limiter, key, value)? {
                return Err(DeviceOptionError::UnknownKey(key.to_string()));
            }
        }
        check_rate(&config.rate_limiter)?;
        Ok(config)
    }
}

impl FromStr for VsockConfig {
    type Err = DeviceOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut uds = None;
        for (key, value) in options(s)? {
            match key {
                "cid" => {
                    let v = required(key, value)?;
                    let range = devices::virtio::vsock::MIN_GUEST_CID
                        ..=devices::virtio::vsock::MAX_GUEST_CID;
                    let n = v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| range.contains(n))
                        .ok_or_else(|| {
                            bad_value(
                                key,
                                v,
                                format!("a number in {}..={}", range.start(), range.end()),
                            )
                        })?;
                    cid = Some(n);
                }
                "uds" => uds = Some(PathBuf::from(required(key, value)?)),
                _ => return Err(DeviceOptionError::UnknownKey(key.to_string())),
            }
        }
        Ok(VsockConfig {
            vsock_id: None,
            guest_cid: cid.ok_or(DeviceOptionError::Missing("cid"))?,
            uds_path: uds.ok_or(DeviceOptionError::Missing("uds"))?,
        })
    }
}

/// `kiln run --restore`: `snapshot=PATH,mem=PATH` (or `uffd=SOCKET` for a page-fault handler
/// instead of the memory file) `[,net.IFACE=TAP]...[,vsock=PATH][,drive.ID=PATH]...
/// [,track_dirty_pages]`, as the API's load with `resume_vm` would take them.
pub fn parse_restore(s: &str) -> Result<api::models::SnapshotLoadParams, DeviceOptionError> {
    use api::models::{
        DriveOverride, MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotLoadParams,
        VsockOverride,
    };
    let mut snapshot = None;
    let mut backend = None;
    let mut params = SnapshotLoadParams {
        snapshot_path: PathBuf::new(),
        mem_file_path: None,
        mem_backend: None,
        enable_diff_snapshots: false,
        track_dirty_pages: false,
        resume_vm: true,
        network_overrides: Vec::new(),
        vsock_override: None,
        clock_realtime: false,
        huge_pages: Default::default(),
        drive_overrides: Vec::new(),
    };
    for (key, value) in options(s)? {
        match key {
            "snapshot" => snapshot = Some(PathBuf::from(required(key, value)?)),
            "mem" | "uffd" => {
                if backend.is_some() {
                    return Err(bad_value(
                        key,
                        value.unwrap_or(""),
                        "give mem= or uffd=, once",
                    ));
                }
                backend = Some(MemoryBackend {
                    backend_type: if key == "mem" {
                        MemoryBackendType::File
                    } else {
                        MemoryBackendType::Uffd
                    },
                    backend_path: PathBuf::from(required(key, value)?),
                });
            }
            "vsock" => {
                params.vsock_override = Some(VsockOverride {
                    uds_path: PathBuf::from(required(key, value)?),
                })
            }
            "track_dirty_pages" => params.track_dirty_pages = flag(key, value)?,
            _ => match key.split_once('.') {
                Some(("net", iface)) => params.network_overrides.push(NetworkOverride {
                    iface_id: iface.to_string(),
                    host_dev_name: required(key, value)?.to_string(),
                }),
                Some(("drive", id)) => params.drive_overrides.push(DriveOverride {
                    drive_id: id.to_string(),
                    path_on_host: PathBuf::from(required(key, value)?),
                }),
                _ => return Err(DeviceOptionError::UnknownKey(key.to_string())),
            },
        }
    }
    params.snapshot_path = snapshot.ok_or(DeviceOptionError::Missing("snapshot"))?;
    params.mem_backend = Some(backend.ok_or(DeviceOptionError::Missing("mem"))?);
    params
        .validate()
        .map_err(|e| bad_value("restore", s, e.to_string()))?;
    Ok(params)
}

/// `kiln run --fs`: `tag=TAG,socket=PATH[,num_queues=N][,queue_size=N]` (Cloud Hypervisor's
/// spelling), checked as a config file's `fs` entry is.
pub fn parse_fs(s: &str) -> Result<devices::virtio::fs::FsConfig, DeviceOptionError> {
    let mut model = api::models::FsDevice {
        tag: String::new(),
        socket: PathBuf::new(),
        num_queues: 1,
        queue_size: devices::virtio::fs::QUEUE_SIZE,
    };
    let (mut tag, mut socket) = (false, false);
    for (key, value) in options(s)? {
        let number = |v: &str| {
            v.parse::<u16>()
                .map_err(|e| bad_value(key, v, e.to_string()))
        };
        match key {
            "tag" => {
                model.tag = required(key, value)?.to_string();
                tag = true;
            }
            "socket" => {
                model.socket = PathBuf::from(required(key, value)?);
                socket = true;
            }
            "num_queues" => model.num_queues = number(required(key, value)?)?,
            "queue_size" => model.queue_size = number(required(key, value)?)?,
            _ => return Err(DeviceOptionError::UnknownKey(key.to_string())),
        }
    }
    if !tag {
        return Err(DeviceOptionError::Missing("tag"));
    }
    if !socket {
        return Err(DeviceOptionError::Missing("socket"));
    }
    model
        .validate()
        .map_err(|e| DeviceOptionError::Invalid(e.to_string()))?;
    Ok(model.to_config())
}

/// Parses `--balloon`'s options (a function, not `FromStr`: the config is the device's own type).
pub fn parse_balloon(s: &str) -> Result<BalloonConfig, DeviceOptionError> {
    let mut config = BalloonConfig::default();
    let mut amount = None;
    for (key, value) in options(s)? {
        match key {
            "amount_mib" => {
                let v = required(key, value)?;
                amount = Some(
                    v.parse::<u32>()
                        .map_err(|e| bad_value(key, v, e.to_string()))?,
                );
            }
            "deflate_on_oom" => config.deflate_on_oom = flag(key, value)?,
            "stats_polling_interval_s" => {
                let v = required(key, value)?;
                config.stats_polling_interval_s = v
                    .parse::<u16>()
                    .map_err(|e| bad_value(key, v, e.to_string()))?;
            }
            "free_page_hinting" => config.free_page_hinting = flag(key, value)?,
            "free_page_reporting" => config.free_page_reporting = flag(key, value)?,
            _ => return Err(DeviceOptionError::UnknownKey(key.to_string())),
        }
    }
    config.amount_mib = amount.ok_or(DeviceOptionError::Missing("amount_mib"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::rate_limiter::TokenBucketConfig;

    #[test]
    fn fs_options() {
        let fs = parse_fs("tag=share,socket=/run/fs.sock").unwrap();
        assert_eq!((fs.tag.as_str(), fs.num_request_queues), ("share", 1));
        assert_eq!(fs.queue_size, devices::virtio::fs::QUEUE_SIZE);
        let fs = parse_fs("socket=/s,tag=t,num_queues=2,queue_size=256").unwrap();
        assert_eq!((fs.num_request_queues, fs.queue_size), (2, 256));
        for bad in [
            "tag=t",
            "socket=/s",
            "tag=,socket=/s",
            "tag=t,socket=/s,queue_size=100",
            "tag=t,socket=/s,num_queues=0",
            "tag=t,socket=/s,dax",
            "tag=0123456789012345678901234567890123456,socket=/s",
        ] {
            assert!(parse_fs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn balloon_options() {
        let b = parse_balloon("amount_mib=64,deflate_on_oom,stats_polling_interval_s=2").unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 2,
                free_page_hinting: false,
                free_page_reporting: false,
            }
        );
        let b = parse_balloon("free_page_reporting=on,amount_mib=0,free_page_hinting").unwrap();
        assert!(b.free_page_reporting && b.free_page_hinting && !b.deflate_on_oom);
        assert_eq!(
            parse_balloon("deflate_on_oom"),
            Err(DeviceOptionError::Missing("amount_mib"))
        );
        assert!(matches!(
            parse_balloon("amount_mib=-1"),
            Err(DeviceOptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse_balloon("amount_mib=1,stats_polling_interval_s=70000"),
            Err(DeviceOptionError::BadValue { .. })
        ));
        assert_eq!(
            parse_balloon("amount_mib=1,size=2"),
            Err(DeviceOptionError::UnknownKey("size".into()))
        );
    }

    #[test]
    fn vsock() {
        let v: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(v.guest_cid, 3);
        assert_eq!(v.uds_path, PathBuf::from("/run/v.sock"));
        for bad in [
            "uds=/x",
            "cid=3",
            "cid=2,uds=/x",
            "cid=4294967295,uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=",
            "cid=3,uds=/x,ro",
            "cid=3,cid=4,uds=/x",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn drives() {
        let d: DriveConfig = "path=/img,ro,root,id=rootfs".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.read_only && d.root);
        assert_eq!(d.id.as_deref(), Some("rootfs"));
        let d: DriveConfig = "path=/img,bw_size=1000,bw_refill_time=100,ro=off"
            .parse()
            .unwrap();
        assert!(!d.read_only);
        assert_eq!(
            d.rate_limiter.bandwidth,
            Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 100
            })
        );
    }

    #[test]
    fn bad_drives() {
        for (s, needle) in [
            ("ro", "'path=' is required"),
            ("path=", "a value is needed"),
            ("path=/a,path=/b", "given twice"),
            ("path=/a,colour=red", "unknown option 'colour'"),
            ("path=/a,ro=maybe", "use on or off"),
            ("path=/a,id=a/b", "may only contain"),
            ("path=/a,bw_size=x", "bad value for 'bw_size'"),
        ] {
            let err = s.parse::<DriveConfig>().unwrap_err().to_string();
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn nets() {
        let n: NetConfig =
            "tap=kiln0,mac=02:00:00:00:00:01,mtu=1400,rx_ops_size=10,rx_ops_refill_time=5"
                .parse()
                .unwrap();
        assert_eq!(n.tap, "kiln0");
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(n.mtu, Some(1400));
        assert!(n.rx_rate_limiter.ops.is_some());
        assert!(n.tx_rate_limiter.ops.is_none());
        for s in [
            "mac=02:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,mac=02:00:00:00:00:0g",
            "tap=t,mtu=10",
            "tap=t,bw_size=1",
        ] {
            assert!(s.parse::<NetConfig>().is_err(), "{s}");
        }
    }

    #[test]
    fn rng() {
        assert_eq!("".parse::<RngConfig>().unwrap(), RngConfig::default());
        let r: RngConfig = "bw_size=4096,bw_refill_time=1000".parse().unwrap();
        assert!(r.rate_limiter.bandwidth.is_some());
        assert!("tap=x".parse::<RngConfig>().is_err());
    }
}
