//! End to end: `kiln run` with no images boots the default guest from guest-images/ (building it
//! on first use) to its init, which prints what it sees and reboots; kiln exits 0.
//!
//! On our nested-PVM machines this takes about 70 s after the images exist (kernel code is
//! emulated; unpacking the 2 MB initramfs alone is ~23 s of it); the first build of the images
//! adds ~5 min. On a real KVM host the boot takes well under a second.

use std::time::Duration;

use kiln_tests::{kvm_available, run_kiln};

#[test]
fn default_guest_boots_to_init_on_two_vcpus_and_reboots() {
    if !kvm_available() {
        return;
    }
    let out = run_kiln(
        &["run", "--vcpus", "2", "--mem-mib", "256"],
        Duration::from_secs(1500),
    );
    eprintln!(
        "kiln ran for {:.1} s; stderr:\n{}",
        out.elapsed.as_secs_f64(),
        out.stderr
    );
    let console = &out.stdout;
    assert_eq!(out.code(), 0, "console tail:\n{}", tail(console));
    assert!(
        console.contains("KILN-GUEST-INIT-OK 6.12."),
        "{}",
        tail(console)
    );
    assert!(console.contains("KILN-GUEST-CPUS 2"), "{}", tail(console));
    let mem_kb: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("KILN-GUEST-MEM-KB "))
        .and_then(|v| v.trim().parse().ok())
        .expect("memory marker");
    assert!(
        (200_000..=262_144).contains(&mem_kb),
        "guest saw {mem_kb} kB"
    );
    assert!(console.contains("KILN-GUEST-REBOOT"), "{}", tail(console));
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        tail(console)
    );
    assert!(out.stderr.contains("the guest rebooted"), "{}", out.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(out.stderr.contains("nested PVM host"), "{}", out.stderr);
    }
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
