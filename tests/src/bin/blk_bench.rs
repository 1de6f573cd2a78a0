//! Block-device benchmark (issue 3): prints figures, asserts nothing.
//!
//! Boots the default guest kernel from its ext4 root (read-only) with a raw test disk and runs
//! `kiln-blkbench` (guest-images/tools/kiln-blkbench.c, built by guest-images/build.sh next to
//! vmlinux) inside it: seq-write, seq-read, rand-write, rand-read, each moving `--mib` MiB in 4 KiB
//! O_DIRECT system calls. Reports per mode:
//! - MiB/s and IOPS as the guest measured them (CLOCK_MONOTONIC around the I/O loop and the final
//!   fdatasync of the writes);
//! - CPU seconds per GiB moved of kiln's device event-loop thread (`kiln_vmm`, which does all the
//!   virtio I/O) and of the whole kiln process (vCPU threads included), from utime+stime in
//!   /proc, sampled when the guest's `KILN-BENCH-START`/`KILN-BENCH-END` lines reach the console.
//!
//! Drives: vda = rootfs.ext4 (root, ro: the cached image stays pristine), vdb = the test disk
//! (rw, a sparse file of `--disk-mib` MiB), vdc = the tool (ro), vdd = the script (ro).
//!
//! Usage: `cargo run --release -p kiln-tests --bin blk-bench [-- --mib N] [--disk-mib N]
//! [--timeout-secs N] [--keep]` (`KILN_GUEST_IMAGES=DIR` to use built images; otherwise
//! guest-images/build.sh is run first).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::bench::{clock_ticks_per_second, host_context, CpuSample as Sample, Sampler};
use kiln_tests::{kiln_bin, scratch_dir, write_script_drive, write_tool_drive};

/// The modes, in the order the guest runs them (reads after writes: they read written blocks).
const MODES: [&str; 4] = ["seq-write", "seq-read", "rand-write", "rand-read"];
const MEM_MIB: u64 = 256;
const TOOL: &str = "kiln-blkbench";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdd";

const USAGE: &str = "usage: blk-bench [--mib N] [--disk-mib N] [--timeout-secs N] [--keep]
  --mib N           MiB moved per mode (default 16: ~2 min per mode on nested KVM; at most --disk-mib)
  --disk-mib N      size of the guest's test disk /dev/vdb, a sparse raw file (default 256)
  --timeout-secs N  kill kiln after this long (default 3600)
  --keep            keep the scratch directory (test disk, tool and script drives)";

struct Options {
    mib: u64,
    disk_mib: u64,
    timeout: Duration,
    keep: bool,
}

fn die(msg: &str) -> ! {
    eprintln!("blk-bench: error: {msg}");
    std::process::exit(1);
}

fn parse_args() -> Options {
    let mut opts = Options {
        mib: 16,
        disk_mib: 256,
        timeout: Duration::from_secs(3600),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > 0 => n,
                _ => die(&format!("{name} takes a positive number\n{USAGE}")),
            }
        };
        match arg.as_str() {
            "--mib" => opts.mib = number("--mib"),
            "--disk-mib" => opts.disk_mib = number("--disk-mib"),
            "--timeout-secs" => opts.timeout = Duration::from_secs(number("--timeout-secs")),
            "--keep" => opts.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if opts.mib > opts.disk_mib {
        die(&format!(
            "--mib {} exceeds --disk-mib {}: the sequential modes would wrap around",
            opts.mib, opts.disk_mib
        ));
    }
    opts
}

/// The guest's `KILN-BENCH <mode> key=value...` line.
struct Figures {
    bytes: u64,
    mibps: f64,
    iops: u64,
    direct: bool,
}

fn parse_figures(words: &[&str]) -> Option<Figures> {
    let value = |key: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    Some(Figures {
        bytes: value("bytes")?.parse().ok()?,
        mibps: value("MiBps")?.parse().ok()?,
        iops: value("iops")?.parse().ok()?,
        direct: value("direct") != Some("0"),
    })
}

#[derive(Default)]
struct ModeRun {
    start: Option<Sample>,
    end: Option<Sample>,
    figures: Option<Figures>,
}

/// Everything read from one boot.
struct Run {
    modes: Vec<ModeRun>,
    problems: Vec<String>,
    script_exit: Option<String>,
    console: Vec<String>,
    stderr: String,
    status: Option<ExitStatus>,
    timed_out: bool,
    elapsed: Duration,
}

fn guest_script(tool_len: usize, mib: u64) -> String {
    let modes = MODES.join(" ");
    format!(
        r#"
if ! head -c {tool_len} /dev/vdc >/tmp/{TOOL} || ! chmod +x /tmp/{TOOL}; then
    echo "KILN-BENCH-ERROR setup cannot copy {TOOL} from /dev/vdc"
    exit 1
fi
for mode in {modes}; do
    /tmp/{TOOL} /dev/vdb "$mode" {mib} || exit 1
done
"#
    )
}

fn boot(args: &[String], opts: &Options) -> Run {
    let start = Instant::now();
    let mut child = Command::new(kiln_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", kiln_bin().display())));
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stderr = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });

    // Watchdog: kills kiln at the deadline, which ends the console stream below.
    let child = Arc::new(Mutex::new(child));
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    {
        let (child, finished, timed_out) = (child.clone(), finished.clone(), timed_out.clone());
        let deadline = opts.timeout;
        thread::spawn(move || {
            while !finished.load(Ordering::SeqCst) {
                if start.elapsed() > deadline {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = child.lock().unwrap().kill();
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
    }

    let mut sampler = Sampler::new(pid);
    let mut modes: Vec<ModeRun> = MODES.iter().map(|_| ModeRun::default()).collect();
    let mut problems = Vec::new();
    let mut script_exit = None;
    let mut console = Vec::new();
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                problems.push(format!("reading kiln's console: {e}"));
                break;
            }
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
        if let Some(pos) = line.find("KILN-BENCH") {
            let words: Vec<&str> = line[pos..].split_whitespace().collect();
            let mode = words.get(1).copied().unwrap_or("");
            let slot = MODES.iter().position(|m| *m == mode);
            match (words[0], slot) {
                ("KILN-BENCH-ERROR", _) => {
                    problems.push(format!("the guest reported: {}", &line[pos..]));
                }
                ("KILN-BENCH-START", Some(i)) | ("KILN-BENCH-END", Some(i)) => {
                    let is_start = words[0] == "KILN-BENCH-START";
                    match sampler.sample() {
                        Ok(s) if is_start => modes[i].start = Some(s),
                        Ok(s) => modes[i].end = Some(s),
                        Err(e) => problems.push(e),
                    }
                    eprintln!(
                        "blk-bench: {:6.1} s: {mode} {}",
                        start.elapsed().as_secs_f64(),
                        if is_start { "started" } else { "ended" }
                    );
                }
                ("KILN-BENCH", Some(i)) => match parse_figures(&words[2..]) {
                    Some(f) => modes[i].figures = Some(f),
                    None => problems.push(format!("unparsable guest line: {}", &line[pos..])),
                },
                _ => problems.push(format!("unexpected guest line: {}", &line[pos..])),
            }
        } else if let Some(rest) = line.split_once("KILN-GUEST-SCRIPT-EXIT ").map(|(_, r)| r) {
            script_exit = Some(rest.trim().to_string());
        }
        console.push(line);
    }

    let status = loop {
        let mut child = child.lock().unwrap();
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => {
                problems.push(format!("waiting for kiln: {e}"));
                break None;
            }
        }
        drop(child);
        thread::sleep(Duration::from_millis(50));
    };
    finished.store(true, Ordering::SeqCst);
    Run {
        modes,
        problems,
        script_exit,
        console,
        stderr: stderr.join().unwrap_or_default(),
        status,
        timed_out: timed_out.load(Ordering::SeqCst),
        elapsed: start.elapsed(),
    }
}

fn main() {
    let opts = parse_args();
    let images =
        vmm::guest_images::default_guest().unwrap_or_else(|e| die(&format!("guest images: {e}")));
    let image_dir = images
        .vmlinux
        .parent()
        .unwrap_or_else(|| die("vmlinux has no parent directory"))
        .to_path_buf();
    let tool = image_dir.join(TOOL);
    let tool_bytes = std::fs::read(&tool).unwrap_or_else(|e| {
        die(&format!(
            "{}: {e} (guest images built before tools/{TOOL}.c existed? run guest-images/build.sh)",
            tool.display()
        ))
    });
    if !images.rootfs.is_file() {
        die(&format!("{} is missing", images.rootfs.display()));
    }

    let dir = scratch_dir("blk-bench");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(opts.disk_mib << 20))
        .unwrap_or_else(|e| die(&format!("{}: {e}", disk.display())));
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool_bytes)
        .unwrap_or_else(|e| die(&format!("{}: {e}", tool_drive.display())));
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script(tool_bytes.len(), opts.mib));

    let args: Vec<String> = vec![
        "run".into(),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        MEM_MIB.to_string(),
        "--drive".into(),
        format!("path={},root,ro", images.rootfs.display()),
        "--drive".into(),
        format!("path={}", disk.display()),
        "--drive".into(),
        format!("path={},ro", tool_drive.display()),
        "--drive".into(),
        format!("path={},ro", script.display()),
        "--cmdline".into(),
        CMDLINE.into(),
    ];

    let tck = clock_ticks_per_second();
    println!(
        "blk-bench: {} MiB per mode in 4 KiB O_DIRECT syscalls on vdb (sparse raw file, {} MiB), \
         1 vCPU, {MEM_MIB} MiB",
        opts.mib, opts.disk_mib
    );
    println!("{}", host_context());
    println!(
        "kiln: {}; guest images: {}",
        kiln_bin().display(),
        image_dir.display()
    );
    eprintln!(
        "blk-bench: booting (about a minute on nested KVM), then {} modes; scratch dir {}",
        MODES.len(),
        dir.display()
    );

    let run = boot(&args, &opts);
    let mut problems = run.problems;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{:<11} {:>9} {:>9} {:>22} {:>20}",
        "mode", "MiB/s", "IOPS", "kiln_vmm CPU s/GiB", "process CPU s/GiB"
    );
    for (mode, m) in MODES.iter().zip(&run.modes) {
        match (&m.start, &m.end, &m.figures) {
            (Some(s), Some(e), Some(f)) => {
                let per_gib = |ticks: u64| ticks as f64 / tck / gib(f.bytes);
                println!(
                    "{:<11} {:>9.1} {:>9} {:>22.3} {:>20.3}{}",
                    mode,
                    f.mibps,
                    f.iops,
                    per_gib(e.vmm.saturating_sub(s.vmm)),
                    per_gib(e.process.saturating_sub(s.process)),
                    if f.direct { "" } else { "  (not O_DIRECT)" }
                );
            }
            _ => {
                println!("{mode:<11} {:>9} {:>9} {:>22} {:>20}", "-", "-", "-", "-");
                let missing: Vec<&str> = [
                    (m.start.is_none(), "KILN-BENCH-START"),
                    (m.end.is_none(), "KILN-BENCH-END"),
                    (m.figures.is_none(), "KILN-BENCH"),
                ]
                .iter()
                .filter(|(absent, _)| *absent)
                .map(|(_, name)| *name)
                .collect();
                problems.push(format!(
                    "{mode}: missing guest line(s): {}",
                    missing.join(", ")
                ));
            }
        }
    }
    println!(
        "CPU time: utime+stime from /proc at the guest's START/END console lines, resolution 1/{tck} s \
         (= {:.3} s/GiB at {} MiB per mode); kiln ran {:.1} s in all",
        1.0 / tck / gib(opts.mib << 20),
        opts.mib,
        run.elapsed.as_secs_f64()
    );

    if run.timed_out {
        problems.push(format!(
            "kiln killed after --timeout-secs {}",
            opts.timeout.as_secs()
        ));
    }
    match run.script_exit.as_deref() {
        Some("0") => {}
        Some(status) => problems.push(format!("the guest script exited with status {status}")),
        None => problems.push("no KILN-GUEST-SCRIPT-EXIT line: the script did not finish".into()),
    }
    match run.status {
        Some(s) if s.success() => {}
        Some(s) => problems.push(format!("kiln exited with {s}")),
        None => {}
    }
    if problems.is_empty() {
        if !opts.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return;
    }
    let tail = run.console.len().saturating_sub(60);
    eprintln!(
        "--- kiln stderr:\n{}\n--- console (last {} lines):\n{}",
        run.stderr.trim_end(),
        run.console.len() - tail,
        run.console[tail..].join("\n")
    );
    for p in &problems {
        eprintln!("blk-bench: error: {p}");
    }
    eprintln!("blk-bench: scratch dir kept: {}", dir.display());
    std::process::exit(1);
}
