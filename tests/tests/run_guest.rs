//! End to end: `kiln run -- CMD`, a command in a throw-away VM with host directories shared over
//! virtio-fs (virtiofsd, installed by `guest-images/virtiofsd.sh` on first use). Seven boots, each
//! checking what only a boot can (one boot costs 20-60 s on our nested-KVM machines):
//!
//! 1. stdio and shares: 16 MiB of stdin through `cat` back on stdout (sha256 equal), `out` on
//!    stdout only and `err` on stderr only, a file written into a read-write share appearing on
//!    the host byte for byte, a read-only share refusing writes but reading, exit status 7;
//! 2. a command killed by SIGKILL in the guest: 137;
//! 3. a command the guest does not have: 127 with the shell's message;
//! 4. `--timeout`: the command started (its output arrived), then 124 at the deadline;
//! 5. `--host-root`: the host's own `python3` runs in the guest (about 90 s here);
//! 6. the share's virtiofsd killed while the command runs: one line, status 125, VM stopped;
//! 7. SIGTERM to Kiln while the command runs: 143, the VM and the daemons stopped.
//!
//! After each: no virtiofsd or VM process left, and Kiln's private directory gone. Bad input
//! (missing share, unknown option, an unusable virtiofsd) is checked without a boot.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{die_with_test, kiln_bin, kvm_available, scratch_dir, sha256_file};

const DEADLINE: Duration = Duration::from_secs(600);

/// The tests that boot take turns: two emulated guests at once on these 2 cores starve each
/// other.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What one `kiln run -- CMD` left.
struct Ran {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

/// Runs `kiln run ARGS` in `cwd` with `stdin` (or nothing), its private directories under
/// `runtime` (which must be empty again afterwards).
fn kiln_run(cwd: &Path, runtime: &Path, args: &[&str], stdin: Option<&Path>) -> Ran {
    let out_path = runtime.with_extension("stdout");
    let err_path = runtime.with_extension("stderr");
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("run")
        .args(args)
        .current_dir(cwd)
        .env("XDG_RUNTIME_DIR", runtime)
        .stdin(match stdin {
            Some(path) => Stdio::from(File::open(path).expect("stdin file")),
            None => Stdio::null(),
        })
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"));
    die_with_test(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn kiln");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("kiln run {args:?} did not end within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ran = Ran {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read(&out_path).expect("stdout"),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    assert_nothing_left(runtime);
    ran
}

/// No virtiofsd or Kiln process of this run remains, and its private directory is gone.
fn assert_nothing_left(runtime: &Path) {
    let left: Vec<_> = std::fs::read_dir(runtime)
        .expect("runtime dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let marker = runtime.to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect();
        if running.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {running:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("runtime dir");
    dir
}

#[test]
fn commands_run_in_throw_away_vms() {
    if !kvm_available() {
        return;
    }
    let _one_vm_at_a_time = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let root = scratch_dir("run-guest");
    let work = root.join("work");
    let ro = root.join("ro");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("hostfile"), "from the host\n").unwrap();

    // 1. stdio and shares.
    let input = root.join("input.bin");
    let random = Command::new("head")
        .args(["-c", "16777216", "/dev/urandom"])
        .stdout(File::create(&input).unwrap())
        .status()
        .unwrap();
    assert!(random.success());
    let script = "cat; echo out; echo err >&2; printf 'written\\n' > guestfile; \
                  if { echo x > /ro/f; } 2>/dev/null; then echo ro-writable; fi; \
                  cat /ro/hostfile; exit 7";
    let ro_share = format!("{}:/ro:ro", ro.display());
    let work_share = work.display().to_string();
    let ran = kiln_run(
        &work,
        &runtime_dir(&root, "rt1"),
        &[
            "--share",
            &work_share,
            "--share",
            &ro_share,
            "--",
            "sh",
            "-c",
            script,
        ],
        Some(&input),
    );
    assert_eq!(ran.code, 7, "stderr: {}", ran.stderr);
    assert_eq!(ran.stderr, "err\n");
    let expected_tail = b"out\nfrom the host\n";
    assert_eq!(ran.stdout.len(), 16 * 1024 * 1024 + expected_tail.len());
    let (echoed, tail) = ran.stdout.split_at(16 * 1024 * 1024);
    assert_eq!(
        tail, expected_tail,
        "no ro-writable line, then the ro share's file"
    );
    let echoed_path = root.join("echoed.bin");
    std::fs::write(&echoed_path, echoed).unwrap();
    assert_eq!(sha256_file(&echoed_path), sha256_file(&input));
    assert_eq!(std::fs::read(work.join("guestfile")).unwrap(), b"written\n");
    assert!(!ro.join("f").exists(), "the read-only share was written");
    eprintln!(
        "boot 1 (16 MiB through stdin and stdout): {:?}",
        ran.elapsed
    );

    // 2. A signal ends the command.
    let ran = kiln_run(
        &work,
        &runtime_dir(&root, "rt2"),
        &["--", "sh", "-c", "kill -9 $$"],
        None,
    );
    assert_eq!(ran.code, 137, "stderr: {}", ran.stderr);
    let boot = ran.elapsed;
    eprintln!("boot 2 (a short command): {boot:?}");

    // 3. Not found, as a shell says it.
    let ran = kiln_run(
        &work,
        &runtime_dir(&root, "rt3"),
        &["--", "no-such-command", "x"],
        None,
    );
    assert_eq!(ran.code, 127, "stderr: {}", ran.stderr);
    assert!(ran.stderr.contains("no-such-command"), "{}", ran.stderr);

    // 4. --timeout: long enough for the boot (half as long again as the short command's run,
    // and 20 s), then the VM is stopped.
    let timeout = (boot * 3 / 2 + Duration::from_secs(20))
        .as_secs()
        .to_string();
    let ran = kiln_run(
        &work,
        &runtime_dir(&root, "rt4"),
        &[
            "--timeout",
            &timeout,
            "--",
            "sh",
            "-c",
            "echo started; sleep 100000",
        ],
        None,
    );
    assert_eq!(ran.code, 124, "stderr: {}", ran.stderr);
    assert_eq!(ran.stdout, b"started\n");
    assert!(ran.stderr.contains("--timeout"), "{}", ran.stderr);

    // 5. The host's root: the runner's own python3 runs in the guest. Debian's, where there is
    // one: a version manager's `python3` on PATH (pyenv's shim is a bash script that starts a
    // dozen processes before Python) takes minutes of emulated guest kernel here.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let ran = kiln_run(
        &work,
        &runtime_dir(&root, "rt5"),
        &[
            "--host-root",
            "--mem-mib",
            "256",
            "--",
            python,
            "-c",
            "print(1+1)",
        ],
        None,
    );
    assert_eq!(ran.code, 0, "stderr: {}", ran.stderr);
    assert_eq!(ran.stdout, b"2\n");
    let _ = std::fs::remove_dir_all(&root);
}

/// A `kiln run` whose command has printed `ready` and sleeps, in a fresh scratch directory:
/// the process, the scratch directory and the run's private-directory root.
fn start_sleeper(name: &str) -> (std::process::Child, PathBuf, PathBuf) {
    use std::io::{BufRead, BufReader, Read};
    let root = scratch_dir(name);
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let runtime = runtime_dir(&root, "rt");
    let mut cmd = Command::new(kiln_bin());
    cmd.args(["run", "--", "sh", "-c", "echo ready; sleep 100000"])
        .current_dir(&work)
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_test(&mut cmd);
    let mut child = cmd.spawn().expect("spawn kiln");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read stdout");
    if line != "ready\n" {
        let _ = child.kill();
        let mut stderr = String::new();
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr);
        panic!("expected ready, got {line:?}; stderr: {stderr}");
    }
    (child, root, runtime)
}

/// Waits for `child` (up to a minute) and gives its status and stderr.
fn wait_for_end(mut child: std::process::Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "kiln did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    (status.code(), stderr)
}

/// SIGTERM to Kiln while the command runs: the VM and the daemons are stopped, 143.
#[test]
fn a_stop_signal_ends_the_vm_cleanly() {
    if !kvm_available() {
        return;
    }
    let _one_vm_at_a_time = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (child, root, runtime) = start_sleeper("run-sigterm");
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let (code, stderr) = wait_for_end(child);
    assert_eq!(code, Some(143), "{stderr}");
    assert_nothing_left(&runtime);
    let _ = std::fs::remove_dir_all(&root);
}

/// 6. The share's virtiofsd dies while the command runs: one line, the VM stopped.
#[test]
fn a_dying_virtiofsd_stops_the_vm() {
    if !kvm_available() {
        return;
    }
    let _one_vm_at_a_time = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (child, root, runtime) = start_sleeper("run-dying-virtiofsd");
    let runtime = &runtime;
    let marker = runtime.to_string_lossy().to_string();
    let daemons: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("virtiofsd") && c.contains(&marker)
            })
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(!daemons.is_empty(), "no virtiofsd found");
    let killed = Command::new("kill")
        .arg("-KILL")
        .args(&daemons)
        .status()
        .expect("kill");
    assert!(killed.success());
    let (code, stderr) = wait_for_end(child);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(stderr.starts_with("kiln: virtiofsd serving"), "{stderr}");
    assert_nothing_left(runtime);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    let root = scratch_dir("run-bad-input");
    let rt = runtime_dir(&root, "rt");
    let ran = kiln_run(&root, &rt, &["--share", "/no/such/dir", "--", "true"], None);
    assert_eq!(ran.code, 2);
    assert_eq!(ran.stderr.lines().count(), 1, "{}", ran.stderr);
    assert!(ran.stderr.contains("/no/such/dir"), "{}", ran.stderr);

    let ran = kiln_run(&root, &rt, &["--bogus", "--", "true"], None);
    assert_eq!(ran.code, 2);

    let ran = kiln_run(
        &root,
        &rt,
        &["--share", "/tmp:relative", "--", "true"],
        None,
    );
    assert_eq!(ran.code, 2, "{}", ran.stderr);

    let ran = kiln_run(
        &root,
        &rt,
        &["--vsock", "cid=3,uds=/tmp/x", "--", "true"],
        None,
    );
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_unusable_virtiofsd_is_one_line_and_leaves_nothing() {
    if !kvm_available() {
        return;
    }
    let root = scratch_dir("run-no-virtiofsd");
    let rt = runtime_dir(&root, "rt");
    let mut cmd = Command::new(kiln_bin());
    cmd.args(["run", "--", "true"])
        .current_dir(&root)
        .env("XDG_RUNTIME_DIR", &rt)
        .env("KILN_VIRTIOFSD", "/nonexistent/virtiofsd")
        .stdin(Stdio::null());
    die_with_test(&mut cmd);
    let out = cmd.output().expect("kiln");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("/nonexistent/virtiofsd"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("kiln:")).count(),
        1,
        "{stderr}"
    );
    assert_nothing_left(&rt);
    let _ = std::fs::remove_dir_all(&root);
}
