//! A microVM's configuration, validated once into a type that cannot describe an impossible VM.

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use crate::arch::layout::{FIRST_DEVICE_GSI, LAST_DEVICE_GSI, MIN_MEM_SIZE};
use crate::arch::MAX_VCPUS;
use crate::device_config::{DriveConfig, NetConfig, RngConfig, VsockConfig};
use devices::legacy::OutputLimits;
use devices::rate_limiter::TokenBucketConfig;
use devices::virtio::balloon::BalloonConfig;
use devices::virtio::fs::FsConfig;

/// Most virtio devices a guest can have: one interrupt line each.
pub const MAX_VIRTIO_DEVICES: usize = (LAST_DEVICE_GSI - FIRST_DEVICE_GSI + 1) as usize;

/// The kernel command line used when the user gives none: serial console, reset through the
/// keyboard controller on reboot (which ends the microVM), reboot 1 s after a panic, no PCI probe.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// Kiln's standard output.
    Stdout,
    /// A file, created (mode 0600) or truncated.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(format!(
                    "'{s}' is not a console: use stdout, file:PATH or none"
                )),
            },
        }
    }
}

/// The serial console: where it goes (`PUT /serial`'s `serial_out_path`, `--console`) and how
/// fast the guest may write to it (`PUT /serial`'s `rate_limiter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Where the output goes.
    pub console: ConsoleConfig,
    /// The output rate; `None`: no limit.
    pub rate_limit: Option<TokenBucketConfig>,
}

impl Default for SerialConfig {
    /// Kiln's standard output, unlimited (Firecracker's default).
    fn default() -> Self {
        Self {
            console: ConsoleConfig::Stdout,
            rate_limit: None,
        }
    }
}

/// The largest config or seccomp filter file Kiln reads (Firecracker's biggest are a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Reads a small text file a user named (a config file, a filter file): never blocking on a FIFO,
/// never reading a character device without end, refusing one larger than `max_bytes`.
pub fn read_small_file(path: &std::path::Path, max_bytes: u64) -> std::io::Result<String> {
    String::from_utf8(read_small_file_bytes(path, max_bytes)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// [`read_small_file`] for a file that may be binary (a compiled seccomp filter).
pub fn read_small_file_bytes(path: &std::path::Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = devices::host_file::open(path, false, devices::host_file::Accept::RegularFile)?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes"),
        ));
    }
    Ok(bytes)
}

impl ConsoleConfig {
    /// Opens the console's sink.
    pub fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::None => Box::new(std::io::sink()),
            // Owner-only, and never through a symlink: a path an attacker can pre-create must
            // not make Kiln write (or truncate) another file.
            Self::File(path) => Box::new(open_console_file(path)?),
        })
    }
}

/// Opens a console file: owner-only, and never through a symlink (a path an attacker can
/// pre-create must not make Kiln write, or truncate, another file). Nonblocking: a FIFO's open
/// does not wait for a reader (without one, Kiln holds the read end itself and the pipe's
/// buffer takes what it can), and a reader that stops reading makes the guest's output be
/// dropped instead of stalling the vCPU that writes it.
fn open_console_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let file =
        crate::output_file::open_nonblocking_output(path, crate::output_file::OutputMode::Truncate)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    std::io::Error::new(e.kind(), "it is a symbolic link")
                } else {
                    e
                }
            })?;
    // (A directory is refused by the open itself: EISDIR.)
    Ok(file)
}

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No kernel to boot (Firecracker's text for `InstanceStart` before `PUT /boot-source`).
    #[error("Cannot start microvm without kernel configuration.")]
    NoBootSource,
    /// vCPU count outside what KVM and the MP table allow.
    #[error("--vcpus {requested}: must be between 1 and {max} on this host")]
    VcpuCount {
        /// The vCPU count asked for.
        requested: u64,
        /// The most this host allows.
        max: u8,
    },
    /// Memory below the minimum.
    #[error("--mem-mib {requested}: at least {min} MiB are needed", min = MIN_MEM_SIZE >> 20)]
    MemoryTooSmall {
        /// The memory asked for, in MiB.
        requested: u64,
    },
    /// Memory beyond what the host has.
    #[error("--mem-mib {requested}: the host has only {host} MiB of memory")]
    MemoryTooLarge {
        /// The memory asked for, in MiB.
        requested: u64,
        /// The host's memory, in MiB.
        host: u64,
    },
    /// More than one drive marked root.
    #[error("drives {first} and {second} are both marked root; only one can be")]
    MultipleRoots {
        /// Id of the first drive marked root (empty if it has none).
        first: String,
        /// Id of the second drive marked root (empty if it has none).
        second: String,
    },
    /// Two devices share an id.
    #[error("two devices have the id '{0}'")]
    DuplicateId(String),
    /// More devices than interrupt lines.
    #[error("{0} virtio devices asked for; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    /// A balloon bigger than the guest's memory (Firecracker's first sentence).
    #[error(
        "Amount of pages requested is too large: a {amount_mib} MiB balloon in a {mem_mib} MiB \
         guest."
    )]
    BalloonTooLarge {
        /// The balloon's size in MiB.
        amount_mib: u32,
        /// The guest's memory in MiB.
        mem_mib: u64,
    },
}

/// What the host allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// KVM's per-VM vCPU limit.
    pub max_vcpus: usize,
    /// Host RAM in MiB.
    pub mem_mib: u64,
}

impl HostLimits {
    /// What this host allows: KVM's vCPU limit and the host's RAM.
    pub fn of(kvm: &kvm_ioctls::Kvm) -> Self {
        Self {
            max_vcpus: crate::vstate::vm::max_vcpus(kvm),
            mem_mib: Self::host_mem_mib().unwrap_or(u64::MAX),
        }
    }

    /// Reads the host's RAM from /proc/meminfo; `None` if it cannot be read.
    pub fn host_mem_mib() -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }
}

/// A validated microVM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, before host quirks and devices are added.
    pub cmdline: String,
    /// Number of vCPUs, 1 ..= the host limit.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Serial console destination.
    pub console: ConsoleConfig,
    /// The console's output rate (Firecracker's `PUT /serial` `rate_limiter`); `None`: no limit.
    pub console_rate_limit: Option<TokenBucketConfig>,
    /// Block devices, the root drive (if any) first so the guest names it /dev/vda; every id set.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces; every id set.
    pub nets: Vec<NetConfig>,
    /// The entropy device, if any.
    pub rng: Option<RngConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The balloon device, if any; never larger than the guest's memory.
    pub balloon: Option<BalloonConfig>,
    /// virtio-fs devices (vhost-user), in attach order; their tags are unique. Guest memory is
    /// then shared memory, which the backends map.
    pub fs: Vec<FsConfig>,
    /// MMDS's interfaces (ids of `nets`), address and version, if MMDS is on.
    pub mmds: Option<api::models::MmdsConfig>,
    /// Firecracker's boot-timer device (`--boot-timer`): the guest's write of 123 at
    /// `BOOT_TIMER_ADDR` logs its boot time.
    pub boot_timer: bool,
    /// KVM logs the guest's writes to memory, for Diff snapshots.
    pub track_dirty_pages: bool,
}

impl VmConfig {
    /// Checks the configuration against itself and the host's limits; names unnamed devices
    /// and puts the root drive first.
    pub fn validate(self, limits: HostLimits) -> Result<VmConfig, ConfigError> {
        let max = limits.max_vcpus.min(usize::from(MAX_VCPUS)) as u8;
        if !(1..=max).contains(&self.vcpus) {
            return Err(ConfigError::VcpuCount {
                requested: u64::from(self.vcpus),
                max,
            });
        }
        if self.mem_mib < MIN_MEM_SIZE >> 20 {
            return Err(ConfigError::MemoryTooSmall {
                requested: self.mem_mib,
            });
        }
        if self.mem_mib > limits.mem_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: self.mem_mib,
                host: limits.mem_mib,
            });
        }
        if let Some(balloon) = &self.balloon {
            check_balloon_size(balloon.amount_mib, self.mem_mib)?;
        }
        let (drives, nets) = name_devices(self.drives, self.nets)?;
        let mut tags: Vec<&str> = self.fs.iter().map(|fs| fs.tag.as_str()).collect();
        tags.sort_unstable();
        if let Some(pair) = tags.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateId(pair[0].to_string()));
        }
        let config = VmConfig {
            drives,
            nets,
            ..self
        };
        let count = config.virtio_device_count();
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        Ok(config)
    }
}

/// A balloon may hold at most the guest's memory (Firecracker's rule).
pub fn check_balloon_size(amount_mib: u32, mem_mib: u64) -> Result<(), ConfigError> {
    if u64::from(amount_mib) > mem_mib {
        return Err(ConfigError::BalloonTooLarge {
            amount_mib,
            mem_mib,
        });
    }
    Ok(())
}

/// Gives unnamed devices ids (`drive0`, `net0`, ... by position), checks ids are unique and at most
/// one drive is root, and moves the root drive first.
fn name_devices(
    mut drives: Vec<DriveConfig>,
    mut nets: Vec<NetConfig>,
) -> Result<(Vec<DriveConfig>, Vec<NetConfig>), ConfigError> {
    for (i, drive) in drives.iter_mut().enumerate() {
        drive.id.get_or_insert_with(|| format!("drive{i}"));
    }
    for (i, net) in nets.iter_mut().enumerate() {
        net.id.get_or_insert_with(|| format!("net{i}"));
    }
    let mut ids: Vec<&str> = drives
        .iter()
        .filter_map(|d| d.id.as_deref())
        .chain(nets.iter().filter_map(|n| n.id.as_deref()))
        .collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(ConfigError::DuplicateId(pair[0].to_string()));
    }
    let roots: Vec<&DriveConfig> = drives.iter().filter(|d| d.root).collect();
    if let [first, second, ..] = roots[..] {
        return Err(ConfigError::MultipleRoots {
            first: first.id.clone().unwrap_or_default(),
            second: second.id.clone().unwrap_or_default(),
        });
    }
    // Stable: the other drives keep their order, so the guest's vdb, vdc... follow the command line.
    drives.sort_by_key(|d| !d.root);
    Ok((drives, nets))
}

/// The most a guest may write into a console file; past it, output is dropped, so a guest cannot
/// fill the host's disk through its console. (Output to stdout, which the user redirects, has no
/// cap.)
pub const CONSOLE_FILE_MAX_BYTES: u64 = 64 << 20;

impl VmConfig {
    /// What the console may write: its rate limit, and the cap for a console file.
    pub fn console_limits(&self) -> OutputLimits {
        OutputLimits {
            rate: self.console_rate_limit,
            max_bytes: matches!(self.console, ConsoleConfig::File(_))
                .then_some(CONSOLE_FILE_MAX_BYTES),
        }
    }

    /// How many virtio devices the VM has (drives, nets, rng, vsock, balloon), each taking one
    /// MMIO slot and GSI.
    pub fn virtio_device_count(&self) -> usize {
        self.drives.len()
            + self.nets.len()
            + usize::from(self.rng.is_some())
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + self.fs.len()
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 1024,
        mem_mib: 24 * 1024,
    };

    fn request() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 2,
            mem_mib: 128,
            console: ConsoleConfig::Stdout,
            console_rate_limit: None,
            drives: Vec::new(),
            nets: Vec::new(),
            rng: None,
            vsock: None,
            balloon: None,
            fs: Vec::new(),
            mmds: None,
            boot_timer: false,
            track_dirty_pages: false,
        }
    }

    #[test]
    fn devices_are_named_and_root_goes_first() {
        let config = VmConfig {
            drives: vec![
                "path=/a".parse().unwrap(),
                "path=/b,root".parse().unwrap(),
                "path=/c,id=data".parse().unwrap(),
            ],
            nets: vec!["tap=t0".parse().unwrap()],
            ..request()
        }
        .validate(LIMITS)
        .unwrap();
        let ids: Vec<_> = config
            .drives
            .iter()
            .map(|d| d.id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["drive1", "drive0", "data"]);
        assert!(config.drives[0].root);
        assert_eq!(config.nets[0].id.as_deref(), Some("net0"));
    }

    #[test]
    fn device_conflicts() {
        let two_roots = VmConfig {
            drives: vec![
                "path=/a,root".parse().unwrap(),
                "path=/b,root".parse().unwrap(),
            ],
            ..request()
        };
        assert!(matches!(
            two_roots.validate(LIMITS),
            Err(ConfigError::MultipleRoots { .. })
        ));
        let dup = VmConfig {
            drives: vec!["path=/a,id=x".parse().unwrap()],
            nets: vec!["tap=t,id=x".parse().unwrap()],
            ..request()
        };
        assert_eq!(
            dup.validate(LIMITS),
            Err(ConfigError::DuplicateId("x".into()))
        );
        let many = VmConfig {
            drives: (0..20)
                .map(|i| format!("path=/d{i}").parse().unwrap())
                .collect(),
            ..request()
        };
        assert_eq!(many.validate(LIMITS), Err(ConfigError::TooManyDevices(20)));
    }

    #[test]
    fn a_valid_config_passes_unchanged() {
        let config = request().validate(LIMITS).unwrap();
        assert_eq!(config, request());
        assert_eq!(config.mem_bytes(), 128 << 20);
        assert_eq!(config.vcpus, 2);
    }

    #[test]
    fn vcpu_limits() {
        for bad in [0, 255] {
            let err = VmConfig {
                vcpus: bad,
                ..request()
            }
            .validate(LIMITS)
            .unwrap_err();
            assert_eq!(
                err,
                ConfigError::VcpuCount {
                    requested: u64::from(bad),
                    max: 254
                }
            );
        }
        let small_host = HostLimits {
            max_vcpus: 4,
            ..LIMITS
        };
        let err = VmConfig {
            vcpus: 5,
            ..request()
        }
        .validate(small_host)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--vcpus 5: must be between 1 and 4 on this host"
        );
        assert!(VmConfig {
            vcpus: 254,
            ..request()
        }
        .validate(LIMITS)
        .is_ok());
    }

    #[test]
    fn memory_limits() {
        let err = VmConfig {
            mem_mib: 0,
            ..request()
        }
        .validate(LIMITS)
        .unwrap_err();
        assert_eq!(err, ConfigError::MemoryTooSmall { requested: 0 });
        let err = VmConfig {
            mem_mib: 1 << 30,
            ..request()
        }
        .validate(LIMITS)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--mem-mib 1073741824: the host has only 24576 MiB of memory"
        );
    }

    #[test]
    fn a_console_file_is_capped_and_the_rate_limit_is_kept() {
        let bucket = TokenBucketConfig {
            size: 4096,
            one_time_burst: None,
            refill_time: 100,
        };
        let to_file = VmConfig {
            console: ConsoleConfig::File("/tmp/console".into()),
            console_rate_limit: Some(bucket),
            ..request()
        }
        .validate(LIMITS)
        .unwrap();
        assert_eq!(
            to_file.console_limits(),
            OutputLimits {
                rate: Some(bucket),
                max_bytes: Some(CONSOLE_FILE_MAX_BYTES),
            }
        );
        let to_stdout = request().validate(LIMITS).unwrap();
        assert_eq!(to_stdout.console_limits(), OutputLimits::default());
    }

    #[test]
    fn console_parsing() {
        assert_eq!("stdout".parse(), Ok(ConsoleConfig::Stdout));
        assert_eq!("none".parse(), Ok(ConsoleConfig::None));
        assert_eq!(
            "file:/tmp/c".parse(),
            Ok(ConsoleConfig::File("/tmp/c".into()))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty"
            .parse::<ConsoleConfig>()
            .unwrap_err()
            .contains("stdout, file:PATH or none"));
    }

    #[test]
    fn host_memory_is_readable_here() {
        assert!(HostLimits::host_mem_mib().unwrap() > 0);
    }
}
