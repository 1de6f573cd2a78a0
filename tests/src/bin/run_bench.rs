//! `kiln run -- CMD` measured (prints figures; never a pass/fail test):
//!
//! - wall time of a plain `kiln run` boot of the default guest (its init prints its markers and
//!   reboots), of `kiln run -- true`, and of `kiln run --share DIR -- cat FILE` for a 64 MiB
//!   file (its output to /dev/null), N rounds interleaved, median [min .. max];
//! - in one guest: reading and writing a 64 MiB file over virtio-fs (a share) against reading
//!   and writing 64 MiB on a virtio-blk drive, timed in the guest (`/proc/uptime`, 10 ms).
//!
//! Usage: `cargo run --release -p kiln-tests --bin run-bench [ROUNDS]` (default 3; 0 for the
//! throughput figures alone) after
//! `cargo build --release -p vmm`, or with `KILN_BIN` pointing at a kiln binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::bench::{host_context, median};
use kiln_tests::kiln_bin;

const FILE_MIB: usize = 64;

fn timed(cwd: &Path, args: &[&str]) -> (Duration, std::process::Output) {
    let started = Instant::now();
    let out = Command::new(kiln_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("kiln");
    (started.elapsed(), out)
}

fn run_to_null(cwd: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let status = Command::new(kiln_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("kiln");
    assert!(status.success(), "kiln {args:?}: {status}");
    started.elapsed()
}

fn print_figure(name: &str, samples: &mut [f64], unit: &str) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let med = median(samples);
    println!("{name:<44} {med:>9.2} {unit} [{min:.2} .. {max:.2}]");
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS is a number"))
        .unwrap_or(3);
    println!("{}", host_context());
    let dir = std::env::temp_dir().join(format!("kiln-run-bench-{}", std::process::id()));
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("bench dir");
    let file = share.join("file.bin");
    let made = Command::new("head")
        .args(["-c", &(FILE_MIB << 20).to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&file).expect("file"))
        .status()
        .expect("head");
    assert!(made.success());

    let share_arg = share.display().to_string();
    let cat_arg = file.display().to_string();
    let mut plain = Vec::new();
    let mut true_run = Vec::new();
    let mut cat_run = Vec::new();
    for round in 0..rounds {
        plain.push(run_to_null(&dir, &["run", "--console", "none"]).as_secs_f64());
        true_run.push(run_to_null(&share, &["run", "--", "true"]).as_secs_f64());
        cat_run.push(
            run_to_null(&dir, &["run", "--share", &share_arg, "--", "cat", &cat_arg]).as_secs_f64(),
        );
        eprintln!(
            "round {round}: plain {:.2} s, true {:.2} s, cat {:.2} s",
            plain[round], true_run[round], cat_run[round]
        );
    }
    if rounds > 0 {
        print_figure("plain `kiln run` boot (default guest)", &mut plain, "s");
        print_figure("`kiln run -- true`", &mut true_run, "s");
        print_figure(
            "`kiln run --share DIR -- cat FILE` (64 MiB)",
            &mut cat_run,
            "s",
        );
    }

    // Throughput in one guest: the share against a raw drive of the same size.
    let drive = dir.join("drive.img");
    std::fs::File::create(&drive)
        .and_then(|f| f.set_len((FILE_MIB as u64) << 20))
        .expect("drive");
    let script = format!(
        "t() {{ read up _ < /proc/uptime; echo $up; }}; \
         a=$(t); cat /share/file.bin > /dev/null; b=$(t); \
         dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; c=$(t); \
         dd if=/dev/zero of=/share/out.bin bs=1M count={FILE_MIB} conv=fsync 2>/dev/null; d=$(t); \
         dd if=/dev/zero of=/dev/vda bs=1M count={FILE_MIB} conv=fsync 2>/dev/null; e=$(t); \
         echo $a $b $c $d $e"
    );
    let share_at = format!("{}:/share", share.display());
    let drive_arg = format!("path={}", drive.display());
    // On the host's root the guest's first drive is vda (and the host's dd and cat are used).
    let (_, out) = timed(
        &dir,
        &[
            "run",
            "--host-root",
            "--drive",
            &drive_arg,
            "--share",
            &share_at,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let t: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if t.len() == 5 {
        let mib = FILE_MIB as f64;
        let rate = |a: f64, b: f64| mib / (b - a).max(0.01);
        println!(
            "{:<44} {:>9.1} MiB/s   virtio-blk {:>9.1} MiB/s",
            "read 64 MiB: virtio-fs",
            rate(t[0], t[1]),
            rate(t[1], t[2])
        );
        println!(
            "{:<44} {:>9.1} MiB/s   virtio-blk {:>9.1} MiB/s",
            "write 64 MiB (fsync): virtio-fs",
            rate(t[2], t[3]),
            rate(t[3], t[4])
        );
    } else {
        println!(
            "throughput: the guest printed {text:?} (stderr: {})",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
