//! End to end: snapshots with Firecracker's API, from one boot of the default guest.
//!
//! The guest (ext4 root on a read-only drive, a read-write data drive, eth0 on a TAP inside a
//! network namespace the test makes, vsock) starts `kiln-vsock serve`, writes a record to the
//! data drive and syncs it, keeps a marker in its tmpfs, and then counts: each second it pings
//! the host's TAP address and prints `KILN-T count N ok|no MARKER`.
//!
//! Then, each from the same Full snapshot of the paused guest (the first Kiln SIGKILLed after):
//! - every bad state or memory file is refused with 400 by one fresh Kiln, which then loads
//!   the good snapshot: the count goes on from where it stopped (not from 1), the marker is
//!   there, the guest pings the *new* TAP (`network_overrides`), a vsock stream made after the
//!   restore echoes (`vsock_override`), the data drive holds the synced record;
//! - that VM, loaded with `track_dirty_pages`, takes a Diff snapshot later on; the Diff merged
//!   onto the Full's memory file (`kiln snapshot merge`) restores (`kiln run --restore`) to the
//!   count of the Diff;
//! - four clones run at once, each with its own API socket, TAP, vsock socket and data drive
//!   (`drive_overrides`), and each echoes on vsock; their guest memory is shared: the summed Pss
//!   of their guest-memory mappings is well below the sum of their Rss;
//! - a load with the `Uffd` backend gets its pages from a page-fault handler written from
//!   Firecracker's protocol (tests/src/uffd_handler.rs), and counts on.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::bench::memory_kib;
use kiln_tests::uffd_handler::UffdHandler;
use kiln_tests::vsock_proto::{connect_guest, pattern};
use kiln_tests::{
    api_call, console_lines, die_with_test, kiln_bin, kvm_available, scratch_dir, wait_for_socket,
    write_script_drive, write_tool_drive, NetNs,
};

const TOOL: &str = "kiln-vsock";
const GUEST_PORT: u32 = 5000;
const GUEST_MIB: u64 = 128;
const HOST_IP: &str = "172.16.7.1";
const GUEST_IP: &str = "172.16.7.2";
const GUEST_MAC: &str = "06:00:ac:10:07:02";
/// The MAC every TAP the guest talks to gets, so its ARP entry stays right after a restore
/// onto another TAP.
const TAP_MAC: &str = "06:00:ac:10:07:01";
const RECORD: &str = "KILN-SNAPSHOT-RECORD";
const MARKER: &str = "in-guest-memory-7f3a";
const DEADLINE: Duration = Duration::from_secs(900);

fn guest_script(tool_len: usize) -> String {
    format!(
        r#"
head -c {tool_len} /dev/vdd >/tmp/kv && chmod +x /tmp/kv || echo "KILN-T setup failed"
/tmp/kv serve {GUEST_PORT} &
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo {MARKER} >/tmp/marker
echo {RECORD} | dd of=/dev/vdc conv=fsync 2>/dev/null
echo "KILN-T ready"
i=0
while [ $i -lt 100000 ]; do
    i=$((i+1))
    if ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; then p=ok; else p=no; fi
    read -r m </tmp/marker
    echo "KILN-T count $i $p $m"
    sleep 1
done
"#
    )
}

/// A running Kiln whose console lines (its stdout) arrive on a channel.
struct Vmm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vmm {
    /// Starts `kiln ARGS` inside `ns`.
    fn spawn(ns: &NetNs, args: &[&str]) -> Self {
        let bin = kiln_bin();
        let mut argv = vec![bin.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut cmd = ns.command(&argv);
        die_with_test(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Kiln's log lines go to the test's output, where a failure shows them.
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn kiln");
        let (lines, _reader) = console_lines(&mut child);
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a console line `KILN-T <key> ...` that `accept` takes; returns its words after
    /// the key.
    fn wait_for(&mut self, key: &str, mut accept: impl FnMut(&[&str]) -> bool) -> Vec<String> {
        let prefix = format!("KILN-T {key}");
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.trim_end().strip_prefix(&prefix) {
                        let words: Vec<&str> = rest.split_whitespace().collect();
                        if accept(&words) {
                            return words.iter().map(|w| w.to_string()).collect();
                        }
                    }
                }
                Err(_) => panic!(
                    "no {prefix:?} line; last lines:\n{}",
                    self.seen[self.seen.len().saturating_sub(30)..].join("\n")
                ),
            }
        }
    }

    /// The last count the paused guest printed: every line it wrote before the pause, read
    /// (the console reader is given a moment to catch up).
    fn last_count(&mut self) -> u64 {
        std::thread::sleep(Duration::from_millis(500));
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen
            .iter()
            .rev()
            .find_map(|l| {
                l.strip_prefix("KILN-T count ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .expect("a count before the pause")
    }

    /// The next count line: (count, ping ok, marker).
    fn next_count(&mut self) -> (u64, bool, String) {
        let words = self.wait_for("count", |w| w.len() == 3);
        (
            words[0].parse().expect("count"),
            words[1] == "ok",
            words[2].clone(),
        )
    }

    /// Count lines until one says the ping went through.
    fn wait_for_ping(&mut self) -> u64 {
        let words = self.wait_for("count", |w| w.get(1) == Some(&"ok"));
        words[0].parse().expect("count")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or a sandbox platform's clean-up would.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn put(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, reply) = api_call(sock, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {reply}");
}

/// `PUT /snapshot/load`'s refusal of `body`: its fault message.
fn refused_load(sock: &Path, body: &str) -> String {
    let (status, reply) = api_call(sock, "PUT", "/snapshot/load", body);
    assert_eq!(status, 400, "{body}: {reply}");
    let value: serde_json::Value = serde_json::from_str(&reply).expect("fault JSON");
    value["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn load_body(state: &Path, mem: &Path, tap: &str, vsock: &Path, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},
            "network_overrides":[{{"iface_id":"eth0","host_dev_name":"{tap}"}}],
            "vsock_override":{{"uds_path":"{}"}},"resume_vm":true{extra}}}"#,
        state.display(),
        mem.display(),
        vsock.display()
    )
}

/// Echoes a pattern through the guest's vsock server, on a connection made now.
///
/// A connection made just after a restore can race the guest's handling of the transport reset
/// event: when the guest accepts it first, the reset then closes it on the guest's side without
/// a word to the host (Linux resets its connected sockets silently), and the echo never comes.
/// Clients of a restored VM reconnect; so does this, once per stalled try, and says so.
fn vsock_echo(uds: &Path, seed: u32) {
    let data = pattern(seed, 16 << 10);
    for attempt in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut s = connect_guest(uds, GUEST_PORT, deadline);
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"ECHO\n").unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        match s.read_to_end(&mut back) {
            Ok(_) if back == data => return,
            // The guest's reset of the connection, seen as an early end (its RST).
            Ok(_) => eprintln!(
                "vsock echo, try {attempt}: ended after {} of {} bytes; reconnecting",
                back.len(),
                data.len()
            ),
            Err(e) => eprintln!(
                "vsock echo, try {attempt}: {e} after {} bytes; reconnecting",
                back.len()
            ),
        }
    }
    panic!("no vsock echo in 3 tries on {}", uds.display());
}

fn allocated_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("file").blocks() / 2
}

fn add_tap(ns: &NetNs, name: &str, with_ip: bool) {
    ns.run(&["ip", "tuntap", "add", "dev", name, "mode", "tap"]);
    ns.run(&["ip", "link", "set", name, "address", TAP_MAC]);
    if with_ip {
        ns.run(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", name]);
    }
    ns.run(&["ip", "link", "set", name, "up"]);
}

fn read_record(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("data drive");
    String::from_utf8_lossy(&bytes[..RECORD.len()]).to_string()
}

#[test]
fn a_snapshot_restores_clones_and_diffs() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let tool = std::fs::read(images.vmlinux.parent().unwrap().join(TOOL)).expect(TOOL);
    let dir = scratch_dir("snapshot-guest");
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool).unwrap();
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script(tool.len()));
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let ns = NetNs::create(&format!("kiln-snap-{}", std::process::id()));
    add_tap(&ns, "ktap0", true);

    // --- Boot, then a Full snapshot of the paused guest. ---
    let sock_a = dir.join("a.sock");
    let vsock_a = dir.join("a.vsock");
    let mut a = Vmm::spawn(&ns, &["--api-sock", sock_a.to_str().unwrap()]);
    wait_for_socket(&sock_a, Duration::from_secs(30));
    put(
        &sock_a,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb"}}"#,
            images.vmlinux.display()
        ),
    );
    put(
        &sock_a,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{GUEST_MIB}}}"#),
    );
    for (id, path, root, ro) in [
        ("rootfs", &images.rootfs, true, true),
        ("script", &script, false, true),
        ("data", &data, false, false),
        ("tool", &tool_drive, false, true),
    ] {
        put(
            &sock_a,
            "PUT",
            &format!("/drives/{id}"),
            &format!(
                r#"{{"drive_id":"{id}","path_on_host":"{}","is_root_device":{root},"is_read_only":{ro}}}"#,
                path.display()
            ),
        );
    }
    put(
        &sock_a,
        "PUT",
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id":"eth0","host_dev_name":"ktap0","guest_mac":"{GUEST_MAC}"}}"#),
    );
    put(
        &sock_a,
        "PUT",
        "/vsock",
        &format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock_a.display()),
    );
    put(
        &sock_a,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    a.wait_for("ready", |_| true);
    a.wait_for_ping();
    vsock_echo(&vsock_a, 1);
    let (status, _) = api_call(
        &sock_a,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path":"/x","mem_file_path":"/y"}"#,
    );
    assert_eq!(status, 400, "a running VM is not snapshotted");
    put(&sock_a, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let before = a.last_count();
    let (state, mem) = (dir.join("full.state"), dir.join("full.mem"));
    let started = Instant::now();
    put(
        &sock_a,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    eprintln!(
        "Full snapshot in {:?}: state {} bytes, memory file {} KiB allocated of {} MiB",
        started.elapsed(),
        std::fs::metadata(&state).unwrap().len(),
        allocated_kib(&mem),
        GUEST_MIB
    );
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), GUEST_MIB << 20);
    assert!(
        allocated_kib(&mem) < (GUEST_MIB << 10) * 3 / 4,
        "the memory file is sparse"
    );
    let (describe, _) = {
        let out = Command::new(kiln_bin())
            .args(["snapshot", "describe", state.to_str().unwrap()])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), out.status)
    };
    assert_eq!(describe.trim(), "v1.0.0");
    a.kill();
    assert_eq!(
        read_record(&data),
        RECORD,
        "the synced record is on the drive"
    );
    // The first TAP is gone: a restore must be told of the new one.
    ns.run(&["ip", "link", "del", "ktap0"]);
    add_tap(&ns, "ktap1", true);

    // --- Bad files, each refused by one process that then loads the good snapshot. ---
    let sock_b = dir.join("b.sock");
    let vsock_b = dir.join("b.vsock");
    let mut b = Vmm::spawn(&ns, &["--api-sock", sock_b.to_str().unwrap()]);
    wait_for_socket(&sock_b, Duration::from_secs(30));
    let good = std::fs::read(&state).unwrap();
    let bad_state = dir.join("bad.state");
    let damage = |name: &str, bytes: Vec<u8>, expected: &str| {
        std::fs::write(&bad_state, bytes).unwrap();
        let message = refused_load(&sock_b, &load_body(&bad_state, &mem, "ktap1", &vsock_b, ""));
        assert!(message.contains(expected), "{name}: {message}");
        eprintln!("{name}: {message}");
    };
    damage("truncated", good[..good.len() / 2].to_vec(), "truncated");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x20;
    damage("corrupted", flipped, "corrupted");
    let mut foreign = good.clone();
    foreign[..8].copy_from_slice(b"KILNSNPA");
    damage("foreign", foreign, "aarch64");
    let mut newer = good.clone();
    newer[8..10].copy_from_slice(&2u16.to_le_bytes());
    damage("newer", newer, "format version is 2.0");
    let mut oversized = good.clone();
    oversized[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    damage("oversized", oversized, "more than");
    damage(
        "not a snapshot",
        b"\x7fELF".repeat(10),
        "not a Kiln snapshot",
    );
    let short_mem = dir.join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 4096]).unwrap();
    let message = refused_load(
        &sock_b,
        &load_body(&state, &short_mem, "ktap1", &vsock_b, ""),
    );
    assert!(message.contains("4096 bytes"), "{message}");
    let message = refused_load(
        &sock_b,
        &load_body(
            &state,
            &mem,
            "ktap1",
            &vsock_b,
            r#","drive_overrides":[{"drive_id":"nope","path_on_host":"/tmp/x"}]"#,
        ),
    );
    assert!(message.contains("no drive nope"), "{message}");
    let unknown_iface = load_body(&state, &mem, "ktap1", &vsock_b, "").replace("eth0", "eth9");
    let message = refused_load(&sock_b, &unknown_iface);
    assert!(message.contains("no network interface eth9"), "{message}");
    let (status, info) = api_call(&sock_b, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(info.contains("Not started"), "{info}");

    let started = Instant::now();
    put(
        &sock_b,
        "PUT",
        "/snapshot/load",
        &load_body(
            &state,
            &mem,
            "ktap1",
            &vsock_b,
            r#","track_dirty_pages":true"#,
        ),
    );
    eprintln!("load answered in {:?}", started.elapsed());
    let (first, _, marker) = b.next_count();
    assert!(
        first > before && first <= before + 2,
        "the count goes on from {before}: {first}"
    );
    assert_eq!(marker, MARKER);
    let (_, info) = api_call(&sock_b, "GET", "/", "");
    assert!(info.contains("Running"), "{info}");
    let pinged = b.wait_for_ping();
    eprintln!("restored: count {first} after {before}; ping through the new TAP at count {pinged}");
    vsock_echo(&vsock_b, 2);

    // --- A Diff, merged onto the Full, restores to the Diff's count. ---
    b.next_count();
    put(&sock_b, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let at_diff = b.last_count();
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    put(
        &sock_b,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"Diff","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            diff_state.display(),
            diff_mem.display()
        ),
    );
    eprintln!(
        "Diff: {} KiB allocated (the Full: {} KiB)",
        allocated_kib(&diff_mem),
        allocated_kib(&mem)
    );
    assert!(allocated_kib(&diff_mem) < allocated_kib(&mem));
    b.kill();
    let merged = dir.join("merged.mem");
    std::fs::copy(&mem, &merged).unwrap();
    let out = Command::new(kiln_bin())
        .args([
            "snapshot",
            "merge",
            merged.to_str().unwrap(),
            diff_mem.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vsock_c = dir.join("c.vsock");
    let restore = format!(
        "snapshot={},mem={},net.eth0=ktap1,vsock={}",
        diff_state.display(),
        merged.display(),
        vsock_c.display()
    );
    let mut c = Vmm::spawn(&ns, &["run", "--restore", &restore]);
    let (count, _, _) = c.next_count();
    assert!(
        count > at_diff && count <= at_diff + 2,
        "the merged Diff goes on from {at_diff}: {count}"
    );
    c.kill();

    // --- Four clones of the Full snapshot at once. ---
    let clones: Vec<(Vmm, PathBuf)> = (0..4)
        .map(|i| {
            let tap = format!("kclone{i}");
            add_tap(&ns, &tap, false);
            let sock = dir.join(format!("clone{i}.sock"));
            let vsock = dir.join(format!("clone{i}.vsock"));
            let drive = dir.join(format!("clone{i}.img"));
            std::fs::copy(&data, &drive).unwrap();
            let vmm = Vmm::spawn(&ns, &["--api-sock", sock.to_str().unwrap()]);
            wait_for_socket(&sock, Duration::from_secs(30));
            put(
                &sock,
                "PUT",
                "/snapshot/load",
                &load_body(
                    &state,
                    &mem,
                    &tap,
                    &vsock,
                    &format!(
                        r#","drive_overrides":[{{"drive_id":"data","path_on_host":"{}"}}]"#,
                        drive.display()
                    ),
                ),
            );
            (vmm, vsock)
        })
        .collect();
    let mut clones = clones;
    let (mut rss_sum, mut pss_sum) = (0, 0);
    for (i, (vmm, vsock)) in clones.iter_mut().enumerate() {
        let (count, _, _) = vmm.next_count();
        assert!(count > before, "clone {i} goes on from {before}: {count}");
        vsock_echo(vsock, 10 + i as u32);
    }
    for (vmm, _) in &clones {
        let kib = memory_kib(vmm.pid(), GUEST_MIB << 20).expect("smaps");
        rss_sum += kib.guest_rss;
        pss_sum += kib.guest_pss;
    }
    eprintln!("4 clones: guest memory Rss {rss_sum} KiB in all, Pss {pss_sum} KiB in all");
    assert!(
        pss_sum * 2 < rss_sum,
        "clones share their snapshot's pages: Pss {pss_sum} KiB, Rss {rss_sum} KiB"
    );
    for (vmm, _) in clones {
        vmm.kill();
    }

    // --- The Uffd backend, served by a page-fault handler. ---
    let handler_sock = dir.join("uffd.sock");
    let handler = UffdHandler::start(&handler_sock, &mem);
    let sock_d = dir.join("d.sock");
    let vsock_d = dir.join("d.vsock");
    let mut d = Vmm::spawn(&ns, &["--api-sock", sock_d.to_str().unwrap()]);
    wait_for_socket(&sock_d, Duration::from_secs(30));
    put(
        &sock_d,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},
                "network_overrides":[{{"iface_id":"eth0","host_dev_name":"ktap1"}}],
                "vsock_override":{{"uds_path":"{}"}},"resume_vm":true}}"#,
            state.display(),
            handler_sock.display(),
            vsock_d.display()
        ),
    );
    let (count, _, marker) = d.next_count();
    assert!(
        count > before,
        "the Uffd restore goes on from {before}: {count}"
    );
    assert_eq!(marker, MARKER);
    let regions = handler
        .regions_json
        .lock()
        .unwrap()
        .clone()
        .expect("regions");
    for field in ["base_host_virt_addr", "size", "offset", "page_size"] {
        assert!(regions[0].get(field).is_some(), "{field} in {regions}");
    }
    let faults = handler.faults.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("Uffd restore: {faults} pages served by the handler");
    assert!(faults > 0);
    d.kill();
    drop(handler);
    let _ = std::fs::remove_dir_all(&dir);
}
