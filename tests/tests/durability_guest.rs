//! End to end: what the guest flushed survives Kiln's SIGKILL. The default guest writes numbered
//! 4 KiB records to a raw drive with `O_DIRECT`, each followed by a flush (`conv=fsync`), and
//! prints `KILN-T flushed N` once the flush is answered; the test kills Kiln with SIGKILL while
//! the guest goes on writing. Every record the guest saw flushed must then be in the host file:
//! Kiln may not answer a write before it is in the file, nor a flush before the writes before it.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::{
    console_lines, die_with_test, kiln_bin, kvm_available, scratch_dir, write_script_drive,
};

const RECORD_BYTES: usize = 4096;
const RECORDS: usize = 1024;
/// Records seen flushed before the kill.
const KILL_AFTER: usize = 4;
const BOOT_DEADLINE: Duration = Duration::from_secs(900);

fn guest_script() -> String {
    format!(
        r#"
i=0
while [ $i -lt {RECORDS} ]; do
    printf 'KILN-REC %08d\n' $i >/tmp/rec
    if ! dd if=/tmp/rec of=/dev/vdc bs={RECORD_BYTES} seek=$i count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null; then
        echo "KILN-T write failed $i"
        break
    fi
    echo "KILN-T flushed $i"
    i=$((i+1))
done
"#
    )
}

/// The record number a `KILN-T flushed N` line names.
fn flushed(line: &str) -> Option<usize> {
    line.trim_end()
        .strip_prefix("KILN-T flushed ")?
        .parse()
        .ok()
}

#[test]
fn every_write_the_guest_saw_flushed_survives_a_sigkill() {
    if !kvm_available() {
        return;
    }
    let images = vmm::guest_images::default_guest().expect("guest images");
    let dir = scratch_dir("durability");
    let script = dir.join("script.img");
    write_script_drive(&script, &guest_script());
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; RECORDS * RECORD_BYTES]).unwrap();

    let mut cmd = Command::new(kiln_bin());
    cmd.args([
        "run",
        "--drive",
        &format!("path={},root,ro", images.rootfs.display()),
        "--drive",
        &format!("path={},ro", script.display()),
        "--drive",
        &format!("path={}", data.display()),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vdb",
    ]);
    die_with_test(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn kiln");
    let (lines, reader) = console_lines(&mut child);

    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = BOOT_DEADLINE.saturating_sub(started.elapsed());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no record {KILL_AFTER} flushed; console:\n{}",
                seen.join("\n")
            )
        });
        let done = flushed(&line).is_some_and(|n| n >= KILL_AFTER);
        seen.push(line);
        if done {
            break;
        }
    }
    // In the middle of the next record (each takes the guest a good fraction of a second here).
    thread::sleep(Duration::from_millis(150));
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let _ = reader.join();
    seen.extend(lines.try_iter());
    let last = seen
        .iter()
        .filter_map(|l| flushed(l))
        .max()
        .expect("a record flushed");
    assert!(
        !seen.iter().any(|l| l.contains("KILN-T write failed")),
        "{seen:#?}"
    );

    let bytes = std::fs::read(&data).unwrap();
    for n in 0..=last {
        let record = &bytes[n * RECORD_BYTES..(n + 1) * RECORD_BYTES];
        let expected = format!("KILN-REC {n:08}\n");
        assert!(
            record.starts_with(expected.as_bytes()),
            "record {n} of {last} flushed is not in the host file: {:?}",
            String::from_utf8_lossy(&record[..expected.len()])
        );
    }
    eprintln!(
        "{} records flushed before the SIGKILL, all in the host file",
        last + 1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
