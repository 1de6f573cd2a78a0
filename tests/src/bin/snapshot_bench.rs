//! Snapshots, Kiln beside Firecracker on one machine: prints figures, asserts nothing.
//!
//! Both VMMs boot the same guest (the default guest's vmlinux, its ext4 root read-only, 1 vCPU,
//! 128 MiB, the same command line with this host's compat parameters) with a script that prints
//! `KILN-T tick N` every half second; each is paused and snapshotted once (Full), then restored
//! round by round, Firecracker then Kiln, from its own snapshot:
//! - **create**: `PUT /snapshot/create` answered, and the memory file's allocated size;
//! - **restore**: exec → API answers `GET /` → `PUT /snapshot/load` (`resume_vm`) answered →
//!   the guest's next tick on the console;
//! - **memory**: the restored VMM's resident memory outside guest memory, 1 s after the load;
//! - **clones**: 4, then 16 restores of one snapshot at once, their summed Pss once each ticked.
//!
//! Printed: each figure's median, min and max for both, and Kiln / Firecracker (below 1: Kiln is
//! faster or smaller). Ratios taken in one run are what count; absolute times here depend on
//! the machine (a nested PVM host runs the guest's kernel emulated).
//!
//! Usage: `cargo build --release --workspace && cargo run --release -p kiln-tests --bin
//! snapshot-bench [-- ROUNDS]` (default 5); `FIRECRACKER_BIN` overrides
//! `../shared/anchors/firecracker`. The Firecracker anchor is a gnu build without seccomp
//! filters (see its README); Kiln runs with its filters on.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::bench::{
    firecracker_then_kiln, host_context, memory_kib, request_status, same_cmdline, Figure, Vmm,
};
use kiln_tests::{scratch_dir, write_script_drive};

const MEM_MIB: u64 = 128;
const DEADLINE: Duration = Duration::from_secs(900);
const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule quiet kiln.script=/dev/vdb";
const SCRIPT: &str = "i=0\nwhile true; do i=$((i+1)); echo \"KILN-T tick $i\"; sleep 0.5; done\n";

/// A VMM process, killed on drop, whose console lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Running {
    fn spawn(vmm: &Vmm, sock: &Path) -> Self {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new(&vmm.bin)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the VMM");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// When the next tick line came, if one comes within the deadline.
    fn next_tick(&self) -> Option<Instant> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            let (at, line) = self.lines.recv_timeout(DEADLINE).ok()?;
            if line.contains("KILN-T tick") {
                return Some(at);
            }
        }
        None
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn put(vmm: &Vmm, sock: &Path, method: &str, path: &str, body: &str) {
    let status = request_status(sock, method, path, body, DEADLINE);
    assert_eq!(status, Some(204), "{} {method} {path} {body}", vmm.name);
}

/// Waits for the API's first answer; returns when it came.
fn api_up(sock: &Path) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if UnixStream::connect(sock).is_ok()
            && request_status(sock, "GET", "/", "", DEADLINE) == Some(200)
        {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Boots the guest in `vmm`, pauses it at its first tick and takes a Full snapshot; returns
/// (state, memory file, create time in ms).
fn snapshot(vmm: &Vmm, dir: &Path, cmdline: &str, script: &Path) -> (PathBuf, PathBuf, f64) {
    let images = vmm::guest_images::default_guest().expect("guest images");
    let sock = dir.join(format!("{}-boot.sock", vmm.name));
    let running = Running::spawn(vmm, &sock);
    api_up(&sock).expect("API");
    let boot = serde_json::json!({"kernel_image_path": images.vmlinux, "boot_args": cmdline});
    put(vmm, &sock, "PUT", "/boot-source", &boot.to_string());
    put(
        vmm,
        &sock,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{MEM_MIB}}}"#),
    );
    for (id, path, root) in [
        ("rootfs", &images.rootfs, true),
        ("script", &script.to_path_buf(), false),
    ] {
        let drive = serde_json::json!({
            "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": true,
        });
        put(
            vmm,
            &sock,
            "PUT",
            &format!("/drives/{id}"),
            &drive.to_string(),
        );
    }
    put(
        vmm,
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    running.next_tick().expect("the guest ticks");
    put(vmm, &sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let state = dir.join(format!("{}.state", vmm.name));
    let mem = dir.join(format!("{}.mem", vmm.name));
    let body = serde_json::json!({
        "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem,
    });
    let asked = Instant::now();
    put(vmm, &sock, "PUT", "/snapshot/create", &body.to_string());
    let took = asked.elapsed().as_secs_f64() * 1000.0;
    (state, mem, took)
}

fn load_body(state: &Path, mem: &Path) -> String {
    serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string()
}

/// One restore: (exec → API answer, → load answered, → next tick) in ms, and the RSS outside
/// guest memory 1 s later in kB.
fn restore(vmm: &Vmm, dir: &Path, state: &Path, mem: &Path) -> Option<[f64; 4]> {
    let sock = dir.join(format!("{}-restore.sock", vmm.name));
    let start = Instant::now();
    let running = Running::spawn(vmm, &sock);
    let up = api_up(&sock)?;
    let status = request_status(
        &sock,
        "PUT",
        "/snapshot/load",
        &load_body(state, mem),
        DEADLINE,
    );
    let loaded = Instant::now();
    if status != Some(204) {
        println!("{}: load answered {status:?}", vmm.name);
        return None;
    }
    let tick = running.next_tick()?;
    std::thread::sleep(Duration::from_secs(1));
    let kib = memory_kib(running.pid(), MEM_MIB << 20)?;
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
    Some([
        ms(start, up),
        ms(start, loaded),
        ms(start, tick),
        kib.rss.saturating_sub(kib.guest_rss) as f64,
    ])
}

/// `count` restores of one snapshot at once: their summed Pss (all, and of guest memory) in
/// KiB once every one has ticked.
fn clones(vmm: &Vmm, dir: &Path, state: &Path, mem: &Path, count: usize) -> Option<(f64, f64)> {
    let running: Vec<Running> = (0..count)
        .map(|i| {
            let sock = dir.join(format!("{}-clone{i}.sock", vmm.name));
            let running = Running::spawn(vmm, &sock);
            api_up(&sock).expect("API");
            put(vmm, &sock, "PUT", "/snapshot/load", &load_body(state, mem));
            running
        })
        .collect();
    for r in &running {
        r.next_tick()?;
    }
    let (mut pss, mut guest_pss) = (0, 0);
    for r in &running {
        let kib = memory_kib(r.pid(), MEM_MIB << 20)?;
        pss += kib.pss;
        guest_pss += kib.guest_pss;
    }
    Some((pss as f64, guest_pss as f64))
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let vmms = firecracker_then_kiln("snapshot-bench");
    let cmdline = same_cmdline(BASE_CMDLINE);
    let dir = scratch_dir("snapshot-bench");
    let script = dir.join("script.img");
    write_script_drive(&script, SCRIPT);
    println!("snapshot-bench: {}", host_context());
    println!(
        "snapshot-bench: default guest, ext4 root (ro), 1 vCPU, {MEM_MIB} MiB, {rounds} rounds"
    );
    let mut create = Figure::new("PUT /snapshot/create (Full)", "ms");
    let mut size = Figure::new("memory file allocated", "MiB");
    let snapshots: Vec<(PathBuf, PathBuf)> = vmms
        .iter()
        .enumerate()
        .map(|(i, vmm)| {
            let (state, mem, took) = snapshot(vmm, &dir, &cmdline, &script);
            create.samples[i].push(took);
            let blocks = std::fs::metadata(&mem).map(|m| m.blocks()).unwrap_or(0);
            size.samples[i].push(blocks as f64 * 512.0 / f64::from(1 << 20));
            (state, mem)
        })
        .collect();
    let mut figures = [
        Figure::new("exec -> GET / answered", "ms"),
        Figure::new("exec -> PUT /snapshot/load answered", "ms"),
        Figure::new("exec -> guest's first tick after load", "ms"),
        Figure::new("RSS outside guest memory at 1 s", "kB"),
    ];
    for round in 1..=rounds {
        for (i, vmm) in vmms.iter().enumerate() {
            let (state, mem) = &snapshots[i];
            match restore(vmm, &dir, state, mem) {
                Some(values) => {
                    for (figure, value) in figures.iter_mut().zip(values) {
                        figure.samples[i].push(value);
                    }
                }
                None => println!("round {round}: {}: the restore did not tick", vmm.name),
            }
        }
        println!("round {round} done");
    }
    let mut clone_figures = Vec::new();
    for count in [4, 16] {
        let mut all = Figure::new(
            if count == 4 {
                "Pss of 4 clones"
            } else {
                "Pss of 16 clones"
            },
            "MiB",
        );
        let mut guest = Figure::new(
            if count == 4 {
                "  of which guest memory"
            } else {
                "  of which guest memory "
            },
            "MiB",
        );
        for (i, vmm) in vmms.iter().enumerate() {
            let (state, mem) = &snapshots[i];
            match clones(vmm, &dir, state, mem, count) {
                Some((pss, guest_pss)) => {
                    all.samples[i].push(pss / 1024.0);
                    guest.samples[i].push(guest_pss / 1024.0);
                }
                None => println!("{count} clones: {}: not all ticked", vmm.name),
            }
        }
        clone_figures.push(all);
        clone_figures.push(guest);
    }
    create.print();
    size.print();
    for figure in figures.iter_mut().chain(clone_figures.iter_mut()) {
        figure.print();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
