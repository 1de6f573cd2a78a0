//! Host paths that are not what they should be — a named pipe nobody writes, a character device
//! without end (/dev/zero), a directory — given as kernel, initrd, drive, console, config file or
//! filter file. Each is answered within a second with an error that says what the path is, the
//! API keeps answering, and SIGTERM still ends Kiln: nothing Kiln opens for a user may block the
//! control loop. (A FIFO as the console is allowed: nothing reads it yet, and the guest's output
//! waits in it or is dropped.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{
    api_call, die_with_test, kiln_bin, kvm_available, scratch_dir, send_signal, tiny_elf,
    wait_for_exit, wait_for_socket, write_file, TINY_LOAD_ADDR,
};

/// How long any answer may take.
const PROMPT: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(30);

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(made.success());
}

/// Makes `call`, asserts it was answered within [`PROMPT`] with `status`, returns the answer.
fn prompt(sock: &Path, method: &str, path: &str, body: &str, status: u16) -> String {
    let start = Instant::now();
    let (got, answer) = api_call(sock, method, path, body);
    let took = start.elapsed();
    assert_eq!(got, status, "{method} {path} {body}: {answer}");
    assert!(
        took < PROMPT,
        "{method} {path} {body}: answered after {took:?}"
    );
    answer
}

fn start_kiln(dir: &Path) -> (Child, PathBuf) {
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("--api-sock").arg(&sock);
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("spawn kiln");
    wait_for_socket(&sock, DEADLINE);
    (child, sock)
}

fn instance_start(sock: &Path, status: u16) -> String {
    prompt(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
        status,
    )
}

#[test]
fn the_api_refuses_fifos_devices_and_directories_at_once_and_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("bad-paths-api");
    let kernel = write_file(
        &dir,
        "parked.elf",
        &tiny_elf(TINY_LOAD_ADDR, &[0xfa, 0xf4, 0xeb, 0xfd]),
    );
    let disk = write_file(&dir, "disk.img", &[0u8; 64 << 10]);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let subdir = dir.join("a-directory");
    std::fs::create_dir_all(&subdir).unwrap();
    let (mut kiln, sock) = start_kiln(&dir);
    prompt(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":16}"#,
        204,
    );
    let boot = |kernel: &Path, initrd: Option<&Path>| match initrd {
        Some(initrd) => format!(
            r#"{{"kernel_image_path":"{}","initrd_path":"{}"}}"#,
            kernel.display(),
            initrd.display()
        ),
        None => format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display()),
    };

    // Kernel and initrd: each bad kind refused by the start, which can then be tried again.
    let zero = Path::new("/dev/zero");
    for (bad, says) in [
        (fifo.as_path(), "a named pipe (FIFO)"),
        (zero, "a character device"),
        (subdir.as_path(), "a directory"),
    ] {
        prompt(&sock, "PUT", "/boot-source", &boot(bad, None), 204);
        let answer = instance_start(&sock, 400);
        assert!(answer.contains(says), "kernel {}: {answer}", bad.display());
        prompt(&sock, "PUT", "/boot-source", &boot(&kernel, Some(bad)), 204);
        let answer = instance_start(&sock, 400);
        assert!(answer.contains(says), "initrd {}: {answer}", bad.display());
    }
    prompt(&sock, "PUT", "/boot-source", &boot(&kernel, None), 204);

    // Drives, read-only and read-write.
    for read_only in [true, false] {
        for (bad, says) in [
            (fifo.as_path(), "a named pipe (FIFO)"),
            (zero, "a character device"),
        ] {
            let drive = format!(
                r#"{{"drive_id":"d1","path_on_host":"{}","is_root_device":false,"is_read_only":{read_only}}}"#,
                bad.display()
            );
            prompt(&sock, "PUT", "/drives/d1", &drive, 204);
            let answer = instance_start(&sock, 400);
            assert!(answer.contains(says), "drive {}: {answer}", bad.display());
        }
    }
    let drive = format!(
        r#"{{"drive_id":"d1","path_on_host":"{}","is_root_device":false}}"#,
        disk.display()
    );
    prompt(&sock, "PUT", "/drives/d1", &drive, 204);

    // The console into a FIFO nobody reads: the start goes ahead.
    let serial = format!(r#"{{"serial_out_path":"{}"}}"#, fifo.display());
    prompt(&sock, "PUT", "/serial", &serial, 204);
    instance_start(&sock, 204);

    // A running VM: a drive swapped for a FIFO is refused, the VM runs on.
    let patch = format!(r#"{{"drive_id":"d1","path_on_host":"{}"}}"#, fifo.display());
    let answer = prompt(&sock, "PATCH", "/drives/d1", &patch, 400);
    assert!(answer.contains("a named pipe (FIFO)"), "{answer}");
    let info = prompt(&sock, "GET", "/", "", 200);
    assert!(info.contains(r#""state":"Running""#), "{info}");

    let asked = Instant::now();
    send_signal(&kiln, "-TERM");
    let status = wait_for_exit(&mut kiln, DEADLINE);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(
        asked.elapsed() < PROMPT,
        "SIGTERM took {:?}",
        asked.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `kiln ARGS`; asserts it ended by itself within [`PROMPT`] with a failure that says
/// `says`.
fn refused_at_once(args: &[&str], says: &str) {
    let start = Instant::now();
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args);
    let out = kiln_tests::wait_with_deadline(kiln_tests::spawn_piped(cmd), DEADLINE);
    let took = start.elapsed();
    assert!(took < PROMPT * 5, "kiln {args:?} took {took:?}");
    let code = out.status.and_then(|s| s.code());
    assert!(
        code.is_some_and(|c| c != 0),
        "kiln {args:?}: {:?}; {}",
        out.status,
        out.stderr
    );
    assert!(out.stderr.contains(says), "kiln {args:?}: {}", out.stderr);
}

#[test]
fn command_line_paths_that_would_block_are_refused_at_once() {
    let dir = scratch_dir("bad-paths-cli");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let sock = dir.join("api.sock");
    let sock = sock.to_str().unwrap();
    refused_at_once(
        &["--no-api", "--config-file", fifo],
        "a named pipe (FIFO), not a regular file",
    );
    refused_at_once(
        &["--no-api", "--config-file", "/dev/zero"],
        "a character device, not a regular file",
    );
    refused_at_once(
        &["--api-sock", sock, "--seccomp-filter", fifo],
        "a named pipe (FIFO), not a regular file",
    );
    refused_at_once(
        &["--api-sock", sock, "--seccomp-filter", "/dev/urandom"],
        "a character device, not a regular file",
    );
    if kvm_available() {
        refused_at_once(
            &["run", "--kernel", fifo],
            "a named pipe (FIFO), not a regular file",
        );
        refused_at_once(
            &["run", "--kernel", "/dev/zero"],
            "a character device, not a regular file",
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
