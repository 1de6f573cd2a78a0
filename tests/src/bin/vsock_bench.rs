//! vsock benchmark (issue 5): prints figures, asserts nothing.
//!
//! Boots the default guest kernel from its ext4 root (read-only) with `--vsock`, starts the
//! guest's `kiln-vsock serve` (guest-images/tools/kiln-vsock.c) and drives it from the host
//! through Firecracker's hybrid Unix socket:
//! - host → guest: `SINK` of `--mib` MiB (the guest checksums it and replies);
//! - guest → host: `SOURCE` of `--mib` MiB (checked here byte for byte).
//!
//! Reports per direction the MiB/s the host saw (from its first write to the last byte or the
//! reply) and the CPU seconds per GiB moved of kiln's device thread (`kiln_vmm`, all vsock work)
//! and of the whole kiln process (vCPU threads included), from utime+stime in /proc around each
//! transfer.
//!
//! Usage: `cargo run --release -p kiln-tests --bin vsock-bench [-- --mib N] [--timeout-secs N]`
//! (`KILN_GUEST_IMAGES=DIR` to use built images; otherwise guest-images/build.sh is run first).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::bench::{clock_ticks_per_second, host_context, CpuSample, Sampler};
use kiln_tests::vsock_proto::{connect_guest, fnv64, fnv_hex, pattern, read_line};
use kiln_tests::{kiln_bin, scratch_dir, write_script_drive, write_tool_drive};

const TOOL: &str = "kiln-vsock";
const MEM_MIB: u64 = 256;
const GUEST_PORT: u32 = 5000;
/// Host port the guest fetches one byte from once the host is done, which ends its script.
const DONE_PORT: u32 = 6001;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb";

const USAGE: &str = "usage: vsock-bench [--mib N] [--timeout-secs N]
  --mib N           MiB moved per direction (default 16)
  --timeout-secs N  give up after this long (default 1800)";

fn die(msg: &str) -> ! {
    eprintln!("vsock-bench: error: {msg}");
    std::process::exit(1);
}

fn parse_args() -> (usize, Duration) {
    let (mut mib, mut timeout) = (16usize, Duration::from_secs(1800));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > 0 => n,
                _ => die(&format!("{name} takes a positive number\n{USAGE}")),
            }
        };
        match arg.as_str() {
            "--mib" => mib = number("--mib") as usize,
            "--timeout-secs" => timeout = Duration::from_secs(number("--timeout-secs")),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    (mib, timeout)
}

fn guest_script(tool_len: usize) -> String {
    format!(
        r#"
head -c {tool_len} /dev/vdc >/tmp/kv && chmod +x /tmp/kv || echo "KILN-BENCH-ERROR setup"
/tmp/kv serve {GUEST_PORT} &
i=0
until /tmp/kv fetch 2 {DONE_PORT} 1 0 >/dev/null 2>&1; do
    i=$((i+1))
    [ $i -gt 3600 ] && break
    sleep 1
done
"#
    )
}

/// One direction's figures.
struct Transfer {
    seconds: f64,
    before: CpuSample,
    after: CpuSample,
}

fn measure(sampler: &mut Sampler, transfer: impl FnOnce()) -> Transfer {
    let before = sampler.sample().unwrap_or_else(|e| die(&e));
    let start = Instant::now();
    transfer();
    let seconds = start.elapsed().as_secs_f64();
    let after = sampler.sample().unwrap_or_else(|e| die(&e));
    Transfer {
        seconds,
        before,
        after,
    }
}

fn host_to_guest<'a>(uds: &Path, data: &'a [u8], deadline: Instant) -> impl FnOnce() + 'a {
    let mut s = connect_guest(uds, GUEST_PORT, deadline);
    move || {
        s.write_all(b"SINK\n")
            .unwrap_or_else(|e| die(&format!("sending: {e}")));
        s.write_all(data)
            .unwrap_or_else(|e| die(&format!("sending: {e}")));
        s.shutdown(Shutdown::Write).ok();
        let reply = read_line(&mut s).unwrap_or_else(|e| die(&format!("reply: {e}")));
        let want = format!("{} {}", data.len(), fnv_hex(fnv64(data)));
        if reply != want {
            die(&format!(
                "the guest received other bytes: {reply:?}, want {want:?}"
            ));
        }
    }
}

fn guest_to_host(uds: &Path, len: usize, deadline: Instant) -> impl FnOnce() {
    let mut s = connect_guest(uds, GUEST_PORT, deadline);
    move || {
        s.write_all(format!("SOURCE {len} 2\n").as_bytes())
            .unwrap_or_else(|e| die(&format!("sending: {e}")));
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| die(&format!("receiving: {e}")));
        if got != pattern(2, len) {
            die(&format!(
                "the host received other bytes ({} of {len})",
                got.len()
            ));
        }
    }
}

fn main() {
    let (mib, timeout) = parse_args();
    let images =
        vmm::guest_images::default_guest().unwrap_or_else(|e| die(&format!("guest images: {e}")));
    let image_dir = images
        .vmlinux
        .parent()
        .unwrap_or_else(|| die("vmlinux has no parent directory"));
    let tool = image_dir.join(TOOL);
    let tool_bytes = std::fs::read(&tool).unwrap_or_else(|e| {
        die(&format!(
            "{}: {e} (guest images built before tools/{TOOL}.c existed? run guest-images/build.sh)",
            tool.display()
        ))
    });
    let dir = scratch_dir("vsock-bench");
    let tool_drive = dir.join("tool.img");
    write_tool_drive(&tool_drive, &tool_bytes)
        .unwrap_or_else(|e| die(&format!("{}: {e}", tool_drive.display())));
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script(tool_bytes.len()));
    let uds = dir.join("v.sock");

    println!("vsock-bench: {mib} MiB per direction over hybrid vsock, 1 vCPU, {MEM_MIB} MiB");
    println!("{}", host_context());
    let mut child = Command::new(kiln_bin())
        .args([
            "run",
            "--mem-mib",
            &MEM_MIB.to_string(),
            "--drive",
            &format!("path={},root,ro", images.rootfs.display()),
            "--drive",
            &format!("path={},ro", script.display()),
            "--drive",
            &format!("path={},ro", tool_drive.display()),
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--cmdline",
            CMDLINE,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", kiln_bin().display())));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, console) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    eprintln!("vsock-bench: booting (about a minute on nested KVM)...");
    let deadline = Instant::now() + timeout;
    let mut sampler = Sampler::new(child.id());
    let data = pattern(1, mib << 20);
    let send = host_to_guest(&uds, &data, deadline);
    let into_guest = measure(&mut sampler, send);
    let fetch = guest_to_host(&uds, mib << 20, deadline);
    let out_of_guest = measure(&mut sampler, fetch);

    // Let the guest's script end, which reboots it.
    let mut done = uds.as_os_str().to_owned();
    done.push(format!("_{DONE_PORT}"));
    if let Ok(listener) = UnixListener::bind(&done) {
        thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = read_line(&mut s);
                let _ = s.write_all(&pattern(0, 1));
            }
        });
    }
    let status = child.wait();
    let lines: Vec<String> = console.try_iter().collect();
    if lines.iter().any(|l| l.contains("KILN-BENCH-ERROR")) {
        die(&format!("the guest failed:\n{}", lines.join("\n")));
    }

    let tck = clock_ticks_per_second();
    let gib = (mib as f64) / 1024.0;
    println!(
        "{:<14} {:>9} {:>22} {:>20}",
        "direction", "MiB/s", "kiln_vmm CPU s/GiB", "process CPU s/GiB"
    );
    for (name, t) in [("host->guest", &into_guest), ("guest->host", &out_of_guest)] {
        let per_gib = |ticks: u64| ticks as f64 / tck / gib;
        println!(
            "{:<14} {:>9.1} {:>22.3} {:>20.3}",
            name,
            mib as f64 / t.seconds,
            per_gib(t.after.vmm.saturating_sub(t.before.vmm)),
            per_gib(t.after.process.saturating_sub(t.before.process)),
        );
    }
    println!(
        "CPU time: utime+stime from /proc around each transfer, resolution 1/{tck} s \
         (= {:.3} s/GiB at {mib} MiB); kiln exited with {status:?}",
        1.0 / tck / gib
    );
    let _ = std::fs::remove_dir_all(&dir);
}
