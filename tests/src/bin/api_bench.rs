//! API benchmark, Kiln beside Firecracker: prints figures, asserts nothing.
//!
//! For each VMM, interleaved round by round:
//! - **API latency in bursts**: 1000 clients connect at once and each wants one answer to
//!   `GET /machine-config`, asking again at once when refused, burst after burst for a fixed
//!   time. Printed: p50 and p99 of the time from the burst's start to each client's answer, and
//!   the 503s met on the way.
//! - **API latency beside idle clients**: 1000 clients connect and stay connected, idle, while a
//!   few streams send `GET /machine-config` back to back (a new connection each, as most clients
//!   do). Printed as above, plus how many of the idle clients the VMM kept open.
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

use kiln_tests::bench::{host_context, median, percentile, raise_fd_limit, request_status};
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

/// One request on a new connection; its status code.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Option<u16> {
    request_status(sock, method, path, body, DEADLINE)
}

struct LoadFigures {
    latencies: Vec<Duration>,
    refused: usize,
    failed: usize,
    idle_kept: usize,
}

/// Bursts of [`IDLE_CLIENTS`] clients that connect at once and each want one answer to
/// `GET /machine-config`, sending again at once when refused, burst after burst for `seconds`:
/// the time from the start of its burst until each client had its answer. `refused` counts the
/// 503s met on the way, `failed` the connections closed without a status.
fn api_bursts(vmm: &Vmm, dir: &Path, seconds: u64) -> LoadFigures {
    const REQUEST: &[u8] = b"GET /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let sock = dir.join(format!("{}-burst.sock", vmm.name));
    let mut child = vmm.start(&sock);
    let mut figures = LoadFigures {
        latencies: Vec::new(),
        refused: 0,
        failed: 0,
        idle_kept: 0,
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let burst = Instant::now();
        let mut waiting = IDLE_CLIENTS;
        while waiting > 0 && burst.elapsed() < DEADLINE {
            let clients: Vec<UnixStream> = (0..waiting)
                .filter_map(|_| {
                    let mut stream = UnixStream::connect(&sock).ok()?;
                    stream.write_all(REQUEST).ok()?;
                    Some(stream)
                })
                .collect();
            figures.failed += waiting - clients.len();
            for mut stream in clients {
                stream.set_read_timeout(Some(DEADLINE)).ok();
                let mut head = [0u8; 12];
                let status: Option<u16> = stream
                    .read_exact(&mut head)
                    .ok()
                    .and_then(|()| std::str::from_utf8(&head).ok()?.get(9..12)?.parse().ok());
                match status {
                    Some(200) => {
                        figures.latencies.push(burst.elapsed());
                        waiting -= 1;
                    }
                    Some(503) => figures.refused += 1,
                    _ => figures.failed += 1,
                }
            }
        }
    }
    figures.latencies.sort();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    figures
}

/// [`IDLE_CLIENTS`] clients that connect and stay, idle, while [`STREAMS`] streams send requests
/// back to back for `seconds`.
fn api_beside_idle_clients(vmm: &Vmm, dir: &Path, seconds: u64) -> LoadFigures {
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
    raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("kiln-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kernel = dir.join("parked.elf");
    std::fs::write(&kernel, tiny_elf(TINY_LOAD_ADDR, &[0xfa, 0xf4, 0xeb, 0xfd])).unwrap();

    println!("{}", host_context());
    println!(
        "{rounds} rounds; {load_seconds} s of bursts of {IDLE_CLIENTS} clients, {load_seconds} s \
         of {STREAMS} request streams beside {IDLE_CLIENTS} idle clients, {cycles} start/stop \
         cycles"
    );
    // Per VMM: burst p50, burst p99, idle-load p50, idle-load p99, cycles per minute.
    let mut figures: [[Vec<f64>; 5]; 2] = Default::default();
    for round in 1..=rounds {
        for (i, vmm) in vmms.iter().enumerate() {
            let bursts = api_bursts(vmm, &dir, load_seconds);
            let idle = api_beside_idle_clients(vmm, &dir, load_seconds);
            let rate = cycles_per_minute(vmm, &dir, &kernel, cycles);
            println!(
                "round {round} {:<11} bursts: p50 {:>7.0} us p99 {:>7.0} us, {} answered, {} \
                 refused, {} failed",
                vmm.name,
                micros(percentile(&bursts.latencies, 50)),
                micros(percentile(&bursts.latencies, 99)),
                bursts.latencies.len(),
                bursts.refused,
                bursts.failed,
            );
            println!(
                "round {round} {:<11} beside idle clients: p50 {:>7.0} us p99 {:>7.0} us, {} \
                 answered, {} refused, {} failed, {} of {IDLE_CLIENTS} idle clients kept",
                vmm.name,
                micros(percentile(&idle.latencies, 50)),
                micros(percentile(&idle.latencies, 99)),
                idle.latencies.len(),
                idle.refused,
                idle.failed,
                idle.idle_kept,
            );
            println!(
                "round {round} {:<11} start/stop cycles per minute {rate:.0}",
                vmm.name
            );
            let answered = |load: &LoadFigures, p| {
                // A VMM that answered nothing has no latency: shown as infinite.
                if load.latencies.is_empty() {
                    f64::INFINITY
                } else {
                    micros(percentile(&load.latencies, p))
                }
            };
            let row = &mut figures[i];
            row[0].push(answered(&bursts, 50));
            row[1].push(answered(&bursts, 99));
            row[2].push(answered(&idle, 50));
            row[3].push(answered(&idle, 99));
            row[4].push(rate);
        }
    }
    println!("medians over {rounds} rounds (ratio Kiln / Firecracker; inf: answered nothing):");
    let names = [
        "bursts of 1000, time to answer: p50 (us)",
        "bursts of 1000, time to answer: p99 (us)",
        "beside 1000 idle clients: p50 (us)",
        "beside 1000 idle clients: p99 (us)",
        "start/stop cycles per minute (higher)",
    ];
    for (j, what) in names.iter().enumerate() {
        let kiln = median(&mut figures[0][j]);
        let fc = median(&mut figures[1][j]);
        println!(
            "  {what:<42} kiln {kiln:>9.0}  firecracker {fc:>9.0}  ratio {:.2}",
            kiln / fc
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
