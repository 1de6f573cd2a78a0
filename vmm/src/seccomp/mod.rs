//! seccomp-bpf filters, one per kind of thread.
//!
//! Kiln assumes the guest is hostile and that the VMM has bugs: if a bug lets a guest steer a Kiln
//! thread, the thread can still only make the system calls its kind needs. Each thread installs its
//! own filter when it starts, and a filter is inherited by the threads its thread creates, so:
//!
//! - `api`: the `kiln_api` thread (HTTP on the API socket), before it serves its first request.
//! - `vcpu`: each `kiln_vcpu N` thread, before its first `KVM_RUN`.
//! - `vmm`: everything else — the main thread (control loop and runtime API calls), `kiln_vmm`
//!   (the device event loop), `kiln_signals`, `kiln_reset` and `kiln_stdin`.
//!
//! Every filter is in place before the guest's first instruction: the vCPUs wait at a gate that
//! the main thread opens only after its own filter is in and every other thread has reported its
//! filter in ([`spawn_filtered`]). A call outside the allow list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`, exit by SIGSYS), so a compromised thread cannot carry on.
//!
//! The allow lists are [`DEFAULT_FILTERS_JSON`] (seccompiler's JSON format, each entry with a
//! comment saying who needs it). `--seccomp-filter FILE` replaces them with a file in the same
//! format, or with Firecracker's compiled form ([`compiled`]), told apart by content; either
//! must define exactly the three kinds. `--no-seccomp` installs none.

pub mod compiled;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use seccompiler::{BpfProgram, TargetArch};

/// Kiln's own allow lists, x86_64 (the only architecture the VMM builds for today).
pub const DEFAULT_FILTERS_JSON: &str = include_str!("x86_64.json");

/// A kind of Kiln thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The `kiln_api` HTTP thread.
    Api,
    /// The main thread, the device event loop and the small helper threads.
    Vmm,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Every kind, in the order filter files list them.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Api, ThreadKind::Vmm, ThreadKind::Vcpu];

    /// The kind's key in a filter file.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Api => "api",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

/// Errors of loading or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter file could not be read.
    #[error("seccomp filter file {path}: {source}")]
    ReadFile {
        /// The filter file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON does not compile (bad syntax, unknown syscall name, bad action...).
    #[error("seccomp filters {source_name}: {error}")]
    Compile {
        /// Where the filters came from: the file's path, or "built in".
        source_name: String,
        /// What seccompiler reported.
        error: seccompiler::Error,
    },
    /// A compiled filter file that is not Firecracker's format.
    #[error("seccomp filters {source_name}: not seccompiler JSON, nor Firecracker's compiled filters: {error}")]
    Decode {
        /// The file's path.
        source_name: String,
        /// What is wrong with it.
        error: compiled::DecodeError,
    },
    /// A thread kind has no filter in the file.
    #[error("seccomp filters {source_name}: no filter for thread kind {kind:?} (need \"api\", \"vmm\" and \"vcpu\")")]
    MissingKind {
        /// Where the filters came from: the file's path, or "built in".
        source_name: String,
        /// The thread kind with no filter.
        kind: &'static str,
    },
    /// The file names a thread kind Kiln does not have.
    #[error("seccomp filters {source_name}: unknown thread kind {kind:?} (Kiln's are \"api\", \"vmm\" and \"vcpu\")")]
    UnknownKind {
        /// Where the filters came from: the file's path, or "built in".
        source_name: String,
        /// The unknown kind's name, as in the file.
        kind: String,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind} seccomp filter: {error}")]
    Install {
        /// The thread kind whose filter was refused.
        kind: &'static str,
        /// What seccompiler reported.
        error: seccompiler::Error,
    },
    /// The thread could not block the process-directed signals.
    #[error("blocking signals on a new thread: {0}")]
    BlockSignals(String),
    /// The thread could not be created.
    #[error("starting thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The thread ended before saying whether its filter went in.
    #[error("thread {name} ended before installing its seccomp filter")]
    ThreadGone {
        /// The thread's name.
        name: String,
    },
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::other(e)
    }
}

/// The filter of each thread kind, compiled; or none at all (`--no-seccomp`).
#[derive(Debug, Clone, Default)]
pub struct SeccompFilters {
    /// `None` when filtering is off.
    programs: Option<HashMap<ThreadKind, BpfProgram>>,
}

impl SeccompFilters {
    /// No filters: every thread may make every call (`--no-seccomp`).
    pub fn disabled() -> Self {
        Self { programs: None }
    }

    /// Kiln's own allow lists.
    pub fn kiln_default() -> Result<Self, Error> {
        Self::from_json(DEFAULT_FILTERS_JSON.as_bytes(), "built in")
    }

    /// The filters of a `--seccomp-filter` file: seccompiler JSON (its first non-blank byte is
    /// `{`), or Firecracker's compiled filters (anything else).
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes =
            crate::config::read_small_file_bytes(path, crate::config::MAX_CONFIG_FILE_BYTES)
                .map_err(|source| Error::ReadFile {
                    path: path.display().to_string(),
                    source,
                })?;
        let source_name = path.display().to_string();
        let is_json = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        if is_json {
            return Self::from_json(bytes.as_slice(), &source_name);
        }
        let programs = compiled::decode(&bytes).map_err(|error| Error::Decode {
            source_name: source_name.clone(),
            error,
        })?;
        Self::from_programs(programs, &source_name)
    }

    /// Compiles seccompiler JSON that defines exactly the three thread kinds.
    pub fn from_json(reader: impl Read, source_name: &str) -> Result<Self, Error> {
        let compiled =
            seccompiler::compile_from_json(reader, TargetArch::x86_64).map_err(|error| {
                Error::Compile {
                    source_name: source_name.to_owned(),
                    error,
                }
            })?;
        Self::from_programs(compiled.into_iter().collect(), source_name)
    }

    /// Filters from each thread kind's name and program: exactly the three kinds.
    fn from_programs(
        compiled: Vec<(String, BpfProgram)>,
        source_name: &str,
    ) -> Result<Self, Error> {
        let mut programs = HashMap::new();
        for (name, program) in compiled {
            let Some(kind) = ThreadKind::ALL.into_iter().find(|k| k.name() == name) else {
                return Err(Error::UnknownKind {
                    source_name: source_name.to_owned(),
                    kind: name,
                });
            };
            programs.insert(kind, program);
        }
        if let Some(kind) = ThreadKind::ALL
            .into_iter()
            .find(|k| !programs.contains_key(k))
        {
            return Err(Error::MissingKind {
                source_name: source_name.to_owned(),
                kind: kind.name(),
            });
        }
        Ok(Self {
            programs: Some(programs),
        })
    }

    /// Compiles seccompiler JSON into Firecracker's compiled form (what `seccompiler-bin`
    /// writes), kinds in [`ThreadKind::ALL`]'s order.
    pub fn compile_to_firecracker_format(json: &str) -> Result<Vec<u8>, Error> {
        let filters = Self::from_json(json.as_bytes(), "JSON")?;
        let programs = filters.programs.unwrap_or_default();
        let empty = BpfProgram::new();
        let entries: Vec<(&str, &BpfProgram)> = ThreadKind::ALL
            .iter()
            .map(|kind| (kind.name(), programs.get(kind).unwrap_or(&empty)))
            .collect();
        Ok(compiled::encode(&entries))
    }

    /// Whether any filter will be installed.
    pub fn enabled(&self) -> bool {
        self.programs.is_some()
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filtering is off). From then
    /// on, this thread and any thread it creates are held to it, for good.
    pub fn install(&self, kind: ThreadKind) -> Result<(), Error> {
        let Some(programs) = &self.programs else {
            return Ok(());
        };
        // `from_programs` checked that every kind has a program.
        let program = programs.get(&kind).map(Vec::as_slice).unwrap_or_default();
        // An empty program means no filter for the kind (Firecracker's rule for compiled
        // filters); the kernel would refuse it.
        if !program.is_empty() {
            seccompiler::apply_filter(program).map_err(|error| Error::Install {
                kind: kind.name(),
                error,
            })?;
        }
        violation_hook::after_install(kind);
        Ok(())
    }
}

/// Keeps glibc's allocator within the allow lists; call it first thing in `main`, before any
/// thread starts.
///
/// glibc gives a new thread its own arena, and the first time a thread shrinks such an arena it
/// opens `/proc/sys/vm/overcommit_memory` to choose how. That `openat` is on no thread's list
/// but the vmm one, so a thread whose heap shrank at the wrong moment — the API thread after a
/// connection flood, a vCPU after a large MMIO buffer — killed Kiln with SIGSYS. With one arena
/// every thread allocates from the main heap, which glibc trims with `brk` and `madvise`
/// (on every list) and never opens a file for. Kiln's threads allocate little once the VM runs
/// (and each still has its own small-block cache), so sharing the arena costs nothing
/// measurable, and it keeps the VMM's resident memory down.
pub fn keep_allocator_within_filters() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes a malloc parameter; no thread is running yet, so no other
        // allocation is in progress.
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        if set != 1 {
            eprintln!("kiln: mallopt(M_ARENA_MAX, 1) failed: threads may get arenas of their own");
        }
    }
}

/// The process-directed signals Kiln handles (stop and report). Threads made by
/// [`spawn_filtered`] block them, so the kernel delivers them to the main thread, whose filter
/// allows what the handler does (a `sendto` to the `kiln_signals` thread); a vCPU or the API
/// thread never runs a signal handler it has no allowance for. The `kiln_signals` thread watches
/// exactly these, so the list is kept once, here.
pub const PROCESS_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

fn block_process_signals() -> Result<(), Error> {
    for signal in PROCESS_SIGNALS {
        vmm_sys_util::signal::block_signal(signal)
            .map_err(|e| Error::BlockSignals(e.to_string()))?;
    }
    Ok(())
}

/// Spawns thread `name`, which blocks the process-directed signals, installs `kind`'s filter and then runs `body`. Returns once the
/// filter is in place, so the caller knows the thread is confined before it goes on (the vCPUs
/// must not start before every thread is). If the filter cannot be installed the thread ends
/// without running `body`, and the error is returned.
pub fn spawn_filtered(
    name: &str,
    filters: &Arc<SeccompFilters>,
    kind: ThreadKind,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    let (installed_tx, installed_rx) = mpsc::sync_channel(1);
    let thread_filters = filters.clone();
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = block_process_signals().and_then(|()| thread_filters.install(kind));
            let ok = result.is_ok();
            let _ = installed_tx.send(result);
            if ok {
                body();
            }
        })
        .map_err(|source| Error::Spawn {
            name: name.to_owned(),
            source,
        })?;
    match installed_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::ThreadGone {
            name: name.to_owned(),
        }),
    }
}

/// Test hook: in a debug build with the `test-support` feature (a workspace `cargo build` or
/// `cargo test`), `KILN_TEST_SECCOMP_VIOLATION=<kind>` makes the threads of that kind make a call
/// no filter allows right after their filter went in, so the tests can watch the process die of
/// SIGSYS. (A vCPU thread installs its filter before it first enters the guest.) A release build
/// never has it, even where workspace feature unification turns `test-support` on.
pub mod violation_hook {
    use super::ThreadKind;

    /// The environment variable naming the kind whose thread misbehaves.
    pub const ENV: &str = "KILN_TEST_SECCOMP_VIOLATION";

    /// Called right after `kind`'s filter is installed on the calling thread.
    pub fn after_install(kind: ThreadKind) {
        fire_if_asked(kind);
    }

    #[cfg(all(feature = "test-support", debug_assertions))]
    fn fire_if_asked(kind: ThreadKind) {
        if std::env::var(ENV).is_ok_and(|v| v == kind.name()) {
            log::warn!(
                "test hook: the {} thread makes a forbidden call",
                kind.name()
            );
            // syslog(SYSLOG_ACTION_SIZE_BUFFER) only reads a size: harmless if it were allowed,
            // and on no allow list.
            // SAFETY: the call takes no pointers (the buffer argument is null and unused).
            unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null_mut::<u8>(), 0) };
        }
    }

    #[cfg(not(all(feature = "test-support", debug_assertions)))]
    fn fire_if_asked(_kind: ThreadKind) {}
}

#[cfg(test)]
mod tests;
