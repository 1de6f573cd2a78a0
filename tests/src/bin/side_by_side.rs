//! Kiln beside Firecracker on one machine, round by round: prints figures, asserts nothing.
//!
//! Both VMMs get the same kernel (the default guest's vmlinux), the same read-only ext4 root on
//! virtio-blk, 1 vCPU, 128 MiB and the same command line (with this host's compat parameters,
//! which Kiln would add itself but Firecracker needs by hand). Each round runs Firecracker, then
//! Kiln, through:
//! - **boot**: exec with `--no-api --config-file` → the guest's init marker on the console;
//! - **API up**: exec with `--api-sock` → the first answer to `GET /`;
//! - **InstanceStart**: the time to the answer of `PUT /actions` after the same `PUT`s;
//! - **memory**: the VMM's resident memory outside guest memory 1 s after `InstanceStart`.
//!
//! Printed: each figure's median, min and max for both, and Kiln / Firecracker of the medians
//! (below 1: Kiln is faster or smaller). Ratios taken in one run are what count here; the
//! absolute figures depend on the machine (a nested PVM host runs the guest's kernel emulated).
//!
//! Usage: `cargo build --release --workspace && cargo run --release -p kiln-tests --bin
//! side-by-side [-- ROUNDS]` (default 3); `FIRECRACKER_BIN` overrides
//! `../shared/anchors/firecracker`, `KILN_GUEST_IMAGES` the guest images. The Firecracker anchor
//! is a gnu build without seccomp filters (see its README); Kiln runs with its filters on.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::bench::{
    firecracker_then_kiln, host_context, request_status, rss_kib, same_cmdline, Figure, Vmm,
};
use kiln_tests::scratch_dir;

const MEM_MIB: u64 = 128;
const INIT_MARKER: &str = "KILN-GUEST-INIT-OK";
const DEADLINE: Duration = Duration::from_secs(600);
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule quiet";

/// Kills `child` on drop, so a failed round leaves no VMM behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's config file: the default guest's kernel, its ext4 root read-only, 1 vCPU.
fn config_file(dir: &Path, cmdline: &str) -> PathBuf {
    let images = vmm::guest_images::default_guest().expect("guest images");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": images.vmlinux,
            "boot_args": cmdline,
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": images.rootfs,
            "is_root_device": true,
            "is_read_only": true,
        }],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).expect("config file");
    path
}

/// Exec → the init marker, booting from `config`.
fn boot(vmm: &Vmm, config: &Path) -> Option<f64> {
    let start = Instant::now();
    let child = Command::new(&vmm.bin)
        .args(["--no-api", "--config-file"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the VMM");
    let mut running = Running(child);
    let stdout = running.0.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(INIT_MARKER) {
                let _ = tx.send(Instant::now());
                return;
            }
        }
    });
    let at = rx.recv_timeout(DEADLINE).ok()?;
    Some((at - start).as_secs_f64())
}

/// The API figures: exec → `GET /` answered (ms), `InstanceStart` answered (ms), and the RSS
/// outside guest memory 1 s after it (kB).
fn api(vmm: &Vmm, dir: &Path, cmdline: &str) -> Option<(f64, f64, f64)> {
    let images = vmm::guest_images::default_guest().expect("guest images");
    let sock = dir.join(format!("{}.sock", vmm.name));
    let _ = std::fs::remove_file(&sock);
    let start = Instant::now();
    let child = Command::new(&vmm.bin)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the VMM");
    let running = Running(child);
    let pid = running.0.id();
    // Poll with a bare connect, then ask: the first answer is what a client waits for.
    let up = loop {
        if UnixStream::connect(&sock).is_ok()
            && request_status(&sock, "GET", "/", "", DEADLINE) == Some(200)
        {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let boot = serde_json::json!({"kernel_image_path": images.vmlinux, "boot_args": cmdline});
    let drive = serde_json::json!({
        "drive_id": "rootfs", "path_on_host": images.rootfs,
        "is_root_device": true, "is_read_only": true,
    });
    for (path, body) in [
        ("/boot-source", boot.to_string()),
        (
            "/machine-config",
            format!(r#"{{"vcpu_count":1,"mem_size_mib":{MEM_MIB}}}"#),
        ),
        ("/drives/rootfs", drive.to_string()),
    ] {
        let status = request_status(&sock, "PUT", path, &body, DEADLINE);
        assert_eq!(status, Some(204), "{} PUT {path} {body}", vmm.name);
    }
    let asked = Instant::now();
    let status = request_status(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
        DEADLINE,
    );
    let started = asked.elapsed();
    assert_eq!(status, Some(204), "{} InstanceStart", vmm.name);
    std::thread::sleep(Duration::from_secs(1));
    let (total, guest) = rss_kib(pid, MEM_MIB << 20)?;
    drop(running);
    Some((
        up.as_secs_f64() * 1000.0,
        started.as_secs_f64() * 1000.0,
        total.saturating_sub(guest) as f64,
    ))
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let vmms = firecracker_then_kiln("side-by-side");
    let cmdline = same_cmdline(BASE_CMDLINE);
    let dir = scratch_dir("side-by-side");
    let config = config_file(&dir, &cmdline);
    println!("side-by-side: {}", host_context());
    println!(
        "side-by-side: default guest's vmlinux, ext4 root (ro), 1 vCPU, {MEM_MIB} MiB, {rounds} rounds, command line {cmdline:?}"
    );
    let mut figures = [
        Figure::new("exec -> init marker (config file)", "s"),
        Figure::new("exec -> GET / answered", "ms"),
        Figure::new("PUT /actions InstanceStart", "ms"),
        Figure::new("RSS outside guest memory at 1 s", "kB"),
    ];
    for round in 1..=rounds {
        for (i, vmm) in vmms.iter().enumerate() {
            match boot(vmm, &config) {
                Some(s) => figures[0].samples[i].push(s),
                None => println!("round {round}: {}: no init marker", vmm.name),
            }
            match api(vmm, &dir, &cmdline) {
                Some((up, start, rss)) => {
                    figures[1].samples[i].push(up);
                    figures[2].samples[i].push(start);
                    figures[3].samples[i].push(rss);
                }
                None => println!("round {round}: {}: the API did not come up", vmm.name),
            }
        }
        println!("round {round} done");
    }
    for figure in &mut figures {
        figure.print();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
