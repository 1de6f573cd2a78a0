//! `kiln run [flags] -- CMD [ARGS...]`: run one command in a throw-away VM, as a CI job runs its
//! tests on the host.
//!
//! Kiln stays a small supervisor here and runs the VM in a child Kiln process (the ordinary
//! `--config-file` boot, with its seccomp filters), so that whatever happens to the VM, this
//! process is left to report it and to clean up. In order:
//! 1. check the shares, find the guest images and virtiofsd (installing it if needed), make a
//!    private temporary directory;
//! 2. start one virtiofsd per share (and one for the host's `/` with `--host-root`);
//! 3. listen on the vsock ports of [`protocol`] and start the VM with the run init as its
//!    initramfs, a virtio-fs device per share and a vsock device;
//! 4. send the guest the [`protocol::RunSpec`], carry stdin, stdout and stderr byte for byte,
//!    and wait for the command's status, the VM's end, a daemon's death, the timeout or a
//!    signal, whichever comes first;
//! 5. stop the VM and the daemons, remove the temporary directory, and exit with the command's
//!    status: 124 on `--timeout`, 128+N for signal N (to the command or to Kiln), and
//!    [`EXIT_RUN_FAILED`] with one `kiln: ...` line when Kiln or the VM failed.

pub mod protocol;
mod share;
pub mod virtiofsd;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

pub use share::Share;

use api::models::Drive;
use devices::virtio::fs::FsConfig;

use crate::cli::RunArgs;
use crate::config::ConsoleConfig;
use crate::device_config::VsockConfig;
use crate::guest_images::{default_guest, GuestImages};
use protocol::{GuestShare, Outcome, Root, RunSpec};

/// Kiln's exit status when it or the VM failed before the command's status was known
/// (`docker run`'s choice: it stays clear of a command's own 1, 2, 126, 127 and 128+N).
pub const EXIT_RUN_FAILED: u8 = 125;
/// `--timeout` ran out (`timeout(1)`'s status).
pub const EXIT_TIMEOUT: u8 = 124;

/// The guest's vsock context id (any will do: the VM has one device).
const GUEST_CID: u64 = 3;
/// The kernel command line of a command's VM: quiet (the console is hidden anyway, and an
/// emulated guest's printk is slow), the run init from the initramfs.
const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 pci=off nomodule rdinit=/init";
/// How long the output streams may take to reach their end once the VM is gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VM gets to end by itself once the command's status is known.
const VM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command's VM could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A share that cannot be shared.
    #[error("--share {share}: {why}")]
    Share {
        /// The share as given.
        share: String,
        /// Why.
        why: String,
    },
    /// A flag that does not go with a command.
    #[error("{0}")]
    Usage(String),
    /// The guest images could not be found or built.
    #[error(transparent)]
    Images(#[from] crate::guest_images::GuestImagesError),
    /// The spec cannot be sent.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// A host operation failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// True for errors in what the user gave (exit status 2, as for any bad flag).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Share { .. } | Self::Usage(_) | Self::Protocol(_)
        )
    }
}

fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Host { what, source }
}

/// A share, resolved: what virtiofsd serves and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResolvedShare {
    host_dir: PathBuf,
    guest: GuestShare,
}

/// Checks the shares (each an existing directory) and gives each its tag and guest path; the
/// default share (the current directory) when there are none, unless that is `/`.
fn resolve_shares(shares: &[Share], cwd: &Path) -> Result<Vec<ResolvedShare>, RunError> {
    let defaulted;
    let shares = if shares.is_empty() && cwd != Path::new("/") {
        defaulted = [Share::current_dir(cwd)];
        &defaulted[..]
    } else {
        shares
    };
    let mut resolved: Vec<ResolvedShare> = Vec::new();
    for (index, share) in shares.iter().enumerate() {
        let fail = |why: String| RunError::Share {
            share: share.host_dir.display().to_string(),
            why,
        };
        let host_dir = cwd
            .join(&share.host_dir)
            .canonicalize()
            .map_err(|e| fail(e.to_string()))?;
        if !host_dir.is_dir() {
            return Err(fail("not a directory".into()));
        }
        let guest_dir = match &share.guest_dir {
            Some(dir) => dir.clone(),
            None => host_dir
                .to_str()
                .ok_or_else(|| fail("the path is not UTF-8: give a GUEST_DIR".into()))?
                .to_string(),
        };
        if guest_dir == "/" {
            return Err(fail(
                "it would be mounted on the guest's / (use --host-root)".into(),
            ));
        }
        if resolved.iter().any(|r| r.guest.guest_dir == guest_dir) {
            return Err(fail(format!("a second share at {guest_dir}")));
        }
        resolved.push(ResolvedShare {
            host_dir,
            guest: GuestShare {
                tag: format!("kiln-share-{index}"),
                guest_dir,
                read_only: share.read_only,
            },
        });
    }
    Ok(resolved)
}

/// The command's working directory in the guest: the current directory where a share shows it
/// (at the same place inside the share), else `/`.
fn guest_cwd(shares: &[ResolvedShare], cwd: &Path) -> String {
    let cwd = cwd.canonicalize().unwrap_or_else(|_| cwd.to_path_buf());
    for share in shares {
        if let Ok(rest) = cwd.strip_prefix(&share.host_dir) {
            if rest.as_os_str().is_empty() {
                return share.guest.guest_dir.clone();
            }
            let dir = Path::new(&share.guest.guest_dir).join(rest);
            if let Some(dir) = dir.to_str() {
                return dir.to_string();
            }
        }
    }
    // Elsewhere it may not exist in the guest, or be hidden (the guest's own /tmp and /run).
    "/".to_string()
}

/// The command's environment: the host's PATH and TERM with the host's root (its programs are
/// there), a standard PATH in the default guest.
fn guest_env(host_root: bool) -> Vec<(String, String)> {
    let default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string();
    let path = match std::env::var("PATH") {
        Ok(path) if host_root => path,
        _ => default_path,
    };
    let mut env = vec![
        ("PATH".to_string(), path),
        ("HOME".to_string(), "/root".to_string()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".to_string(), term));
    }
    env
}

/// The last `lines` lines of a file, indented, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text);
    let mut last: VecDeque<&str> = VecDeque::with_capacity(lines);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if last.len() == lines {
            last.pop_front();
        }
        last.push_back(line);
    }
    last.iter().map(|l| format!("\n    {l}")).collect()
}

/// A private directory for the sockets and logs, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self, RunError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let mut random = [0u8; 6];
        getrandom_bytes(&mut random);
        let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let dir = base.join(format!("kiln-run-{}-{name}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(host(format!("creating {}", dir.display())))?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn getrandom_bytes(buf: &mut [u8]) {
    // A name clash only makes the mkdir fail, which is reported: the time is a fine fallback.
    // SAFETY: getrandom(2) writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
        for (b, n) in buf.iter_mut().zip(nanos) {
            *b = n;
        }
    }
}

/// What the supervisor waits for.
enum Event {
    /// The guest reported the command's end.
    Status(Outcome),
    /// The control connection ended without a status (or could not be used).
    ControlLost(String),
    /// An output stream reached its end.
    StreamDone,
    /// The VM's process ended (it is left for its [`Child`] to reap).
    VmExited(std::io::Result<ExitStatus>),
    /// A stop signal reached Kiln.
    Signal(i32),
    /// The virtiofsd of share `index` ended, successfully or not.
    DaemonExited(usize, bool),
}

/// Sends the spec on the control connection, waits for the status line, and keeps the
/// connection open until `close` says the output streams have ended: the guest resets the VM
/// only once it is closed, so no output still on its way is lost.
fn serve_control(
    listener: UnixListener,
    spec: Vec<u8>,
    events: Sender<Event>,
    close: mpsc::Receiver<()>,
) {
    let result = (|| -> Result<(Outcome, UnixStream), String> {
        let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
        stream.write_all(&spec).map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut reader = BufReader::new((&stream).take(4096));
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err("the guest closed the control connection".into());
        }
        let line = String::from_utf8_lossy(&line);
        let outcome = Outcome::parse(line.trim_end_matches('\n')).map_err(|e| e.to_string())?;
        Ok((outcome, stream))
    })();
    match result {
        Ok((outcome, stream)) => {
            let _ = events.send(Event::Status(outcome));
            // Dropped (closed) when told, or when the supervisor is gone.
            let _ = close.recv();
            drop(stream);
        }
        Err(e) => {
            let _ = events.send(Event::ControlLost(e));
        }
    }
}

/// Copies the host's stdin to the guest until either side ends, then closes the guest's side.
fn serve_stdin(listener: UnixListener) {
    if let Ok((mut stream, _)) = listener.accept() {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut stream);
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Copies one of the command's output streams to Kiln's own, byte for byte.
fn serve_output(listener: UnixListener, mut out: impl Write, events: Sender<Event>) {
    if let Ok((mut stream, _)) = listener.accept() {
        let _ = std::io::copy(&mut stream, &mut out);
        let _ = out.flush();
    }
    let _ = events.send(Event::StreamDone);
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(drop)
        .map_err(host(format!("starting thread {name}")))
}

/// The VM's Kiln process and where its output went.
struct VmProcess {
    child: Child,
    console_log: Option<PathBuf>,
    kiln_log: Option<PathBuf>,
}

impl VmProcess {
    /// Stops the VM: its Kiln ends cleanly on SIGTERM (its metrics written, its sockets
    /// removed).
    fn kill(&mut self) {
        stop_child(&mut self.child);
    }

    /// Its log and console's last lines, for an error message.
    fn diagnostics(&self) -> String {
        let mut text = String::new();
        if let Some(log) = &self.kiln_log {
            let t = tail(log, 10);
            if !t.is_empty() {
                text.push_str("\n  kiln's log:");
                text.push_str(&t);
            }
        }
        if let Some(console) = &self.console_log {
            let t = tail(console, 15);
            if !t.is_empty() {
                text.push_str("\n  the guest's console:");
                text.push_str(&t);
            }
        }
        text
    }
}

/// Stops a child of the supervisor (the VM's Kiln, a virtiofsd) and reaps it: SIGTERM, then
/// SIGKILL if it has not ended within 2 s.
fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our own child, not yet reaped (try_wait saw it running).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `args.command` in a VM and gives the exit status Kiln ends with.
pub fn main(args: RunArgs) -> u8 {
    let started = Instant::now();
    match run(args, started) {
        Ok(status) => status,
        Err(e) => {
            log::error!("{e}");
            if e.is_bad_input() {
                2
            } else {
                EXIT_RUN_FAILED
            }
        }
    }
}

fn run(args: RunArgs, started: Instant) -> Result<u8, RunError> {
    if args.initrd.is_some() {
        return Err(RunError::Usage(
            "--initrd does not go with a command: the VM boots Kiln's run init".into(),
        ));
    }
    if args.vsock.is_some() {
        return Err(RunError::Usage(
            "--vsock does not go with a command: Kiln uses the VM's vsock for its stdio".into(),
        ));
    }
    let cwd = std::env::current_dir().map_err(host("reading the current directory"))?;
    let shares = resolve_shares(&args.shares, &cwd)?;
    let images = default_guest()?;
    if !images.run_initramfs.is_file() {
        return Err(crate::guest_images::GuestImagesError::Missing(images.run_initramfs).into());
    }
    let virtiofsd = virtiofsd::locate()?;
    let work = WorkDir::new()?;

    let root = if args.host_root {
        Root::Host
    } else {
        Root::Disk
    };
    let spec = RunSpec {
        root,
        shares: shares.iter().map(|s| s.guest.clone()).collect(),
        cwd: guest_cwd(&shares, &cwd),
        env: guest_env(args.host_root),
        args: args.command.clone(),
        hostname: "kiln".to_string(),
    }
    .encode()?;

    // The daemons: the host's root first (read-only), then the shares.
    // (tag, host directory, read-only, the host's whole root)
    let mut served: Vec<(String, PathBuf, bool, bool)> = Vec::new();
    if args.host_root {
        served.push((
            protocol::HOST_ROOT_TAG.to_string(),
            PathBuf::from("/"),
            true,
            true,
        ));
    }
    for share in &shares {
        served.push((
            share.guest.tag.clone(),
            share.host_dir.clone(),
            share.guest.read_only,
            false,
        ));
    }
    let mut daemons = Vec::new();
    let mut fs = Vec::new();
    for (index, (tag, dir, read_only, whole_root)) in served.iter().enumerate() {
        let socket = work.path(&format!("fs{index}.sock"));
        let log = work.path(&format!("virtiofsd{index}.log"));
        let daemon =
            virtiofsd::Daemon::spawn(&virtiofsd, &socket, dir, *read_only, *whole_root, &log)
                .map_err(host(format!("starting {}", virtiofsd.display())))?;
        daemons.push(daemon);
        fs.push(FsConfig {
            tag: tag.clone(),
            socket,
            num_request_queues: 1,
            queue_size: devices::virtio::fs::QUEUE_SIZE,
        });
    }
    let outcome = supervise(&args, &images, &work, fs, spec, &mut daemons, started);
    for daemon in daemons {
        daemon.stop();
    }
    outcome
}

/// Starts the VM and carries the command's stdio until it ends (see the module's steps 3-5).
fn supervise(
    args: &RunArgs,
    images: &GuestImages,
    work: &WorkDir,
    fs: Vec<FsConfig>,
    spec: Vec<u8>,
    daemons: &mut [virtiofsd::Daemon],
    started: Instant,
) -> Result<u8, RunError> {
    let vsock_path = work.path("vsock.sock");
    let listen = |port: u32| {
        let path = PathBuf::from(format!("{}_{port}", vsock_path.display()));
        UnixListener::bind(&path).map_err(host(format!("listening on {}", path.display())))
    };
    let control = listen(protocol::CONTROL_PORT)?;
    let stdin = listen(protocol::STDIN_PORT)?;
    let stdout = listen(protocol::STDOUT_PORT)?;
    let stderr = listen(protocol::STDERR_PORT)?;

    let config = work.path("vm.json");
    write_vm_config(args, images, fs, &vsock_path, &config)?;
    let (events, rx) = mpsc::channel();
    watch_signals(events.clone())?;
    let mut vm = start_vm(args, work, &config)?;

    let (close_control, close_rx) = mpsc::channel();
    spawn_thread("kiln-run-control", {
        let events = events.clone();
        move || serve_control(control, spec, events, close_rx)
    })?;
    spawn_thread("kiln-run-stdin", move || serve_stdin(stdin))?;
    spawn_thread("kiln-run-stdout", {
        let events = events.clone();
        move || serve_output(stdout, std::io::stdout(), events)
    })?;
    spawn_thread("kiln-run-stderr", {
        let events = events.clone();
        move || serve_output(stderr, std::io::stderr(), events)
    })?;
    let pid = vm.child.id();
    spawn_thread("kiln-run-vm", {
        let events = events.clone();
        move || {
            let _ = events.send(Event::VmExited(wait_without_reaping(pid)));
        }
    })?;
    for (index, daemon) in daemons.iter().enumerate() {
        let pid = daemon.pid();
        let events = events.clone();
        spawn_thread("kiln-run-fsd", move || {
            let success = wait_without_reaping(pid).is_ok_and(|s| s.success());
            let _ = events.send(Event::DaemonExited(index, success));
        })?;
    }
    drop(events);

    let deadline = args.timeout.map(|t| started + t);
    let mut outcome: Option<Outcome> = None;
    let mut streams_done = 0;
    let mut vm_gone = false;
    // Set once the control connection is closed: the VM then has this long to end by itself.
    let mut vm_deadline: Option<Instant> = None;
    // Set once the VM is gone after the status: the streams have this long to reach their end.
    let mut drain_until: Option<Instant> = None;
    loop {
        if outcome.is_some() && streams_done >= 2 && vm_deadline.is_none() {
            // Every byte is out: let the guest reset the VM.
            let _ = close_control.send(());
            vm_deadline = Some(Instant::now() + VM_EXIT_TIMEOUT);
        }
        if let (Some(outcome), true) = (&outcome, vm_gone) {
            // The VM's end closed the streams; what they still hold is read to the end.
            let drained = streams_done >= 2 || drain_until.is_some_and(|t| Instant::now() >= t);
            if drained {
                return Ok(finish(outcome, &mut vm));
            }
        }
        // The timeout counts until the command's status is known; then only the VM's end and
        // the streams' are waited for.
        let wait_until = match outcome {
            None => deadline,
            Some(_) if vm_gone => drain_until,
            Some(_) => vm_deadline,
        };
        let event = match wait_until {
            Some(until) => rx.recv_timeout(until.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Disconnected) => {
                vm.kill();
                return Err(RunError::Usage(
                    "internal error: every watcher ended".into(),
                ));
            }
            Err(RecvTimeoutError::Timeout) if outcome.is_none() => {
                vm.kill();
                log::error!(
                    "--timeout: the command did not finish within {:.1} s; the VM was stopped",
                    args.timeout.unwrap_or_default().as_secs_f64()
                );
                return Ok(EXIT_TIMEOUT);
            }
            Err(RecvTimeoutError::Timeout) => {
                // The VM did not end by itself after the command: stop it.
                vm.kill();
                vm_gone = true;
                drain_until.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                continue;
            }
        };
        match event {
            Event::Status(Outcome::Error(message)) => {
                vm.kill();
                log::error!("the guest could not run the command: {message}");
                return Ok(EXIT_RUN_FAILED);
            }
            Event::Status(status) => outcome = Some(status),
            Event::StreamDone => streams_done += 1,
            Event::VmExited(_) if outcome.is_some() => {
                // Its end closed the output streams: they report done on their own.
                vm_gone = true;
                drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            Event::VmExited(status) => {
                // A status already on its way is the better answer.
                if let Ok(Event::Status(status)) = rx.recv_timeout(Duration::from_millis(200)) {
                    outcome = Some(status);
                    vm_gone = true;
                    drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
                    continue;
                }
                if !report_failed_daemon(daemons) {
                    log::error!(
                        "the VM ended ({}) before the command finished{}",
                        status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|e| e.to_string()),
                        vm.diagnostics()
                    );
                }
                return Ok(EXIT_RUN_FAILED);
            }
            Event::ControlLost(why) => {
                // What ended the connection makes the better report (the VM's end, a daemon's
                // death, seen by their watchers): give them a moment.
                let _ = rx.recv_timeout(Duration::from_secs(1));
                vm.kill();
                if !report_failed_daemon(daemons) {
                    log::error!(
                        "lost the guest before the command finished: {why}{}",
                        vm.diagnostics()
                    );
                }
                return Ok(EXIT_RUN_FAILED);
            }
            Event::Signal(signal) => {
                vm.kill();
                return Ok(128u8.saturating_add(signal as u8));
            }
            // Once the command has ended, the daemons end with the VM's connections.
            Event::DaemonExited(..) if outcome.is_some() => {}
            // virtiofsd ends successfully when its VM disconnects: the VM's end is the news.
            Event::DaemonExited(_, true) => {}
            Event::DaemonExited(index, false) => {
                // A status already on its way stands (the command ended with the daemon).
                if let Ok(Event::Status(status @ (Outcome::Exited(_) | Outcome::Signaled(_)))) =
                    rx.recv_timeout(Duration::from_millis(200))
                {
                    outcome = Some(status);
                    continue;
                }
                // Otherwise the daemon's end is the cause to report, whatever else followed
                // it (the guest may lose its connections or the VM end soon after).
                if !report_failed_daemon(daemons) {
                    log::error!(
                        "virtiofsd serving {} ended while the command ran; the VM was stopped",
                        daemons[index].host_dir.display()
                    );
                }
                vm.kill();
                return Ok(EXIT_RUN_FAILED);
            }
        }
    }
}

/// Logs the first daemon that ended in failure (killed, crashed: not the clean exit of one whose
/// VM disconnected), which is then the cause of the run's failure; false if none did.
fn report_failed_daemon(daemons: &mut [virtiofsd::Daemon]) -> bool {
    let Some((daemon, status)) = daemons
        .iter_mut()
        .find_map(|d| d.exited().filter(|s| !s.success()).map(|s| (d, s)))
    else {
        return false;
    };
    log::error!(
        "virtiofsd serving {} exited ({status}) while the command ran; the VM was stopped{}",
        daemon.host_dir.display(),
        daemon.log_tail()
    );
    true
}

/// Waits until process `pid` (a child) has ended, leaving it unreaped so that its [`Child`] can
/// still be killed and waited for without racing this wait.
fn wait_without_reaping(pid: u32) -> std::io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        // SAFETY: siginfo_t is plain data that waitid fills; zeroed is a valid value of it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer; WNOWAIT leaves it for
        // Child::wait to reap.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: waitid succeeded with WEXITED, so si_status and si_code are set.
            let (code, status) = unsafe { (info.si_code, info.si_status()) };
            return Ok(if code == libc::CLD_EXITED {
                ExitStatus::from_raw((status & 0xff) << 8)
            } else {
                ExitStatus::from_raw(status & 0x7f)
            });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The exit status for the command's outcome, once the VM is gone.
fn finish(outcome: &Outcome, vm: &mut VmProcess) -> u8 {
    vm.kill();
    outcome.exit_status(EXIT_RUN_FAILED)
}

/// Forwards SIGINT, SIGTERM and SIGHUP to the supervisor.
fn watch_signals(events: Sender<Event>) -> Result<(), RunError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(host("watching signals"))?;
    spawn_thread("kiln-run-signals", move || {
        if let Some(signal) = signals.forever().next() {
            let _ = events.send(Event::Signal(signal));
        }
    })
}

/// The VM's configuration file: the default guest's kernel (or `--kernel`), the run init,
/// the default root file system (unless the user gave a root drive or `--host-root`), the
/// user's other drives and interfaces, the virtio-fs devices and the vsock device.
fn write_vm_config(
    args: &RunArgs,
    images: &GuestImages,
    fs: Vec<FsConfig>,
    vsock: &Path,
    path: &Path,
) -> Result<(), RunError> {
    let mut run = args.clone();
    run.command.clear();
    run.console = None;
    let mut resources = run
        .into_resources(Some(images))
        .map_err(|e| RunError::Usage(e.to_string()))?;
    // A config file names every drive and interface (as a boot from flags would).
    for (index, drive) in resources.drives.iter_mut().enumerate() {
        drive.id.get_or_insert_with(|| format!("drive{index}"));
    }
    for (index, net) in resources.nets.iter_mut().enumerate() {
        net.id.get_or_insert_with(|| format!("net{index}"));
    }
    let boot = resources
        .boot_source
        .as_mut()
        .ok_or_else(|| RunError::Usage("no kernel".into()))?;
    boot.initrd_path = Some(images.run_initramfs.clone());
    let mut cmdline = args.cmdline.clone().unwrap_or_else(|| CMDLINE.to_string());
    if !cmdline.contains("rdinit=") {
        cmdline.push_str(" rdinit=/init");
    }
    boot.boot_args = Some(cmdline);
    if !args.host_root && !resources.drives.iter().any(|d| d.root) {
        let rootfs = Drive {
            drive_id: "rootfs".to_string(),
            path_on_host: Some(images.rootfs.clone()),
            is_root_device: true,
            is_read_only: Some(true),
            partuuid: None,
            cache_type: Default::default(),
            rate_limiter: None,
            io_engine: Default::default(),
            socket: None,
        };
        resources
            .put_drive(rootfs)
            .map_err(|e| RunError::Usage(e.to_string()))?;
    }
    resources.vsock = Some(VsockConfig {
        vsock_id: None,
        guest_cid: GUEST_CID,
        uds_path: vsock.to_path_buf(),
    });
    resources.fs = fs;
    resources.serial.console = ConsoleConfig::Stdout;
    let json = serde_json::to_string_pretty(&resources.full_config())
        .map_err(|e| RunError::Usage(format!("internal error: {e}")))?;
    std::fs::write(path, json).map_err(host(format!("writing {}", path.display())))
}

/// Starts the VM's Kiln process: without `--console` its console and log go to files in the
/// work directory (shown if the VM fails), with it to Kiln's stderr.
fn start_vm(args: &RunArgs, work: &WorkDir, config: &Path) -> Result<VmProcess, RunError> {
    let exe = std::env::current_exe().map_err(host("finding Kiln's own binary"))?;
    let mut command = Command::new(exe);
    command
        .arg("--no-api")
        .arg("--id")
        .arg("kiln-run")
        .arg("--config-file")
        .arg(config)
        .stdin(Stdio::null());
    let o = &args.observability;
    if let Some(path) = &o.log_path {
        command.arg("--log-path").arg(path);
    }
    if let Some(level) = o.level {
        command.arg("--level").arg(format!("{level:?}"));
    }
    if let Some(path) = &o.metrics_path {
        command.arg("--metrics-path").arg(path);
    }
    if o.boot_timer {
        command.arg("--boot-timer");
    }
    if args.seccomp.no_seccomp {
        command.arg("--no-seccomp");
    }
    if let Some(filter) = &args.seccomp.seccomp_filter {
        command.arg("--seccomp-filter").arg(filter);
    }
    let (console_log, kiln_log) = match &args.console {
        None | Some(ConsoleConfig::None) => {
            let console = work.path("console.log");
            let log = work.path("kiln.log");
            command
                .stdout(File::create(&console).map_err(host("creating the console log"))?)
                .stderr(File::create(&log).map_err(host("creating the VM's log"))?);
            (Some(console), Some(log))
        }
        Some(ConsoleConfig::Stdout) => {
            let err = std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(host("duplicating stderr"))?;
            command.stdout(Stdio::from(err));
            (None, None)
        }
        Some(ConsoleConfig::File(path)) => {
            command
                .stdout(File::create(path).map_err(host(format!("creating {}", path.display())))?);
            (None, None)
        }
    };
    virtiofsd::detach_and_tie_to_parent(&mut command);
    let child = command.spawn().map_err(host("starting the VM"))?;
    Ok(VmProcess {
        child,
        console_log,
        kiln_log,
    })
}

use std::os::fd::AsFd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_directory_is_the_default_share_and_working_directory() {
        let dir = std::env::temp_dir().canonicalize().unwrap();
        let shares = resolve_shares(&[], &dir).unwrap();
        assert_eq!(shares.len(), 1);
        assert_eq!(shares[0].host_dir, dir);
        assert_eq!(shares[0].guest.guest_dir, dir.to_str().unwrap());
        assert!(!shares[0].guest.read_only);
        assert_eq!(guest_cwd(&shares, &dir), dir.to_str().unwrap());
        // Never the whole host by default.
        assert!(resolve_shares(&[], Path::new("/")).unwrap().is_empty());
        assert_eq!(guest_cwd(&[], Path::new("/nonexistent-dir")), "/");
    }

    #[test]
    fn shares_are_checked_and_tagged() {
        let dir = std::env::temp_dir().canonicalize().unwrap();
        let shares = resolve_shares(
            &[
                format!("{}:/data:ro", dir.display()).parse().unwrap(),
                "/proc/self/..:/other".parse().unwrap(),
            ],
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(shares[0].guest.tag, "kiln-share-0");
        assert_eq!(shares[1].guest.tag, "kiln-share-1");
        assert!(shares[0].guest.read_only);
        assert_eq!(guest_cwd(&shares, &dir.join("sub")), "/data/sub");
        assert_eq!(guest_cwd(&shares, Path::new("/nonexistent")), "/");
        let inside = guest_cwd(&shares, &dir);
        assert_eq!(inside, "/data");
        let missing = resolve_shares(&["/no/such/dir".parse().unwrap()], Path::new("/"));
        assert!(matches!(missing, Err(RunError::Share { .. })));
        let file = resolve_shares(&["/proc/version".parse().unwrap()], Path::new("/"));
        assert!(matches!(file, Err(RunError::Share { .. })));
        let twice = resolve_shares(
            &["/tmp:/x".parse().unwrap(), "/proc:/x".parse().unwrap()],
            Path::new("/"),
        );
        assert!(matches!(twice, Err(RunError::Share { .. })));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("kiln-tail-{}", std::process::id()));
        std::fs::write(&path, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail(&path, 2), "\n    c\n    d");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(tail(&path, 2), "");
    }
}
