//! What the VMM's process does between `fork` and `exec`, as PID 1 of its new PID namespace:
//! join the cgroups and the network namespace, make a private mount namespace, bind the jail
//! root and the `--file`s, `pivot_root` into it, set the rlimits, drop every fd it inherited
//! and every privilege, then exec the VMM.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, execve, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

/// One `--file` bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host file or directory to bind (absolute, symlink-free).
    pub source: PathBuf,
    /// The placeholder in the jail root (host path).
    pub target: PathBuf,
    /// Bind read-write; otherwise read-only.
    pub writable: bool,
}

/// Everything the child needs, prepared before `fork` (so the child only makes system calls).
#[derive(Debug, Clone)]
pub struct ChildPlan {
    /// The jail root (host path), which becomes the VMM's `/`.
    pub root: PathBuf,
    /// The `cgroup.procs` files to write `0` to, to join the jail's cgroups.
    pub cgroup_procs: Vec<PathBuf>,
    /// A network namespace to join, if given.
    pub netns: Option<PathBuf>,
    /// The `--file` bind mounts.
    pub binds: Vec<Bind>,
    /// The uid to drop to.
    pub uid: u32,
    /// The gid to drop to.
    pub gid: u32,
    /// RLIMIT_FSIZE in bytes, if limited.
    pub file_size: Option<u64>,
    /// RLIMIT_NOFILE.
    pub no_file: u64,
    /// The VMM binary's path inside the jail.
    pub exec: CString,
    /// The VMM's argv (see `JailConfig::vmm_argv`).
    pub argv: Vec<CString>,
}

/// A step that failed; the child reports it on its error pipe and exits.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct ChildError {
    step: String,
    #[source]
    source: std::io::Error,
}

fn step<E: Into<std::io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> ChildError {
    let step = step.into();
    move |e| ChildError {
        step,
        source: e.into(),
    }
}

/// Enters the jail and execs the VMM; returns only on failure. `keep_fd` (the error pipe,
/// close-on-exec) is the one fd above stderr that stays open until the exec.
pub fn enter_and_exec(plan: &ChildPlan, keep_fd: RawFd) -> ChildError {
    match enter(plan, keep_fd) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn enter(plan: &ChildPlan, keep_fd: RawFd) -> Result<std::convert::Infallible, ChildError> {
    // Die with the supervisor from the start (set again below: a uid change clears it).
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("prctl(PR_SET_PDEATHSIG)"))?;
    close_inherited_fds(keep_fd).map_err(step("closing inherited fds"))?;
    for procs in &plan.cgroup_procs {
        std::fs::write(procs, "0").map_err(step(format!("joining cgroup {}", procs.display())))?;
    }
    if let Some(netns) = &plan.netns {
        // Nonblocking: a FIFO given as the namespace must not hang the child (and with it the
        // supervisor, whose stop signals are masked); setns refuses what is not a namespace.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(netns)
            .map_err(step(format!(
                "opening network namespace {}",
                netns.display()
            )))?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(step(format!(
            "joining network namespace {}",
            netns.display()
        )))?;
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare(CLONE_NEWNS)"))?;
    // Nothing mounted from here on reaches the host, and nothing of the host's reaches us.
    mount_flags(None, Path::new("/"), MsFlags::MS_REC | MsFlags::MS_PRIVATE)
        .map_err(step("making / private"))?;
    // pivot_root needs the new root to be a mount point.
    mount_flags(
        Some(&plan.root),
        &plan.root,
        MsFlags::MS_BIND | MsFlags::MS_REC,
    )
    .map_err(step(format!("bind-mounting {}", plan.root.display())))?;
    for bind in &plan.binds {
        bind_file(bind).map_err(step(format!(
            "bind-mounting {} into the jail",
            bind.source.display()
        )))?;
    }
    chdir(&plan.root).map_err(step("chdir into the jail"))?;
    // The old root ends up under the new one; detach it and only the jail is left.
    pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    chdir("/").map_err(step("chdir /"))?;
    setrlimit(Resource::RLIMIT_NOFILE, plan.no_file, plan.no_file)
        .map_err(step(format!("setrlimit(RLIMIT_NOFILE, {})", plan.no_file)))?;
    if let Some(size) = plan.file_size {
        setrlimit(Resource::RLIMIT_FSIZE, size, size)
            .map_err(step(format!("setrlimit(RLIMIT_FSIZE, {size})")))?;
    }
    let (uid, gid) = (Uid::from_raw(plan.uid), Gid::from_raw(plan.gid));
    setgroups(&[]).map_err(step("setgroups([])"))?;
    setresgid(gid, gid, gid).map_err(step(format!("setresgid({gid})")))?;
    setresuid(uid, uid, uid).map_err(step(format!("setresuid({uid})")))?;
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("prctl(PR_SET_PDEATHSIG)"))?;
    prctl::set_no_new_privs().map_err(step("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    // The supervisor blocks the signals it forwards; the VMM starts with none blocked and
    // SIGPIPE at its default (Rust's runtime ignores it in the supervisor).
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(step("sigprocmask"))?;
    // SAFETY: installs the default disposition, no handler; nothing else runs in this process.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
        .map_err(step("signal(SIGPIPE)"))?;
    let env: [CString; 0] = [];
    execve(&plan.exec, &plan.argv, &env).map_err(step(format!(
        "exec {} in the jail",
        plan.exec.to_string_lossy()
    )))
}

fn mount_flags(source: Option<&Path>, target: &Path, flags: MsFlags) -> nix::Result<()> {
    mount(source, target, None::<&str>, flags, None::<&str>)
}

/// Binds `bind.source` on its placeholder, then remounts it nosuid, noexec and (unless
/// writable) read-only, keeping the source mount's nodev and read-only.
fn bind_file(bind: &Bind) -> nix::Result<()> {
    mount_flags(Some(&bind.source), &bind.target, MsFlags::MS_BIND)?;
    let source_flags = statvfs(&bind.target)?.flags();
    let mut flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    if !bind.writable || source_flags.contains(FsFlags::ST_RDONLY) {
        flags |= MsFlags::MS_RDONLY;
    }
    if source_flags.contains(FsFlags::ST_NODEV) {
        flags |= MsFlags::MS_NODEV;
    }
    mount_flags(None, &bind.target, flags)
}

/// Closes every fd above stderr except `keep` (close_range(2)).
fn close_inherited_fds(keep: RawFd) -> std::io::Result<()> {
    let keep = u32::try_from(keep).map_err(|_| std::io::Error::other("negative fd"))?;
    let ranges = [
        (3, keep.saturating_sub(1)),
        (keep.saturating_add(1), u32::MAX),
    ];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range only closes descriptors, and from here on this process uses none
        // it inherited but `keep` and stdio (it opens what it needs afterwards).
        if unsafe { libc::close_range(first, last, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
