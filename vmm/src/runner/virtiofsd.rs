//! The virtio-fs daemons of `kiln run -- CMD`: one `virtiofsd` per share, started before the VM
//! and stopped after it. They run in their own process group (a Ctrl+C at the terminal reaches
//! Kiln alone, which then stops them) and die with Kiln (`PR_SET_PDEATHSIG`), so nothing is left
//! running on the host however Kiln ends.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::guest_images::{run_build_script, GuestImagesError};

/// The installer script in the source tree Kiln was built from.
const INSTALL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-images/virtiofsd.sh");

/// Finds virtiofsd: `KILN_VIRTIOFSD`, then `virtiofsd` on `PATH` or in `/usr/libexec`, else the
/// copy `guest-images/virtiofsd.sh` installs (and caches) from crates.io.
pub fn locate() -> Result<PathBuf, GuestImagesError> {
    if let Some(path) = std::env::var_os("KILN_VIRTIOFSD") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(found) = on_path
        .iter()
        .map(|dir| dir.join("virtiofsd"))
        .chain(std::iter::once(PathBuf::from("/usr/libexec/virtiofsd")))
        .find(|p| is_rust_virtiofsd(p))
    {
        return Ok(found);
    }
    run_build_script(Path::new(INSTALL_SCRIPT))
}

/// True for an executable virtiofsd that is the Rust daemon (QEMU's old C one takes other
/// flags): it answers `--version` with `virtiofsd 1.x`.
fn is_rust_virtiofsd(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("virtiofsd")
        })
        .unwrap_or(false)
}

/// A running virtiofsd.
pub struct Daemon {
    child: Child,
    /// What it serves, for messages: the host directory.
    pub host_dir: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

/// Makes `command` a child that leaves the terminal's signals to Kiln and dies with it.
pub fn detach_and_tie_to_parent(command: &mut Command) {
    command.process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it is the only thing done between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Daemon {
    /// Starts `binary` serving `host_dir` on `socket`, its stderr into `log`. A `whole_root`
    /// share (the host's `/`, which the guest lays an overlay over) shows the host's other
    /// mounts as plain directories: announced as submounts, overlayfs refuses to use them
    /// (EREMOTE), and the guest mounts its own /proc, /sys and /dev over them anyway.
    pub fn spawn(
        binary: &Path,
        socket: &Path,
        host_dir: &Path,
        read_only: bool,
        whole_root: bool,
        log: &Path,
    ) -> std::io::Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", host_dir.display()))
            // Its own mount, PID and network namespaces, pivot_root into the share.
            .arg("--sandbox=namespace")
            .arg("--cache=auto")
            .arg(if whole_root {
                "--no-announce-submounts"
            } else {
                "--announce-submounts"
            })
            // Keep the host's descriptor limit (raising it needs CAP_SYS_RESOURCE).
            .arg("--rlimit-nofile=0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?);
        if read_only {
            command.arg("--readonly");
        }
        detach_and_tie_to_parent(&mut command);
        Ok(Self {
            child: command.spawn()?,
            host_dir: host_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        super::tail(&self.log, 5)
    }

    /// Stops it: SIGTERM, then SIGKILL if it lingers.
    pub fn stop(mut self) {
        super::stop_child(&mut self.child);
    }
}
