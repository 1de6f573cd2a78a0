use super::*;

/// A filter file whose three kinds allow everything but `getppid`, which fails with EPERM: safe
/// to install in a test thread.
const GETPPID_EPERM: &str = r#"{
    "api":  {"default_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": "getppid"}]},
    "vmm":  {"default_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": "getppid"}]},
    "vcpu": {"default_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": "getppid"}]}
}"#;

fn getppid_fails() -> bool {
    // SAFETY: getppid takes no arguments and cannot fail unless a filter makes it.
    unsafe { libc::getppid() == -1 }
}

#[test]
fn the_built_in_filters_compile_for_every_kind() {
    let filters = SeccompFilters::kiln_default().unwrap();
    assert!(filters.enabled());
    let programs = filters.programs.as_ref().unwrap();
    for kind in ThreadKind::ALL {
        assert!(!programs[&kind].is_empty(), "{kind:?}");
    }
}

#[test]
fn the_built_in_filters_kill_the_process_on_a_call_they_do_not_list() {
    let json: serde_json::Value = serde_json::from_str(DEFAULT_FILTERS_JSON).unwrap();
    for kind in ThreadKind::ALL {
        let filter = &json[kind.name()];
        assert_eq!(filter["default_action"], "kill_process", "{kind:?}");
        assert_eq!(filter["filter_action"], "allow", "{kind:?}");
        // Every entry says why it is there.
        for rule in filter["filter"].as_array().unwrap() {
            assert!(rule["comment"].is_string(), "{kind:?}: {rule}");
        }
    }
}

#[test]
fn the_built_in_filters_leave_out_what_kiln_never_needs() {
    let json: serde_json::Value = serde_json::from_str(DEFAULT_FILTERS_JSON).unwrap();
    for kind in ThreadKind::ALL {
        let names: Vec<&str> = json[kind.name()]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| rule["syscall"].as_str().unwrap())
            .collect();
        for forbidden in [
            "execve",
            "execveat",
            "fork",
            "vfork",
            "ptrace",
            "mount",
            "setuid",
            "chroot",
            "syslog",
            "kexec_load",
            "init_module",
            "bpf",
            "process_vm_writev",
            // Every thread is made before its spawner's filter goes in: no filter needs clone.
            "clone",
            "clone3",
        ] {
            assert!(!names.contains(&forbidden), "{kind:?} allows {forbidden}");
        }
    }
}

#[test]
fn a_filter_file_must_define_exactly_the_three_kinds() {
    let missing = r#"{"api": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "read"}]},
                      "vmm": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "read"}]}}"#;
    let e = SeccompFilters::from_json(missing.as_bytes(), "f.json").unwrap_err();
    assert!(matches!(e, Error::MissingKind { kind: "vcpu", .. }), "{e}");
    assert!(e.to_string().contains("f.json"), "{e}");

    let unknown = GETPPID_EPERM.replacen("\"vcpu\"", "\"vcpus\"", 1);
    let e = SeccompFilters::from_json(unknown.as_bytes(), "f.json").unwrap_err();
    assert!(
        matches!(&e, Error::UnknownKind { kind, .. } if kind == "vcpus"),
        "{e}"
    );
}

#[test]
fn bad_filter_files_are_errors_that_name_the_file() {
    for bad in [
        "",
        "not json",
        r#"{"api": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "no_such_call"}]}}"#,
        r#"{"api": {"default_action": "explode", "filter_action": "allow", "filter": []}}"#,
    ] {
        let e = SeccompFilters::from_json(bad.as_bytes(), "bad.json").unwrap_err();
        assert!(matches!(e, Error::Compile { .. }), "{bad}: {e}");
        assert!(
            e.to_string().starts_with("seccomp filters bad.json: "),
            "{e}"
        );
    }
    let e = SeccompFilters::from_file(Path::new("/nonexistent/filters.json")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("seccomp filter file /nonexistent/filters.json: "),
        "{e}"
    );
}

#[test]
fn disabled_filters_install_nothing() {
    let filters = Arc::new(SeccompFilters::disabled());
    assert!(!filters.enabled());
    let (tx, rx) = mpsc::channel();
    spawn_filtered("kiln_test", &filters, ThreadKind::Vmm, move || {
        tx.send(getppid_fails()).unwrap();
    })
    .unwrap()
    .join()
    .unwrap();
    assert!(!rx.recv().unwrap());
}

#[test]
fn a_filter_confines_its_thread_and_the_threads_it_makes_but_no_other() {
    let filters = Arc::new(SeccompFilters::from_json(GETPPID_EPERM.as_bytes(), "test").unwrap());
    let (tx, rx) = mpsc::channel();
    let handle = spawn_filtered("kiln_test", &filters, ThreadKind::Api, move || {
        let in_child = std::thread::spawn(getppid_fails).join().unwrap();
        tx.send((getppid_fails(), in_child)).unwrap();
    })
    .unwrap();
    handle.join().unwrap();
    assert_eq!(rx.recv().unwrap(), (true, true));
    assert!(!getppid_fails(), "the filter leaked to the test's thread");
}

#[test]
fn each_built_in_filter_lets_a_thread_start_report_and_end() {
    // The real filters in real threads: a thread that starts, sends on a channel and ends must
    // live through it (a missing call here would kill the test process).
    let filters = Arc::new(SeccompFilters::kiln_default().unwrap());
    for kind in ThreadKind::ALL {
        let (tx, rx) = mpsc::channel();
        spawn_filtered("kiln_test", &filters, kind, move || {
            // The clocks as a host without a usable vDSO clock reads them: real calls.
            for clock in [libc::CLOCK_MONOTONIC, libc::CLOCK_REALTIME] {
                let mut now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: clock_gettime writes one timespec, which `now` is.
                let read = unsafe { libc::syscall(libc::SYS_clock_gettime, clock, &mut now) };
                assert_eq!(read, 0);
            }
            // What the kernel makes a thread call when SIGCONT resumes a timed wait that
            // SIGSTOP interrupted; called with nothing to restart, it fails with EINTR.
            // SAFETY: restart_syscall takes no arguments and touches no memory of ours.
            let restarted = unsafe { libc::syscall(libc::SYS_restart_syscall) };
            assert_eq!(restarted, -1);
            // What std's channels do to back off under contention.
            std::thread::yield_now();
            tx.send(kind).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), kind);
    }
}
