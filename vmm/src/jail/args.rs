//! `kiln jail`'s flags (Firecracker's jailer names where they exist) and their validation into a
//! [`JailConfig`] that cannot be invalid.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;

use super::cgroup::{CgroupSetting, CgroupVersion};

/// Firecracker's default `no-file` limit: Kiln's vsock can need more than 1024 fds.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// `kiln jail`'s flags.
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct JailArgs {
    /// The jail's id: 1 to 64 characters of A-Z, a-z, 0-9 and '-'. Names the jail directory
    /// and the cgroup.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The VMM binary to copy into the jail and run there (default: this kiln).
    #[arg(long = "exec-file", value_name = "PATH")]
    pub exec_file: Option<PathBuf>,
    /// The uid the VMM runs as.
    #[arg(long, value_name = "UID")]
    pub uid: u32,
    /// The gid the VMM runs as (it gets no supplementary groups).
    #[arg(long, value_name = "GID")]
    pub gid: u32,
    /// Where jails live: the jail is <DIR>/<exec file name>/<id>/root.
    #[arg(
        long = "chroot-base-dir",
        value_name = "DIR",
        default_value = "/srv/jailer"
    )]
    pub chroot_base_dir: PathBuf,
    /// An existing network namespace for the VMM to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Return once the VMM runs: the supervisor detaches (setsid, stdio on /dev/null).
    #[arg(long)]
    pub daemonize: bool,
    /// Accepted for Firecracker compatibility: Kiln always gives the VMM its own PID namespace.
    #[arg(long = "new-pid-ns")]
    pub new_pid_ns: bool,
    /// A cgroup file and its value, FILE=VALUE (repeatable): memory.max=256M, cpu.max=..,
    /// pids.max=.. on cgroup v2; memory.limit_in_bytes=.., cpu.cfs_quota_us=.., pids.max=..
    /// on v1. The controller is the part before the first dot.
    #[arg(long = "cgroup", value_name = "FILE=VALUE", value_parser = CgroupSetting::parse)]
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup version, 1 or 2 (default: the host's: 2 when /sys/fs/cgroup is cgroup2).
    #[arg(long = "cgroup-version", value_name = "1|2", value_parser = CgroupVersion::parse)]
    pub cgroup_version: Option<CgroupVersion>,
    /// The cgroup the jail's cgroup is made in, relative to each hierarchy's root (default: the
    /// exec file's name).
    #[arg(long = "parent-cgroup", value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,
    /// A resource limit, RES=VALUE (repeatable): fsize (bytes), no-file (default 2048).
    #[arg(long = "resource-limit", value_name = "RES=VALUE", value_parser = ResourceLimit::parse)]
    pub resource_limits: Vec<ResourceLimit>,
    /// Put SRC into the jail root under its file name, as a bind mount private to the jail
    /// (read-only unless `:rw`). Repeatable.
    #[arg(long = "file", value_name = "SRC[:rw]", value_parser = JailFile::parse)]
    pub files: Vec<JailFile>,
    /// Arguments for the VMM (after `--`).
    #[arg(last = true, value_name = "KILN ARGS")]
    pub exec_args: Vec<OsString>,
}

/// Errors in the flags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// `--id` is not 1 to 64 characters of A-Z, a-z, 0-9 and '-'.
    #[error("--id {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9 and '-'")]
    BadId(String),
    /// `--exec-file` (or this kiln) cannot be resolved, is not a regular file, or has a bad name.
    #[error("--exec-file {path}: {reason}")]
    BadExecFile {
        /// The exec file as given.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// `--parent-cgroup` is empty, absolute, or has `.` or `..` components.
    #[error("--parent-cgroup {0}: give a relative path without '.' or '..' components")]
    BadParentCgroup(PathBuf),
    /// `--chroot-base-dir` is not an absolute path.
    #[error("--chroot-base-dir {0}: give an absolute path")]
    RelativeBase(PathBuf),
    /// A `--file` cannot be resolved or has an unusable name.
    #[error("--file {path}: {reason}")]
    BadFile {
        /// The file as given.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// Two `--file`s have the same file name.
    #[error("--file {0}: two files would have that name in the jail root")]
    DuplicateFile(String),
    /// A `--file`'s name is one the jailer itself puts in the jail root.
    #[error("--file {0}: that name is taken in the jail root (the VMM binary, dev, run, lib...)")]
    ReservedName(String),
    /// The same cgroup file is given twice with `--cgroup`.
    #[error("--cgroup {0}: given twice")]
    DuplicateCgroup(String),
}

/// A resource limit the jailed VMM gets (soft and hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    /// RLIMIT_FSIZE, bytes.
    FileSize(u64),
    /// RLIMIT_NOFILE.
    NoFile(u64),
}

impl ResourceLimit {
    /// Parses Firecracker's `fsize=N` / `no-file=N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected RES=VALUE (fsize=N or no-file=N)"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("{s:?}: {value:?} is not a whole number"))?;
        match name {
            "fsize" => Ok(Self::FileSize(value)),
            "no-file" => Ok(Self::NoFile(value)),
            _ => Err(format!(
                "{s:?}: unknown resource {name:?} (fsize or no-file)"
            )),
        }
    }
}

/// A file put into the jail root by a bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    /// The file on the host, as given.
    pub source: PathBuf,
    /// Writable inside the jail.
    pub writable: bool,
}

impl JailFile {
    /// Parses `SRC` or `SRC:rw` (a path that itself ends in `:rw` cannot be given).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (source, writable) = match s.strip_suffix(":rw") {
            Some(source) => (source, true),
            None => (s.strip_suffix(":ro").unwrap_or(s), false),
        };
        if source.is_empty() {
            return Err(format!("{s:?}: no file given"));
        }
        Ok(Self {
            source: source.into(),
            writable,
        })
    }
}

/// A validated `--file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindFile {
    /// Absolute, symlink-free source.
    pub source: PathBuf,
    /// Its name in the jail root.
    pub name: String,
    /// A directory (bound on a directory) rather than a file.
    pub is_dir: bool,
    /// Writable inside the jail (`:rw`).
    pub writable: bool,
}

/// Everything `kiln jail` does, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The jail's id (`--id`).
    pub id: String,
    /// Absolute, symlink-free path of the VMM binary.
    pub exec_file: PathBuf,
    /// Its file name: the name of the copy in the jail root and of the jail's parent directory.
    pub exec_name: String,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// Where jails live (`--chroot-base-dir`); absolute.
    pub chroot_base: PathBuf,
    /// An existing network namespace for the VMM to join.
    pub netns: Option<PathBuf>,
    /// Detach once the VMM runs (`--daemonize`).
    pub daemonize: bool,
    /// The `--cgroup` settings, each file at most once.
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup version asked for; `None` means the host's.
    pub cgroup_version: Option<CgroupVersion>,
    /// The cgroup the jail's cgroup is made in, relative to each hierarchy's root.
    pub parent_cgroup: PathBuf,
    /// RLIMIT_FSIZE in bytes, if limited.
    pub file_size: Option<u64>,
    /// RLIMIT_NOFILE (default 2048).
    pub no_file: u64,
    /// The `--file` bind mounts, with distinct, unreserved names.
    pub files: Vec<BindFile>,
    /// Arguments for the VMM (after `--`).
    pub exec_args: Vec<OsString>,
}

/// The start-up times the jailer hands the VMM, as Firecracker's jailer does, so that the
/// VMM's start-up metrics include the jail's set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchTimes {
    /// When the jailer started, CLOCK_MONOTONIC in microseconds (`--start-time-us`).
    pub start_time_us: u64,
    /// The CPU time the jailer spent before starting the VMM's process
    /// (`--parent-cpu-time-us`). The VMM's own process counts from zero (`--start-time-cpu-us
    /// 0`): a forked process's CPU clock starts there, and covers the jail's set-up in it.
    pub parent_cpu_us: u64,
}

/// Names the jailer itself puts in the jail root, besides the exec file and its pid file.
const RESERVED: [&str; 6] = ["dev", "run", "lib", "lib64", "usr", "sys"];

/// Every name the jailer puts in the jail root for an exec file named `exec_name`: a `--file`
/// may not take one, and an existing root may not hold one.
pub(super) fn names_the_jail_makes(exec_name: &str) -> Vec<String> {
    let mut names = vec![exec_name.to_string(), format!("{exec_name}.pid")];
    names.extend(RESERVED.map(String::from));
    names
}

/// Whether `id` is a valid jail id (Firecracker's rule).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A parent cgroup path that stays inside the hierarchy.
fn valid_parent_cgroup(path: &Path) -> bool {
    use std::path::Component;
    path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

impl JailArgs {
    /// Checks the flags and resolves paths; touches nothing.
    pub fn validate(self) -> Result<JailConfig, ArgsError> {
        if !valid_id(&self.id) {
            return Err(ArgsError::BadId(self.id));
        }
        let exec_given = match self.exec_file {
            Some(path) => path,
            None => std::env::current_exe().map_err(|e| ArgsError::BadExecFile {
                path: PathBuf::from("(this kiln)"),
                reason: e.to_string(),
            })?,
        };
        let bad_exec = |reason: String| ArgsError::BadExecFile {
            path: exec_given.clone(),
            reason,
        };
        let exec_file = std::fs::canonicalize(&exec_given).map_err(|e| bad_exec(e.to_string()))?;
        if !exec_file.is_file() {
            return Err(bad_exec("not a regular file".into()));
        }
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !RESERVED.contains(n))
            .ok_or_else(|| bad_exec("its file name must be UTF-8 and not a reserved name".into()))?
            .to_string();
        if !self.chroot_base_dir.is_absolute() {
            return Err(ArgsError::RelativeBase(self.chroot_base_dir));
        }
        let parent_cgroup = self
            .parent_cgroup
            .unwrap_or_else(|| PathBuf::from(&exec_name));
        if !valid_parent_cgroup(&parent_cgroup) {
            return Err(ArgsError::BadParentCgroup(parent_cgroup));
        }
        for (i, setting) in self.cgroups.iter().enumerate() {
            if self.cgroups[..i].iter().any(|s| s.file == setting.file) {
                return Err(ArgsError::DuplicateCgroup(setting.file.clone()));
            }
        }
        let mut file_size = None;
        let mut no_file = DEFAULT_NO_FILE;
        for limit in self.resource_limits {
            match limit {
                ResourceLimit::FileSize(n) => file_size = Some(n),
                ResourceLimit::NoFile(n) => no_file = n,
            }
        }
        let taken = names_the_jail_makes(&exec_name);
        let mut files: Vec<BindFile> = Vec::new();
        for file in self.files {
            let bind = validate_file(file)?;
            if taken.contains(&bind.name) {
                return Err(ArgsError::ReservedName(bind.name));
            }
            if files.iter().any(|f| f.name == bind.name) {
                return Err(ArgsError::DuplicateFile(bind.name));
            }
            files.push(bind);
        }
        Ok(JailConfig {
            id: self.id,
            exec_file,
            exec_name,
            uid: self.uid,
            gid: self.gid,
            chroot_base: self.chroot_base_dir,
            netns: self.netns,
            daemonize: self.daemonize,
            cgroups: self.cgroups,
            cgroup_version: self.cgroup_version,
            parent_cgroup,
            file_size,
            no_file,
            files,
            exec_args: self.exec_args,
        })
    }
}

fn validate_file(file: JailFile) -> Result<BindFile, ArgsError> {
    let bad = |reason: String| ArgsError::BadFile {
        path: file.source.clone(),
        reason,
    };
    let source = std::fs::canonicalize(&file.source).map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(&source).map_err(|e| bad(e.to_string()))?;
    let name = source
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| bad("its file name must be UTF-8 and not start with '.'".into()))?
        .to_string();
    Ok(BindFile {
        source,
        name,
        is_dir: meta.is_dir(),
        writable: file.writable,
    })
}

impl JailConfig {
    /// `<chroot-base-dir>/<exec-file-name>/<id>`: what the jail owns and removes at the end.
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base.join(&self.exec_name).join(&self.id)
    }

    /// `<jail dir>/root`: the VMM's `/`.
    pub fn root_dir(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// The VMM's argv: `/<exec-file-name>`, `--id <id>` as Firecracker's jailer passes it (only
    /// when the VMM runs in its process mode, i.e. the arguments do not start with a
    /// subcommand, and do not set `--id` themselves) and, in process mode, the `launch` times
    /// as `--start-time-us`, `--start-time-cpu-us` and `--parent-cpu-time-us` (unless the
    /// arguments set them); then the arguments after `--`.
    pub fn vmm_argv(&self, launch: Option<LaunchTimes>) -> Vec<OsString> {
        let mut argv = vec![OsString::from(format!("/{}", self.exec_name))];
        let process_mode = self
            .exec_args
            .first()
            .is_none_or(|a| a.to_string_lossy().starts_with('-'));
        let has_id = self
            .exec_args
            .iter()
            .any(|a| a == "--id" || a.to_string_lossy().starts_with("--id="));
        if process_mode && !has_id {
            argv.push("--id".into());
            argv.push(self.id.clone().into());
        }
        let has_times = self
            .exec_args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--start-time-us"));
        if let Some(times) = launch.filter(|_| process_mode && !has_times) {
            for (flag, value) in [
                ("--start-time-us", times.start_time_us),
                ("--start-time-cpu-us", 0),
                ("--parent-cpu-time-us", times.parent_cpu_us),
            ] {
                argv.push(flag.into());
                argv.push(value.to_string().into());
            }
        }
        argv.extend(self.exec_args.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<JailArgs, clap::Error> {
        let cli = Cli::try_parse_from(["kiln", "jail"].iter().chain(args.iter()))?;
        match cli.command {
            Some(Command::Jail(jail)) => Ok(jail),
            other => panic!("not a jail command: {other:?}"),
        }
    }

    const BASE: [&str; 6] = ["--id", "vm-1", "--uid", "123", "--gid", "456"];

    fn with_base(extra: &[&str]) -> Vec<String> {
        BASE.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    }

    fn parse_base(extra: &[&str]) -> Result<JailArgs, clap::Error> {
        let args = with_base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        parse(&refs)
    }

    #[test]
    fn defaults_are_firecrackers() {
        let args = parse_base(&[]).unwrap();
        assert_eq!(args.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert!(!args.daemonize && !args.new_pid_ns && args.netns.is_none());
        let config = args.validate().unwrap();
        assert_eq!(
            config.exec_file,
            std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap()
        );
        assert_eq!(config.parent_cgroup, PathBuf::from(&config.exec_name));
        assert_eq!(config.no_file, DEFAULT_NO_FILE);
        assert_eq!(config.file_size, None);
        assert_eq!(config.cgroup_version, None);
        assert_eq!(
            config.root_dir(),
            PathBuf::from("/srv/jailer")
                .join(&config.exec_name)
                .join("vm-1/root")
        );
    }

    #[test]
    fn every_flag() {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        let args = parse_base(&[
            "--exec-file",
            exe,
            "--chroot-base-dir",
            "/tmp/jails",
            "--netns",
            "/var/run/netns/blue",
            "--daemonize",
            "--new-pid-ns",
            "--cgroup",
            "memory.max=256M",
            "--cgroup",
            "pids.max=64",
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "vms/kiln",
            "--resource-limit",
            "fsize=1000",
            "--resource-limit",
            "no-file=4096",
            "--file",
            exe,
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .unwrap();
        assert_eq!(args.cgroups.len(), 2);
        assert_eq!(args.cgroups[0].controller(), "memory");
        assert_eq!(args.cgroups[1].value, "64");
        assert_eq!(args.cgroup_version, Some(CgroupVersion::V2));
        let err = args.validate().unwrap_err();
        // The --file has the exec file's name.
        assert!(matches!(err, ArgsError::ReservedName(_)), "{err}");
        let args = parse_base(&[
            "--chroot-base-dir",
            "/tmp/jails",
            "--daemonize",
            "--resource-limit",
            "fsize=1000",
            "--resource-limit",
            "no-file=4096",
            "--parent-cgroup",
            "vms/kiln",
            "--file",
            "/etc/hostname:rw",
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .unwrap();
        let config = args.validate().unwrap();
        assert!(config.daemonize);
        assert_eq!((config.file_size, config.no_file), (Some(1000), 4096));
        assert_eq!(config.parent_cgroup, PathBuf::from("vms/kiln"));
        assert_eq!(config.files.len(), 1);
        assert_eq!(config.files[0].name, "hostname");
        assert!(config.files[0].writable && !config.files[0].is_dir);
        let argv = config.vmm_argv(None);
        let expected: Vec<OsString> = [
            format!("/{}", config.exec_name).as_str(),
            "--id",
            "vm-1",
            "--api-sock",
            "/api.sock",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(argv, expected);
    }

    #[test]
    fn id_is_not_added_for_subcommands_or_when_given() {
        let run = parse_base(&["--", "run", "--kernel", "/vmlinux"]).unwrap();
        let times = Some(LaunchTimes {
            start_time_us: 12,
            parent_cpu_us: 3,
        });
        let argv = run.validate().unwrap().vmm_argv(times);
        assert_eq!(argv[1], "run");
        assert_eq!(
            argv.len(),
            4,
            "no process flags before a subcommand: {argv:?}"
        );
        let own = parse_base(&["--", "--id", "other"]).unwrap();
        let argv = own.validate().unwrap().vmm_argv(None);
        assert_eq!(&argv[1..], &[OsString::from("--id"), "other".into()]);
        let none = parse_base(&[]).unwrap().validate().unwrap().vmm_argv(None);
        assert_eq!(&none[1..], &[OsString::from("--id"), "vm-1".into()]);
        // Firecracker's jailer passes its start-up times to a VMM in process mode.
        let timed = parse_base(&["--", "--api-sock", "/a"]).unwrap();
        let argv = timed.validate().unwrap().vmm_argv(times);
        let expected: Vec<OsString> = [
            "--id",
            "vm-1",
            "--start-time-us",
            "12",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "3",
            "--api-sock",
            "/a",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(&argv[1..], &expected[..]);
    }

    #[test]
    fn ids() {
        assert!(valid_id("a") && valid_id("551e7604-e35c-42b3-b825-416853441234"));
        assert!(valid_id(&"x".repeat(64)));
        for bad in ["", "a/b", "..", "a_b", "a b", "ä", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
            let err = parse(&["--id", bad, "--uid", "1", "--gid", "1"])
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(matches!(err, ArgsError::BadId(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bad_input() {
        // clap refuses these (exit status 2): a required flag missing or not a number...
        for args in [
            &["--uid", "1", "--gid", "1"][..],
            &["--id", "a", "--gid", "1"],
            &["--id", "a", "--uid", "-1", "--gid", "1"],
            &["--id", "a", "--uid", "1", "--gid", "x"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        // ...and values its parsers refuse.
        for extra in [
            ["--cgroup", "memory.max"],
            ["--cgroup", "=1"],
            ["--cgroup", "memory.max="],
            ["--cgroup", "../x.y=1"],
            ["--cgroup", "memory.max=1\n2"],
            ["--cgroup-version", "3"],
            ["--resource-limit", "cpu=1"],
            ["--resource-limit", "fsize"],
            ["--resource-limit", "fsize=-1"],
            ["--file", ":rw"],
        ] {
            let err = parse_base(&extra).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{extra:?}");
        }
        // Validation refuses these.
        type Check = fn(&ArgsError) -> bool;
        let cases: [(&[&str], Check); 6] = [
            (&["--exec-file", "/nonexistent/kiln"], |e| {
                matches!(e, ArgsError::BadExecFile { .. })
            }),
            (&["--exec-file", "/"], |e| {
                matches!(e, ArgsError::BadExecFile { .. })
            }),
            (&["--parent-cgroup", "../x"], |e| {
                matches!(e, ArgsError::BadParentCgroup(_))
            }),
            (&["--parent-cgroup", "/x"], |e| {
                matches!(e, ArgsError::BadParentCgroup(_))
            }),
            (
                &["--file", "/etc/hostname", "--file", "/etc/hostname:rw"],
                |e| matches!(e, ArgsError::DuplicateFile(_)),
            ),
            (&["--cgroup", "pids.max=1", "--cgroup", "pids.max=2"], |e| {
                matches!(e, ArgsError::DuplicateCgroup(_))
            }),
        ];
        for (extra, expected) in cases {
            let err = parse_base(extra).unwrap().validate().unwrap_err();
            assert!(expected(&err), "{extra:?}: {err}");
        }
        let err = parse_base(&["--chroot-base-dir", "jails"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err, ArgsError::RelativeBase("jails".into()));
    }

    #[test]
    fn jail_files() {
        assert_eq!(
            JailFile::parse("/a/b:rw").unwrap(),
            JailFile {
                source: "/a/b".into(),
                writable: true
            }
        );
        assert!(!JailFile::parse("/a/b:ro").unwrap().writable);
        assert!(!JailFile::parse("/a/b").unwrap().writable);
        let dir = parse_base(&["--file", "/etc"]).unwrap().validate().unwrap();
        assert!(dir.files[0].is_dir);
        let err = parse_base(&["--file", "/dev"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err, ArgsError::ReservedName("dev".into()));
    }

    #[test]
    fn resource_limits() {
        assert_eq!(
            ResourceLimit::parse("fsize=10"),
            Ok(ResourceLimit::FileSize(10))
        );
        assert_eq!(
            ResourceLimit::parse("no-file=7"),
            Ok(ResourceLimit::NoFile(7))
        );
        assert!(ResourceLimit::parse("nofile=7").is_err());
    }
}
