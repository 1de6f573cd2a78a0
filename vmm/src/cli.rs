//! The `kiln` command line.

use std::path::PathBuf;

use api::models::{
    BootSource, LogLevel, Logger, MachineConfiguration, Metrics, SnapshotLoadParams,
};
use clap::{Args, Parser, Subcommand};

use crate::arch::MAX_VCPUS;
use crate::config::{ConfigError, ConsoleConfig, SerialConfig};
use crate::device_config::{
    parse_balloon, parse_fs, parse_restore, DriveConfig, NetConfig, RngConfig, VsockConfig,
};
use crate::guest_images::GuestImages;
use crate::personality::Personality;
use crate::resources::VmResources;
use crate::runner::Share;
use crate::seccomp::SeccompFilters;
use devices::virtio::balloon::BalloonConfig;
use devices::virtio::fs::FsConfig;

/// Kiln: a KVM microVM monitor.
///
/// Without a subcommand Kiln behaves as Firecracker's process does: it serves Firecracker's REST API
/// on `--api-sock` and/or boots from `--config-file`.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Firecracker's process flags (when there is no subcommand).
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// Firecracker's process flags.
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct ProcessArgs {
    /// Path of the API's Unix socket (created 0600, removed on exit) [default:
    /// /run/kiln.socket, or /run/firecracker.socket when started as `firecracker`].
    #[arg(long = "api-sock", value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The microVM's id, reported by GET /.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Boot from this JSON file (the shape of GET /vm/config) without waiting for the API.
    #[arg(long = "config-file", value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long = "no-api", requires = "config_file")]
    pub no_api: bool,
    /// Largest API request body, in bytes.
    #[arg(
        long = "http-api-max-payload-size",
        value_name = "BYTES",
        default_value_t = 51200
    )]
    pub max_payload: usize,
    /// When the process was started, as Firecracker's jailer passes it: CLOCK_MONOTONIC in
    /// microseconds. `api_server.process_startup_time_us` then counts from it.
    #[arg(long = "start-time-us", value_name = "MICROS")]
    pub start_time_us: Option<u64>,
    /// The process's CPU time when it was started (CLOCK_PROCESS_CPUTIME_ID, microseconds), as
    /// the jailer passes it: `api_server.process_startup_time_cpu_us` counts from it.
    #[arg(long = "start-time-cpu-us", value_name = "MICROS")]
    pub start_time_cpu_us: Option<u64>,
    /// CPU time the parent (the jailer) spent before starting the process, in microseconds;
    /// added to `api_server.process_startup_time_cpu_us`.
    #[arg(long = "parent-cpu-time-us", value_name = "MICROS")]
    pub parent_cpu_time_us: Option<u64>,
    /// MMDS's document at start: a JSON file (as a first `PUT /mmds`).
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
    /// The largest MMDS document, in bytes serialized [default: --http-api-max-payload-size].
    #[arg(long = "mmds-size-limit", value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Firecracker's switch to virtio-pci. Kiln has only the virtio-mmio transport: it says so
    /// in one warning and boots with every device on virtio-mmio, where the guest finds them
    /// through the command line as before.
    #[arg(long = "enable-pci")]
    pub enable_pci: bool,
    /// Print the snapshot format version this Kiln writes, and exit.
    #[arg(long = "snapshot-version")]
    pub snapshot_version: bool,
    /// Print the format version of the snapshot state file at PATH, and exit.
    #[arg(long = "describe-snapshot", value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
    /// Logging, metrics and the boot timer.
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// seccomp filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

impl ProcessArgs {
    /// The API socket: `--api-sock`, or the personality's default.
    pub fn api_sock(&self, personality: Personality) -> PathBuf {
        self.api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from(personality.default_api_sock()))
    }
}

/// Firecracker's jailer, as Kiln runs it when started under the name `jailer`: `kiln jail`'s
/// flags, which are the jailer's.
#[derive(Debug, Parser)]
#[command(
    name = "jailer",
    about = "Firecracker's jailer, as Kiln runs it (kiln jail)"
)]
pub struct JailerCli {
    /// The jailer's flags.
    #[command(flatten)]
    pub jail: crate::jail::JailArgs,
}

/// Firecracker's seccomp flags (both modes take them).
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
pub struct SeccompArgs {
    /// Install no seccomp filters (every thread may make every system call).
    #[arg(long = "no-seccomp", conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Replace Kiln's seccomp filters with this file: seccompiler JSON defining the thread kinds
    /// "api", "vmm" and "vcpu" (Kiln's own are in vmm/src/seccomp/x86_64.json).
    #[arg(long = "seccomp-filter", value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,
}

impl SeccompArgs {
    /// The filters the flags ask for.
    pub fn filters(&self) -> Result<SeccompFilters, crate::seccomp::Error> {
        match (&self.seccomp_filter, self.no_seccomp) {
            (_, true) => Ok(SeccompFilters::disabled()),
            (Some(path), false) => SeccompFilters::from_file(path),
            (None, false) => SeccompFilters::kiln_default(),
        }
    }
}

/// Firecracker's logging, metrics and boot-timer flags (both modes take them).
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
pub struct ObservabilityArgs {
    /// Write Kiln's log to this file or named pipe (created 0600, appended to, never through a
    /// symlink) instead of stderr. The guest's console is not part of it.
    #[arg(long = "log-path", value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info (default), Debug, Trace or Off (any case).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub level: Option<LogLevel>,
    /// Show each message's level: `kiln: [WARN] ...`.
    #[arg(long = "show-level")]
    pub show_level: bool,
    /// Show each message's source file and line: `kiln: [vmm/src/machine.rs:42] ...`.
    #[arg(long = "show-log-origin")]
    pub show_log_origin: bool,
    /// Log only messages from modules whose path starts with this (`vmm::machine`, `api`, ...).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Write Firecracker-style JSON metrics to this file or named pipe every 60 s and at exit.
    #[arg(long = "metrics-path", value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Add Firecracker's boot-timer device: the guest writing 123 to 0xc0000000 logs its boot
    /// time.
    #[arg(long = "boot-timer")]
    pub boot_timer: bool,
}

impl ObservabilityArgs {
    /// The logger configuration the flags ask for, `None` when they leave the defaults.
    pub fn logger_config(&self) -> Option<Logger> {
        let config = Logger {
            log_path: self.log_path.clone(),
            level: self.level,
            show_level: self.show_level.then_some(true),
            show_log_origin: self.show_log_origin.then_some(true),
            module: self.module.clone(),
        };
        (config != Logger::default()).then_some(config)
    }

    /// The metrics configuration `--metrics-path` asks for.
    pub fn metrics_config(&self) -> Option<Metrics> {
        self.metrics_path.as_ref().map(|path| Metrics {
            metrics_path: path.clone(),
            emit_id: None,
            properties: None,
        })
    }
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs < 1e9)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds above 0"))
}

fn parse_level(s: &str) -> Result<LogLevel, String> {
    LogLevel::parse(s).ok_or_else(|| {
        format!("unknown level {s:?}: expected Error, Warning, Info, Debug, Trace or Off")
    })
}

/// Kiln's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it reboots.
    Run(Box<RunArgs>),
    /// Run kiln jailed (Firecracker's jailer): own mount and PID namespaces, pivot_root into
    /// <chroot-base-dir>/<exec-file-name>/<id>/root, cgroups, rlimits, --uid/--gid.
    Jail(crate::jail::JailArgs),
    /// Work with snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `kiln snapshot ...`.
#[derive(Debug, Subcommand, Clone, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// Apply a Diff snapshot's memory file onto its base's (in place): the base then restores,
    /// with the Diff's state file, to the VM as it was at the Diff.
    Merge {
        /// The base memory file (a Full snapshot's, or an earlier merge), changed in place.
        base: PathBuf,
        /// The Diff snapshot's memory file.
        diff: PathBuf,
    },
    /// Print a state file's format version (Firecracker's `--describe-snapshot`).
    Describe {
        /// The state file.
        state: PathBuf,
    },
}

/// `kiln run`'s flags.
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// Kernel image: an uncompressed ELF vmlinux or a bzImage. Without it, Kiln boots the default
    /// guest from guest-images/ (built on first use).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs / initrd image (uncompressed cpio boots fastest).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0 reboot=k panic=1 pci=off nomodule).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 128, value_name = "N")]
    pub mem_mib: u64,
    /// Where the serial console goes: stdout (the default; a bare --console), file:PATH or
    /// none. With a command (`-- CMD`) the console is hidden unless this is given, and then
    /// goes to stderr (stdout is the command's).
    #[arg(long, value_name = "DEST", num_args = 0..=1, default_missing_value = "stdout")]
    pub console: Option<ConsoleConfig>,
    /// Logging, metrics and the boot timer.
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// seccomp filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
    /// A virtio block device (repeatable; the guest sees them as vda, vdb... with the root drive
    /// first): path=FILE[,id=ID][,ro][,root][,bw_size=B,bw_refill_time=MS,ops_size=N,...].
    #[arg(long = "drive", value_name = "OPTS")]
    pub drives: Vec<DriveConfig>,
    /// A virtio network interface on a host TAP device (repeatable):
    /// tap=NAME[,id=ID][,mac=MAC][,mtu=N][,rx_bw_size=B,...][,tx_ops_size=N,...].
    #[arg(long = "net", value_name = "OPTS")]
    pub nets: Vec<NetConfig>,
    /// A virtio entropy device (/dev/hwrng in the guest), optionally rate limited:
    /// [bw_size=B,bw_refill_time=MS,...].
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<RngConfig>,
    /// A virtio-vsock device with Firecracker's hybrid Unix-socket host side: cid=N,uds=PATH.
    /// Host clients connect to PATH and send `CONNECT <port>\n`; guest connections to host
    /// port P reach PATH_P.
    #[arg(long, value_name = "OPTS")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device (Firecracker's fields):
    /// amount_mib=N[,deflate_on_oom][,stats_polling_interval_s=S][,free_page_hinting]
    /// [,free_page_reporting]. It starts at amount_mib; the guest gives that much back.
    #[arg(long, value_name = "OPTS", value_parser = parse_balloon)]
    pub balloon: Option<BalloonConfig>,
    /// A virtio-fs device served by a vhost-user backend you run (virtiofsd), repeatable:
    /// tag=TAG,socket=PATH[,num_queues=N][,queue_size=N]. The guest mounts it with
    /// `mount -t virtiofs TAG DIR`.
    #[arg(long = "fs", value_name = "OPTS", value_parser = parse_fs)]
    pub fs: Vec<FsConfig>,
    /// With a command: share a host directory with the VM over virtio-fs (repeatable),
    /// HOST_DIR[:GUEST_DIR][:ro]; GUEST_DIR defaults to HOST_DIR's absolute path. Without any
    /// --share the current directory is shared read-write at its own path.
    #[arg(
        long = "share",
        value_name = "HOST_DIR[:GUEST_DIR][:ro]",
        requires = "command"
    )]
    pub shares: Vec<Share>,
    /// With a command: boot the host's / (read-only, writes going to a tmpfs overlay) as the
    /// guest's root instead of the default guest's root filesystem, so the command finds the
    /// host's programs.
    #[arg(long = "host-root", requires = "command")]
    pub host_root: bool,
    /// With a command: end the VM after SECS seconds (from Kiln's start) and exit with 124.
    #[arg(long, value_name = "SECS", requires = "command", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
    /// Run CMD in the VM (`kiln run [flags] -- CMD [ARGS...]`): its stdout, stderr and exit
    /// status become Kiln's, stdin is forwarded, and the VM is gone afterwards.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Restore a snapshot instead of booting, and run it:
    /// snapshot=PATH,mem=PATH (or uffd=SOCKET for a page-fault handler)
    /// [,net.IFACE=TAP]...[,vsock=PATH][,drive.ID=PATH]...[,track_dirty_pages].
    /// The VM is the snapshot's: no other VM flag may be given.
    #[arg(
        long,
        value_name = "OPTS",
        value_parser = |s: &str| parse_restore(s).map(Box::new),
        conflicts_with_all = [
            "kernel", "initrd", "cmdline", "vcpus", "mem_mib", "drives", "nets", "rng", "vsock",
            "balloon", "fs", "shares", "host_root", "timeout", "command",
        ]
    )]
    pub restore: Option<Box<SnapshotLoadParams>>,
}

impl RunArgs {
    /// The VM these flags describe, as the resources the API would have built. `images` is the
    /// default guest, used when there is no `--kernel`: its vmlinux, and its initramfs unless a
    /// `--drive ...,root` or `--initrd` is given.
    pub fn into_resources(self, images: Option<&GuestImages>) -> Result<VmResources, ConfigError> {
        let has_root_drive = self.drives.iter().any(|d| d.root);
        let (kernel, initrd) = match (self.kernel, images) {
            (Some(kernel), _) => (kernel, self.initrd),
            (None, Some(images)) if has_root_drive => (images.vmlinux.clone(), self.initrd),
            (None, Some(images)) => (
                images.vmlinux.clone(),
                self.initrd.or_else(|| Some(images.initramfs.clone())),
            ),
            (None, None) => return Err(ConfigError::NoBootSource),
        };
        let vcpu_count = u8::try_from(self.vcpus).map_err(|_| ConfigError::VcpuCount {
            requested: self.vcpus,
            max: MAX_VCPUS,
        })?;
        Ok(VmResources {
            boot_source: Some(BootSource {
                kernel_image_path: kernel,
                boot_args: self.cmdline,
                initrd_path: initrd,
            }),
            machine_config: MachineConfiguration {
                vcpu_count,
                mem_size_mib: self.mem_mib,
                ..MachineConfiguration::default()
            },
            drives: self.drives,
            nets: self.nets,
            vsock: self.vsock,
            rng: self.rng,
            balloon: self.balloon,
            fs: self.fs,
            mmds_config: None,
            serial: SerialConfig {
                console: self.console.unwrap_or(ConsoleConfig::Stdout),
                rate_limit: None,
            },
            boot_timer: self.observability.boot_timer,
            // The logging and metrics flags apply before the VM is built.
            logger: None,
            metrics: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))?;
        match cli.command {
            Some(Command::Run(run)) => Ok(*run),
            other => panic!("not `kiln run` in {args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let run = parse(&["run"]).unwrap();
        assert_eq!(run.kernel, None);
        assert_eq!((run.vcpus, run.mem_mib), (1, 128));
        assert_eq!(run.console, None);
    }

    #[test]
    fn every_flag() {
        let run = parse(&[
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "a=b c",
            "--vcpus",
            "2",
            "--mem-mib",
            "256",
            "--console",
            "file:/tmp/out",
        ])
        .unwrap();
        assert_eq!(run.kernel, Some("/k".into()));
        assert_eq!(run.initrd, Some("/i".into()));
        assert_eq!(run.cmdline.as_deref(), Some("a=b c"));
        assert_eq!((run.vcpus, run.mem_mib), (2, 256));
        assert_eq!(run.console, Some(ConsoleConfig::File("/tmp/out".into())));
        assert!(run.drives.is_empty() && run.nets.is_empty() && run.rng.is_none());
    }

    #[test]
    fn firecracker_process_flags() {
        let cli =
            Cli::try_parse_from(["kiln", "--api-sock", "/tmp/a.sock", "--id", "vm7"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.process.api_sock(Personality::Firecracker),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(cli.process.id, "vm7");
        assert_eq!(cli.process.max_payload, 51200);
        let defaults = Cli::try_parse_from(["kiln"]).unwrap();
        assert_eq!(
            defaults.process.api_sock(Personality::Kiln),
            PathBuf::from("/run/kiln.socket")
        );
        assert_eq!(
            defaults.process.api_sock(Personality::Firecracker),
            PathBuf::from("/run/firecracker.socket")
        );
        // The flags Firecracker's jailer and client libraries pass.
        let jailed = Cli::try_parse_from([
            "firecracker",
            "--id",
            "vm1",
            "--start-time-us",
            "123",
            "--start-time-cpu-us",
            "4",
            "--parent-cpu-time-us",
            "5",
            "--enable-pci",
        ])
        .unwrap();
        let p = jailed.process;
        assert_eq!(
            (p.start_time_us, p.start_time_cpu_us, p.parent_cpu_time_us),
            (Some(123), Some(4), Some(5))
        );
        assert!(p.enable_pci);
        let jailer = JailerCli::try_parse_from([
            "jailer",
            "--id",
            "vm1",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--",
            "--config-file",
            "vm.json",
        ])
        .unwrap();
        assert_eq!(jailer.jail.id, "vm1");
        assert_eq!(jailer.jail.exec_args.len(), 2);
        let err = Cli::try_parse_from(["kiln", "--no-api"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(Cli::try_parse_from(["kiln", "--api-sock", "/x", "run"]).is_err());
    }

    #[test]
    fn devices() {
        let run = parse(&[
            "run",
            "--drive",
            "path=/r.ext4,root",
            "--rng",
            "--drive",
            "path=/d.img,ro,id=data",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:01",
        ])
        .unwrap();
        assert_eq!(run.drives.len(), 2);
        assert!(run.drives[0].root && !run.drives[0].read_only);
        assert_eq!(run.drives[1].id.as_deref(), Some("data"));
        assert_eq!(run.nets[0].tap, "tap0");
        assert_eq!(run.rng, Some(RngConfig::default()));
        let limited = parse(&["run", "--rng", "bw_size=1000,bw_refill_time=100"]).unwrap();
        assert!(limited.rng.unwrap().rate_limiter.bandwidth.is_some());
    }

    #[test]
    fn flags_become_the_resources_the_api_would_build() {
        let images = GuestImages {
            vmlinux: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.cpio".into(),
            rootfs: "/g/rootfs.ext4".into(),
            run_initramfs: "/g/run-initramfs.cpio".into(),
        };
        let r = parse(&["run", "--vcpus", "2", "--boot-timer"])
            .unwrap()
            .into_resources(Some(&images))
            .unwrap();
        let boot = r.boot_source.clone().unwrap();
        assert_eq!(boot.kernel_image_path, images.vmlinux);
        assert_eq!(boot.initrd_path, Some(images.initramfs.clone()));
        assert_eq!(boot.boot_args, None);
        assert_eq!(r.machine_config.vcpu_count, 2);
        assert!(r.boot_timer);
        // A root drive boots without the default initramfs; the drives keep their order.
        let r = parse(&[
            "run",
            "--drive",
            "path=/d,id=data",
            "--drive",
            "path=/r,root,partuuid=0eaa91a0-01",
            "--console",
            "none",
        ])
        .unwrap()
        .into_resources(Some(&images))
        .unwrap();
        assert_eq!(r.boot_source.as_ref().unwrap().initrd_path, None);
        assert_eq!(r.drives[1].partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(r.serial.console, ConsoleConfig::None);
        let own = parse(&["run", "--kernel", "/k"])
            .unwrap()
            .into_resources(None)
            .unwrap();
        assert_eq!(own.boot_source.unwrap().initrd_path, None);
        let err = parse(&["run", "--vcpus", "300"])
            .unwrap()
            .into_resources(Some(&images))
            .unwrap_err();
        assert!(matches!(err, ConfigError::VcpuCount { requested: 300, .. }));
    }

    #[test]
    fn observability_flags_in_both_modes() {
        let cli = Cli::try_parse_from([
            "kiln",
            "--log-path",
            "/tmp/k.log",
            "--level",
            "warning",
            "--show-level",
            "--metrics-path",
            "/tmp/m.json",
            "--boot-timer",
        ])
        .unwrap();
        let o = &cli.process.observability;
        assert!(o.boot_timer && o.show_level && !o.show_log_origin);
        let logger = o.logger_config().unwrap();
        assert_eq!(logger.level, Some(LogLevel::Warning));
        assert_eq!(logger.log_path, Some(PathBuf::from("/tmp/k.log")));
        assert_eq!(logger.show_level, Some(true));
        assert_eq!(logger.show_log_origin, None);
        assert_eq!(
            o.metrics_config().unwrap().metrics_path,
            PathBuf::from("/tmp/m.json")
        );
        let defaults = Cli::try_parse_from(["kiln"]).unwrap().process.observability;
        assert_eq!(defaults.logger_config(), None);
        assert_eq!(defaults.metrics_config(), None);
        let run = parse(&[
            "run",
            "--boot-timer",
            "--level",
            "DEBUG",
            "--show-log-origin",
        ])
        .unwrap();
        assert!(run.observability.boot_timer);
        assert_eq!(run.observability.level, Some(LogLevel::Debug));
        let err = Cli::try_parse_from(["kiln", "--level", "loud"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("unknown level"), "{err}");
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &["run", "--bogus"][..],
            &["run", "--vcpus", "two"],
            &["run", "--mem-mib", "-1"],
            &["run", "--console", "tty"],
            &["run", "--drive", "ro"],
            &["run", "--drive", "path=/x,bogus"],
            &["run", "--net", "mac=02:00:00:00:00:01"],
            &["run", "--rng", "bw_size=x"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
