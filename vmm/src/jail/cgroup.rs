//! The jail's cgroups: `<hierarchy>/<parent-cgroup>/<id>` with the `--cgroup` values written,
//! on cgroup v1 (one directory per hierarchy that has a controller in use) or v2 (one directory,
//! its controllers enabled in every ancestor's `cgroup.subtree_control`).
//!
//! The supervisor makes the directories and writes the limits before the VMM exists; the VMM's
//! process joins them by writing `0` to each `cgroup.procs` before it pivots into the jail; the
//! supervisor removes them once the VMM is gone.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the host mounts its cgroup hierarchies (v2: the hierarchy itself).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long removal waits for a cgroup to drain after the VMM is gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors in making, filling or removing the jail's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// /proc/self/mountinfo could not be read.
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    /// No cgroup hierarchy of the chosen version is mounted.
    #[error("no cgroup {0} hierarchy is mounted (see /proc/self/mountinfo); pick the other with --cgroup-version")]
    NoHierarchy(CgroupVersion),
    /// v1: no mounted hierarchy has the controller a setting needs.
    #[error("--cgroup {file}: no cgroup v1 hierarchy has the {controller:?} controller")]
    NoController {
        /// The setting's cgroup file.
        file: String,
        /// The controller it needs.
        controller: String,
    },
    /// v2: the hierarchy's root does not offer the controller a setting needs.
    #[error("--cgroup {file}: the cgroup v2 hierarchy at {mount} does not offer the {controller:?} controller (it has: {available}); try --cgroup-version 1")]
    V2ControllerUnavailable {
        /// The setting's cgroup file.
        file: String,
        /// The controller it needs.
        controller: String,
        /// The v2 hierarchy's mount point.
        mount: PathBuf,
        /// The controllers it offers (its `cgroup.controllers`).
        available: String,
    },
    /// A setting's file does not exist in the jail's cgroup directory.
    #[error("--cgroup {file}: {dir} has no such file (a cgroup {version} file name is needed)")]
    NoSuchFile {
        /// The setting's cgroup file.
        file: String,
        /// The jail's cgroup directory.
        dir: PathBuf,
        /// The cgroup version in use.
        version: CgroupVersion,
    },
    /// The jail's cgroup already exists and has processes in it.
    #[error("cgroup {0} already exists and has processes: another jail with this id is running")]
    InUse(PathBuf),
    /// A file system operation on a cgroup file or directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "creating cgroup".
        what: &'static str,
        /// The cgroup file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// A cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1: a hierarchy per controller (or group of controllers).
    V1,
    /// cgroup v2: one unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

impl CgroupVersion {
    /// Parses `--cgroup-version`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "1" => Ok(Self::V1),
            "2" => Ok(Self::V2),
            _ => Err(format!("{s:?}: expected 1 or 2")),
        }
    }

    /// The host's: v2 when /sys/fs/cgroup is a cgroup2 file system (a unified host), else v1
    /// (legacy and hybrid hosts).
    pub fn detect() -> Self {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
        match statfs(CGROUP_ROOT) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Self::V2,
            _ => Self::V1,
        }
    }
}

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// A cgroup interface file name such as `memory.max`.
    pub file: String,
    /// The value written to it: one non-empty line.
    pub value: String,
}

impl CgroupSetting {
    /// Parses `FILE=VALUE`: FILE is `<controller>.<name>` of lower-case letters, digits and
    /// `_`/`.`; VALUE is one line.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (file, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected FILE=VALUE (e.g. memory.max=256M)"))?;
        let file_ok = file.contains('.')
            && !file.starts_with('.')
            && file
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        if !file_ok {
            return Err(format!(
                "{s:?}: {file:?} is not a cgroup file name (<controller>.<name>, e.g. memory.max)"
            ));
        }
        if value.is_empty() || value.contains('\n') {
            return Err(format!("{s:?}: the value must be one non-empty line"));
        }
        Ok(Self {
            file: file.to_string(),
            value: value.to_string(),
        })
    }

    /// The controller: the part of the file name before the first dot.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

/// A cgroup hierarchy mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where the hierarchy is mounted.
    pub mount_point: PathBuf,
    /// Whether it is a cgroup v1 or v2 hierarchy.
    pub version: CgroupVersion,
    /// v1: the controllers of this hierarchy (from its mount options).
    pub controllers: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
pub(super) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup hierarchies in a `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut tail = after.split(' ');
            let fstype = tail.next()?;
            let _source = tail.next()?;
            let options = tail.next().unwrap_or_default();
            let version = match fstype {
                "cgroup" => CgroupVersion::V1,
                "cgroup2" => CgroupVersion::V2,
                _ => return None,
            };
            let controllers = match version {
                CgroupVersion::V1 => options.split(',').map(str::to_string).collect(),
                CgroupVersion::V2 => Vec::new(),
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape(mount_point)),
                version,
                controllers,
            })
        })
        .collect()
}

/// The host's cgroup hierarchies.
pub fn host_mounts() -> Result<Vec<CgroupMount>, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    Ok(parse_mountinfo(&text))
}

/// One directory of the jail's cgroup and what goes into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// The hierarchy's mount point.
    pub hierarchy: PathBuf,
    /// `<hierarchy>/<parent>/<id>`.
    pub path: PathBuf,
    /// The settings written into this directory.
    pub settings: Vec<CgroupSetting>,
}

/// The jail's cgroup directories, before any exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// The cgroup version in use.
    pub version: CgroupVersion,
    /// `<parent>/<id>`, relative to each hierarchy.
    pub relative: PathBuf,
    /// The directories to make: v1, one per hierarchy in use; v2, one (none without settings).
    pub dirs: Vec<CgroupDir>,
}

impl CgroupPlan {
    /// Maps each setting to its hierarchy. v2 uses the cgroup2 mount at /sys/fs/cgroup if there
    /// is one, else the first one mounted (a hybrid host's `/sys/fs/cgroup/unified`).
    pub fn new(
        version: CgroupVersion,
        mounts: &[CgroupMount],
        parent: &Path,
        id: &str,
        settings: &[CgroupSetting],
    ) -> Result<Self, CgroupError> {
        let relative = parent.join(id);
        let mut dirs: Vec<CgroupDir> = Vec::new();
        match version {
            CgroupVersion::V1 => {
                for setting in settings {
                    let controller = setting.controller();
                    let mount = mounts
                        .iter()
                        .find(|m| {
                            m.version == CgroupVersion::V1
                                && m.controllers.iter().any(|c| c == controller)
                        })
                        .ok_or_else(|| CgroupError::NoController {
                            file: setting.file.clone(),
                            controller: controller.to_string(),
                        })?;
                    match dirs.iter_mut().find(|d| d.hierarchy == mount.mount_point) {
                        Some(dir) => dir.settings.push(setting.clone()),
                        None => dirs.push(CgroupDir {
                            hierarchy: mount.mount_point.clone(),
                            path: mount.mount_point.join(&relative),
                            settings: vec![setting.clone()],
                        }),
                    }
                }
            }
            CgroupVersion::V2 => {
                let mut v2 = mounts.iter().filter(|m| m.version == CgroupVersion::V2);
                let mount = v2
                    .clone()
                    .find(|m| m.mount_point == Path::new(CGROUP_ROOT))
                    .or_else(|| v2.next())
                    .ok_or(CgroupError::NoHierarchy(version))?;
                if !settings.is_empty() {
                    dirs.push(CgroupDir {
                        hierarchy: mount.mount_point.clone(),
                        path: mount.mount_point.join(&relative),
                        settings: settings.to_vec(),
                    });
                }
            }
        }
        Ok(Self {
            version,
            relative,
            dirs,
        })
    }

    /// Makes the directories and writes the settings. On failure, whatever it made is removed.
    pub fn create(&self) -> Result<Cgroups, CgroupError> {
        let mut made = Cgroups { dirs: Vec::new() };
        for dir in &self.dirs {
            if let Err(e) = self.create_dir(dir, &mut made) {
                let _ = made.remove();
                return Err(e);
            }
        }
        Ok(made)
    }

    fn create_dir(&self, dir: &CgroupDir, made: &mut Cgroups) -> Result<(), CgroupError> {
        let controllers: BTreeSet<&str> = dir.settings.iter().map(|s| s.controller()).collect();
        if self.version == CgroupVersion::V2 {
            check_v2_controllers(dir)?;
        }
        // Each ancestor from the hierarchy's root down to the parent cgroup.
        let mut level = dir.hierarchy.clone();
        let mut ancestors = vec![level.clone()];
        let parent_components: Vec<_> = self.relative.components().collect();
        for component in &parent_components[..parent_components.len().saturating_sub(1)] {
            level.push(component);
            ancestors.push(level.clone());
        }
        for (i, ancestor) in ancestors.iter().enumerate() {
            if i > 0 {
                make_dir(ancestor)?;
            }
            match self.version {
                CgroupVersion::V2 => enable_controllers(ancestor, &controllers)?,
                CgroupVersion::V1 if controllers.contains("cpuset") && i > 0 => {
                    inherit_cpuset(ancestor)?
                }
                CgroupVersion::V1 => {}
            }
        }
        match std::fs::create_dir(&dir.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // A leftover of a jail that did not clean up is reused; a live one is not.
                let procs =
                    std::fs::read_to_string(dir.path.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    return Err(CgroupError::InUse(dir.path.clone()));
                }
            }
            Err(e) => return Err(io_error("creating cgroup", &dir.path)(e)),
        }
        made.dirs.push(dir.path.clone());
        if self.version == CgroupVersion::V1 && controllers.contains("cpuset") {
            inherit_cpuset(&dir.path)?;
        }
        for setting in &dir.settings {
            let file = dir.path.join(&setting.file);
            if !file.is_file() {
                return Err(CgroupError::NoSuchFile {
                    file: setting.file.clone(),
                    dir: dir.path.clone(),
                    version: self.version,
                });
            }
            std::fs::write(&file, &setting.value)
                .map_err(io_error("writing the value to", &file))?;
        }
        Ok(())
    }
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io_error("creating cgroup", path)(e)),
        _ => Ok(()),
    }
}

/// v2: the hierarchy's root must offer every controller in use.
fn check_v2_controllers(dir: &CgroupDir) -> Result<(), CgroupError> {
    let list = dir.hierarchy.join("cgroup.controllers");
    let available = std::fs::read_to_string(&list).map_err(io_error("reading", &list))?;
    let offered: BTreeSet<&str> = available.split_whitespace().collect();
    for setting in &dir.settings {
        let controller = setting.controller();
        // `cgroup.*` files are the core's, present without any controller.
        if controller != "cgroup" && !offered.contains(controller) {
            return Err(CgroupError::V2ControllerUnavailable {
                file: setting.file.clone(),
                controller: controller.to_string(),
                mount: dir.hierarchy.clone(),
                available: available.trim().to_string(),
            });
        }
    }
    Ok(())
}

/// v2: enables `controllers` for the children of `dir` (`+memory +pids` into its
/// `cgroup.subtree_control`).
pub fn enable_controllers(dir: &Path, controllers: &BTreeSet<&str>) -> Result<(), CgroupError> {
    let line: Vec<String> = controllers
        .iter()
        .filter(|c| **c != "cgroup")
        .map(|c| format!("+{c}"))
        .collect();
    if line.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    std::fs::write(&file, line.join(" ")).map_err(io_error("enabling controllers in", &file))
}

/// v1 cpuset: a new cgroup starts with empty `cpuset.cpus` and `cpuset.mems` and takes no
/// process until they are set; copy its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for name in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(name);
        let current = std::fs::read_to_string(&own).map_err(io_error("reading", &own))?;
        if current.trim().is_empty() {
            let from = parent.join(name);
            let value = std::fs::read_to_string(&from).map_err(io_error("reading", &from))?;
            std::fs::write(&own, value.trim()).map_err(io_error("writing", &own))?;
        }
    }
    Ok(())
}

/// The jail's cgroup directories, once made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroups {
    /// The directories made, each `<hierarchy>/<parent>/<id>`.
    pub dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// The files the VMM's process writes `0` to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the directories (not the parent cgroup, which other jails share), waiting up to
    /// 5 s for each to drain. Returns the first failure after trying them all.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for dir in &self.dirs {
            let start = Instant::now();
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    // EBUSY while the last task exits.
                    Err(_) if start.elapsed() < DRAIN_TIMEOUT => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(io_error("removing cgroup", dir)(e));
                        }
                        break;
                    }
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(s: &str) -> CgroupSetting {
        CgroupSetting::parse(s).unwrap()
    }

    const HYBRID: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
42 27 254:0 /x /mnt/with\\040space rw - cgroup cgroup rw,hugetlb
";

    #[test]
    fn settings() {
        let s = setting("memory.limit_in_bytes=100M");
        assert_eq!((s.controller(), s.value.as_str()), ("memory", "100M"));
        assert_eq!(setting("cpu.max=50000 100000").value, "50000 100000");
        assert_eq!(setting("cpuset.cpus=0-1").controller(), "cpuset");
        for bad in [
            "memory",
            "memory.max",
            "memory.max=",
            "max=1",
            ".max=1",
            "../memory.max=1",
            "memory/x.max=1",
            "Memory.max=1",
            "memory.max=1\n2",
        ] {
            assert!(CgroupSetting::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 7);
        assert_eq!(
            mounts[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(mounts[0].controllers.iter().any(|c| c == "cpuacct"));
        assert_eq!(mounts[5].version, CgroupVersion::V2);
        assert_eq!(mounts[6].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn v1_plan_maps_each_file_to_its_hierarchy() {
        let mounts = parse_mountinfo(HYBRID);
        let plan = CgroupPlan::new(
            CgroupVersion::V1,
            &mounts,
            Path::new("kiln"),
            "vm1",
            &[
                setting("memory.limit_in_bytes=64M"),
                setting("cpu.cfs_quota_us=50000"),
                setting("pids.max=32"),
                setting("cpuacct.usage=0"),
                setting("memory.swappiness=0"),
            ],
        )
        .unwrap();
        let paths: Vec<_> = plan.dirs.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "/sys/fs/cgroup/memory/kiln/vm1",
                "/sys/fs/cgroup/cpu,cpuacct/kiln/vm1",
                "/sys/fs/cgroup/pids/kiln/vm1"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(plan.dirs[0].settings.len(), 2);
        assert_eq!(plan.dirs[1].settings.len(), 2);
        let err = CgroupPlan::new(
            CgroupVersion::V1,
            &mounts,
            Path::new("kiln"),
            "vm1",
            &[setting("io.max=1")],
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::NoController { .. }), "{err}");
    }

    #[test]
    fn v2_plan_prefers_sys_fs_cgroup() {
        let hybrid = parse_mountinfo(HYBRID);
        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &hybrid,
            Path::new("a/b"),
            "vm1",
            &[setting("memory.max=1G"), setting("pids.max=10")],
        )
        .unwrap();
        assert_eq!(plan.dirs.len(), 1);
        assert_eq!(
            plan.dirs[0].path,
            PathBuf::from("/sys/fs/cgroup/unified/a/b/vm1")
        );
        let unified = parse_mountinfo(
            "1 0 0:1 / /mnt/cg2 rw - cgroup2 cgroup2 rw\n2 0 0:2 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        );
        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &unified,
            Path::new("kiln"),
            "x",
            &[setting("memory.max=1G")],
        )
        .unwrap();
        assert_eq!(plan.dirs[0].path, PathBuf::from("/sys/fs/cgroup/kiln/x"));
        let none = CgroupPlan::new(CgroupVersion::V2, &unified[..0], Path::new("k"), "x", &[]);
        assert!(matches!(
            none,
            Err(CgroupError::NoHierarchy(CgroupVersion::V2))
        ));
    }

    /// A fake cgroup v2 hierarchy in a temporary directory: the root offers `controllers`.
    fn fake_v2(name: &str, controllers: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("kiln-cg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), controllers).unwrap();
        root
    }

    fn v2_plan(root: &Path, parent: &str, settings: &[CgroupSetting]) -> CgroupPlan {
        let mounts = [CgroupMount {
            mount_point: root.to_path_buf(),
            version: CgroupVersion::V2,
            controllers: Vec::new(),
        }];
        CgroupPlan::new(
            CgroupVersion::V2,
            &mounts,
            Path::new(parent),
            "vm1",
            settings,
        )
        .unwrap()
    }

    #[test]
    fn v2_enables_controllers_in_every_ancestor_and_writes_the_values() {
        let root = fake_v2("subtree", "cpuset cpu io memory hugetlb pids rdma misc");
        let settings = [
            setting("memory.max=268435456"),
            setting("pids.max=64"),
            setting("cpu.max=50000 100000"),
        ];
        let plan = v2_plan(&root, "vms/kiln", &settings);
        // A real hierarchy makes the interface files on mkdir; the fake one has them made
        // beforehand (an existing, empty cgroup is reused).
        let leaf = root.join("vms/kiln/vm1");
        std::fs::create_dir_all(&leaf).unwrap();
        for file in ["memory.max", "pids.max", "cpu.max", "cgroup.procs"] {
            std::fs::write(leaf.join(file), "").unwrap();
        }
        let made = plan.create().unwrap();
        for level in ["", "vms", "vms/kiln"] {
            let control =
                std::fs::read_to_string(root.join(level).join("cgroup.subtree_control")).unwrap();
            assert_eq!(control, "+cpu +memory +pids", "level {level:?}");
        }
        assert!(!leaf.join("cgroup.subtree_control").exists());
        assert_eq!(
            std::fs::read_to_string(leaf.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(
            std::fs::read_to_string(leaf.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(made.dirs, vec![leaf.clone()]);
        assert_eq!(made.procs_files(), vec![leaf.join("cgroup.procs")]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_refuses_missing_controllers_files_and_live_cgroups() {
        let root = fake_v2("refuse", "cpu pids");
        let plan = v2_plan(&root, "kiln", &[setting("memory.max=1G")]);
        let err = plan.create().unwrap_err();
        assert!(
            matches!(err, CgroupError::V2ControllerUnavailable { ref controller, .. } if controller == "memory"),
            "{err}"
        );
        // A file the controller does not have; what was made is removed again.
        let plan = v2_plan(&root, "kiln", &[setting("pids.maximum=1")]);
        let err = plan.create().unwrap_err();
        assert!(matches!(err, CgroupError::NoSuchFile { .. }), "{err}");
        assert!(err.to_string().contains("pids.maximum"), "{err}");
        assert!(!root.join("kiln/vm1").exists());
        // A cgroup of that id with a process in it belongs to a live jail.
        let leaf = root.join("kiln/vm1");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(leaf.join("cgroup.procs"), "4242\n").unwrap();
        let plan = v2_plan(&root, "kiln", &[setting("pids.max=1")]);
        assert!(matches!(plan.create(), Err(CgroupError::InUse(_))));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn removal_of_missing_dirs_is_fine() {
        let cgroups = Cgroups {
            dirs: vec![PathBuf::from("/nonexistent/kiln/cg")],
        };
        cgroups.remove().unwrap();
    }

    #[test]
    fn versions() {
        assert_eq!(CgroupVersion::parse("1"), Ok(CgroupVersion::V1));
        assert_eq!(CgroupVersion::parse("2"), Ok(CgroupVersion::V2));
        assert!(CgroupVersion::parse("v2").is_err());
        // This host's answer must match how /sys/fs/cgroup is mounted.
        let cgroup2_root =
            parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
                .iter()
                .any(|m| m.version == CgroupVersion::V2 && m.mount_point == Path::new(CGROUP_ROOT));
        assert_eq!(CgroupVersion::detect() == CgroupVersion::V2, cgroup2_root);
    }
}
