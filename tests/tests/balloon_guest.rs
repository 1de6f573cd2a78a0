//! End to end: virtio-balloon through Firecracker's API with the real default guest (one boot).
//!
//! A 256 MiB guest with a balloon (statistics every second) fills 200 MiB of a tmpfs and frees
//! it, so Kiln's guest-memory mapping holds those pages. Inflating the balloon to 160 MiB must
//! give them back to the host: the mapping's RSS (its `/proc/PID/smaps` entry) drops by at least
//! 100 MiB, the guest's MemTotal drops by the balloon's size, and `GET /balloon/statistics`
//! serves the guest's figures. Deflating it to 0 gives the memory back to the guest, which then
//! fills 100 MiB: more than it had with the balloon inflated. (Filling costs minutes here: the
//! guest kernel's copies run through the instruction emulator, about 0.6-1 MiB/s, so this one
//! boot takes several minutes of the test command.)

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::{
    api_call as call, die_with_test, kiln_bin, kvm_available, scratch_dir, wait_for_exit,
    wait_for_socket, wait_until, write_script_drive,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const GUEST_MIB: u64 = 256;
const FILL_MIB: u64 = 200;
const BALLOON_MIB: u64 = 160;
/// The fill after deflating: more than the guest has free while the balloon holds 160 MiB.
const REFILL_MIB: u64 = 100;
/// How much of the filled memory inflating must hand back to the host.
const RETURNED_MIB: u64 = 100;

/// Fills and frees FILL_MIB, then waits for MemTotal to drop by most of the balloon (inflated),
/// then to come back (deflated), and fills REFILL_MIB.
fn guest_script() -> String {
    format!(
        r#"
memtotal() {{
    while read -r key value _; do
        if [ "$key" = MemTotal: ]; then echo "$value"; return; fi
    done </proc/meminfo
}}
fill() {{
    mkdir -p /tmp/fill && mount -t tmpfs -o size={tmpfs}m tmpfs /tmp/fill &&
        dd if=/dev/zero of=/tmp/fill/f bs=1M count=$1 2>/dev/null &&
        echo "KILN-T filled $(wc -c </tmp/fill/f)"
    rm -f /tmp/fill/f
    umount /tmp/fill
}}
echo "KILN-T driver $(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio)"
full=$(memtotal)
fill {FILL_MIB}
echo "KILN-T freed $full"
i=0
while [ $(( full - $(memtotal) )) -lt {inflated_kb} ] && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done
echo "KILN-T inflated $(memtotal)"
i=0
while [ $(( full - $(memtotal) )) -gt 1024 ] && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done
echo "KILN-T deflated $(memtotal)"
fill {REFILL_MIB}
echo "KILN-T done"
"#,
        tmpfs = FILL_MIB + 16,
        // Most of the balloon: the driver may still be adding its last pages.
        inflated_kb = (BALLOON_MIB - 8) << 10,
    )
}

/// The RSS in KiB of the process's guest-memory mapping: the one mapping of exactly the
/// guest's size.
fn guest_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let want = format!("{}", GUEST_MIB << 10);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some("Size:"), Some(kib)) => in_guest = kib == want,
            (Some("Rss:"), Some(kib)) if in_guest => return kib.parse().expect("Rss"),
            _ => {}
        }
    }
    panic!("no {GUEST_MIB} MiB mapping in /proc/{pid}/smaps");
}

fn put(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, reply) = call(sock, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {reply}");
}

fn get(sock: &Path, path: &str) -> serde_json::Value {
    let (status, reply) = call(sock, "GET", path, "");
    assert_eq!(status, 200, "GET {path}: {reply}");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("GET {path}: {e}: {reply}"))
}

/// Time since the test's first wait, for the log: the phases here take minutes.
fn started() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Waits for a console line starting with `KILN-T <key>`; returns what follows.
fn wait_for(lines: &mpsc::Receiver<String>, key: &str, seen: &mut Vec<String>) -> String {
    let prefix = format!("KILN-T {key}");
    let start = Instant::now();
    eprintln!("[{:?}] waiting for {prefix}", started());
    loop {
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if let Some(rest) = line.trim_end().strip_prefix(&prefix) {
                    return rest.trim().to_string();
                }
            }
            Err(_) => panic!(
                "no {prefix:?} on the console; last lines:\n{}",
                seen[seen.len().saturating_sub(40)..].join("\n")
            ),
        }
    }
}

#[test]
fn inflating_returns_guest_memory_to_the_host_and_deflating_gives_it_back() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let dir = scratch_dir("balloon-guest");
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script());
    let sock = dir.join("api.sock");

    let mut cmd = std::process::Command::new(kiln_bin());
    cmd.args(["--api-sock", sock.to_str().unwrap()]);
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kiln");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (line_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    wait_for_socket(&sock, Duration::from_secs(30));

    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb"}}"#,
        images.vmlinux.display()
    );
    put(&sock, "PUT", "/boot-source", &boot);
    put(
        &sock,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{GUEST_MIB}}}"#),
    );
    for (id, path, root) in [("rootfs", &images.rootfs, true), ("script", &script, false)] {
        let body = format!(
            r#"{{"drive_id":"{id}","path_on_host":"{}","is_root_device":{root},"is_read_only":true}}"#,
            path.display()
        );
        put(&sock, "PUT", &format!("/drives/{id}"), &body);
    }
    // A balloon bigger than the guest is refused; the real one starts empty.
    let (status, reply) = call(
        &sock,
        "PUT",
        "/balloon",
        &format!(
            r#"{{"amount_mib":{},"deflate_on_oom":false}}"#,
            GUEST_MIB + 1
        ),
    );
    assert_eq!(status, 400, "{reply}");
    put(
        &sock,
        "PUT",
        "/balloon",
        r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1}"#,
    );
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );

    let mut seen = Vec::new();
    assert_eq!(
        wait_for(&lines, "driver", &mut seen),
        "1",
        "the guest's driver bound"
    );
    assert_eq!(
        wait_for(&lines, "filled", &mut seen),
        (FILL_MIB << 20).to_string()
    );
    let full_kb: u64 = wait_for(&lines, "freed", &mut seen).parse().unwrap();
    let before = guest_rss_kib(pid);
    assert!(
        before >= FILL_MIB << 10,
        "the guest's {FILL_MIB} MiB should be resident: {before} KiB"
    );

    // Post-boot PUT is refused; PATCH inflates.
    let (status, _) = call(
        &sock,
        "PUT",
        "/balloon",
        r#"{"amount_mib":1,"deflate_on_oom":false}"#,
    );
    assert_eq!(status, 400);
    put(
        &sock,
        "PATCH",
        "/balloon",
        &format!(r#"{{"amount_mib":{BALLOON_MIB}}}"#),
    );
    assert_eq!(get(&sock, "/balloon")["amount_mib"], BALLOON_MIB);
    let inflated_kb: u64 = wait_for(&lines, "inflated", &mut seen).parse().unwrap();
    assert!(
        full_kb - inflated_kb >= (BALLOON_MIB - 8) << 10,
        "guest MemTotal {full_kb} -> {inflated_kb} kB"
    );
    let mut stats = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(300),
        "the balloon at its target",
        || {
            stats = get(&sock, "/balloon/statistics");
            stats["actual_mib"] == BALLOON_MIB && stats.get("free_memory").is_some()
        },
    );
    let after = guest_rss_kib(pid);
    eprintln!("guest-memory RSS {before} KiB -> {after} KiB with a {BALLOON_MIB} MiB balloon");
    assert!(
        before.saturating_sub(after) >= RETURNED_MIB << 10,
        "inflating to {BALLOON_MIB} MiB gave back only {} KiB",
        before.saturating_sub(after)
    );
    assert_eq!(stats["target_mib"], BALLOON_MIB);
    assert_eq!(stats["target_pages"], BALLOON_MIB * 256);
    let total = stats["total_memory"].as_u64().expect("total_memory");
    assert!(
        ((GUEST_MIB - BALLOON_MIB - 32) << 20..=GUEST_MIB << 20).contains(&total),
        "{stats}"
    );
    // Fault counts need the guest's VM_EVENT_COUNTERS, which the default kernel leaves out.
    for field in ["free_memory", "available_memory", "disk_caches"] {
        assert!(stats[field].is_u64(), "{field} missing: {stats}");
    }
    put(
        &sock,
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":2}"#,
    );
    let (status, reply) = call(
        &sock,
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":0}"#,
    );
    assert_eq!(
        status, 400,
        "statistics cannot be turned off after boot: {reply}"
    );

    // Deflating gives the memory back: the guest can fill REFILL_MIB, more than it had free.
    put(&sock, "PATCH", "/balloon", r#"{"amount_mib":0}"#);
    let deflated_kb: u64 = wait_for(&lines, "deflated", &mut seen).parse().unwrap();
    assert!(
        full_kb - deflated_kb <= 1024,
        "{full_kb} -> {deflated_kb} kB"
    );
    assert_eq!(
        wait_for(&lines, "filled", &mut seen),
        (REFILL_MIB << 20).to_string()
    );
    wait_for(&lines, "done", &mut seen);
    let status = wait_for_exit(&mut child, BOOT_DEADLINE);
    let stderr = stderr_thread.join().unwrap_or_default();
    assert_eq!(status.code(), Some(0), "kiln: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
