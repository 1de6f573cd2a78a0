//! API benchmark, Kiln beside Firecracker: prints figures, asserts nothing.
//!
//! For each VMM, interleaved round by round:
//! - **API latency under load**: 1000 clients connect and stay connected, idle, while a few
//!   streams send `GET /machine-config` back to back (a new connection each, as most clients
//!   do) for a fixed time. Printed: p50 and p99 of the answered requests, how many were answered
//!   and refused (503), and how many of the 1000 idle clients the VMM kept open.
//! - **VM start/stop cycles per minute**: start the VMM, wait for its socket, `PUT /boot-source`
//!   (a tiny ELF kernel that parks its vCPU), `PUT /machine-config` (1 vCPU, 16 MiB),
//!   `InstanceStart`, SIGTERM, wait for the process to be gone.
//!
//! Usage: `cargo build --release --workspace && cargo run --release -p kiln-tests --bin api-bench
//! [-- ROUNDS [LOAD_SECONDS [CYCLES]]]`; `FIRECRACKER_BIN` overrides `../shared/anchors/firecracker`.
//! Both run with their default seccomp settings: Kiln's filters are on; the Firecracker anchor's
//! gnu build has no filters to turn on (see its README).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::bench::{host_context, median, percentile};
use kiln_tests::{kiln_bin, tiny_elf, TINY_LOAD_ADDR};

const IDLE_CLIENTS: usize = 1000;
const STREAMS: usize = 4;
const DEADLINE: Duration = Duration::from_secs(30);

/// One VMM under test.
struct Vmm {
    name: &'static str,
    bin: PathBuf,
}

impl Vmm {
    fn start(&self, sock: &Path) -> Child {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(&self.bin)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.bin.display()));
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                start.elapsed() < DEADLINE,
                "{}: no API socket at {}",
                self.name,
                sock.display()
            );
            thread::sleep(Duration::from_micros(500));
        }
        child
    }
}

/// Sends one request on a new connection; returns the status code (None if the VMM closed
/// without a status line).
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Option<u16> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    // The status line is enough: a VMM may keep the connection open after its answer.
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head).ok()?.get(9..12)?.parse().ok()
}

struct LoadFigures {
    latencies: Vec<Duration>,
    refused: usize,
    failed: usize,
    idle_kept: usize,
}

fn api_under_load(vmm: &Vmm, dir: &Path, seconds: u64) -> LoadFigures {
    let sock = dir.join(format!("{}-load.sock", vmm.name));
    let mut child = vmm.start(&sock);
    let idle: Vec<UnixStream> = (0..IDLE_CLIENTS)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (sock, stop) = (sock.clone(), stop.clone());
            thread::spawn(move || {
                let (mut latencies, mut refused, mut failed) = (Vec::new(), 0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match request(&sock, "GET", "/machine-config", "") {
                        Some(200) => latencies.push(sent.elapsed()),
                        Some(503) => refused += 1,
                        _ => failed += 1,
                    }
                }
                (latencies, refused, failed)
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut figures = LoadFigures {
        latencies: Vec::new(),
        refused: 0,
        failed: 0,
        idle_kept: 0,
    };
    for stream in streams {
        let (latencies, refused, failed) = stream.join().expect("stream");
        figures.latencies.extend(latencies);
        figures.refused += refused;
        figures.failed += failed;
    }
    // An idle client the VMM kept has nothing to read; one it turned away reads a 503 or EOF.
    for mut client in idle {
        client.set_nonblocking(true).ok();
        let mut byte = [0u8; 1];
        if matches!(client.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            figures.idle_kept += 1;
        }
    }
    figures.latencies.sort();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    figures
}

/// Start/stop cycles per minute over `cycles` cycles.
fn cycles_per_minute(vmm: &Vmm, dir: &Path, kernel: &Path, cycles: usize) -> f64 {
    let sock = dir.join(format!("{}-cycle.sock", vmm.name));
    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    let started = Instant::now();
    for cycle in 0..cycles {
        let mut child = vmm.start(&sock);
        let steps = [
            ("PUT", "/boot-source", boot.as_str()),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":16}"#,
            ),
            ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        ];
        for (method, path, body) in steps {
            let status = request(&sock, method, path, body);
            assert_eq!(
                status,
                Some(204),
                "{} cycle {cycle}: {method} {path}",
                vmm.name
            );
        }
        // SAFETY: kill with the pid of a child this process started and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = child.wait();
        let _ = std::fs::remove_file(&sock);
    }
    cycles as f64 * 60.0 / started.elapsed().as_secs_f64()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut next = |default: usize| {
        args.next()
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let rounds = next(3);
    let load_seconds = next(10) as u64;
    let cycles = next(20);
    let firecracker = std::env::var_os("FIRECRACKER_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/anchors/firecracker"),
        PathBuf::from,
    );
    assert!(
        firecracker.is_file(),
        "{}: no Firecracker binary (set FIRECRACKER_BIN)",
        firecracker.display()
    );
    let vmms = [
        Vmm {
            name: "kiln",
            bin: kiln_bin(),
        },
        Vmm {
            name: "firecracker",
            bin: firecracker,
        },
    ];
    // Room for the idle clients and the streams' connections.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the one struct they are given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let dir = std::env::temp_dir().join(format!("kiln-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kernel = dir.join("parked.elf");
    std::fs::write(&kernel, tiny_elf(TINY_LOAD_ADDR, &[0xfa, 0xf4, 0xeb, 0xfd])).unwrap();

    println!("{}", host_context());
    println!(
        "{rounds} rounds; load: {IDLE_CLIENTS} idle clients + {STREAMS} request streams for \
         {load_seconds} s; {cycles} start/stop cycles"
    );
    let mut p50 = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    let mut per_minute = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, vmm) in vmms.iter().enumerate() {
            let load = api_under_load(vmm, &dir, load_seconds);
            let (a, b) = (
                percentile(&load.latencies, 50),
                percentile(&load.latencies, 99),
            );
            let rate = cycles_per_minute(vmm, &dir, &kernel, cycles);
            println!(
                "round {round} {:<11} p50 {:>7.0} us  p99 {:>7.0} us  answered {:>6}  \
                 refused {:>6}  failed {:>4}  idle kept {:>4}/{IDLE_CLIENTS}  cycles/min {rate:>5.0}",
                vmm.name,
                micros(a),
                micros(b),
                load.latencies.len(),
                load.refused,
                load.failed,
                load.idle_kept,
            );
            p50[i].push(micros(a));
            p99[i].push(micros(b));
            per_minute[i].push(rate);
        }
    }
    println!("medians over {rounds} rounds (Kiln / Firecracker; lower is better for latency):");
    for (what, figures) in [
        ("API p50 under load (us)", &mut p50),
        ("API p99 under load (us)", &mut p99),
        ("start/stop cycles per minute", &mut per_minute),
    ] {
        let (kiln, fc) = (median(&mut figures[0]), median(&mut figures[1]));
        println!(
            "  {what:<30} kiln {kiln:>8.0}  firecracker {fc:>8.0}  ratio {:.2}",
            kiln / fc
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
