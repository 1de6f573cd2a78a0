//! The kiln binary end to end with tiny hand-made kernels (seconds, even on nested KVM), and
//! every kind of bad input.

use std::time::Duration;

use kiln_tests::{
    hello_elf, kvm_available, metrics_lines, run_kiln, scratch_dir, send_signal, spawn_kiln,
    tiny_elf, wait_for_exit, wait_for_thread, wait_until, wait_with_deadline, write_file,
    TINY_LOAD_ADDR,
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
                                                                               // stderr to a file, to see the SIGUSR1 report arrive before sending SIGTERM.
    let log = dir.join("stderr.txt");
    let mut cmd = std::process::Command::new(kiln_tests::kiln_bin());
    cmd.args(["run", "--kernel", &kernel, "--mem-mib", "16"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    kiln_tests::die_with_test(&mut cmd);
    let mut child = cmd.spawn().expect("spawn kiln");
    // The vCPU threads start after the signal watcher: from then on SIGUSR1 is a report.
    wait_for_thread(child.id(), "kiln_vcpu 0", DEADLINE);
    send_signal(&child, "-USR1");
    let report = "kiln: vCPU 0: RIP 0x100000 (running); exits:";
    wait_until(DEADLINE, "the SIGUSR1 report", || {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(child.try_wait().unwrap().is_none(), "kiln ended: {text}");
        text.contains(report)
    });
    send_signal(&child, "-TERM");
    let status = wait_for_exit(&mut child, DEADLINE);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{text}");
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
    // A regular file where the vsock socket should go: refused, and left alone.
    let not_a_socket = write(&dir, "not-a-socket", b"keep me");
    let vsock_on_file = format!("cid=3,uds={not_a_socket}");
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
            "disk image /dev/null is a character device, not a regular file or block device",
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
        (
            vec!["--kernel", &good, "--vsock", "cid=2,uds=/tmp/x.sock"],
            "bad value for 'cid'",
        ),
        (
            vec!["--kernel", &good, "--vsock", &vsock_on_file],
            "vsock socket",
        ),
        (
            vec![
                "--kernel",
                &good,
                "--vsock",
                "cid=3,uds=/nonexistent/dir/v.sock",
            ],
            "vsock socket",
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
            && !expected.contains("bad value")
        {
            assert_eq!(out.stderr.lines().count(), 1, "one line: {:?}", out.stderr);
        }
        assert!(
            !console.exists(),
            "{args:?} left {} behind",
            console.display()
        );
    }
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");
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
    // Its drives are open and locked before its vCPUs start.
    wait_for_thread(first.id(), "kiln_vcpu 0", DEADLINE);
    for second_drive in [drive.clone(), format!("{drive},ro")] {
        let second = run_tiny(&kernel, &["--drive", &second_drive]);
        assert_eq!(second.code(), 2, "{second:?}");
        assert!(
            second.stderr.contains("is in use by another process"),
            "{second:?}"
        );
    }
    send_signal(&first, "-TERM");
    let out = wait_with_deadline(first, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "the first VM ran on: {out:?}");
}

/// A tiny kernel that signals Firecracker's boot timer, then resets: it maps the 2 MiB at
/// 0xc000_0000 (the boot identity map covers only the first GiB) with a new page directory at
/// 0xc000, writes 123 there, and resets through the i8042.
fn boot_timer_elf() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0x83, 0x00, 0x00, 0xc0,             // mov eax, 0xc0000083 (2 MiB page, P|RW|PS)
        0x48, 0x89, 0x04, 0x25, 0x00, 0xc0, 0, 0, // mov [0xc000], rax (the new PD's entry 0)
        0xb8, 0x03, 0xc0, 0x00, 0x00,             // mov eax, 0xc003 (the PD, P|RW)
        0x48, 0x89, 0x04, 0x25, 0x18, 0xa0, 0, 0, // mov [0xa018], rax (PDPT entry 3: 3..4 GiB)
        0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8,       // mov rax, cr3; mov cr3, rax (flush the TLB)
        0xb9, 0x00, 0x00, 0x00, 0xc0,             // mov ecx, 0xc0000000
        0xc6, 0x01, 0x7b,                         // mov byte [rcx], 123
        0xb0, 0xfe, 0xe6, 0x64,                   // mov al, 0xfe; out 0x64, al (reset)
        0xf4, 0xeb, 0xfd,                         // hlt; jmp hlt
    ];
    tiny_elf(LOAD_ADDR, code)
}

#[test]
fn boot_timer_logs_the_guest_boot_time() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("boot-timer");
    let kernel = write(&dir, "timer.elf", &boot_timer_elf());
    let out = run_tiny(&kernel, &["--boot-timer"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("kiln: Guest-boot-time = "))
        .unwrap_or_else(|| panic!("no boot time in {:?}", out.stderr));
    assert!(
        line.contains(" us ") && line.contains(" ms, ") && line.ends_with(" CPU ms"),
        "{line}"
    );
    // Without the flag the write goes nowhere (an unclaimed MMIO address) and nothing is logged.
    let out = run_tiny(&kernel, &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!out.stderr.contains("Guest-boot-time"), "{out:?}");
}

/// 0xc000_0000 is the MMIO gap's start: a 3.5 GiB guest has RAM up to there and from 4 GiB, and
/// the boot timer still answers at that address.
#[test]
fn a_guest_over_3_gib_boots_and_reaches_the_boot_timer() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("big-guest");
    let hello = write(&dir, "hello.elf", &hello_elf());
    let out = run_kiln(&["run", "--kernel", &hello, "--mem-mib", "3584"], DEADLINE);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");
    let timer = write(&dir, "timer.elf", &boot_timer_elf());
    let out = run_kiln(
        &[
            "run",
            "--kernel",
            &timer,
            "--mem-mib",
            "3584",
            "--boot-timer",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("kiln: Guest-boot-time = "), "{out:?}");
}

#[test]
fn log_and_metrics_flags() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("log-flags");
    let hello = write(&dir, "hello.elf", &hello_elf());
    let log = dir.join("kiln.log");
    let metrics = dir.join("metrics.json");
    let (log_s, metrics_s) = (log.to_str().unwrap(), metrics.to_str().unwrap());

    // The log goes to the file, the guest's console stays on stdout.
    let out = run_tiny(&hello, &["--log-path", log_s, "--metrics-path", metrics_s]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");
    assert!(!out.stderr.contains("rebooted"), "{out:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "kiln: the guest rebooted; exiting"),
        "{text}"
    );
    assert!(!text.contains("KILN-TINY-OK"), "{text}");
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 1, "one line, at exit: {lines:?}");
    let exits = lines[0]["vcpu"]["exit_io_out"].as_u64().unwrap();
    assert!(exits >= 13, "13 console bytes and the reset: {}", lines[0]);
    // The reset went through the i8042 (Firecracker's group and names).
    assert_eq!(lines[0]["i8042"]["reset_count"], 1, "{}", lines[0]);
    assert_eq!(lines[0]["i8042"]["write_count"], 1, "{}", lines[0]);
    // The CMOS clock's group (Firecracker's `rtc`): this guest never touched it.
    assert_eq!(lines[0]["rtc"]["missed_write_count"], 0, "{}", lines[0]);

    // Errors only, with the level shown: a failing guest's last word is there, nothing else.
    let fault = write(
        &dir,
        "fault.elf",
        &tiny_elf(LOAD_ADDR, &[0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0x40, 0xf4]),
    );
    let errors = dir.join("errors.log");
    let args = [
        "--log-path",
        errors.to_str().unwrap(),
        "--level",
        "ERROR",
        "--show-level",
    ];
    let out = run_tiny(&fault, &args);
    assert_eq!(out.code(), 1, "{out:?}");
    let text = std::fs::read_to_string(&errors).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("kiln: [ERROR] guest failed: vCPU 0:"),
        "{text}"
    );

    // Firecracker's process mode takes the same flags.
    let config = format!(
        r#"{{"boot-source":{{"kernel_image_path":"{hello}"}},
            "machine-config":{{"vcpu_count":1,"mem_size_mib":16}}}}"#
    );
    let config_path = write(&dir, "vm.json", config.as_bytes());
    let process_log = dir.join("process.log");
    let out = run_kiln(
        &[
            "--no-api",
            "--config-file",
            &config_path,
            "--log-path",
            process_log.to_str().unwrap(),
            "--level",
            "debug",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    let text = std::fs::read_to_string(&process_log).unwrap();
    assert!(text.contains("kiln: the guest rebooted; exiting"), "{text}");

    // Bad values are bad input, before anything runs.
    let link = dir.join("link.log");
    std::os::unix::fs::symlink(&log, &link).unwrap();
    let out = run_tiny(&hello, &["--log-path", link.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("symbolic link"), "{out:?}");
    assert!(!out.stdout.contains("KILN-TINY-OK"), "{out:?}");
    let out = run_tiny(&hello, &["--level", "loud"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("unknown level"), "{out:?}");
}

/// The console file is never opened through a symlink (it would be truncated and written).
#[test]
fn a_console_path_that_is_a_symlink_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("console-link");
    let kernel = write_file(&dir, "hello.elf", &hello_elf());
    let target = dir.join("victim.txt");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.join("console.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let console = format!("file:{}", link.display());
    let out = run_kiln(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "16",
            "--console",
            &console,
        ],
        DEADLINE,
    );
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Started under Firecracker's names (a symlink), Kiln is Firecracker's process and jailer:
/// Firecracker's `--version` line (parsed as Kata's runtime parses it), the flags the jailer and
/// client libraries pass, and vCPU threads named `fc_vcpu N`.
#[test]
fn started_as_firecracker_it_answers_as_firecracker() {
    let dir = scratch_dir("fc-name");
    let firecracker = dir.join("firecracker");
    std::os::unix::fs::symlink(kiln_tests::kiln_bin(), &firecracker).unwrap();
    let jailer = dir.join("jailer");
    std::os::unix::fs::symlink(kiln_tests::kiln_bin(), &jailer).unwrap();
    let version = |program: &std::path::Path| {
        let out = std::process::Command::new(program)
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = version(&firecracker);
    let first: Vec<&str> = text.lines().next().unwrap().split(' ').collect();
    assert_eq!(first[0], "Firecracker", "{text}");
    let semver: Vec<u32> = first[1]
        .trim_start_matches('v')
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        semver >= vec![0, 21, 1],
        "Kata wants at least 0.21.1: {text}"
    );
    assert!(text.lines().nth(1).unwrap().starts_with("kiln "), "{text}");
    assert!(version(&jailer).starts_with("Jailer v"));
    // `kiln --version` is unchanged.
    let kiln = version(&kiln_tests::kiln_bin());
    assert!(kiln.starts_with("kiln "), "{kiln}");

    if !kvm_available() {
        return;
    }
    let kernel = write(&dir, "spin.elf", &tiny_elf(LOAD_ADDR, &[0xeb, 0xfe])); // jmp $
    let config = format!(
        r#"{{"boot-source":{{"kernel_image_path":"{kernel}"}},
            "machine-config":{{"vcpu_count":2,"mem_size_mib":16}}}}"#
    );
    let config_path = write(&dir, "vm.json", config.as_bytes());
    let metrics = dir.join("metrics.json");
    let sock = dir.join("api.sock");
    // As the jailer starts it: two seconds ago, 1000 us of the jailer's CPU time.
    let start_us = vmm::startup_clock::monotonic_us().unwrap() - 2_000_000;
    let mut cmd = std::process::Command::new(&firecracker);
    cmd.args([
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        &config_path,
        "--metrics-path",
        metrics.to_str().unwrap(),
        "--enable-pci",
        "--start-time-us",
        &start_us.to_string(),
        "--start-time-cpu-us",
        "0",
        "--parent-cpu-time-us",
        "1000",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    kiln_tests::die_with_test(&mut cmd);
    let child = cmd.spawn().expect("spawn firecracker");
    wait_for_thread(child.id(), "fc_vcpu 0", DEADLINE);
    wait_for_thread(child.id(), "fc_vcpu 1", DEADLINE);
    send_signal(&child, "-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + 15, "{out:?}");
    assert!(
        out.stderr
            .contains("--enable-pci: Kiln has no virtio-pci transport"),
        "{out:?}"
    );
    let lines = metrics_lines(&metrics);
    let api = &lines.last().unwrap()["api_server"];
    let wall = api["process_startup_time_us"].as_u64().unwrap();
    let cpu = api["process_startup_time_cpu_us"].as_u64().unwrap();
    assert!(wall >= 2_000_000, "counted from --start-time-us: {api}");
    assert!(cpu >= 1000, "the parent's CPU time is added: {api}");
}

/// Firecracker's snapshot flags: `--snapshot-version` prints the format Kiln writes,
/// `--describe-snapshot` a state file's (read from its header), and the `kiln snapshot`
/// subcommands do the same and merge memory files; bad files are one line and status 2.
#[test]
fn snapshot_version_describe_and_merge() {
    let dir = scratch_dir("snapshot-flags");
    let out = run_kiln(&["--snapshot-version"], Duration::from_secs(10));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "v1.0.0");
    let state = dir.join("vm.state");
    std::fs::write(&state, vmm::persist::format::frame(b"{}")).unwrap();
    for args in [
        vec!["--describe-snapshot", state.to_str().unwrap()],
        vec!["snapshot", "describe", state.to_str().unwrap()],
    ] {
        let out = run_kiln(&args, Duration::from_secs(10));
        assert_eq!(out.code(), 0, "{args:?}: {out:?}");
        assert_eq!(out.stdout.trim(), "v1.0.0", "{args:?}");
    }
    let not_state = write(
        &dir,
        "kernel",
        b"\x7fELF and then a kernel image, not a snapshot",
    );
    for path in [
        not_state.as_str(),
        "/nonexistent/vm.state",
        dir.to_str().unwrap(),
    ] {
        let out = run_kiln(&["--describe-snapshot", path], Duration::from_secs(10));
        assert_eq!(out.code(), 2, "{path}: {out:?}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{path}: {out:?}");
    }

    // A Diff's data ranges go over the base; holes leave the base as it was.
    let base = dir.join("base.mem");
    let diff = dir.join("diff.mem");
    std::fs::write(&base, vec![1u8; 64 << 10]).unwrap();
    let file = std::fs::File::create(&diff).unwrap();
    file.set_len(64 << 10).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[9u8; 4096], 8192).unwrap();
    drop(file);
    let out = run_kiln(
        &[
            "snapshot",
            "merge",
            base.to_str().unwrap(),
            diff.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), 0, "{out:?}");
    let merged = std::fs::read(&base).unwrap();
    assert!(merged[..8192].iter().all(|&b| b == 1));
    assert!(merged[8192..12288].iter().all(|&b| b == 9));
    assert!(merged[12288..].iter().all(|&b| b == 1));
    let short = write(&dir, "short.mem", &[0u8; 4096]);
    let out = run_kiln(
        &["snapshot", "merge", base.to_str().unwrap(), &short],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("4096 bytes"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
