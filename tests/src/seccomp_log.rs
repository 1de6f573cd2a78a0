//! `KILN_SECCOMP_LOG=1`: the fault tests run Kiln with its built-in filters in a logging mode (a
//! call outside a list is allowed and the kernel logs it) instead of killing, so that one run
//! finds every missing call on its way rather than dying at the first; the kernel's audit lines
//! (`type=1326`, from `dmesg`) name each call and thread. Without it, the real filters kill.

use std::path::Path;
use std::process::Command;

/// True when the tests run Kiln's filters in logging mode.
pub fn logging_mode() -> bool {
    std::env::var("KILN_SECCOMP_LOG").is_ok_and(|v| v == "1")
}

/// The seccomp flags every Kiln in a fault test gets: none (the built-in filters, killing) or, in
/// logging mode, `--seccomp-filter` with the built-in lists and a logging default action (the
/// file is written into `dir`).
pub fn seccomp_args(dir: &Path) -> Vec<String> {
    if !logging_mode() {
        return Vec::new();
    }
    let mut filters: serde_json::Value =
        serde_json::from_str(vmm::seccomp::DEFAULT_FILTERS_JSON).expect("built-in filters");
    for kind in ["api", "vmm", "vcpu"] {
        filters[kind]["default_action"] = "log".into();
    }
    let file = dir.join("log-filters.json");
    std::fs::write(&file, filters.to_string()).expect("write filters");
    vec!["--seccomp-filter".into(), file.display().to_string()]
}

/// The kernel's seccomp audit lines for `pid` (empty when dmesg cannot be read).
pub fn audit_lines(pid: u32) -> Vec<String> {
    let out = Command::new("dmesg").output().map(|o| o.stdout);
    let text = String::from_utf8_lossy(out.as_deref().unwrap_or_default()).into_owned();
    let pid = format!(" pid={pid} ");
    text.lines()
        .filter(|l| l.contains("type=1326") && l.contains(&pid))
        .map(str::to_string)
        .collect()
}

/// The audit lines for `pid` as a suffix for a failure message (empty when there are none).
pub fn audit_note(pid: u32) -> String {
    let lines = audit_lines(pid);
    if lines.is_empty() {
        String::new()
    } else {
        format!("; seccomp audit: {lines:#?}")
    }
}

/// In logging mode, prints what the filters logged for `pid`.
pub fn report(pid: u32) {
    if logging_mode() {
        eprintln!("seccomp logging mode, pid {pid}{}", audit_note(pid));
    }
}
