//! A microVM's configuration, validated once into a type that cannot describe an impossible VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::arch::x86_64::layout::MIN_MEM_SIZE;
use crate::arch::x86_64::mptable;

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

impl ConsoleConfig {
    /// Opens the console's sink.
    pub fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::None => Box::new(std::io::sink()),
            Self::File(path) => Box::new(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)?,
            ),
        })
    }
}

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count outside what KVM and the MP table allow.
    #[error("--vcpus {requested}: must be between 1 and {max} on this host")]
    VcpuCount { requested: u64, max: u8 },
    /// Memory below the minimum.
    #[error("--mem-mib {requested}: at least {min} MiB are needed", min = MIN_MEM_SIZE >> 20)]
    MemoryTooSmall { requested: u64 },
    /// Memory beyond what the host has.
    #[error("--mem-mib {requested}: the host has only {host} MiB of memory")]
    MemoryTooLarge { requested: u64, host: u64 },
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
    /// The kernel command line, before host quirks are added.
    pub cmdline: String,
    /// Number of vCPUs, 1 ..= the host limit.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Serial console destination.
    pub console: ConsoleConfig,
}

/// A configuration as given, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfigRequest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Command line; `None` means [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// vCPUs as asked for.
    pub vcpus: u64,
    /// MiB as asked for.
    pub mem_mib: u64,
    /// Console.
    pub console: ConsoleConfig,
}

impl VmConfigRequest {
    /// Checks the request against the host's limits.
    pub fn validate(self, limits: HostLimits) -> Result<VmConfig, ConfigError> {
        let max = limits.max_vcpus.min(usize::from(mptable::MAX_CPUS)) as u8;
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or(ConfigError::VcpuCount {
                requested: self.vcpus,
                max,
            })?;
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
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus,
            mem_mib: self.mem_mib,
            console: self.console,
        })
    }
}

impl VmConfig {
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

    fn request() -> VmConfigRequest {
        VmConfigRequest {
            kernel: "/k".into(),
            initrd: None,
            cmdline: None,
            vcpus: 2,
            mem_mib: 128,
            console: ConsoleConfig::Stdout,
        }
    }

    #[test]
    fn defaults_fill_in() {
        let config = request().validate(LIMITS).unwrap();
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
        assert_eq!(config.mem_bytes(), 128 << 20);
        assert_eq!(config.vcpus, 2);
    }

    #[test]
    fn vcpu_limits() {
        for bad in [0, 255, 1 << 40] {
            let err = VmConfigRequest {
                vcpus: bad,
                ..request()
            }
            .validate(LIMITS)
            .unwrap_err();
            assert_eq!(
                err,
                ConfigError::VcpuCount {
                    requested: bad,
                    max: 254
                }
            );
        }
        let small_host = HostLimits {
            max_vcpus: 4,
            ..LIMITS
        };
        let err = VmConfigRequest {
            vcpus: 5,
            ..request()
        }
        .validate(small_host)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--vcpus 5: must be between 1 and 4 on this host"
        );
        assert!(VmConfigRequest {
            vcpus: 254,
            ..request()
        }
        .validate(LIMITS)
        .is_ok());
    }

    #[test]
    fn memory_limits() {
        let err = VmConfigRequest {
            mem_mib: 0,
            ..request()
        }
        .validate(LIMITS)
        .unwrap_err();
        assert_eq!(err, ConfigError::MemoryTooSmall { requested: 0 });
        let err = VmConfigRequest {
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
