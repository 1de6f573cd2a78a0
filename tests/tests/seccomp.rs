//! seccomp: each thread kind's filter is in place and kills the whole process on a call outside
//! its allow list (with the debug-build hook `KILN_TEST_SECCOMP_VIOLATION=<kind>`, the first
//! thread of that kind makes such a call as soon as its filter is in); `--no-seccomp` and
//! `--seccomp-filter` change that; bad filter files are refused before anything starts.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use vmm::seccomp::violation_hook::ENV as HOOK;

use kiln_tests::{
    api_call, hello_elf, kiln_bin, kvm_available, scratch_dir, send_signal, spawn_piped,
    wait_for_socket, wait_with_deadline, write_file, Outcome,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn kiln(args: &[&str], violation: Option<&str>) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args);
    if let Some(kind) = violation {
        cmd.env(HOOK, kind);
    }
    cmd
}

/// `kiln run` with the tiny guest that prints and reboots.
fn run_tiny(dir: &std::path::Path, violation: Option<&str>, extra: &[&str]) -> Outcome {
    let kernel = write_file(dir, "hello.elf", &hello_elf());
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem-mib",
        "16",
    ];
    args.extend_from_slice(extra);
    wait_with_deadline(spawn_piped(kiln(&args, violation)), DEADLINE)
}

/// The hook exists in debug builds only (the kiln binary is built in the tests' profile).
fn hook_in_binary() -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("skipping: a release kiln has no {HOOK} hook");
    }
    cfg!(debug_assertions)
}

fn killed_by_sigsys(out: &Outcome) -> bool {
    out.status.and_then(|s| s.signal()) == Some(libc::SIGSYS)
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_kills_kiln_before_the_guest_runs() {
    if !kvm_available() || !hook_in_binary() {
        return;
    }
    let dir = scratch_dir("seccomp-vcpu");
    let out = run_tiny(&dir, Some("vcpu"), &[]);
    assert!(killed_by_sigsys(&out), "{out:?}");
    assert!(out.stderr.contains("the vcpu thread makes"), "{out:?}");
    // The vCPU is killed at its filter, before its first KVM_RUN: the guest never printed.
    assert!(!out.stdout.contains("KILN-TINY-OK"), "{out:?}");
}

#[test]
fn a_forbidden_call_on_a_vmm_thread_kills_kiln() {
    if !kvm_available() || !hook_in_binary() {
        return;
    }
    let dir = scratch_dir("seccomp-vmm");
    let out = run_tiny(&dir, Some("vmm"), &[]);
    assert!(killed_by_sigsys(&out), "{out:?}");
    assert!(out.stderr.contains("the vmm thread makes"), "{out:?}");
}

#[test]
fn a_forbidden_call_on_the_api_thread_kills_kiln() {
    if !hook_in_binary() {
        return;
    }
    let dir = scratch_dir("seccomp-api");
    let sock = dir.join("api.sock");
    let out = wait_with_deadline(
        spawn_piped(kiln(&["--api-sock", sock.to_str().unwrap()], Some("api"))),
        DEADLINE,
    );
    assert!(killed_by_sigsys(&out), "{out:?}");
    assert!(out.stderr.contains("the api thread makes"), "{out:?}");
}

#[test]
fn the_filters_allow_everything_kiln_does_with_a_tiny_guest() {
    if !kvm_available() {
        return;
    }
    // The default filters on: the guest boots, prints and reboots, exit 0 (the guest e2e tests
    // cover the devices, the API and the signals under the same filters).
    let dir = scratch_dir("seccomp-clean");
    let out = run_tiny(&dir, None, &["--vcpus", "2"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");

    // The API thread serves, and a stop signal is handled, under their filters.
    let sock = dir.join("api.sock");
    let child = spawn_piped(kiln(&["--api-sock", sock.to_str().unwrap()], None));
    wait_for_socket(&sock, DEADLINE);
    let (status, body) = api_call(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    send_signal(&child, "-TERM");
    let out = wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), 128 + libc::SIGTERM, "{out:?}");
    assert!(!sock.exists());
}

#[test]
fn no_seccomp_installs_no_filter() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("seccomp-off");
    for kind in ["vcpu", "vmm"] {
        let out = run_tiny(&dir, Some(kind), &["--no-seccomp"]);
        assert_eq!(out.code(), 0, "{kind}: {out:?}");
        assert!(out.stdout.contains("KILN-TINY-OK"), "{kind}: {out:?}");
    }
}

#[test]
fn a_seccomp_filter_file_replaces_the_built_in_filters() {
    if !kvm_available() || !hook_in_binary() {
        return;
    }
    let dir = scratch_dir("seccomp-file");
    // Kiln's own filters with syslog added to every kind: the hook's call is now allowed.
    let mut filters: serde_json::Value =
        serde_json::from_str(vmm::seccomp::DEFAULT_FILTERS_JSON).unwrap();
    for kind in ["api", "vmm", "vcpu"] {
        filters[kind]["filter"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"syscall": "syslog"}));
    }
    let file = write_file(&dir, "filters.json", filters.to_string().as_bytes());
    let out = run_tiny(
        &dir,
        Some("vcpu"),
        &["--seccomp-filter", file.to_str().unwrap()],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");

    // A vcpu filter without ioctl: the vCPU dies at its first KVM_RUN.
    let mut filters: serde_json::Value =
        serde_json::from_str(vmm::seccomp::DEFAULT_FILTERS_JSON).unwrap();
    filters["vcpu"]["filter"]
        .as_array_mut()
        .unwrap()
        .retain(|rule| rule["syscall"] != "ioctl");
    let file = write_file(&dir, "no-ioctl.json", filters.to_string().as_bytes());
    let out = run_tiny(&dir, None, &["--seccomp-filter", file.to_str().unwrap()]);
    assert!(killed_by_sigsys(&out), "{out:?}");
    assert!(!out.stdout.contains("KILN-TINY-OK"), "{out:?}");
}

/// Firecracker's compiled filter files work as they are: Kiln's own filters in that form keep
/// every thread confined; an empty program leaves its kind unfiltered, as in Firecracker.
#[test]
fn firecrackers_compiled_filter_files_are_read_too() {
    if !kvm_available() || !hook_in_binary() {
        return;
    }
    use vmm::seccomp::compiled;
    let dir = scratch_dir("seccomp-compiled");
    let bytes = vmm::seccomp::SeccompFilters::compile_to_firecracker_format(
        vmm::seccomp::DEFAULT_FILTERS_JSON,
    )
    .unwrap();
    let file = write_file(&dir, "filters.bpf", &bytes);
    let out = run_tiny(&dir, None, &["--seccomp-filter", file.to_str().unwrap()]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("KILN-TINY-OK"), "{out:?}");
    // Still enforced: the vCPU's forbidden call kills Kiln.
    let out = run_tiny(
        &dir,
        Some("vcpu"),
        &["--seccomp-filter", file.to_str().unwrap()],
    );
    assert!(killed_by_sigsys(&out), "{out:?}");
    // An empty vcpu program: no filter on the vCPU threads, so its forbidden call passes.
    let programs = compiled::decode(&bytes).unwrap();
    let empty = Vec::new();
    let entries: Vec<(&str, &Vec<_>)> = programs
        .iter()
        .map(|(name, program)| (name.as_str(), if name == "vcpu" { &empty } else { program }))
        .collect();
    let file = write_file(&dir, "no-vcpu.bpf", &compiled::encode(&entries));
    let out = run_tiny(
        &dir,
        Some("vcpu"),
        &["--seccomp-filter", file.to_str().unwrap()],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    // Bytes that are neither form are refused before anything starts.
    let file = write_file(&dir, "garbage.bpf", &[7u8; 40]);
    let out = run_tiny(&dir, None, &["--seccomp-filter", file.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("nor Firecracker's compiled filters"),
        "{out:?}"
    );
}

#[test]
fn bad_seccomp_flags_are_refused_before_anything_starts() {
    let dir = scratch_dir("seccomp-bad");
    let sock = dir.join("api.sock");
    let sock = sock.to_str().unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        ("missing.json", b"", "seccomp filter file "),
        ("garbage.json", b"{not json", "seccomp filters "),
        (
            "two-kinds.json",
            br#"{"api": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "read"}]},
                 "vmm": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "read"}]}}"#,
            "no filter for thread kind \"vcpu\"",
        ),
    ];
    for (name, bytes, message) in cases {
        let path = dir.join(name);
        if !bytes.is_empty() {
            std::fs::write(&path, bytes).unwrap();
        }
        let out = wait_with_deadline(
            spawn_piped(kiln(
                &[
                    "--api-sock",
                    sock,
                    "--seccomp-filter",
                    path.to_str().unwrap(),
                ],
                None,
            )),
            DEADLINE,
        );
        assert_eq!(out.code(), 2, "{name}: {out:?}");
        assert!(out.stderr.contains(message), "{name}: {out:?}");
        assert!(!std::path::Path::new(sock).exists(), "{name}");
    }
    let out = wait_with_deadline(
        spawn_piped(kiln(
            &["--api-sock", sock, "--no-seccomp", "--seccomp-filter", "/x"],
            None,
        )),
        DEADLINE,
    );
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("cannot be used with"), "{out:?}");
}
