//! Boot benchmark: prints figures, asserts nothing.
//!
//! Boots the default guest (1 vCPU, 128 MiB, its initramfs) with `kiln run` and reports:
//! - wall time from process start to the guest's init marker and to VMM exit;
//! - the VMM's resident memory excluding guest RAM (peak over the run, sampled every 100 ms from
//!   /proc/PID/smaps: total Rss minus the Rss of the guest-memory mapping).
//!
//! Usage: `cargo run --release -p kiln-tests --bin boot-bench [-- RUNS]`
//! (`KILN_GUEST_IMAGES=DIR` to use built images; otherwise guest-images/build.sh is run first).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::bench::rss_kib;
use kiln_tests::kiln_bin;

const MEM_MIB: u64 = 128;
const INIT_MARKER: &str = "KILN-GUEST-INIT-OK";

struct Run {
    to_init: Option<Duration>,
    to_exit: Duration,
    peak_vmm_rss_kib: u64,
    status: i32,
}

fn one_run() -> Run {
    let start = Instant::now();
    let mut child = Command::new(kiln_bin())
        .args([
            "run",
            "--vcpus",
            "1",
            "--mem-mib",
            &MEM_MIB.to_string(),
            "--cmdline",
        ])
        .arg("console=ttyS0 reboot=k panic=1 pci=off nomodule quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(INIT_MARKER) {
                let _ = tx.send(Instant::now());
            }
        }
    });
    let mut peak = 0;
    let status = loop {
        if let Some((total, guest)) = rss_kib(pid, MEM_MIB << 20) {
            peak = peak.max(total - guest);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let to_exit = start.elapsed();
    Run {
        to_init: rx.try_recv().ok().map(|t| t - start),
        to_exit,
        peak_vmm_rss_kib: peak,
        status,
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    if std::env::var_os("KILN_GUEST_IMAGES").is_none() {
        let dir = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../guest-images/build.sh"
            ))
            .stderr(Stdio::inherit())
            .output()
            .expect("guest-images/build.sh");
        assert!(dir.status.success(), "guest-images/build.sh failed");
        // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
        unsafe {
            std::env::set_var(
                "KILN_GUEST_IMAGES",
                String::from_utf8_lossy(&dir.stdout).trim(),
            );
        }
    }
    println!("boot-bench: default guest, 1 vCPU, {MEM_MIB} MiB, initramfs, quiet console");
    for i in 1..=runs {
        let run = one_run();
        println!(
            "run {i}: exec->init {} s, exec->exit {:.1} s, VMM RSS excluding guest memory {:.1} MB (peak), exit status {}",
            run.to_init.map_or("n/a".into(), |d| format!("{:.1}", d.as_secs_f64())),
            run.to_exit.as_secs_f64(),
            run.peak_vmm_rss_kib as f64 / 1000.0,
            run.status
        );
    }
    println!("reference on this kind of machine: Firecracker 71 s exec->exit, 4.2 MB RSS; target 0.8x of both");
}
