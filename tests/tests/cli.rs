//! The kiln binary end to end with tiny hand-made kernels (seconds, even on nested KVM), and
//! every kind of bad input.

use std::time::Duration;

use kiln_tests::{
    hello_elf, kvm_available, run_kiln, scratch_dir, spawn_kiln, tiny_elf, wait_with_deadline,
    write_file, TINY_LOAD_ADDR,
};

const DEADLINE: Duration = Duration::from_secs(60);
const LOAD_ADDR: u64 = TINY_LOAD_ADDR;

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let path = write_file(dir, name, bytes);
    path.to_str().unwrap().to_string()
}

/// Runs `kiln run --kernel KERNEL --mem-mib 16 EXTRA...`.
fn run_tiny(kernel: &str, extra: &[&str]) -> kiln_tests::Outcome {
    let mut args = vec!["run", "--kernel", kernel, "--mem-mib", "16"];
    args.extend_from_slice(extra);
    run_kiln(&args, DEADLINE)
}

#[test]
fn tiny_kernel_prints_and_reboots_with_status_0() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("hello");
    let kernel = write(&dir, "hello.elf", &hello_elf());
    let out = run_tiny(&kernel, &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK\n"), "{out:?}");
    assert!(out.stderr.contains("the guest rebooted"), "{out:?}");

    // The same with the console in a file (created 0600) and with no console at all.
    let console = dir.join("console.log");
    let spec = format!("file:{}", console.display());
    let out = run_tiny(&kernel, &["--console", &spec]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "KILN-TINY-OK\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&console).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = run_tiny(&kernel, &["--console", "none"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!out.stdout.contains("KILN-TINY-OK"), "{out:?}");
}

#[test]
fn tiny_kernel_on_several_vcpus() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("smp");
    let kernel = write(&dir, "hello.elf", &hello_elf());
    let out = run_tiny(&kernel, &["--vcpus", "4"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");
}

#[test]
fn triple_fault_exits_1_with_reason_rip_and_bytes() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("triple");
    // mov rax, [0x40000000]: beyond the boot identity map, with no IDT → triple fault.
    let kernel = write(
        &dir,
        "fault.elf",
        &tiny_elf(LOAD_ADDR, &[0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0x40, 0xf4]),
    );
    let out = run_tiny(&kernel, &[]);
    assert_eq!(out.code(), 1, "{out:?}");
    let last = out.stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("kiln: guest failed: vCPU 0: KVM_EXIT_"),
        "{last}"
    );
    assert!(last.contains("at RIP 0x100000"), "{last}");
    assert!(
        last.contains("instruction bytes 48 8b 04 25 00 00 00 40"),
        "{last}"
    );
}

#[test]
fn sigterm_stops_a_spinning_guest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("spin");
    let kernel = write(&dir, "spin.elf", &tiny_elf(LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let child = spawn_kiln(&["run", "--kernel", &kernel, "--mem-mib", "16"]);
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {name}");
    };
    std::thread::sleep(Duration::from_millis(500));
    signal("-USR1");
    std::thread::sleep(Duration::from_millis(500));
    signal("-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(
        out.stderr
            .contains("kiln: vCPU 0: RIP 0x100000 (running); exits:"),
        "{out:?}"
    );
}

/// Every bad input: one `kiln: ...` line, status 2, nothing created.
#[test]
fn bad_input_is_one_line_and_status_2() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("bad");
    let good = write(&dir, "hello.elf", &hello_elf());
    let garbage = write(&dir, "garbage", b"GARBAGE!not a kernel at all");
    let empty = write(&dir, "empty", b"");
    let big_initrd = write(&dir, "big.cpio", &vec![0u8; 20 << 20]);
    let console = dir.join("console.log");
    let console_spec = format!("file:{}", console.display());
    let long_cmdline = "x".repeat(3000);
    let dir_drive = format!("path={}", dir.display());
    let root_a = format!("path={},root", write(&dir, "a.img", &[0u8; 4096]));
    let root_b = format!("path={},root", write(&dir, "b.img", &[0u8; 4096]));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "kernel image /nonexistent/vmlinux: No such file",
        ),
        (
            vec!["--kernel", &garbage],
            "not an ELF or bzImage (first bytes 47 41 52 42 41 47 45 21)",
        ),
        (vec!["--kernel", &empty], "the file is empty"),
        (
            vec!["--kernel", &good, "--initrd", &big_initrd],
            "do not fit in guest memory",
        ),
        (
            vec!["--kernel", &good, "--initrd", "/nonexistent/initrd"],
            "initrd /nonexistent/initrd",
        ),
        (
            vec!["--kernel", &good, "--mem-mib", "0"],
            "--mem-mib 0: at least 8 MiB",
        ),
        (
            vec!["--kernel", &good, "--mem-mib", "100000000"],
            "the host has only",
        ),
        (
            vec!["--kernel", &good, "--vcpus", "0"],
            "--vcpus 0: must be between 1 and",
        ),
        (
            vec!["--kernel", &good, "--vcpus", "100000"],
            "--vcpus 100000: must be between 1 and",
        ),
        (
            vec!["--kernel", &good, "--cmdline", &long_cmdline],
            "kernel command line",
        ),
        (
            vec!["--kernel", &good, "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (
            vec!["--kernel", &good, "--console", "tty"],
            "is not a console",
        ),
        (
            vec!["--kernel", &good, "--drive", "path=/nonexistent/disk.img"],
            "drive drive0: disk image /nonexistent/disk.img: No such file",
        ),
        (
            vec!["--kernel", &good, "--drive", &dir_drive],
            "Is a directory",
        ),
        (
            vec!["--kernel", &good, "--drive", "path=/dev/null"],
            "disk image /dev/null: not a regular file or block device",
        ),
        (
            vec!["--kernel", &good, "--drive", "ro"],
            "'path=' is required",
        ),
        (
            vec!["--kernel", &good, "--drive", &root_a, "--drive", &root_b],
            "are both marked root",
        ),
        (
            vec!["--kernel", &good, "--net", "tap=a/b"],
            "tap name \"a/b\"",
        ),
        (
            vec!["--kernel", &good, "--rng", "bw_size=100"],
            "needs a non-zero refill_time",
        ),
    ];
    for (mut args, expected) in cases {
        if !args.contains(&"--mem-mib") {
            args.splice(0..0, ["--mem-mib", "16"]);
        }
        args.insert(0, "run");
        args.extend(["--console", &console_spec]);
        let out = run_kiln(&args, DEADLINE);
        assert_eq!(out.code(), 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(expected),
            "{args:?}: expected {expected:?} in {:?}",
            out.stderr
        );
        if !expected.contains("argument")
            && !expected.contains("console")
            && !expected.contains("required")
            && !expected.contains("refill_time")
        {
            assert_eq!(out.stderr.lines().count(), 1, "one line: {:?}", out.stderr);
        }
        assert!(
            !console.exists(),
            "{args:?} left {} behind",
            console.display()
        );
    }
}

/// Two VMs cannot write one image: the second is refused before it starts, and the first runs on.
#[test]
fn a_drive_in_use_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("locked");
    let kernel = write(&dir, "spin.elf", &tiny_elf(LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let disk = write(&dir, "disk.img", &[0u8; 64 * 1024]);
    let drive = format!("path={disk}");
    let first = spawn_kiln(&[
        "run",
        "--kernel",
        &kernel,
        "--mem-mib",
        "16",
        "--drive",
        &drive,
        "--rng",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    for second_drive in [drive.clone(), format!("{drive},ro")] {
        let second = run_tiny(&kernel, &["--drive", &second_drive]);
        assert_eq!(second.code(), 2, "{second:?}");
        assert!(
            second.stderr.contains("is in use by another process"),
            "{second:?}"
        );
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = wait_with_deadline(first, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "the first VM ran on: {out:?}");
}
