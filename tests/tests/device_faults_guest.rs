//! End to end, with the real filters on: host-side device faults under one boot of the default
//! guest, which must see errors where the host failed and go on; Kiln must stay up and end
//! cleanly.
//!
//! - A drive whose file system fills (a small tmpfs): a write the guest flushed before stays on
//!   the host file; the writes that do not fit fail in the guest with an I/O error (ENOSPC).
//! - A drive whose file gives EIO (a btrfs file with corrupted data blocks, which btrfs's
//!   checksums refuse): the guest's read of those blocks fails, the intact block reads.
//! - The TAP deleted while the guest uses it: the guest's next sends fail quietly and Kiln's
//!   device thread does not spin on the dead fd.
//! - vsock host clients past Kiln's fd limit: accepting fails with EMFILE, the listener pauses
//!   instead of spinning, and the waiting clients are served once fds are free again.
//!
//! With `KILN_SECCOMP_LOG=1` the filters log instead of killing (tests/src/seccomp_log.rs).
//!
//! The guest runs a script from a raw drive and prints `KILN-T ...` lines on its console; it
//! waits for the host at barriers (host vsock ports the test serves only when its side is done).
//! No traffic leaves the network namespace the test creates.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::bench::{clock_ticks_per_second, cpu_ticks, find_thread, VMM_THREAD};
use kiln_tests::seccomp_log::{self, seccomp_args};
use kiln_tests::vsock_proto::read_line;
use kiln_tests::{
    console_lines, die_with_test, digest, ensure_command, kiln_bin, kvm_available, marker,
    scratch_dir, sha256_file, wait_for_exit, write_script_drive, write_tool_drive, NetNs,
};

const TOOL: &str = "kiln-vsock";
const TAP: &str = "kilnftap0";
const HOST_IP: &str = "10.199.1.1";
const GUEST_IP: &str = "10.199.1.2";
const GUEST_PORT: u32 = 5000;
/// Barriers: the guest goes on past step N once the host serves port 6000 + N.
const BARRIER_BASE: u32 = 6000;
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
/// The full drive: a sparse file bigger than the tmpfs it lives on.
const FULL_FS_BYTES: u64 = 4 << 20;
const FULL_DRIVE_BYTES: u64 = 16 << 20;
/// What the guest writes and flushes first on the full drive: the start of the tool binary.
const FLUSHED_BYTES: usize = 512 << 10;
/// The EIO drive: an intact first block, then blocks btrfs will refuse.
const EIO_DRIVE_BYTES: usize = 1 << 20;
const EIO_INTACT_BYTES: usize = 64 << 10;
/// vsock clients beyond the fd limit.
const VSOCK_CLIENTS: usize = 12;
const VSOCK_SPARE_FDS: u64 = 4;

fn guest_script(tool_len: usize) -> String {
    let flushed_blocks = FLUSHED_BYTES / 65536;
    let fill_blocks = (FULL_DRIVE_BYTES as usize - FLUSHED_BYTES) / 65536;
    let eio_blocks = EIO_DRIVE_BYTES / 65536;
    format!(
        r#"
if ! head -c {tool_len} /dev/vdc >/tmp/kv || ! chmod +x /tmp/kv; then
    echo "KILN-T setup failed"
    exit 1
fi
barrier() {{
    i=0
    until /tmp/kv fetch 2 $(({BARRIER_BASE} + $1)) 1 0 >/dev/null 2>&1; do
        i=$((i+1))
        [ $i -gt 600 ] && break
        sleep 1
    done
    echo "KILN-T barrier $1 $i"
}}
/tmp/kv serve {GUEST_PORT} &

# A full file system under the drive.
if dd if=/tmp/kv of=/dev/vdd bs=65536 count={flushed_blocks} oflag=direct conv=fsync 2>/dev/null; then
    echo "KILN-T flushed ok"
else
    echo "KILN-T flushed failed"
fi
if dd if=/dev/zero of=/dev/vdd bs=65536 seek={flushed_blocks} count={fill_blocks} oflag=direct conv=fsync 2>/dev/null; then
    echo "KILN-T fill accepted"
else
    echo "KILN-T fill refused"
fi
echo "KILN-T kept $(dd if=/dev/vdd bs=65536 count={flushed_blocks} iflag=direct 2>/dev/null | sha256sum)"
echo "KILN-T expected $(head -c {FLUSHED_BYTES} /tmp/kv | sha256sum)"

# Blocks the host cannot read.
if dd if=/dev/vde of=/dev/null bs=65536 count={eio_blocks} iflag=direct 2>/dev/null; then
    echo "KILN-T eio-read accepted"
else
    echo "KILN-T eio-read refused"
fi
echo "KILN-T intact $(dd if=/dev/vde bs=65536 count=1 iflag=direct 2>/dev/null | sha256sum)"

# The network, then the TAP deleted under it.
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
if ping -c 2 -W 20 {HOST_IP} >/dev/null 2>&1; then echo "KILN-T ping ok"; else echo "KILN-T ping failed"; fi
echo "KILN-T tap-in-use"
barrier 1
if ping -c 3 -W 2 {HOST_IP} >/dev/null 2>&1; then echo "KILN-T ping-after-delete ok"; else echo "KILN-T ping-after-delete failed"; fi
dd if=/dev/zero bs=1024 count=256 2>/dev/null | nc -w 2 {HOST_IP} 5001 >/dev/null 2>&1
echo "KILN-T sent-after-delete"

# vsock clients past the fd limit are served on the host side meanwhile.
echo "KILN-T vsock-ready"
barrier 2
echo "KILN-T done"
"#
    )
}

fn run(argv: &[&str]) -> std::process::Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn run_ok(argv: &[&str]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tmpfs of `bytes` mounted on `dir` while this lives.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, bytes: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes}"),
            "tmpfs",
            dir.to_str().unwrap(),
        ]);
        SmallFs { dir: dir.into() }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", self.dir.to_str().unwrap()]);
    }
}

/// A file on btrfs (on a loop device) whose blocks after the first `EIO_INTACT_BYTES` fail
/// their checksums: reads of them give EIO. Unmounted and detached when dropped.
struct EioFile {
    mnt: PathBuf,
    loop_dev: String,
    file: PathBuf,
}

impl EioFile {
    /// None when this host cannot make one (no btrfs in its kernel).
    fn create(dir: &Path) -> Option<Self> {
        ensure_command("mkfs.btrfs", "btrfs-progs");
        let image = dir.join("btrfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        run_ok(&["mkfs.btrfs", "-q", image.to_str().unwrap()]);
        let loop_dev = run_ok(&["losetup", "--find", "--show", image.to_str().unwrap()])
            .trim()
            .to_string();
        let mnt = dir.join("btrfs");
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = run(&["mount", "-t", "btrfs", &loop_dev, mnt.to_str().unwrap()]);
        let mut eio = EioFile {
            mnt: mnt.clone(),
            loop_dev,
            file: mnt.join("disk.img"),
        };
        if !mounted.status.success() {
            eprintln!(
                "no EIO drive on this host (mounting btrfs: {})",
                String::from_utf8_lossy(&mounted.stderr).trim()
            );
            eio.mnt = PathBuf::new();
            return None;
        }
        // The intact block, then a marker repeated: the corrupted blocks are found by it.
        let token = *b"KILN-EIO-MARKER!";
        let mut bytes: Vec<u8> = (0..EIO_INTACT_BYTES).map(|i| (i % 253) as u8).collect();
        while bytes.len() < EIO_DRIVE_BYTES {
            bytes.extend_from_slice(&token);
        }
        std::fs::write(&eio.file, &bytes).unwrap();
        run_ok(&["sync"]);
        // Corrupt every 4 KiB block of the image that holds the marker (btrfs stores the data
        // uncompressed, in whole blocks), then remount so no cached page hides it.
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let mut block = vec![0u8; 4096];
        let mut corrupted = 0;
        let len = backing.metadata().unwrap().len();
        let mut offset = 0;
        while offset < len {
            backing.read_exact_at(&mut block, offset).unwrap();
            if block.starts_with(&token) {
                backing.write_all_at(&[0x5a; 4096], offset).unwrap();
                corrupted += 1;
            }
            offset += 4096;
        }
        backing.sync_all().unwrap();
        assert!(
            corrupted >= (EIO_DRIVE_BYTES - EIO_INTACT_BYTES) / 4096,
            "found {corrupted} data blocks"
        );
        run_ok(&["umount", mnt.to_str().unwrap()]);
        run_ok(&["mount", "-t", "btrfs", &eio.loop_dev, mnt.to_str().unwrap()]);
        // The host sees the fault the guest should see.
        let file = std::fs::File::open(&eio.file).unwrap();
        let mut probe = vec![0u8; 4096];
        let err = file
            .read_exact_at(&mut probe, EIO_INTACT_BYTES as u64)
            .expect_err("a corrupted block read");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        Some(eio)
    }
}

impl Drop for EioFile {
    fn drop(&mut self) {
        if !self.mnt.as_os_str().is_empty() {
            let _ = run(&["umount", "-l", self.mnt.to_str().unwrap()]);
        }
        let _ = run(&["losetup", "-d", &self.loop_dev]);
    }
}

/// Waits for a console line starting with `prefix`, keeping every line in `seen`.
fn wait_for(lines: &mpsc::Receiver<String>, prefix: &str, seen: &mut Vec<String>) {
    let start = Instant::now();
    loop {
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.starts_with(prefix);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(_) => panic!(
                "no {prefix:?} on the console; last lines:\n{}",
                seen[seen.len().saturating_sub(40)..].join("\n")
            ),
        }
    }
}

/// Serves barrier `n` (answers the guest's `fetch` with one byte) from now on.
fn open_barrier(uds: &Path, n: u32) {
    let listener = UnixListener::bind(format!("{}_{}", uds.display(), BARRIER_BASE + n)).unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
                // "SOURCE 1 0\n": one byte of the seed-0 pattern, then close.
                if read_line(&mut stream).is_ok() {
                    let _ = stream.write_all(&kiln_tests::vsock_proto::pattern(0, 1));
                }
            });
        }
    });
}

/// The number of fds `pid` has open.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Sets `pid`'s soft fd limit, keeping its hard one; returns the soft limit it had.
fn set_soft_nofile(pid: u32, soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes the structs given, for a process this test started.
    unsafe {
        assert_eq!(
            libc::prlimit(
                pid as libc::pid_t,
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut limit
            ),
            0
        );
        let before = limit.rlim_cur;
        limit.rlim_cur = soft;
        assert_eq!(
            libc::prlimit(
                pid as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut()
            ),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
        before
    }
}

/// A host client of guest port [`GUEST_PORT`] that has sent its CONNECT line.
fn vsock_client(uds: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connect to the vsock socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    stream
}

/// Reads `OK <port>`, then round-trips a few bytes through the guest's ECHO server.
fn echo_through(stream: &mut UnixStream, what: &str) {
    let ok = read_line(stream).unwrap_or_else(|e| panic!("{what}: no OK line: {e}"));
    assert!(ok.starts_with("OK "), "{what}: {ok:?}");
    let payload = format!("echo from {what}");
    stream.write_all(b"ECHO\n").unwrap();
    stream.write_all(payload.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    stream.read_to_string(&mut back).unwrap();
    assert_eq!(back, payload, "{what}");
}

/// The `kiln_vmm` thread's CPU ticks.
fn vmm_ticks(pid: u32) -> u64 {
    let tid = find_thread(pid, VMM_THREAD).expect("the device thread");
    cpu_ticks(Path::new(&format!("/proc/{pid}/task/{tid}/stat"))).expect("its CPU time")
}

#[test]
fn a_guest_meets_a_full_disk_eio_a_deleted_tap_and_an_fd_limit_and_goes_on() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let tool = std::fs::read(images.vmlinux.parent().unwrap().join(TOOL)).expect("guest tool");
    assert!(tool.len() >= FLUSHED_BYTES, "the tool is the flushed data");
    let dir = scratch_dir("device-faults");
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool).unwrap();
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script(tool.len()));

    let small = SmallFs::mount(&dir.join("small"), FULL_FS_BYTES);
    let full_drive = small.dir.join("full.img");
    std::fs::File::create(&full_drive)
        .unwrap()
        .set_len(FULL_DRIVE_BYTES)
        .unwrap();
    let eio = EioFile::create(&dir);
    let eio_drive = match &eio {
        Some(eio) => eio.file.clone(),
        None => {
            let stand_in = dir.join("stand-in.img");
            std::fs::write(&stand_in, vec![0u8; EIO_DRIVE_BYTES]).unwrap();
            stand_in
        }
    };
    let intact: Vec<u8> = (0..EIO_INTACT_BYTES).map(|i| (i % 253) as u8).collect();
    let intact_file = dir.join("intact.bin");
    std::fs::write(&intact_file, &intact).unwrap();
    let intact_sum = sha256_file(&intact_file);

    let ns = NetNs::create(&format!("kiln-faults-{}", std::process::id()));
    ns.run(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.run(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.run(&["ip", "link", "set", TAP, "up"]);

    let uds = dir.join("v.sock");
    let log = dir.join("kiln.log");
    let kiln = kiln_bin();
    let args = [
        kiln.to_str().unwrap(),
        "run",
        "--mem-mib",
        "256",
        "--drive",
        &format!("path={},root,ro", images.rootfs.display()),
        "--drive",
        &format!("path={},ro", script.display()),
        "--drive",
        &format!("path={},ro", tool_drive.display()),
        "--drive",
        &format!("path={}", full_drive.display()),
        "--drive",
        &format!("path={}", eio_drive.display()),
        "--net",
        &format!("tap={TAP}"),
        "--vsock",
        &format!("cid=3,uds={}", uds.display()),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb",
    ];
    let seccomp = seccomp_args(&dir);
    let mut cmd = ns.command(&args);
    cmd.args(&seccomp);
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().expect("spawn kiln");
    let pid = child.id();
    let (lines, reader) = console_lines(&mut child);
    let mut seen = Vec::new();
    let started = Instant::now();

    // The TAP deleted while the guest uses it; then the device thread must idle, not spin.
    wait_for(&lines, "KILN-T tap-in-use", &mut seen);
    ns.run(&["ip", "link", "del", TAP]);
    let (ticks_before, measured_from) = (vmm_ticks(pid), Instant::now());
    thread::sleep(Duration::from_secs(3));
    let busy = (vmm_ticks(pid) - ticks_before) as f64
        / clock_ticks_per_second()
        / measured_from.elapsed().as_secs_f64();
    eprintln!("device thread busy {:.0}% with the TAP gone", busy * 100.0);
    assert!(busy < 0.5, "the device thread spins on the deleted TAP");
    open_barrier(&uds, 1);

    // vsock clients past the fd limit.
    wait_for(&lines, "KILN-T vsock-ready", &mut seen);
    let fds = open_fds(pid);
    let soft_limit = set_soft_nofile(pid, fds + VSOCK_SPARE_FDS);
    let mut clients: Vec<UnixStream> = (0..VSOCK_CLIENTS).map(|_| vsock_client(&uds)).collect();
    // The first few are accepted and served.
    for (i, client) in clients.iter_mut().take(2).enumerate() {
        echo_through(client, &format!("client {i} within the limit"));
    }
    thread::sleep(Duration::from_secs(2));
    let (ticks_before, measured_from) = (vmm_ticks(pid), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let busy_paused = (vmm_ticks(pid) - ticks_before) as f64
        / clock_ticks_per_second()
        / measured_from.elapsed().as_secs_f64();
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("pausing the listener"),
        "accept never failed: {log_text}"
    );
    eprintln!(
        "device thread busy {:.0}% with accept failing",
        busy_paused * 100.0
    );
    assert!(busy_paused < 0.5, "the device thread spins on EMFILE");
    // Fds free again: every waiting client is served.
    drop(clients.drain(..2));
    set_soft_nofile(pid, soft_limit);
    for (i, client) in clients.iter_mut().enumerate() {
        echo_through(client, &format!("waiting client {i}"));
    }
    drop(clients);
    open_barrier(&uds, 2);

    wait_for(&lines, "KILN-T done", &mut seen);
    let status = wait_for_exit(&mut child, BOOT_DEADLINE.saturating_sub(started.elapsed()));
    // The rest of the console, then everything is checked.
    let _ = reader.join();
    seen.extend(lines.try_iter());
    let console = seen.join("\n");
    let log_text = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "kiln ran {:.1} s, {status:?}; log:\n{log_text}\nconsole:\n{console}",
        started.elapsed().as_secs_f64()
    );
    seccomp_log::report(pid);
    assert_eq!(
        status.code(),
        Some(0),
        "Kiln's exit{}",
        seccomp_log::audit_note(pid)
    );
    assert!(console.contains("KILN-GUEST-SCRIPT-EXIT"), "script ended");

    // Full disk: the flushed write is there, in the guest and on the host; the rest refused.
    assert_eq!(marker(&console, "flushed"), Some("ok"));
    assert_eq!(marker(&console, "fill"), Some("refused"));
    assert_eq!(
        digest(marker(&console, "kept")),
        digest(marker(&console, "expected"))
    );
    let host_copy = std::fs::read(&full_drive).unwrap();
    assert_eq!(
        &host_copy[..FLUSHED_BYTES],
        &tool[..FLUSHED_BYTES],
        "the flushed write on the host file"
    );

    // EIO: the bad blocks refused, the intact one read.
    if eio.is_some() {
        assert_eq!(marker(&console, "eio-read"), Some("refused"));
        assert_eq!(
            digest(marker(&console, "intact")),
            Some(intact_sum.as_str())
        );
    }

    // The TAP: used, then gone without harm.
    assert_eq!(marker(&console, "ping"), Some("ok"));
    assert_eq!(marker(&console, "ping-after-delete"), Some("failed"));
    assert!(console.contains("KILN-T sent-after-delete"));
    assert!(!uds.exists(), "the vsock socket is removed on exit");
    drop(eio);
    drop(small);
    let _ = std::fs::remove_dir_all(&dir);
}
