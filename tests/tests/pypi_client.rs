//! End to end with a real Firecracker client from PyPI: `pyrecracker` (0.6.4, its `VMManager`
//! and `FirecrackerClient`) drives Kiln installed as `firecracker`, unchanged, inside a network
//! namespace the test makes (the client's own `ip tuntap` set-up runs there too; no traffic
//! leaves it).
//!
//! The client starts `sudo firecracker --api-sock ...` from PATH (here: a `firecracker` link to
//! kiln, and a `sudo` that runs its arguments, the test being root), makes its TAP, configures
//! machine, boot source, root drive and eth0, and boots; the test adds the script drive with the
//! client's `put_drives`. Then through the client: the guest ticks and pings its TAP; pause (the
//! ticks stop); a Full snapshot; resume (the ticks go on); `stop` (Ctrl+Alt+Del: the guest
//! reboots and Kiln exits 0). A second client's Kiln loads the snapshot (with the deprecated
//! `mem_file_path` the client sends) and ticks on from where the snapshot was taken.
//!
//! The client needs Python 3.12 by its metadata but runs on 3.11 (the machine's), so it is
//! installed with `--ignore-requires-python` into a venv cached beside the guest images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_tests::{kiln_bin, kvm_available, scratch_dir, wait_with_deadline, write_script_drive};
use kiln_tests::{spawn_piped, NetNs};

const CLIENT: &str = "pyrecracker==0.6.4";
const DEADLINE: Duration = Duration::from_secs(900);

const GUEST_SCRIPT: &str = r#"
echo 1 >/proc/sys/kernel/ctrl-alt-del
ip link set eth0 up
ip addr add 172.16.9.2/24 dev eth0
if ping -c 1 -W 5 172.16.9.1 >/dev/null 2>&1; then echo "KILN-T ping ok"; else echo "KILN-T ping failed"; fi
i=0
while true; do i=$((i+1)); echo "KILN-T tick $i"; sleep 1; done
"#;

/// The client's script: every step through pyrecracker; prints `PY-T` lines, fails on any
/// surprise.
const DRIVER: &str = r#"
import os, re, sys, time
from pyrecracker.vm import VMManager
from pyrecracker.client import FirecrackerClient
from pyrecracker.client_types import Drive

kernel, rootfs, script, work = sys.argv[1:5]

def ticks(log):
    try:
        text = open(log, errors="replace").read()
    except FileNotFoundError:
        return []
    return [int(n) for n in re.findall(r"KILN-T tick (\d+)", text)]

def wait(what, done, limit=600):
    start = time.time()
    while time.time() - start < limit:
        if done():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")

kilns = []

def manager(name):
    vm = VMManager(f"{work}/{name}.sock", kernel, firecracker_logs_path=f"{work}/{name}.log")
    vm.host_dev_name = "pytap0"
    vm.host_ip = "172.16.9.1"
    vm.guest_ip = "172.16.9.2"
    # stop() sends Ctrl+Alt+Del, waits this long, then terminates what is left: long enough for
    # the emulated guest to reboot (Kiln then exits 0 by itself).
    vm.host_env_cleanup_pause = 20
    kilns.append(vm._VMManager__host_env.process_stack[0])
    return vm

def main():
    vm = manager("first")
    wait("the API socket", lambda: os.path.exists(f"{work}/first.sock"), 30)
    vm.boot_args = "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb"
    vm.path_on_host = rootfs
    vm.is_read_only = True
    vm.configure()
    FirecrackerClient(f"{work}/first.sock").put_drives(
        Drive(drive_id="script", is_root_device=False, is_read_only=True, path_on_host=script))
    vm.start()
    log = f"{work}/first.log"
    wait("ticks", lambda: len(ticks(log)) >= 2)
    assert "KILN-T ping ok" in open(log, errors="replace").read(), "the guest pings its TAP"
    print("PY-T booted", flush=True)

    vm.pause()
    time.sleep(1)
    paused_at = ticks(log)[-1]
    time.sleep(4)
    assert ticks(log)[-1] == paused_at, f"ticks went on while paused: {paused_at} -> {ticks(log)[-1]}"
    vm.create_snapshot(f"{work}/snap.state", f"{work}/snap.mem")
    print(f"PY-T snapshot at tick {paused_at}", flush=True)
    vm.resume()
    wait("ticks after resume", lambda: ticks(log)[-1] > paused_at)
    print("PY-T resumed", flush=True)

    kiln = kilns[0]
    vm.stop()
    kiln.wait(timeout=120)
    assert kiln.returncode == 0, f"kiln exited {kiln.returncode}"
    print("PY-T stopped 0", flush=True)

    vm2 = manager("second")
    wait("the second API socket", lambda: os.path.exists(f"{work}/second.sock"), 30)
    vm2.setup_host_networking()
    vm2.load_snapshot(f"{work}/snap.state", mem_file_path=f"{work}/snap.mem", resume_vm=True)
    log2 = f"{work}/second.log"
    wait("ticks after the load", lambda: ticks(log2))
    first = ticks(log2)[0]
    assert paused_at < first <= paused_at + 2, f"the restored guest ticks on from {paused_at}: {first}"
    print(f"PY-T restored at tick {first}", flush=True)
    kiln2 = kilns[1]
    vm2.stop()
    kiln2.wait(timeout=120)
    assert kiln2.returncode == 0, f"the restored kiln exited {kiln2.returncode}"
    print("PY-T ok", flush=True)

try:
    main()
finally:
    # Whatever failed, no Kiln outlives the run.
    for kiln in kilns:
        if kiln.poll() is None:
            kiln.kill()
"#;

/// A venv with the client, made once and cached (like the guest images).
fn client_venv() -> PathBuf {
    let cache = std::env::var_os("KILN_IMAGE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kiln")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/kiln"));
    let venv = cache.join("pyrecracker-0.6.4");
    let python = venv.join("bin/python");
    let installed = || {
        Command::new(&python)
            .args(["-c", "import pyrecracker.vm"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if installed() {
        return venv;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(status.success(), "python3 -m venv failed");
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--ignore-requires-python", CLIENT])
        .output()
        .expect("pip");
    assert!(
        out.status.success(),
        "pip install {CLIENT}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(installed(), "{CLIENT} does not import");
    venv
}

/// A directory for PATH with `firecracker` (a link to kiln) and a `sudo` that runs its
/// arguments (the test is root; the client prefixes its commands with sudo).
fn fake_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(kiln_bin(), bin.join("firecracker")).unwrap();
    let sudo = bin.join("sudo");
    std::fs::write(&sudo, "#!/bin/sh\nexec \"$@\"\n").unwrap();
    let mut perms = std::fs::metadata(&sudo).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&sudo, perms).unwrap();
    bin
}

#[test]
fn a_pypi_firecracker_client_boots_pauses_snapshots_resumes_and_stops_kiln() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let venv = client_venv();
    let dir = scratch_dir("pypi-client");
    let bin = fake_path(&dir);
    let script = dir.join("script.img");
    write_script_drive(&script, GUEST_SCRIPT);
    let driver = dir.join("driver.py");
    std::fs::write(&driver, DRIVER).unwrap();
    let ns = NetNs::create(&format!("kiln-pypi-{}", std::process::id()));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let python = venv.join("bin/python");
    let mut cmd = ns.command(&[
        "env",
        &format!("PATH={path}"),
        python.to_str().unwrap(),
        driver.to_str().unwrap(),
        images.vmlinux.to_str().unwrap(),
        images.rootfs.to_str().unwrap(),
        script.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    cmd.current_dir(&dir);
    let outcome = wait_with_deadline(spawn_piped(cmd), DEADLINE);
    let logs = ["first.log", "second.log"]
        .iter()
        .map(|name| std::fs::read_to_string(dir.join(name)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n");
    assert!(
        outcome.stdout.contains("PY-T ok"),
        "the client's run failed: {outcome:?}\nKiln's output:\n{logs}"
    );
    eprintln!("{}", outcome.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}
