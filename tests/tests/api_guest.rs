//! End to end through Firecracker's API with the real default guest, in Kata runtime-rs's call
//! order (two boots, about three minutes on our nested-KVM machines), inside a network namespace
//! this test creates:
//!
//! 1. Over the API socket: boot source, machine config, a read-only root drive and placeholder
//!    drives, vsock, network interface eth0 on a TAP, entropy, InstanceStart. While the guest runs:
//!    the host reaches the guest's vsock listener through the hybrid socket, the guest's eth0 has
//!    the configured MAC and pings the TAP, its clock has the host's time (from the CMOS
//!    clock), the placeholder gets its real backing file by PATCH
//!    and the guest sees the new capacity and contents, the VM is paused and resumed, and
//!    SendCtrlAltDel ends it.
//!    MMDS version 2 on eth0: the guest gets a session token (`PUT /latest/api/token` with
//!    busybox `nc`), is refused without it or with a wrong one, reads its metadata with busybox
//!    `wget`, and sees a `PATCH /mmds` made while it runs; its other traffic (the ping) still
//!    reaches the TAP.
//! 2. The same VM from `--config-file` (the `GET /vm/config` document read before boot 1's
//!    InstanceStart, switched to MMDS version 1) with `--no-api` and `--metadata`: vsock both
//!    ways, eth0 and MMDS again (plain `wget`, no token), then the guest reboots.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::vsock_proto::{connect_guest, fnv64, fnv_hex, pattern, read_line};
use kiln_tests::{
    api_call as call, die_with_test, kiln_bin, kvm_available, scratch_dir, sha256_file,
    spawn_piped, wait_for_socket, wait_with_deadline, write_script_drive, write_tool_drive, NetNs,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const TAP: &str = "kilntap1";
const HOST_IP: &str = "10.199.1.1";
const GUEST_IP: &str = "10.199.1.2";
const GUEST_MAC: &str = "02:4b:49:4c:4e:02";
const GUEST_CID: u32 = 3;
/// The guest's vsock listener (Kata's agent listens on 1024).
const AGENT_PORT: u32 = 1024;
/// Host port the second boot's guest connects to when the host is done with it.
const DONE_PORT: u32 = 7000;
const TOOL: &str = "kiln-vsock";
/// MMDS's default address.
const MMDS_IP: &str = "169.254.169.254";

/// Copies the vsock tool off its raw drive, starts its server, brings eth0 up and reports it.
fn common_script(tool_len: usize) -> String {
    format!(
        r#"
head -c {tool_len} /dev/vdd >/tmp/kv && chmod +x /tmp/kv || echo "KILN-T setup failed"
/tmp/kv serve {AGENT_PORT} &
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo "KILN-T date $(date +%s)"
echo "KILN-T mac $(cat /sys/class/net/eth0/address)"
if ping -c 2 -W 20 {HOST_IP} >/dev/null 2>&1; then echo "KILN-T ping ok"; else echo "KILN-T ping failed"; fi
ip route add {MMDS_IP}/32 dev eth0
"#
    )
}

/// Boot 1: ready, then waits for its third drive to change size, reports the new size and
/// contents, then waits to be stopped.
fn api_boot_script(tool_len: usize) -> String {
    common_script(tool_len)
        + &format!(
            r#"
md=http://{MMDS_IP}/latest/meta-data
tok=$(printf 'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n' | nc {MMDS_IP} 80 | tail -n 1)
echo "KILN-T mmds-token-len ${{#tok}}"
wget -q -O /dev/null $md/instance-id 2>/dev/null; echo "KILN-T mmds-no-token $?"
wget -q -O /dev/null --header 'X-metadata-token: bogus' $md/instance-id 2>/dev/null; echo "KILN-T mmds-bad-token $?"
echo "KILN-T mmds-v2 $(wget -q -O - --header "X-metadata-token: $tok" $md/instance-id)"
echo "KILN-T ready $(cat /sys/block/vdc/size)"
i=0
while [ "$(cat /sys/block/vdc/size)" = 8 ] && [ $i -lt 600 ]; do sleep 1; i=$((i + 1)); done
echo "KILN-T resized $(cat /sys/block/vdc/size)"
echo "KILN-T sum $(sha256sum </dev/vdc)"
echo "KILN-T mmds-patched $(wget -q -O - --header "X-metadata-token: $tok" $md/patched)"
sleep 900
"#
        )
}

/// Boot 2: reports, then fetches 16 bytes from host port [`DONE_PORT`] (served once the host is
/// done) and ends, which reboots the guest.
fn config_file_boot_script(tool_len: usize) -> String {
    common_script(tool_len)
        + &format!(
            r#"
echo "KILN-T mmds-v1 $(wget -q -O - http://{MMDS_IP}/latest/meta-data/instance-id)"
echo "KILN-T size $(cat /sys/block/vdc/size)"
i=0
until /tmp/kv fetch 2 {DONE_PORT} 16 5; do
    i=$((i+1))
    [ $i -gt 600 ] && break
    sleep 1
done
"#
        )
}

/// Sends 256 KiB to the guest's `SINK` through the hybrid vsock socket and checks its checksum.
fn vsock_round_trip(uds: &Path) -> String {
    let mut s = connect_guest(uds, AGENT_PORT, Instant::now() + Duration::from_secs(600));
    let data = pattern(42, 256 << 10);
    s.write_all(b"SINK\n").unwrap();
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut s).unwrap();
    assert_eq!(reply, format!("{} {}", data.len(), fnv_hex(fnv64(&data))));
    reply
}

/// Creates a FIFO at `path` and reads it line by line on a thread, as Kata does with the log
/// and metrics FIFOs it gives Firecracker.
fn drain_fifo(path: &Path) -> mpsc::Receiver<String> {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // Blocks until kiln opens the FIFO for writing.
        let Ok(fifo) = std::fs::File::open(&path) else {
            return;
        };
        for line in BufReader::new(fifo).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The value of the console line `KILN-T <key> <value>`.
fn marker<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().find_map(|line| {
        let rest = line.trim_end().strip_prefix("KILN-T ")?;
        Some(rest.strip_prefix(key)?.trim())
    })
}

/// The host's wall clock in seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn put(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, reply) = call(sock, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {reply}");
}

/// Waits for a console line starting with `prefix`; returns it.
fn wait_for(lines: &mpsc::Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let start = Instant::now();
    loop {
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.starts_with(prefix) {
                    return line;
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
fn kata_style_boot_hotplug_pause_and_ctrl_alt_del_then_config_file() {
    if !kvm_available() {
        return;
    }
    let test_started = unix_now();
    let images = vmm::guest_images::default_guest().expect("guest images");
    let tool_bytes = std::fs::read(images.vmlinux.parent().unwrap().join(TOOL))
        .expect("kiln-vsock in the guest images");
    let dir = scratch_dir("api-guest");
    let script = dir.join("script.img");
    write_script_drive(&script, &api_boot_script(tool_bytes.len()));
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool_bytes).unwrap();
    let placeholder = dir.join("placeholder.img");
    std::fs::write(&placeholder, [0u8; 4096]).unwrap();
    let real = dir.join("real.img");
    let contents: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&real, &contents).unwrap();
    let sock = dir.join("api.sock");
    let uds = dir.join("kata.hvsock");

    let ns = NetNs::create(&format!("kiln-kata-{}", std::process::id()));
    ns.run(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.run(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.run(&["ip", "link", "set", TAP, "up"]);

    let kiln = kiln_bin();
    let mut cmd = ns.command(&[
        kiln.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--id",
        "kata_sandbox",
    ]);
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kiln");
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

    // Kata sends the log and the metrics to FIFOs it reads, before anything else.
    let log_fifo = dir.join("log.fifo");
    let metrics_fifo = dir.join("metrics.fifo");
    let log_lines = drain_fifo(&log_fifo);
    let metrics_lines = drain_fifo(&metrics_fifo);
    let logger = format!(
        r#"{{"log_path":"{}","level":"Info","show_level":true,"show_log_origin":false}}"#,
        log_fifo.display()
    );
    put(&sock, "PUT", "/logger", &logger);
    let metrics = format!(r#"{{"metrics_path":"{}"}}"#, metrics_fifo.display());
    put(&sock, "PUT", "/metrics", &metrics);

    // Kata runtime-rs's order: boot source, machine, drives, vsock, network, then start.
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb"}}"#,
        images.vmlinux.display()
    );
    put(&sock, "PUT", "/boot-source", &boot);
    put(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":256}"#,
    );
    let drive = |id: &str, path: &Path, root: bool, ro: bool| {
        format!(
            r#"{{"drive_id":"{id}","path_on_host":"{}","is_root_device":{root},"is_read_only":{ro}}}"#,
            path.display()
        )
    };
    put(
        &sock,
        "PUT",
        "/drives/rootfs",
        &drive("rootfs", &images.rootfs, true, true),
    );
    put(
        &sock,
        "PUT",
        "/drives/script",
        &drive("script", &script, false, true),
    );
    put(
        &sock,
        "PUT",
        "/drives/drive1",
        &drive("drive1", &placeholder, false, false),
    );
    put(
        &sock,
        "PUT",
        "/drives/tool",
        &drive("tool", &tool_drive, false, true),
    );
    let vsock = format!(
        r#"{{"guest_cid":{GUEST_CID},"uds_path":"{}"}}"#,
        uds.display()
    );
    put(&sock, "PUT", "/vsock", &vsock);
    let eth0 =
        format!(r#"{{"iface_id":"eth0","host_dev_name":"{TAP}","guest_mac":"{GUEST_MAC}"}}"#);
    put(&sock, "PUT", "/network-interfaces/eth0", &eth0);
    put(
        &sock,
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces":["eth0"],"version":"V2"}"#,
    );
    put(
        &sock,
        "PUT",
        "/mmds",
        r#"{"latest":{"meta-data":{"instance-id":"i-kiln-v2"}}}"#,
    );
    put(&sock, "PUT", "/entropy", "{}");
    let (status, config) = call(&sock, "GET", "/vm/config", "");
    assert_eq!(status, 200, "{config}");
    assert!(
        config.contains(r#""mmds-config":{"version":"V2""#),
        "{config}"
    );
    // Boot 2 serves MMDS version 1.
    let config_file = dir.join("vm.json");
    std::fs::write(
        &config_file,
        config.replace(r#""version":"V2""#, r#""version":"V1""#),
    )
    .unwrap();
    let metadata = dir.join("metadata.json");
    std::fs::write(
        &metadata,
        r#"{"latest":{"meta-data":{"instance-id":"i-kiln-v1"}}}"#,
    )
    .unwrap();
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );

    let mut seen = Vec::new();
    let ready = wait_for(&lines, "KILN-T ready", &mut seen);
    assert_eq!(ready, "KILN-T ready 8");
    let console = seen.join("\n");
    // The guest read the host's time from the CMOS clock at boot (within minutes: its own
    // clock runs on from there, at whatever pace an emulated guest keeps; without the clock it
    // would be 1970).
    let guest_date: u64 = marker(&console, "date").unwrap().parse().unwrap();
    assert!(
        (test_started.saturating_sub(600)..=unix_now() + 600).contains(&guest_date),
        "guest clock {guest_date}, host {}",
        unix_now()
    );
    assert!(
        !console.contains("Unable to read current time from RTC"),
        "{console}"
    );
    assert_eq!(marker(&console, "mac"), Some(GUEST_MAC), "{console}");
    assert_eq!(marker(&console, "ping"), Some("ok"), "{console}");
    assert_eq!(marker(&console, "mmds-token-len"), Some("64"), "{console}");
    assert_ne!(marker(&console, "mmds-no-token"), Some("0"), "{console}");
    assert_ne!(marker(&console, "mmds-bad-token"), Some("0"), "{console}");
    assert_eq!(marker(&console, "mmds-v2"), Some("i-kiln-v2"), "{console}");
    vsock_round_trip(&uds);

    // Seen by the guest's next fetch (after the drive swap below).
    put(
        &sock,
        "PATCH",
        "/mmds",
        r#"{"latest":{"meta-data":{"patched":"yes"}}}"#,
    );
    let patch = format!(
        r#"{{"drive_id":"drive1","path_on_host":"{}"}}"#,
        real.display()
    );
    put(&sock, "PATCH", "/drives/drive1", &patch);
    let resized = wait_for(&lines, "KILN-T resized", &mut seen);
    assert_eq!(resized, "KILN-T resized 2048");
    let sum = wait_for(&lines, "KILN-T sum", &mut seen);
    assert!(sum.contains(&sha256_file(&real)), "{sum}");
    let patched = wait_for(&lines, "KILN-T mmds-patched", &mut seen);
    assert_eq!(patched, "KILN-T mmds-patched yes");

    put(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Paused""#));
    put(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"FlushMetrics"}"#,
    );
    // Lines hold what happened since the previous one (a periodic flush may have come first):
    // sum them all.
    let mut lines: Vec<serde_json::Value> = vec![serde_json::from_str(
        &metrics_lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a metrics line on the FIFO"),
    )
    .expect("metrics JSON")];
    std::thread::sleep(Duration::from_millis(500));
    for line in metrics_lines.try_iter() {
        lines.push(serde_json::from_str(&line).expect("metrics JSON"));
    }
    let last = lines.last().unwrap();
    for group in [
        "utc_timestamp_ms",
        "block_drive1",
        "net_eth0",
        "vsock",
        "entropy",
        "uart",
        "i8042",
        "rtc",
        "vcpu",
        "mmds",
    ] {
        assert!(last.get(group).is_some(), "no {group} in {last}");
    }
    let total = |group: &str, field: &str| -> u64 {
        lines.iter().filter_map(|l| l[group][field].as_u64()).sum()
    };
    assert!(
        total("vsock", "conns_added") >= 1,
        "vsock round trip not counted: {lines:?}"
    );
    assert!(
        total("mmds", "rx_accepted") > 0 && total("mmds", "connections_created") >= 4,
        "the guest's MMDS requests not counted: {lines:?}"
    );
    assert!(
        total("uart", "write_count") > 0,
        "the guest's console output not counted: {lines:?}"
    );
    assert!(
        total("block_drive1", "read_bytes") >= 1 << 20,
        "the guest's read of drive1 not counted: {lines:?}"
    );
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"SendCtrlAltDel"}"#,
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BOOT_DEADLINE {
            let _ = child.kill();
            panic!("Ctrl+Alt+Del did not end the VM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = stderr_thread.join().unwrap_or_default();
    eprintln!("kiln stderr:\n{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    // The log went to the FIFO, with levels, and not to stderr.
    let logged: Vec<String> = log_lines.try_iter().collect();
    assert!(
        logged
            .iter()
            .any(|l| l.contains("[INFO") && l.contains("api: PATCH /vm -> 204")),
        "log FIFO: {logged:#?}"
    );
    assert!(!stderr.contains("api: PATCH /vm"), "{stderr}");
    assert!(!sock.exists());
    assert!(!uds.exists(), "the vsock socket is removed on exit");

    // Boot 2: the same VM from the config file, no API.
    write_script_drive(&script, &config_file_boot_script(tool_bytes.len()));
    let child = spawn_piped(ns.command(&[
        kiln.to_str().unwrap(),
        "--no-api",
        "--config-file",
        config_file.to_str().unwrap(),
        "--metadata",
        metadata.to_str().unwrap(),
    ]));
    let host = {
        let uds = uds.clone();
        std::thread::spawn(move || {
            let reply = std::panic::catch_unwind(|| vsock_round_trip(&uds));
            // Whatever happened, let the guest finish: serve its fetch of 16 bytes.
            let mut done_path = uds.as_os_str().to_owned();
            done_path.push(format!("_{DONE_PORT}"));
            let listener = UnixListener::bind(&done_path).unwrap();
            if let Ok((mut s, _)) = listener.accept() {
                let _ = read_line(&mut s);
                let _ = s.write_all(&pattern(5, 16));
            }
            reply
        })
    };
    let out = wait_with_deadline(child, BOOT_DEADLINE);
    eprintln!(
        "config-file boot: exit {} in {:.1} s; stderr:\n{}\nconsole:\n{}",
        out.code(),
        out.elapsed.as_secs_f64(),
        out.stderr,
        out.stdout
    );
    if let Err(panic) = host.join().expect("host thread") {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(out.code(), 0);
    assert_eq!(marker(&out.stdout, "mac"), Some(GUEST_MAC));
    assert_eq!(marker(&out.stdout, "ping"), Some("ok"));
    assert_eq!(
        marker(&out.stdout, "mmds-v1"),
        Some("i-kiln-v1"),
        "--metadata over V1"
    );
    assert_eq!(
        marker(&out.stdout, "size"),
        Some("8"),
        "the placeholder, as configured"
    );
    assert!(
        out.stdout.contains("KILN-VSOCK-FETCH ok 16"),
        "guest → host over vsock"
    );
    assert!(!uds.exists(), "the vsock socket is removed on exit");
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
