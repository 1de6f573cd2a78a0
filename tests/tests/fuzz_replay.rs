//! The fuzzers' inputs replayed against the real binary, with its real seccomp filters: every
//! input the `http_request`, `api_body` and `config_file` targets hold (the committed seeds and,
//! where `fuzz/run.sh` has grown one here, the corpus) goes to a running Kiln as a client would
//! send it, or to a fresh `kiln --no-api --config-file`. The fuzz targets prove the parsers never
//! panic in-process; this proves that what follows a parse in the real process (the control loop,
//! the error paths with their system calls, the logger) survives the same inputs.
//!
//! With `KILN_SECCOMP_LOG=1` the filters log instead of killing (tests/src/seccomp_log.rs).
//!
//! Asserted: Kiln stays up through every API input and answers each with a well-formed HTTP
//! response (or closes a connection it could make nothing of), then serves `GET /` and ends on
//! SIGTERM with 128+15; every config file ends Kiln by exit status, not by a signal, within the
//! deadline, and a refused one says why on stderr.
//!
//! The inputs name arbitrary host paths (`/run/fc.log`, `/tmp/...`), so each Kiln runs as
//! `nobody` in a mount namespace of its own with empty private `/tmp`, `/var/tmp` and `/dev/shm`:
//! it can write only to its scratch directory and those, all gone when it ends. KVM is open to it
//! through a node of its own there.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api::routes::ROUTES;
use kiln_tests::seccomp_log::{self, seccomp_args};
use kiln_tests::{api_call, kiln_bin, send_signal, wait_for_exit, wait_for_socket};

/// Inputs replayed per target at most (seeds first, then the corpus by name).
const MAX_INPUTS: usize = 1500;
/// Config files replayed at most: each is a process of its own.
const MAX_CONFIG_FILES: usize = 300;
const DEADLINE: Duration = Duration::from_secs(30);
/// User and group `nobody`.
const NOBODY: libc::uid_t = 65534;

/// The `api_body` target's path IDs (its second input byte).
const IDS: &[&str] = &["rootfs", "eth0", "drive1", "", "a/b", "with space", "ü"];

/// The fuzz directory of this checkout.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted by name (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A target's seeds, then its corpus, at most `max` in all.
fn inputs(target: &str, max: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = fuzz_dir();
    let mut files = files_in(&fuzz.join("seeds").join(target));
    assert!(!files.is_empty(), "no seeds for {target}");
    files.extend(files_in(&fuzz.join("corpus").join(target)));
    files.truncate(max);
    files
        .into_iter()
        .filter_map(|path| Some((path.clone(), std::fs::read(&path).ok()?)))
        .collect()
}

/// A scratch directory `nobody` may write, where a program running as root can find it: under
/// the target directory (the system's temporary directory is private to each Kiln here).
fn scratch(name: &str) -> PathBuf {
    let dir = kiln_bin()
        .parent()
        .expect("target dir")
        .join(format!("fuzz-replay-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

/// Makes `cmd` run as `nobody` in a mount namespace of its own, with fresh tmpfs on the
/// directories anyone may write, dying with the test.
fn confine(cmd: &mut Command) -> &mut Command {
    // SAFETY: runs in the forked child before exec; it calls only async-signal-safe system calls
    // (unshare, mount, setgroups, setgid, setuid, prctl) with static strings, allocating nothing.
    unsafe {
        cmd.pre_exec(|| {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let root: &CStr = c"/";
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            let tmpfs: &CStr = c"tmpfs";
            let options: &CStr = c"size=16m,mode=1777";
            for dir in [c"/tmp", c"/var/tmp", c"/dev/shm"] {
                if libc::access(dir.as_ptr(), libc::F_OK) != 0 {
                    continue;
                }
                // /dev/shm keeps device nodes: it holds the KVM node below.
                let nodev = if dir == c"/dev/shm" {
                    0
                } else {
                    libc::MS_NODEV
                };
                check(libc::mount(
                    tmpfs.as_ptr(),
                    dir.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | nodev,
                    options.as_ptr().cast(),
                ))?;
            }
            // Kiln opens /dev/kvm at start; `nobody` gets a node of its own, in this namespace.
            let kvm: &CStr = c"/dev/kvm";
            let node: &CStr = c"/dev/shm/kvm";
            if libc::access(kvm.as_ptr(), libc::F_OK) == 0 {
                check(libc::mknod(
                    node.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(10, 232),
                ))?;
                check(libc::chmod(node.as_ptr(), 0o666))?;
                check(libc::mount(
                    node.as_ptr(),
                    kvm.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
            // A change of credentials clears the parent-death signal: set it again.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))
        });
    }
    cmd
}

/// The status code of an HTTP response's first line.
fn status_of(reply: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(reply.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A Kiln serving its API as `nobody`, with the built-in filters.
struct Replayer {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Replayer {
    fn start(name: &str) -> Self {
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        let mut cmd = Command::new(kiln_bin());
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(seccomp_args(&dir))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = confine(&mut cmd).spawn().expect("spawn kiln");
        wait_for_socket(&sock, DEADLINE);
        Replayer { child, sock, dir }
    }

    /// Sends `bytes` in `chunk`-sized writes, half-closes, and reads until Kiln closes.
    fn replay(&mut self, input: &Path, bytes: &[u8], chunk: usize) {
        let mut stream = UnixStream::connect(&self.sock).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        for piece in bytes.chunks(chunk.max(1)) {
            // Kiln may close early (a refused head): the rest is then unwanted, not an error.
            if stream.write_all(piece).is_err() {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let read = stream.read_to_end(&mut reply);
        if let Err(e) = &read {
            assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "{}: no end to the answer: {e}",
                input.display()
            );
        }
        assert!(
            reply.is_empty() || status_of(&reply).is_some(),
            "{}: not an HTTP response: {:?}",
            input.display(),
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        );
        let status = self.child.try_wait().expect("try_wait");
        assert!(
            status.is_none(),
            "{}: Kiln ended with {status:?} (signal {:?}){}",
            input.display(),
            status.and_then(|s| s.signal()),
            seccomp_log::audit_note(self.child.id())
        );
    }

    /// `GET /` still answers, then SIGTERM ends Kiln with 128+15.
    fn finish(mut self, replayed: usize) {
        let (status, body) = api_call(&self.sock, "GET", "/", "");
        assert_eq!(status, 200, "after {replayed} inputs: {body}");
        send_signal(&self.child, "-TERM");
        let status = wait_for_exit(&mut self.child, DEADLINE);
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
        seccomp_log::report(self.child.id());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runnable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: dropping to nobody in a mount namespace needs root");
    }
    root
}

#[test]
fn http_request_inputs_leave_kiln_serving() {
    if !runnable() {
        return;
    }
    let inputs = inputs("http_request", MAX_INPUTS);
    let mut kiln = Replayer::start("http");
    for (path, bytes) in &inputs {
        // The target's first byte is the chunk size its stream arrives in (0 means 1).
        let Some((&chunk, stream)) = bytes.split_first() else {
            continue;
        };
        kiln.replay(path, stream, usize::from(chunk));
    }
    eprintln!("http_request: {} inputs replayed", inputs.len());
    kiln.finish(inputs.len());
}

#[test]
fn api_body_inputs_leave_kiln_serving() {
    if !runnable() {
        return;
    }
    let inputs = inputs("api_body", MAX_INPUTS);
    let mut kiln = Replayer::start("body");
    for (path, bytes) in &inputs {
        // As the target reads its input: a route byte, an ID byte (each 0 when missing), the body.
        let route = bytes.first().copied().unwrap_or(0);
        let id = bytes.get(1).copied().unwrap_or(0);
        let body = bytes.get(2..).unwrap_or_default();
        let route = ROUTES[usize::from(route) % ROUTES.len()];
        let (method, template) = (route.method, route.path);
        let id = IDS[usize::from(id) % IDS.len()];
        let path_in_url = match template.split_once('{') {
            Some((prefix, _)) => format!("{prefix}{id}"),
            None => template.to_string(),
        };
        let mut request = format!(
            "{method} {path_in_url} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        kiln.replay(path, &request, request.len());
    }
    eprintln!("api_body: {} inputs replayed", inputs.len());
    kiln.finish(inputs.len());
}

#[test]
fn config_file_inputs_end_kiln_with_a_status() {
    if !runnable() {
        return;
    }
    let inputs = inputs("config_file", MAX_CONFIG_FILES);
    let dir = scratch("config");
    let file = dir.join("config.json");
    let mut refused = 0;
    for (path, bytes) in &inputs {
        std::fs::write(&file, bytes).expect("write config");
        let mut cmd = Command::new(kiln_bin());
        cmd.arg("--no-api")
            .arg("--config-file")
            .arg(&file)
            .args(seccomp_args(&dir))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = confine(&mut cmd).spawn().expect("spawn kiln");
        let pid = child.id();
        let out = kiln_tests::wait_with_deadline(child, DEADLINE);
        seccomp_log::report(pid);
        let status = out
            .status
            .unwrap_or_else(|| panic!("{}: Kiln still running after {DEADLINE:?}", path.display()));
        assert!(
            status.code().is_some(),
            "{}: Kiln ended by signal {:?}; stderr: {}{}",
            path.display(),
            status.signal(),
            out.stderr,
            seccomp_log::audit_note(pid)
        );
        if status.code() != Some(0) {
            refused += 1;
            // A config file's logger takes Kiln's messages from the start: the refusal is
            // said there rather than on stderr.
            let logged = configured_log(bytes, &dir)
                .and_then(|log| std::fs::read_to_string(log).ok())
                .is_some_and(|text| !text.trim().is_empty());
            assert!(
                !out.stderr.trim().is_empty() || logged,
                "{}: exit {status:?} with nothing said",
                path.display()
            );
        }
    }
    eprintln!(
        "config_file: {} inputs replayed, {refused} refused",
        inputs.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log file a config file's `logger` names, relative to `dir` (Kiln's working directory
/// for the replay), if it names one.
fn configured_log(config: &[u8], dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    let path = config.get("logger")?.get("log_path")?.as_str()?;
    Some(dir.join(path))
}
