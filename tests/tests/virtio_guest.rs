//! End to end: the default guest kernel booted from the ext4 root on a virtio-blk drive, with a
//! read-only data drive, a network interface on a TAP inside a network namespace this test creates,
//! and the entropy device. Two boots (each costs about a minute on our nested-KVM machines):
//!
//! 1. The guest writes a file on its root and syncs; tries to write the read-only drive and reads
//!    it; reads /dev/hwrng; brings eth0 up, pings the host end of the TAP and round-trips 256 KiB
//!    through a TCP echo server on the host.
//! 2. Same root drive: the guest reads the file back and trims the filesystem (DISCARD).
//!
//! The guest runs a script from a raw drive (`kiln.script=/dev/vdc`) and prints `KILN-T ...` lines
//! on its console. No traffic leaves the namespace: the only addresses are the TAP's /24.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use kiln_tests::{
    digest, enter_netns, kiln_bin, kvm_available, marker, scratch_dir, sha256_file, spawn_piped,
    wait_with_deadline, write_script_drive, NetNs, Outcome,
};

const TAP: &str = "kilntap0";
const HOST_IP: &str = "10.199.0.1";
const GUEST_IP: &str = "10.199.0.2";
const ECHO_PORT: u16 = 5000;
const PAYLOAD_LEN: usize = 256 * 1024;
const GUEST_MAC: &str = "02:4b:49:4c:4e:01";
const BOOT_DEADLINE: Duration = Duration::from_secs(900);

fn first_boot_script(token: &str) -> String {
    format!(
        r#"
echo "KILN-T serial $(cat /sys/block/vda/serial)"
echo "{token}" >/persist.txt && sync && echo "KILN-T wrote-root ok"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "KILN-T ro-write accepted"
else
    echo "KILN-T ro-write refused"
fi
echo "KILN-T ro-flag $(cat /sys/block/vdb/ro)"
echo "KILN-T data-sum $(sha256sum </dev/vdb)"
echo "KILN-T hwrng-bytes $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo "KILN-T mac $(cat /sys/class/net/eth0/address)"
if ping -c 2 -W 20 {HOST_IP} >/dev/null 2>&1; then echo "KILN-T ping ok"; else echo "KILN-T ping failed"; fi
dd if=/dev/urandom of=/tmp/payload bs=65536 count={blocks} 2>/dev/null
nc {HOST_IP} {ECHO_PORT} </tmp/payload >/tmp/echo
echo "KILN-T sent $(sha256sum </tmp/payload)"
echo "KILN-T echoed $(sha256sum </tmp/echo)"
"#,
        blocks = PAYLOAD_LEN / 65536
    )
}

const SECOND_BOOT_SCRIPT: &str = r#"
echo "KILN-T persisted $(cat /persist.txt)"
if fstrim / >/dev/null 2>&1; then echo "KILN-T fstrim ok"; else echo "KILN-T fstrim failed"; fi
"#;

fn report(what: &str, out: &Outcome) {
    eprintln!(
        "{what}: kiln ran {:.1} s, exit {}; stderr:\n{}\nconsole:\n{}",
        out.elapsed.as_secs_f64(),
        out.code(),
        out.stderr,
        out.stdout
    );
}

/// Accepts one connection in the namespace, reads [`PAYLOAD_LEN`] bytes, sends them back and
/// closes; hands what it received to the test.
fn spawn_echo_server(ns: &NetNs) -> mpsc::Receiver<Vec<u8>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (data_tx, data_rx) = mpsc::channel();
    let ns_name = ns.name().to_string();
    thread::spawn(move || {
        enter_netns(&ns_name);
        let listener = TcpListener::bind((HOST_IP, ECHO_PORT)).expect("bind echo server");
        ready_tx.send(()).expect("ready");
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(600))).ok();
        let mut received = vec![0u8; PAYLOAD_LEN];
        if conn.read_exact(&mut received).is_ok() {
            let _ = conn.write_all(&received);
        }
        drop(conn);
        let _ = data_tx.send(received);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("echo server ready");
    data_rx
}

#[test]
fn root_drive_net_and_rng_across_two_boots() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let dir = scratch_dir("virtio-guest");
    let root = dir.join("root.ext4");
    std::fs::copy(&images.rootfs, &root).expect("copy rootfs");
    let mut perms = std::fs::metadata(&root).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&root, perms).unwrap();
    let data = dir.join("data.img");
    let pattern: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&data, &pattern).unwrap();
    let data_sum = sha256_file(&data);
    let token = format!("kiln-persist-{}", std::process::id());

    // Boot 1, inside the namespace.
    let ns = NetNs::create(&format!("kiln-e2e-{}", std::process::id()));
    ns.run(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.run(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.run(&["ip", "link", "set", TAP, "up"]);
    let echoed = spawn_echo_server(&ns);
    let script1 = dir.join("script1.img");
    write_script_drive(&script1, &first_boot_script(&token));
    let kiln = kiln_bin();
    let args = [
        kiln.to_str().unwrap(),
        "run",
        "--mem-mib",
        "256",
        "--drive",
        &format!("path={},root,id=rootfs", root.display()),
        "--drive",
        &format!("path={},ro", data.display()),
        "--drive",
        &format!("path={},ro", script1.display()),
        "--net",
        &format!("tap={TAP},mac={GUEST_MAC}"),
        "--rng",
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdc",
    ];
    let out = wait_with_deadline(spawn_piped(ns.command(&args)), BOOT_DEADLINE);
    report("boot 1", &out);
    let console = &out.stdout;
    assert_eq!(out.code(), 0);
    assert!(
        console.contains("KILN-GUEST-SCRIPT-EXIT"),
        "script did not run"
    );
    assert_eq!(marker(console, "serial"), Some("rootfs"));
    assert_eq!(marker(console, "wrote-root"), Some("ok"));
    assert_eq!(marker(console, "ro-write"), Some("refused"));
    assert_eq!(marker(console, "ro-flag"), Some("1"));
    assert_eq!(digest(marker(console, "data-sum")), Some(data_sum.as_str()));
    assert_eq!(
        std::fs::read(&data).unwrap(),
        pattern,
        "read-only drive changed"
    );
    assert_eq!(marker(console, "hwrng-bytes"), Some("64"));
    assert_eq!(marker(console, "mac"), Some(GUEST_MAC));
    assert_eq!(marker(console, "ping"), Some("ok"));
    let sent = digest(marker(console, "sent")).expect("sent digest");
    assert_eq!(
        digest(marker(console, "echoed")),
        Some(sent),
        "echo differs"
    );
    let host_copy = dir.join("received.bin");
    std::fs::write(
        &host_copy,
        echoed
            .recv_timeout(Duration::from_secs(10))
            .expect("host side of the echo"),
    )
    .unwrap();
    assert_eq!(sha256_file(&host_copy), sent, "host received other bytes");
    drop(ns);

    // Boot 2: the file is still there.
    let script2 = dir.join("script2.img");
    write_script_drive(&script2, SECOND_BOOT_SCRIPT);
    let mut cmd = Command::new(&kiln);
    cmd.args([
        "run",
        "--drive",
        &format!("path={},root", root.display()),
        "--drive",
        &format!("path={},ro", data.display()),
        "--drive",
        &format!("path={},ro", script2.display()),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdc",
    ]);
    let out = wait_with_deadline(spawn_piped(cmd), BOOT_DEADLINE);
    report("boot 2", &out);
    assert_eq!(out.code(), 0);
    assert_eq!(marker(&out.stdout, "persisted"), Some(token.as_str()));
    assert_eq!(marker(&out.stdout, "fstrim"), Some("ok"));
    let _ = std::fs::remove_dir_all(&dir);
}
