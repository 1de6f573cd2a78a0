//! End to end through Firecracker's API with the real default guest (one boot, about two minutes
//! on our nested-KVM machines): a Kata-style configuration (read-only root drive, a placeholder
//! drive, entropy), InstanceStart, then — while the guest runs — the placeholder gets its real
//! backing file by PATCH and the guest sees the new capacity and contents, the VM is paused and
//! resumed, and SendCtrlAltDel ends it.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::{
    api_call as call, kiln_bin, kvm_available, scratch_dir, sha256_file, wait_for_socket,
    write_script_drive,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);

/// The guest's script: says it is ready, waits for its third drive to change size, reports the
/// new size and contents, then waits to be stopped.
const SCRIPT: &str = r#"
echo "KILN-T ready $(cat /sys/block/vdc/size)"
i=0
while [ "$(cat /sys/block/vdc/size)" = 8 ] && [ $i -lt 600 ]; do sleep 1; i=$((i + 1)); done
echo "KILN-T resized $(cat /sys/block/vdc/size)"
echo "KILN-T sum $(sha256sum </dev/vdc)"
sleep 900
"#;

fn put(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, reply) = call(sock, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {reply}");
}

/// Waits for a console line starting with `prefix`; returns it.
fn wait_for(lines: &mpsc::Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let start = Instant::now();
    loop {
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.starts_with(prefix) {
                    return line;
                }
            }
            Err(_) => panic!(
                "no {prefix:?} on the console; last lines:\n{}",
                seen[seen.len().saturating_sub(40)..].join("\n")
            ),
        }
    }
}

#[test]
fn kata_style_boot_hotplug_pause_and_ctrl_alt_del() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let dir = scratch_dir("api-guest");
    let script = dir.join("script.img");
    write_script_drive(&script, SCRIPT);
    let placeholder = dir.join("placeholder.img");
    std::fs::write(&placeholder, [0u8; 4096]).unwrap();
    let real = dir.join("real.img");
    let pattern: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&real, &pattern).unwrap();
    let sock = dir.join("api.sock");

    let mut child = Command::new(kiln_bin())
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "kata_sandbox"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let stdout = child.stdout.take().unwrap();
    let (line_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    wait_for_socket(&sock, Duration::from_secs(30));

    // Kata runtime-rs's order: boot source, machine, drives, then start.
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb"}}"#,
        images.vmlinux.display()
    );
    put(&sock, "PUT", "/boot-source", &boot);
    put(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":256}"#,
    );
    let drive = |id: &str, path: &Path, root: bool, ro: bool| {
        format!(
            r#"{{"drive_id":"{id}","path_on_host":"{}","is_root_device":{root},"is_read_only":{ro}}}"#,
            path.display()
        )
    };
    put(
        &sock,
        "PUT",
        "/drives/rootfs",
        &drive("rootfs", &images.rootfs, true, true),
    );
    put(
        &sock,
        "PUT",
        "/drives/script",
        &drive("script", &script, false, true),
    );
    put(
        &sock,
        "PUT",
        "/drives/drive1",
        &drive("drive1", &placeholder, false, false),
    );
    put(&sock, "PUT", "/entropy", "{}");
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );

    let mut seen = Vec::new();
    let ready = wait_for(&lines, "KILN-T ready", &mut seen);
    assert_eq!(ready, "KILN-T ready 8");
    let patch = format!(
        r#"{{"drive_id":"drive1","path_on_host":"{}"}}"#,
        real.display()
    );
    put(&sock, "PATCH", "/drives/drive1", &patch);
    let resized = wait_for(&lines, "KILN-T resized", &mut seen);
    assert_eq!(resized, "KILN-T resized 2048");
    let sum = wait_for(&lines, "KILN-T sum", &mut seen);
    assert!(sum.contains(&sha256_file(&real)), "{sum}");

    put(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert!(call(&sock, "GET", "/", "")
        .1
        .contains(r#""state":"Paused""#));
    put(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    put(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"SendCtrlAltDel"}"#,
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BOOT_DEADLINE {
            let _ = child.kill();
            panic!("Ctrl+Alt+Del did not end the VM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = stderr_thread.join().unwrap_or_default();
    eprintln!("kiln stderr:\n{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the guest rebooted"), "{stderr}");
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
