//! The supervisor: the jailer process that stays outside the jail. It forks the VMM's process
//! into a new PID namespace, forwards stop signals to it, waits for it, removes the jail and
//! exits with the VMM's status.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid, ForkResult, Pid};

use super::args::{JailConfig, LaunchTimes};
use super::cgroup::Cgroups;
use super::child::{enter_and_exec, Bind, ChildPlan};
use super::jail_dir::JailDir;
use super::JailError;
use crate::startup_clock::process_cpu_us;

/// The signals the supervisor passes on to the VMM.
const FORWARDED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// How long the VMM has to exit after a forwarded signal before it gets SIGKILL. (A VMM that has
/// not yet installed its handlers ignores the signal: it is PID 1 of its namespace.)
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The signals the supervisor blocks from its start and reads from a signalfd.
pub fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// What the jail made on the host.
#[derive(Debug)]
pub struct Jail {
    /// The jail directory, locked while this lives.
    pub dir: JailDir,
    /// The jail's cgroup directories.
    pub cgroups: Cgroups,
    /// When the jailer started (CLOCK_MONOTONIC, microseconds), for the VMM's start-up metrics.
    pub started_us: Option<u64>,
}

impl Jail {
    /// Removes the cgroups and the jail directory (both are tried).
    pub fn remove(&self) -> Result<(), JailError> {
        let cgroups = self.cgroups.remove();
        self.dir.remove()?;
        Ok(cgroups?)
    }
}

/// Detaches: the calling process waits until the supervisor reports the VMM running (exit 0)
/// or failed (its message, exit 1); the supervisor continues in a new session with stdio on
/// /dev/null. Returns, in the supervisor, where to report.
pub fn daemonize() -> Result<File, JailError> {
    let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC).map_err(JailError::sys("pipe2"))?;
    let dev_null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| JailError::Io("opening /dev/null", e))?;
    // SAFETY: kiln jail runs single-threaded (checked at its start), so the child may run any code.
    match unsafe { fork() }.map_err(JailError::sys("fork"))? {
        ForkResult::Parent { .. } => {
            drop(ready_w);
            let mut report = String::new();
            let _ = File::from(ready_r).read_to_string(&mut report);
            if report == READY {
                std::process::exit(0);
            }
            if report.is_empty() {
                report = "the jail's supervisor ended before the VMM started".into();
            }
            eprintln!("kiln jail: {report}");
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(ready_r);
            setsid().map_err(JailError::sys("setsid"))?;
            dup2_stdin(&dev_null).map_err(JailError::sys("dup2"))?;
            dup2_stdout(&dev_null).map_err(JailError::sys("dup2"))?;
            dup2_stderr(&dev_null).map_err(JailError::sys("dup2"))?;
            Ok(File::from(ready_w))
        }
    }
}

/// What the supervisor writes to the daemonizing parent once the VMM runs.
const READY: &str = "ready";

/// Runs the VMM in the jail and supervises it; removes the jail when it is gone. `report` (with
/// `--daemonize`) hears "ready" or the failure.
pub fn supervise(
    config: &JailConfig,
    jail: &Jail,
    report: Option<File>,
) -> Result<ExitCode, JailError> {
    let result = run_vmm(config, jail, report);
    let removed = jail.remove();
    match (result, removed) {
        (Err(e), Err(removal)) => {
            eprintln!("kiln jail: {removal}");
            Err(e)
        }
        (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
        (Ok(code), Ok(())) => Ok(code),
    }
}

fn child_plan(
    config: &JailConfig,
    jail: &Jail,
    started_us: Option<u64>,
) -> Result<ChildPlan, JailError> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes)
            .map_err(|_| JailError::NulInArgument(String::from_utf8_lossy(bytes).into()))
    };
    let launch = started_us.map(|start_time_us| LaunchTimes {
        start_time_us,
        parent_cpu_us: process_cpu_us().unwrap_or(0),
    });
    let argv = config
        .vmm_argv(launch)
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChildPlan {
        root: jail.dir.root.clone(),
        cgroup_procs: jail.cgroups.procs_files(),
        netns: config.netns.clone(),
        binds: config
            .files
            .iter()
            .map(|f| Bind {
                source: f.source.clone(),
                target: jail.dir.root.join(&f.name),
                writable: f.writable,
            })
            .collect(),
        uid: config.uid,
        gid: config.gid,
        file_size: config.file_size,
        no_file: config.no_file,
        exec: cstring(format!("/{}", config.exec_name).as_bytes())?,
        argv,
    })
}

fn run_vmm(config: &JailConfig, jail: &Jail, report: Option<File>) -> Result<ExitCode, JailError> {
    let tell = |report: Option<File>, message: &str| {
        if let Some(mut report) = report {
            let _ = report.write_all(message.as_bytes());
        }
    };
    let plan = child_plan(config, jail, jail.started_us)?;
    // The next child is PID 1 of a new PID namespace.
    unshare(CloneFlags::CLONE_NEWPID).map_err(JailError::sys("unshare(CLONE_NEWPID)"))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(JailError::sys("pipe2"))?;
    // SAFETY: kiln jail runs single-threaded (checked at its start), so the child may run any code.
    let child = match unsafe { fork() }.map_err(JailError::sys("fork"))? {
        ForkResult::Child => {
            drop(err_r);
            let error = enter_and_exec(&plan, err_w.as_raw_fd());
            let _ = File::from(err_w).write_all(error.to_string().as_bytes());
            std::process::exit(1);
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_w);
    // The pipe closes on the exec (close-on-exec) or carries why the child could not get there.
    let mut setup_error = String::new();
    let _ = File::from(err_r).read_to_string(&mut setup_error);
    if !setup_error.is_empty() {
        let _ = waitpid(child, None);
        let error = JailError::Setup(setup_error);
        tell(report, &error.to_string());
        return Err(error);
    }
    if let Err(e) = jail.dir.write_pid(child.as_raw()) {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        tell(report, &e.to_string());
        return Err(e.into());
    }
    tell(report, READY);
    let status = wait_forwarding(child)?;
    Ok(match status {
        WaitStatus::Exited(_, code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        WaitStatus::Signaled(_, signal, _) => {
            eprintln!("kiln jail: the VMM (pid {child}) was killed by {signal}");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        _ => ExitCode::from(1),
    })
}

/// Waits for `child` to end, passing on stop signals (and SIGKILL if it has not ended
/// [`STOP_GRACE`] after the first).
fn wait_forwarding(child: Pid) -> Result<WaitStatus, JailError> {
    let signals = SignalFd::with_flags(
        &supervised_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .map_err(JailError::sys("signalfd"))?;
    let mut kill_at: Option<Instant> = None;
    loop {
        let status =
            waitpid(child, Some(WaitPidFlag::WNOHANG)).map_err(JailError::sys("waitpid"))?;
        if let WaitStatus::Exited(..) | WaitStatus::Signaled(..) = status {
            return Ok(status);
        }
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(250u16)) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(JailError::sys("poll")(e)),
        }
        while let Some(info) = signals
            .read_signal()
            .map_err(JailError::sys("signalfd read"))?
        {
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if FORWARDED.contains(&signal) {
                let _ = kill(child, signal);
                kill_at.get_or_insert_with(|| Instant::now() + STOP_GRACE);
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            eprintln!(
                "kiln jail: the VMM did not stop within {} s of the signal; killing it",
                STOP_GRACE.as_secs()
            );
            let _ = kill(child, Signal::SIGKILL);
            kill_at = None;
        }
    }
}
