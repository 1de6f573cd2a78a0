//! What the benchmarks share: CPU time of a running kiln from /proc, and the host they ran on.

use std::path::{Path, PathBuf};

/// kiln's device event-loop thread, which does all the virtio I/O.
pub const VMM_THREAD: &str = "kiln_vmm";

/// Clock ticks per second, the unit of /proc's utime and stime.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if tck > 0 {
        tck as f64
    } else {
        100.0
    }
}

/// utime + stime, in clock ticks, from a /proc/.../stat file.
pub fn cpu_ticks(stat_path: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which may contain spaces and parentheses) start at field 3,
    // state; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The thread of `pid` whose name is `name`.
pub fn find_thread(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .and_then(|task| task.file_name().to_str()?.parse().ok())
}

/// CPU time of kiln's device event-loop thread and of the whole process, in clock ticks.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    /// The `kiln_vmm` thread.
    pub vmm: u64,
    /// Every thread of the process.
    pub process: u64,
}

/// Reads a running kiln's CPU time from /proc.
pub struct Sampler {
    pid: u32,
    vmm_tid: Option<u32>,
}

impl Sampler {
    /// For the kiln process `pid`.
    pub fn new(pid: u32) -> Self {
        Self { pid, vmm_tid: None }
    }

    /// Utime + stime so far; the `kiln_vmm` thread must exist by now.
    pub fn sample(&mut self) -> Result<CpuSample, String> {
        let pid = self.pid;
        let tid = match self.vmm_tid {
            Some(tid) => tid,
            None => {
                let tid = find_thread(pid, VMM_THREAD)
                    .ok_or_else(|| format!("kiln (pid {pid}) has no thread named {VMM_THREAD}"))?;
                self.vmm_tid = Some(tid);
                tid
            }
        };
        let vmm_stat = PathBuf::from(format!("/proc/{pid}/task/{tid}/stat"));
        let vmm = cpu_ticks(&vmm_stat)
            .ok_or_else(|| format!("cannot read {} (did the thread exit?)", vmm_stat.display()))?;
        let process = cpu_ticks(Path::new(&format!("/proc/{pid}/stat")))
            .ok_or_else(|| format!("cannot read /proc/{pid}/stat"))?;
        Ok(CpuSample { vmm, process })
    }
}

/// One line saying what the figures were measured on (kernel, CPU, which KVM).
pub fn host_context() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim())
        })
        .unwrap_or("unknown CPU");
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let module = |m: &str| Path::new(&format!("/sys/module/{m}")).exists();
    let kvm = if module("kvm_pvm") {
        "kvm_pvm (nested PVM: guest kernel code runs emulated, so guest figures are far below bare KVM)"
    } else if module("kvm_intel") {
        "kvm_intel"
    } else if module("kvm_amd") {
        "kvm_amd"
    } else {
        "unknown module"
    };
    format!("host: Linux {release}, {model}, {cpus} CPUs; /dev/kvm: {kvm}")
}

/// The `p`th percentile (0..=100) of `sorted`, nearest rank; zero when there is nothing.
pub fn percentile(sorted: &[std::time::Duration], p: usize) -> std::time::Duration {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The median of `values` (sorted in place); NaN when there is none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Raises this process's soft fd limit to its hard one (for tests and benchmarks that hold many
/// connections); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the one struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// A process's memory in KiB, from /proc/PID/smaps: resident and proportional, in all and of
/// its guest-memory mapping (the one mapping of `guest_bytes`, or up to 1 MiB more: Firecracker's
/// includes its guard pages; anonymous after a boot, the memory file after a restore).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryKib {
    /// Rss of the whole process.
    pub rss: u64,
    /// Pss of the whole process.
    pub pss: u64,
    /// Rss of guest memory.
    pub guest_rss: u64,
    /// Pss of guest memory.
    pub guest_pss: u64,
}

/// The memory of process `pid`, whose guest has `guest_bytes` of RAM.
pub fn memory_kib(pid: u32, guest_bytes: u64) -> Option<MemoryKib> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut kib = MemoryKib::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let size = first.split_once('-').and_then(|(s, e)| {
                Some(u64::from_str_radix(e, 16).ok()? - u64::from_str_radix(s, 16).ok()?)
            });
            in_guest =
                size.is_some_and(|size| (guest_bytes..=guest_bytes + (1 << 20)).contains(&size));
        } else if first == "Rss:" || first == "Pss:" {
            let value: u64 = fields.next()?.parse().ok()?;
            let (all, guest) = if first == "Rss:" {
                (&mut kib.rss, &mut kib.guest_rss)
            } else {
                (&mut kib.pss, &mut kib.guest_pss)
            };
            *all += value;
            if in_guest {
                *guest += value;
            }
        }
    }
    Some(kib)
}

/// The resident memory of process `pid` and of its guest-memory mapping, in KiB
/// ([`memory_kib`]).
pub fn rss_kib(pid: u32, guest_bytes: u64) -> Option<(u64, u64)> {
    memory_kib(pid, guest_bytes).map(|kib| (kib.rss, kib.guest_rss))
}

/// One VMM a side-by-side benchmark runs.
pub struct Vmm {
    /// `firecracker` or `kiln`.
    pub name: &'static str,
    /// Its binary.
    pub bin: PathBuf,
}

/// Firecracker (`FIRECRACKER_BIN`, else the anchor at `../shared/anchors/firecracker`), then
/// Kiln: what every side-by-side benchmark runs, in that order. Without Firecracker the
/// benchmark `bench` says so and exits 2.
pub fn firecracker_then_kiln(bench: &str) -> [Vmm; 2] {
    let firecracker = std::env::var_os("FIRECRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/anchors/firecracker"
            ))
        });
    if !firecracker.exists() {
        eprintln!("{bench}: no Firecracker at {}", firecracker.display());
        std::process::exit(2);
    }
    [
        Vmm {
            name: "firecracker",
            bin: firecracker,
        },
        Vmm {
            name: "kiln",
            bin: crate::kiln_bin(),
        },
    ]
}

/// `base` with this host's compat parameters: the one command line both VMMs get (Kiln adds
/// them itself, again harmlessly; Firecracker needs them given).
pub fn same_cmdline(base: &str) -> String {
    std::iter::once(base)
        .chain(vmm::arch::HostQuirks::detect().guest_cmdline())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One figure of a side-by-side benchmark: its samples for Firecracker and for Kiln.
pub struct Figure {
    /// What is measured.
    pub name: &'static str,
    /// Its unit.
    pub unit: &'static str,
    /// Firecracker's samples, then Kiln's.
    pub samples: [Vec<f64>; 2],
}

impl Figure {
    /// A figure without samples yet.
    pub fn new(name: &'static str, unit: &'static str) -> Self {
        Self {
            name,
            unit,
            samples: [Vec::new(), Vec::new()],
        }
    }

    /// Prints the median, min and max for both, and Kiln / Firecracker of the medians.
    pub fn print(&mut self) {
        let stats = |v: &mut Vec<f64>| {
            if v.is_empty() {
                return (f64::NAN, f64::NAN, f64::NAN);
            }
            let med = median(v);
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (med, min, max)
        };
        let (fc, kiln) = self.samples.split_at_mut(1);
        let (fm, fmin, fmax) = stats(&mut fc[0]);
        let (km, kmin, kmax) = stats(&mut kiln[0]);
        println!(
            "{:<40} Firecracker {fm:>10.2} {u} [{fmin:.2} .. {fmax:.2}]   Kiln {km:>10.2} {u} [{kmin:.2} .. {kmax:.2}]   Kiln/FC {:.2}",
            self.name,
            km / fm,
            u = self.unit
        );
    }
}

/// Sends one request on a new connection to the API socket `sock` and returns the answer's
/// status code (`None` if the VMM closed without a status line, or `deadline` passed). Only the
/// status line is read: a VMM may keep the connection open after its answer (Firecracker's
/// does), so waiting for the end of the stream would wait for nothing.
pub fn request_status(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    deadline: std::time::Duration,
) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock).ok()?;
    stream.set_read_timeout(Some(deadline)).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head).ok()?.get(9..12)?.parse().ok()
}
