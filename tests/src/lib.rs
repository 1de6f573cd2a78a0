//! Harness for driving the real `kiln` binary: find it, run it with a deadline, capture what it
//! printed and how it exited.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use vmm::test_elf::tiny_elf;

pub mod bench;
pub mod seccomp_log;
pub mod uffd_handler;
pub mod vsock_proto;

/// The kiln binary: `$KILN_BIN`, or `kiln` in the target directory these tests were built into
/// (build it first: `cargo build --workspace`).
pub fn kiln_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("KILN_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/kiln
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let bin = dir.join("kiln");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build --workspace` before the tests, or set KILN_BIN",
        bin.display()
    );
    bin
}

/// True when /dev/kvm is usable; under CI its absence fails the test instead.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "/dev/kvm is required under CI"
    );
    eprintln!("skipping: no /dev/kvm");
    false
}

/// What a finished kiln run left.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status (None if killed at the deadline).
    pub status: Option<ExitStatus>,
    /// Everything on stdout (the guest console by default).
    pub stdout: String,
    /// Everything on stderr (kiln's own messages).
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Outcome {
    /// The exit code, or -1 when killed by a signal or the deadline.
    pub fn code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or(-1)
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Spawns `kiln ARGS` with piped stdout/stderr and no stdin.
pub fn spawn_kiln(args: &[&str]) -> Child {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args);
    spawn_piped(cmd)
}

/// Sends `signal` (`kill`'s spelling: `-TERM`, `-USR1`) to `child`.
pub fn send_signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal} {}", child.id());
}

/// Makes the process `cmd` starts get SIGKILL when the thread that starts it ends, so a test
/// that panics (its thread ends) leaves no kiln behind to spin a guest forever and starve the
/// tests after it. Survives the `exec` of `ip netns exec`.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// Waits for `child` up to `deadline`, killing it then, and collects its output.
pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> Outcome {
    let start = Instant::now();
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Runs `kiln ARGS` to completion (or the deadline).
pub fn run_kiln(args: &[&str], deadline: Duration) -> Outcome {
    wait_with_deadline(spawn_kiln(args), deadline)
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes `script` as a raw drive image for the guest's `kiln.script=/dev/vdX`: the script, then
/// NUL padding to a whole number of 4 KiB blocks (the guest's init stops at the first NUL).
pub fn write_script_drive(path: &std::path::Path, script: &str) {
    let mut bytes = script.as_bytes().to_vec();
    bytes.resize(bytes.len().div_ceil(4096).max(1) * 4096 + 4096, 0);
    std::fs::write(path, bytes).expect("script drive");
}

/// Writes a guest tool (a static binary from the guest images) as a raw drive image, padded
/// with zeros to whole 4 KiB blocks; the guest copies its first `tool.len()` bytes out with
/// `head -c`.
pub fn write_tool_drive(path: &std::path::Path, tool: &[u8]) -> std::io::Result<()> {
    let mut padded = tool.to_vec();
    padded.resize(tool.len().div_ceil(4096) * 4096, 0);
    std::fs::write(path, padded)
}

/// A network namespace that exists while this value lives, so a test's traffic never leaves it.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` (replacing a leftover of the same name) with loopback up.
    /// Installs iproute2 first if `ip` is missing (a fresh CI machine may not have it).
    pub fn create(name: &str) -> Self {
        ensure_command("ip", "iproute2");
        // A leftover of an earlier, killed run; usually there is none.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ns = Self {
            name: name.to_string(),
        };
        run_checked(Command::new("ip").args(["netns", "add", name]));
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `argv` inside the namespace and panics if it fails.
    pub fn run(&self, argv: &[&str]) {
        run_checked(&mut self.command(argv));
    }

    /// A command that runs `argv` inside the namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }
}

/// Moves the calling thread (only) into network namespace `name`: sockets it creates afterwards
/// live there.
pub fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
    // SAFETY: setns on an owned, open namespace fd; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Installs Debian package `package` when `command` is not on PATH.
pub fn ensure_command(command: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return;
    }
    eprintln!("installing {package} for `{command}`");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        assert!(install(), "could not install {package}");
    }
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Spawns `cmd` with no stdin and piped stdout/stderr, for [`wait_with_deadline`]; it dies with
/// the calling test ([`die_with_test`]).
pub fn spawn_piped(mut cmd: Command) -> Child {
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Where the tiny test kernels are loaded and entered.
pub const TINY_LOAD_ADDR: u64 = 0x10_0000;

/// A tiny kernel that writes "KILN-TINY-OK\n" to COM1, then resets through the i8042.
pub fn hello_elf() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"KILN-TINY-OK\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]); // reset; hlt loop
    tiny_elf(TINY_LOAD_ADDR, &code)
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// The sha256 of a file, as `sha256sum` prints it.
pub fn sha256_file(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Polls `done` every 20 ms until it holds; fails the test after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `deadline` for `child` to exit (without touching its pipes); its status.
pub fn wait_for_exit(child: &mut Child, deadline: Duration) -> ExitStatus {
    let mut status = None;
    wait_until(deadline, "the process to exit", || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

/// Waits until process `pid` has a thread named `name` (its `comm`).
pub fn wait_for_thread(pid: u32, name: &str, deadline: Duration) {
    wait_until(deadline, &format!("a thread {name:?} in pid {pid}"), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
    });
}

/// Waits up to `deadline` for kiln's API socket to appear.
pub fn wait_for_socket(sock: &std::path::Path, deadline: Duration) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < deadline,
            "{} never appeared",
            sock.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// One API request on a fresh connection to kiln's socket; returns the status and the body.
pub fn api_call(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream =
        std::os::unix::net::UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("socket timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The JSON objects of a metrics file, one per line (none if the file does not exist yet).
pub fn metrics_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Streams `child`'s stdout (the guest console) line by line; the thread ends at its EOF, so
/// joining it after the child is gone means every line it printed has been sent.
pub fn console_lines(
    child: &mut Child,
) -> (std::sync::mpsc::Receiver<String>, thread::JoinHandle<()>) {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}

/// The value of the guest script's console line `KILN-T <key> <value>`.
pub fn marker<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().find_map(|line| {
        let rest = line.trim_end().strip_prefix("KILN-T ")?;
        Some(rest.strip_prefix(key)?.strip_prefix(' ')?.trim())
    })
}

/// The first field of a `sha256sum` line.
pub fn digest(line: Option<&str>) -> Option<&str> {
    line.and_then(|l| l.split_whitespace().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_processes_die_with_the_spawning_thread() {
        let child = thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("600");
            spawn_piped(cmd)
        })
        .join()
        .expect("spawning thread");
        // The thread is gone: the child gets SIGKILL.
        let out = wait_with_deadline(child, Duration::from_secs(10));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "{out:?}"
        );
    }
}
