//! End to end: `kiln jail` (Kiln's jailer) around the real kiln binary, as root.
//!
//! 1. No guest: the jailed VMM serves the API from inside the jail; while it runs, the host sees
//!    it with the given uid/gid, in its own mount and PID namespaces, with nothing but the jail
//!    in its root (three device nodes, its binary and loader, `/run`), in the cgroups with the
//!    limits, with the rlimits and without the fd the test left open. SIGTERM to the jailer
//!    reaches the VMM; `--daemonize` returns once the VMM runs (in the `--netns` namespace, made
//!    by the test); an id in use and a bad cgroup file are refused; every jail leaves no files,
//!    mounts or cgroups behind.
//! 2. One boot of the default guest, configured over the API socket inside the jail, with the
//!    kernel and initramfs bind-mounted in read-only and a data drive read-write: the same checks
//!    while it runs, the guest writes the data drive, reboots, and the jail is gone.
//! 3. One boot of a memory-hungry guest under a memory limit: the VMM's memory never goes above
//!    the limit, the OOM killer ends it, the jailer exits 137 and leaves nothing behind.
//!
//! The test picks the cgroup version the host has (v1 on our hybrid CI machines).

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln_tests::{
    api_call, die_with_test, kiln_bin, kvm_available, send_signal, wait_until, write_script_drive,
    NetNs,
};
use vmm::jail::cgroup::{host_mounts, CgroupPlan, CgroupSetting, CgroupVersion};

const UID: u32 = 123456;
const GID: u32 = 123457;
const PARENT_CGROUP: &str = "kiln-jail-test";
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
/// The `--resource-limit fsize=` every test jail gets (1 GiB).
const FILE_SIZE_LIMIT: u64 = 1 << 30;

/// Guest boots one at a time (each needs a whole core here).
static BOOTS: Mutex<()> = Mutex::new(());

fn runnable() -> bool {
    if !nix_is_root() {
        eprintln!("skipping: kiln jail needs root");
        return false;
    }
    kvm_available()
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One jail's names and where its traces would be.
struct Jail {
    base: PathBuf,
    /// The exec file's name, which names the jail's directory and pid file.
    exec: String,
    id: String,
    settings: Vec<CgroupSetting>,
    cgroup_dirs: Vec<PathBuf>,
}

impl Jail {
    fn new(name: &str, settings: &[String]) -> Self {
        // Under the target directory: device nodes need a file system without nodev.
        let base = kiln_bin()
            .parent()
            .expect("target dir")
            .join(format!("jail-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("chroot base");
        let id = format!("{name}-{}", std::process::id());
        let settings: Vec<CgroupSetting> = settings
            .iter()
            .map(|s| CgroupSetting::parse(s).expect("cgroup setting"))
            .collect();
        let plan = CgroupPlan::new(
            CgroupVersion::detect(),
            &host_mounts().expect("cgroup mounts"),
            Path::new(PARENT_CGROUP),
            &id,
            &settings,
        )
        .expect("cgroup plan");
        let cgroup_dirs = plan.dirs.iter().map(|d| d.path.clone()).collect();
        Self {
            base,
            exec: "kiln".to_string(),
            id,
            settings,
            cgroup_dirs,
        }
    }

    fn dir(&self) -> PathBuf {
        self.base.join(&self.exec).join(&self.id)
    }

    fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// `kiln jail` with this jail's id, base, ids and cgroups, then `extra`.
    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(kiln_bin());
        cmd.args(["jail", "--id", &self.id, "--chroot-base-dir"])
            .arg(&self.base)
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .args(["--parent-cgroup", PARENT_CGROUP]);
        for s in &self.settings {
            cmd.arg("--cgroup").arg(format!("{}={}", s.file, s.value));
        }
        cmd.args(extra);
        die_with_test(&mut cmd);
        cmd
    }

    /// `command` with the file-size rlimit `check_isolation` expects, a `--file` for each of
    /// `files` and a read-write one for each of `writable`, then `--` and `vmm_args` if any.
    fn command_with_files(
        &self,
        files: &[&Path],
        writable: &[&Path],
        vmm_args: &[&str],
    ) -> Command {
        let mut cmd = self.command(&["--resource-limit", &format!("fsize={FILE_SIZE_LIMIT}")]);
        for file in files {
            cmd.arg("--file").arg(file);
        }
        for file in writable {
            cmd.arg("--file").arg(format!("{}:rw", file.display()));
        }
        if !vmm_args.is_empty() {
            cmd.arg("--").args(vmm_args);
        }
        cmd
    }

    /// The VMM's host pid, from the jail's pid file.
    fn vmm_pid(&self) -> u32 {
        let file = self.root().join(format!("{}.pid", self.exec));
        wait_until(Duration::from_secs(30), "the pid file", || file.exists());
        std::fs::read_to_string(&file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// The cgroup file `name` (in whichever of the jail's cgroup dirs has it).
    fn cgroup_file(&self, name: &str) -> PathBuf {
        cgroup_file(&self.cgroup_dirs, name)
            .unwrap_or_else(|| panic!("no cgroup file {name} in {:?}", self.cgroup_dirs))
    }

    /// Nothing of the jail is left: no directory, no mount, no cgroup.
    fn assert_gone(&self) {
        assert!(!self.dir().exists(), "{} is left", self.dir().display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let base = self.base.to_string_lossy();
        assert!(
            !mounts.lines().any(|l| l.contains(base.as_ref())),
            "mounts left:\n{mounts}"
        );
        for dir in &self.cgroup_dirs {
            assert!(!dir.exists(), "cgroup {} is left", dir.display());
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // After a failed test: best effort, so the next run starts clean.
        let _ = std::fs::remove_dir_all(self.dir());
        for dir in &self.cgroup_dirs {
            let _ = std::fs::remove_dir(dir);
            // The parent cgroup goes once no jail uses it.
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        // The shared base goes with the last jail of this test run.
        let _ = std::fs::remove_dir(self.base.join(&self.exec));
        let _ = std::fs::remove_dir(&self.base);
    }
}

fn cgroup_file(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
}

/// A running jailer whose output is being collected.
struct Running {
    child: Child,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln jail");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Self { child, out, err }
    }

    /// Waits for the jailer (killing it at the deadline); returns status, stdout, stderr.
    fn finish(mut self, deadline: Duration) -> (Option<ExitStatus>, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break Some(status);
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let out = self.out.join().unwrap_or_default();
        let err = self.err.join().unwrap_or_default();
        (status, out, err)
    }
}

/// An fd without close-on-exec, as a careless parent would leave one; returns its target path.
fn leak_fd(dir: &Path) -> (std::fs::File, PathBuf) {
    use std::os::fd::AsRawFd;
    let path = dir.join("leaked-fd-marker");
    let file = std::fs::File::create(&path).expect("marker file");
    // SAFETY: clears FD_CLOEXEC on an fd this function owns.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(rc, 0);
    (file, path)
}

fn fd_targets(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Every path under `dir`, relative to it.
fn walk(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            found.insert(
                path.strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

/// What the host can see of the jailed VMM `pid`; `files` are the `--file` names.
fn check_isolation(jail: &Jail, pid: u32, files: &[&str], leaked: &Path) {
    let ids = |v: u32| [v; 4].map(|x| x.to_string()).join("\t");
    assert_eq!(status_field(pid, "Uid"), ids(UID));
    assert_eq!(status_field(pid, "Gid"), ids(GID));
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its own PID namespace, where it is PID 1.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    for ns in ["mnt", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the host");
    }
    // Mounts: the jail root and the --file binds, nothing of the host's.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mount_points: BTreeSet<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    let mut expected: BTreeSet<String> = files.iter().map(|f| format!("/{f}")).collect();
    expected.insert("/".into());
    assert_eq!(
        mount_points,
        expected.iter().map(String::as_str).collect(),
        "{mountinfo}"
    );
    // The --file binds: read-only unless given `:rw` (only data.img here), never suid or exec.
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields[4] == "/" {
            continue;
        }
        let options: BTreeSet<&str> = fields[5].split(',').collect();
        let mode = if fields[4] == "/data.img" { "rw" } else { "ro" };
        assert!(options.contains(mode), "{line}");
        assert!(
            options.contains("nosuid") && options.contains("noexec"),
            "{line}"
        );
    }
    // Its root: the jail, nothing else.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut wanted: BTreeSet<String> = ["kiln", "kiln.pid", "dev", "run"]
        .iter()
        .chain(files)
        .map(|s| s.to_string())
        .collect();
    // The loader and libraries of a dynamically linked kiln; the PVM marker on PVM hosts.
    for optional in ["lib", "lib64", "usr"] {
        if top.contains(optional) {
            wanted.insert(optional.into());
            for path in walk(&root.join(optional)) {
                let meta = std::fs::metadata(root.join(optional).join(&path)).unwrap();
                assert!(
                    meta.is_dir() || path.contains(".so"),
                    "{optional}/{path} in the jail"
                );
                assert_eq!(meta.uid(), 0);
                assert_eq!(meta.mode() & 0o222, if meta.is_dir() { 0o200 } else { 0 });
            }
        }
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        wanted.insert("sys".into());
        assert_eq!(
            walk(&root.join("sys")),
            ["module", "module/kvm_pvm"].map(String::from).into()
        );
    }
    assert_eq!(top, wanted);
    for host_only in ["etc", "proc", "tmp", "root", "bin", "home"] {
        assert!(!root.join(host_only).exists(), "/{host_only} in the jail");
    }
    // /dev: kvm, net/tun and urandom, the VMM's, and nothing else.
    assert_eq!(
        walk(&root.join("dev")),
        ["kvm", "net", "net/tun", "urandom"]
            .map(String::from)
            .into()
    );
    for (node, major, minor) in [("kvm", 10, 232), ("net/tun", 10, 200), ("urandom", 1, 9)] {
        let meta = std::fs::metadata(root.join("dev").join(node)).unwrap();
        assert!(meta.file_type().is_char_device(), "{node}");
        assert_eq!(meta.rdev(), libc::makedev(major, minor), "{node}");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (UID, GID, 0o600)
        );
    }
    // cgroups: the limits, and the VMM in them.
    for setting in &jail.settings {
        let value = std::fs::read_to_string(jail.cgroup_file(&setting.file)).unwrap();
        assert_eq!(value.trim(), setting.value, "{}", setting.file);
    }
    for dir in &jail.cgroup_dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "{}", dir.display());
    }
    // rlimits (no-file is Firecracker's default 2048; the tests give fsize).
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "2048 2048");
    assert_eq!(
        limit("Max file size"),
        format!("{FILE_SIZE_LIMIT} {FILE_SIZE_LIMIT}")
    );
    // No fd of the test's: the jailer had it, the VMM does not.
    let supervisor: u32 = status_field(pid, "PPid").parse().unwrap();
    assert!(
        fd_targets(supervisor).iter().any(|t| t == leaked),
        "the jailer did not inherit the marker fd"
    );
    let vmm_fds = fd_targets(pid);
    assert!(!vmm_fds.iter().any(|t| t == leaked), "{vmm_fds:?}");
    assert!(
        vmm_fds
            .iter()
            .all(|t| !t.starts_with("/tmp") && !t.starts_with("/work")),
        "{vmm_fds:?}"
    );
}

/// The limits every test jail gets (the values read back the same on the host's version).
fn limits(memory_bytes: u64) -> Vec<String> {
    match CgroupVersion::detect() {
        CgroupVersion::V1 => vec![
            format!("memory.limit_in_bytes={memory_bytes}"),
            "pids.max=64".into(),
            "cpu.cfs_quota_us=150000".into(),
        ],
        CgroupVersion::V2 => vec![
            format!("memory.max={memory_bytes}"),
            "pids.max=64".into(),
            "cpu.max=150000 100000".into(),
        ],
    }
}

/// What a jail's memory cgroup says about itself while it exists.
#[derive(Clone, Copy, Debug, Default)]
struct MemorySample {
    /// The most memory the cgroup has used so far.
    peak: u64,
    /// How many of its processes the cgroup's OOM killer has ended (0 where the kernel has no
    /// such counter).
    oom_kills: u64,
}

/// Reads the memory cgroup among `dirs`. The limit-hit counters (v1 `memory.failcnt`, v2
/// `max` events) are left alone: whether reclaim moves them before the OOM killer acts differs
/// between our hosts' kernels.
fn memory_sample(dirs: &[PathBuf]) -> MemorySample {
    let read = |name: &str| {
        std::fs::read_to_string(cgroup_file(dirs, name)?)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let keyed = |file: &str, key: &str| {
        cgroup_file(dirs, file)
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    match CgroupVersion::detect() {
        CgroupVersion::V1 => MemorySample {
            peak: read("memory.max_usage_in_bytes").unwrap_or(0),
            oom_kills: keyed("memory.oom_control", "oom_kill"),
        },
        CgroupVersion::V2 => MemorySample {
            peak: read("memory.peak").unwrap_or(0),
            oom_kills: keyed("memory.events", "oom_kill"),
        },
    }
}

/// Samples the memory cgroup among `dirs` from when they appear until they are gone; returns
/// the highest of each figure seen.
fn watch_memory(dirs: Vec<PathBuf>) -> JoinHandle<MemorySample> {
    thread::spawn(move || {
        let all_exist = || dirs.iter().all(|d| d.exists());
        wait_until(Duration::from_secs(60), "the jail's cgroups", all_exist);
        let mut highest = MemorySample::default();
        while all_exist() {
            let now = memory_sample(&dirs);
            highest.peak = highest.peak.max(now.peak);
            highest.oom_kills = highest.oom_kills.max(now.oom_kills);
            thread::sleep(Duration::from_millis(100));
        }
        highest
    })
}

/// Checks the kernel log for the memory cgroup OOM kill of `pid` by the cgroup named `id`:
/// the `oom-kill:` record (constraint `CONSTRAINT_MEMCG`, the OOM'd cgroup and the victim's
/// both end in `/id`) and the `Memory cgroup out of memory: Killed process` line. A global OOM
/// (`Out of memory: Killed process`, constraint `CONSTRAINT_NONE`) is not one. Every Linux
/// since 4.19 writes both lines in this form.
fn memcg_oom_record(log: &str, pid: u32, id: &str) -> Result<(), String> {
    let victim = format!(",pid={pid},");
    let record = log
        .lines()
        .filter_map(|l| l.split_once("oom-kill:").map(|(_, r)| r))
        .find(|r| r.contains(&victim))
        .ok_or_else(|| format!("no oom-kill record for pid {pid}"))?;
    let field = |name: &str| {
        record
            .split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    if field("constraint") != Some("CONSTRAINT_MEMCG") {
        return Err(format!("not a memory cgroup OOM: {record}"));
    }
    let ours = format!("/{id}");
    for name in ["oom_memcg", "task_memcg"] {
        if !field(name).is_some_and(|path| path.ends_with(&ours)) {
            return Err(format!("{name} is not the jail's cgroup {ours}: {record}"));
        }
    }
    let killed = format!("Memory cgroup out of memory: Killed process {pid} (kiln)");
    if !log.contains(&killed) {
        return Err(format!("no {killed:?}"));
    }
    Ok(())
}

fn put(sock: &Path, path: &str, body: &str) {
    let (status, reply) = api_call(sock, "PUT", path, body);
    assert_eq!(status, 204, "PUT {path} {body}: {reply}");
}

#[test]
fn jailed_vmm_is_isolated_forwards_sigterm_daemonizes_and_cleans_up() {
    if !runnable() {
        return;
    }
    let scratch = kiln_tests::scratch_dir("jail-api");
    let (_marker, leaked) = leak_fd(&scratch);
    let jail = Jail::new("api", &limits(256 << 20));
    let running = Running::spawn(jail.command_with_files(&[], &[], &[]));
    let pid = jail.vmm_pid();
    // Firecracker's default API socket path works in the jail.
    let sock = jail.root().join("run/kiln.socket");
    wait_until(Duration::from_secs(30), "the API socket", || sock.exists());
    let (status, body) = api_call(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    // The jailer passes --id on as Firecracker's does.
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    check_isolation(&jail, pid, &[], &leaked);

    // SIGTERM to the jailer reaches the VMM (which exits 128+15), then the jail is removed.
    send_signal(&running.child, "-TERM");
    let (status, _, err) = running.finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    jail.assert_gone();

    // --daemonize: returns 0 once the VMM runs (in the network namespace --netns names); a
    // second jail with the id is refused; killing the VMM (SIGKILL, no chance to clean up
    // itself) still leaves nothing behind.
    let netns = NetNs::create(&format!("kiln-jail-{}", std::process::id()));
    let netns_path = format!("/run/netns/{}", netns.name());
    let daemon = Jail::new("daemon", &limits(256 << 20));
    let (status, out, err) =
        Running::spawn(daemon.command(&["--daemonize", "--netns", &netns_path]))
            .finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{out}{err}");
    assert_eq!(out + &err, "");
    let pid = daemon.vmm_pid();
    let ns_inode = |path: &str| std::fs::metadata(path).unwrap().ino();
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&netns_path),
        "the VMM is not in {netns_path}"
    );
    let supervisor: u32 = status_field(pid, "PPid").parse().unwrap();
    let session = std::fs::read_to_string(format!("/proc/{supervisor}/stat")).unwrap();
    let fields: Vec<&str> = session
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        supervisor.to_string(),
        "the supervisor leads its session"
    );
    let (status, _, err) = Running::spawn(daemon.command(&[])).finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("is in use"), "{err}");
    assert!(
        daemon.root().join("kiln").exists(),
        "the live jail was touched"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        !Path::new(&format!("/proc/{supervisor}")).exists()
    });
    daemon.assert_gone();

    // A cgroup file the controller does not have is refused before anything is made.
    let bogus = Jail::new("bogus", &["pids.maximum=1".to_string()]);
    let (status, _, err) = Running::spawn(bogus.command(&[])).finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.starts_with("kiln jail: --cgroup pids.maximum"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    bogus.assert_gone();
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Kiln installed under Firecracker's names, driven as Kata drives Firecracker's jailer:
/// `jailer --id ... --exec-file .../firecracker ... -- ARGS`. The VMM is Firecracker's
/// process: its API at Firecracker's default socket inside the jail, the jailer's start-up
/// times on its command line and in its metrics.
#[test]
fn started_as_jailer_it_jails_firecrackers_process() {
    if !runnable() {
        return;
    }
    let scratch = kiln_tests::scratch_dir("jailer-name");
    // Copies, not symlinks: the jailer (Firecracker's too) resolves the exec file's links, and
    // its name decides the jail's directory and the VMM's name.
    let jailer = scratch.join("jailer");
    let firecracker = scratch.join("firecracker");
    std::fs::copy(kiln_bin(), &jailer).unwrap();
    std::fs::copy(kiln_bin(), &firecracker).unwrap();
    let mut jail = Jail::new("fcname", &limits(256 << 20));
    jail.exec = "firecracker".to_string();
    let mut cmd = Command::new(&jailer);
    cmd.args(["--id", &jail.id, "--exec-file"])
        .arg(&firecracker)
        .arg("--chroot-base-dir")
        .arg(&jail.base)
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .args(["--parent-cgroup", PARENT_CGROUP]);
    for s in &jail.settings {
        cmd.arg("--cgroup").arg(format!("{}={}", s.file, s.value));
    }
    // The metrics file is bound in from the host (read-write), so it outlives the jail.
    let metrics = scratch.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    std::os::unix::fs::chown(&metrics, Some(UID), Some(GID)).unwrap();
    cmd.arg("--file").arg(format!("{}:rw", metrics.display()));
    cmd.args(["--", "--metrics-path", "/metrics.json"]);
    die_with_test(&mut cmd);
    let running = Running::spawn(cmd);
    let pid = jail.vmm_pid();
    let sock = jail.root().join("run/firecracker.socket");
    wait_until(Duration::from_secs(30), "the API socket", || sock.exists());
    let (status, body) = api_call(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(argv[0], "/firecracker", "{argv:?}");
    for flag in [
        "--start-time-us",
        "--start-time-cpu-us",
        "--parent-cpu-time-us",
    ] {
        assert!(argv.iter().any(|a| a == flag), "{flag} missing: {argv:?}");
    }
    send_signal(&running.child, "-TERM");
    let (status, _, err) = running.finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{err}");
    jail.assert_gone();
    // The metrics written on the way out count the start-up from the jailer's start.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a metrics line")).unwrap();
    let startup = line["api_server"]["process_startup_time_us"]
        .as_u64()
        .unwrap();
    assert!(startup > 0, "{line}");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn default_guest_boots_in_the_jail_and_the_jail_is_removed() {
    if !runnable() {
        return;
    }
    let _one_boot = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let images = vmm::guest_images::default_guest().expect("guest images");
    let scratch = kiln_tests::scratch_dir("jail-boot");
    let (_marker, leaked) = leak_fd(&scratch);
    let script = scratch.join("script.img");
    write_script_drive(
        &script,
        "echo jail-data-ok | dd of=/dev/vdb conv=fsync 2>/dev/null && echo \"KILN-T data written\"\n",
    );
    // The VMM runs as UID: it may read what the world may read, and write what UID owns.
    let data = scratch.join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(&data, Some(UID), Some(GID)).unwrap();
    let jail = Jail::new("boot", &limits(768 << 20));
    let running = Running::spawn(jail.command_with_files(
        &[&images.vmlinux, &images.initramfs, &script],
        &[&data],
        &[],
    ));
    let memory = watch_memory(jail.cgroup_dirs.clone());
    let pid = jail.vmm_pid();
    let sock = jail.root().join("run/kiln.socket");
    wait_until(Duration::from_secs(30), "the API socket", || sock.exists());
    put(
        &sock,
        "/boot-source",
        r#"{"kernel_image_path":"/vmlinux","initrd_path":"/initramfs.cpio","boot_args":"console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vda"}"#,
    );
    put(
        &sock,
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":256}"#,
    );
    put(
        &sock,
        "/drives/script",
        r#"{"drive_id":"script","path_on_host":"/script.img","is_root_device":false,"is_read_only":true}"#,
    );
    put(
        &sock,
        "/drives/data",
        r#"{"drive_id":"data","path_on_host":"/data.img","is_root_device":false,"is_read_only":false}"#,
    );
    put(&sock, "/actions", r#"{"action_type":"InstanceStart"}"#);
    check_isolation(
        &jail,
        pid,
        &["vmlinux", "initramfs.cpio", "script.img", "data.img"],
        &leaked,
    );
    let start = Instant::now();
    let (status, console, err) = running.finish(BOOT_DEADLINE);
    let peak = memory.join().unwrap().peak;
    eprintln!(
        "jailed boot: {:.1} s after InstanceStart, memory peak {} MiB; stderr:\n{err}",
        start.elapsed().as_secs_f64(),
        peak >> 20
    );
    let tail: Vec<&str> = console.lines().rev().take(30).collect();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{tail:#?}");
    for marker in [
        "KILN-GUEST-INIT-OK 6.12.",
        "KILN-T data written",
        "KILN-GUEST-SCRIPT-EXIT 0",
        "KILN-GUEST-REBOOT",
    ] {
        assert!(console.contains(marker), "no {marker:?}: {tail:#?}");
    }
    assert!(err.contains("the guest rebooted"), "{err}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(err.contains("nested PVM host"), "{err}");
    }
    let written = std::fs::read(&data).unwrap();
    assert!(written.starts_with(b"jail-data-ok\n"));
    jail.assert_gone();
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn memory_hungry_guest_stays_within_its_cgroup_and_is_killed() {
    if !runnable() {
        return;
    }
    let _one_boot = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let images = vmm::guest_images::default_guest().expect("guest images");
    let scratch = kiln_tests::scratch_dir("jail-oom");
    // Read the images once so their page cache is charged here, not to the jail.
    for image in [&images.vmlinux, &images.initramfs] {
        std::fs::read(image).unwrap();
    }
    // The guest fills its tmpfs (half its memory) 8 MiB at a time; every page it touches is the
    // VMM's memory.
    let script = scratch.join("script.img");
    write_script_drive(
        &script,
        r#"
i=0
while [ $i -lt 16 ]; do
    dd if=/dev/zero of=/tmp/fill$i bs=1M count=8 2>/dev/null || break
    i=$((i + 1))
    echo "KILN-T filled $((i * 8)) MiB"
done
echo "KILN-T fill ended"
"#,
    );
    let limit: u64 = MEMORY_LIMIT_MIB << 20;
    let jail = Jail::new("oom", &limits(limit));
    let running = Running::spawn(jail.command_with_files(
        &[&images.vmlinux, &images.initramfs, &script],
        &[],
        &[
            "run",
            "--kernel",
            "/vmlinux",
            "--initrd",
            "/initramfs.cpio",
            "--mem-mib",
            "256",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 pci=off nomodule kiln.script=/dev/vda",
            "--drive",
            "path=/script.img,ro",
        ],
    ));
    let memory = watch_memory(jail.cgroup_dirs.clone());
    let pid = jail.vmm_pid();
    let (status, console, err) = running.finish(BOOT_DEADLINE);
    let memory = memory.join().unwrap();
    let filled: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("KILN-T"))
        .collect();
    eprintln!(
        "memory-hungry guest: limit {MEMORY_LIMIT_MIB} MiB, peak {} MiB, cgroup OOM kills seen \
         {}; guest: {filled:?}; stderr:\n{err}",
        memory.peak >> 20,
        memory.oom_kills
    );
    let tail: Vec<&str> = console.lines().rev().take(20).collect();
    assert!(console.contains("KILN-GUEST-INIT-OK"), "{tail:#?}");
    assert!(!console.contains("KILN-T fill ended"), "{tail:#?}");
    assert!(console.contains("KILN-T filled"), "{tail:#?}");
    // The OOM killer ended the VMM: SIGKILL, passed on as 128+9.
    assert_eq!(status.and_then(|s| s.code()), Some(137), "{err}\n{tail:#?}");
    assert!(err.contains("killed by SIGKILL"), "{err}");
    // The guest got as far as the limit and no further.
    let peak = memory.peak;
    assert!(peak <= limit && peak > limit - (16 << 20), "peak {peak}");
    // It was the jail's cgroup that ran out and killed the VMM, not the host. The kernel says
    // so in its log; its counter is only seen if a sample fell between the kill and the jail
    // removing the cgroup, so it may read 0 but never counts another kill.
    assert!(memory.oom_kills <= 1, "{memory:?}");
    let dmesg = Command::new("dmesg").output().expect("dmesg");
    if dmesg.status.success() {
        let log = String::from_utf8_lossy(&dmesg.stdout);
        if let Err(e) = memcg_oom_record(&log, pid, &jail.id) {
            let oom_lines: Vec<&str> = log.lines().filter(|l| l.contains("oom")).collect();
            panic!("{e}; the kernel log's OOM lines: {oom_lines:#?}");
        }
    } else {
        // A host whose kernel log is closed to us: the cgroup's own counter must have seen it.
        assert_eq!(memory.oom_kills, 1, "no kernel log, and {memory:?}");
    }
    jail.assert_gone();
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn memcg_oom_record_tells_the_jail_cgroup_oom_from_others() {
    let ours = "[18167.877431] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,\
        mems_allowed=0,oom_memcg=/kiln-jail-test/oom-7,task_memcg=/kiln-jail-test/oom-7,\
        task=kiln,pid=6795,uid=123\n\
        [18167.877461] Memory cgroup out of memory: Killed process 6795 (kiln) total-vm:26844kB\n";
    assert_eq!(memcg_oom_record(ours, 6795, "oom-7"), Ok(()));
    // Another process, another cgroup, a global OOM, or no kill line: not ours.
    assert!(memcg_oom_record(ours, 679, "oom-7").is_err());
    assert!(memcg_oom_record(ours, 6795, "oom-77").is_err());
    assert!(memcg_oom_record(ours, 6795, "m-7").is_err());
    let global = ours.replace("CONSTRAINT_MEMCG", "CONSTRAINT_NONE");
    assert!(memcg_oom_record(&global, 6795, "oom-7").is_err());
    let unkilled = ours.lines().next().unwrap();
    assert!(memcg_oom_record(unkilled, 6795, "oom-7").is_err());
}

/// The memory-hungry guest's limit: above what the VMM uses to boot the guest to its script
/// (27 MiB here, with the 256 MiB guest), well below what the script touches (up to 128 MiB
/// more, about 0.5 MiB/s on our nested-KVM machines).
const MEMORY_LIMIT_MIB: u64 = 64;
