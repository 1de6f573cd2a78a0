//! `kiln jail`: Kiln's jailer, with Firecracker's jailer flags where they exist.
//!
//! Reading order: [`args`] (the flags, validated) → [`cgroup`] (limits) → [`jail_dir`] (the
//! directory the VMM sees as `/`) → [`supervisor`] (fork into a new PID namespace, forward
//! signals, wait, clean up) → [`child`] (namespaces, `pivot_root`, privileges, exec).
//!
//! Unlike Firecracker's jailer, which execs the VMM, `kiln jail` stays as a small supervisor
//! outside the jail so that it can remove the jail directory and the cgroups when the VMM ends.

pub mod args;
pub mod cgroup;
pub mod child;
pub mod jail_dir;
pub mod supervisor;

use std::process::ExitCode;

use nix::sys::signal::SigmaskHow;

pub use args::JailArgs;
use cgroup::{CgroupError, CgroupPlan, CgroupVersion};
use jail_dir::{JailDir, JailDirError};
use supervisor::Jail;

/// Exit status for a bad request (flags, not root, an id in use).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the jail could not be set up.
const EXIT_FAILURE: u8 = 1;

/// Errors of `kiln jail` itself (the VMM reports its own).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The flags are invalid.
    #[error(transparent)]
    Args(#[from] args::ArgsError),
    /// `kiln jail` is not running as root.
    #[error("kiln jail must run as root: it makes namespaces, device nodes and cgroups, then drops to --uid/--gid")]
    NotRoot,
    /// The process has more than one thread at start (how many it found).
    #[error("internal error: kiln jail must start before any other thread (found {0})")]
    Threads(usize),
    /// The jail's cgroups could not be made or removed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The jail directory could not be made or removed.
    #[error(transparent)]
    JailDir(#[from] JailDirError),
    /// An argument for the VMM contains a NUL byte.
    #[error("an argument for the VMM contains a NUL byte: {0:?}")]
    NulInArgument(String),
    /// A system call failed: which one, and why.
    #[error("{0}: {1}")]
    Sys(&'static str, #[source] nix::Error),
    /// An I/O operation failed: what was being done, and why.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The VMM's process could not enter the jail; the message it sent back.
    #[error("setting up the jail: {0}")]
    Setup(String),
}

impl JailError {
    /// `map_err` helper for a failed system call.
    pub fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Self {
        move |e| Self::Sys(what, e)
    }

    fn exit_code(&self) -> u8 {
        match self {
            Self::Args(_)
            | Self::NotRoot
            | Self::NulInArgument(_)
            | Self::Cgroup(
                CgroupError::NoController { .. }
                | CgroupError::V2ControllerUnavailable { .. }
                | CgroupError::NoSuchFile { .. }
                | CgroupError::NoHierarchy(_)
                | CgroupError::InUse(_),
            )
            | Self::JailDir(
                JailDirError::InUse(_)
                | JailDirError::Leftover { .. }
                | JailDirError::NoDev(_)
                | JailDirError::NotElf(_),
            ) => EXIT_BAD_INPUT,
            _ => EXIT_FAILURE,
        }
    }
}

/// Runs `kiln jail`: its exit status is the VMM's (128+N when signal N killed it), 2 for a bad
/// request and 1 when the jail could not be set up, each failure with one `kiln jail: ...` line.
pub fn main(args: JailArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln jail: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(args: JailArgs) -> Result<ExitCode, JailError> {
    let started_us = crate::startup_clock::monotonic_us();
    let config = args.validate()?;
    if !nix::unistd::geteuid().is_root() {
        return Err(JailError::NotRoot);
    }
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    // From here a stop signal waits (pending) until the supervisor can forward it.
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&supervisor::supervised_signals()),
        None,
    )
    .map_err(JailError::sys("sigprocmask"))?;
    let plan = if config.cgroups.is_empty() {
        None
    } else {
        let version = config.cgroup_version.unwrap_or_else(CgroupVersion::detect);
        let mounts = cgroup::host_mounts()?;
        Some(CgroupPlan::new(
            version,
            &mounts,
            &config.parent_cgroup,
            &config.id,
            &config.cgroups,
        )?)
    };
    let dir = JailDir::prepare(&config)?;
    let cgroups = match plan.map(|p| p.create()).transpose() {
        Ok(cgroups) => cgroups.unwrap_or_default(),
        Err(e) => {
            let _ = dir.remove();
            return Err(e.into());
        }
    };
    let jail = Jail {
        dir,
        cgroups,
        started_us,
    };
    let report = if config.daemonize {
        match supervisor::daemonize() {
            Ok(report) => Some(report),
            Err(e) => {
                let _ = jail.remove();
                return Err(e);
            }
        }
    } else {
        None
    };
    supervisor::supervise(&config, &jail, report)
}
