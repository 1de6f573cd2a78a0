//! The jail directory `<chroot-base-dir>/<exec-file-name>/<id>` and its `root`: the VMM binary
//! (and, when it is dynamically linked, its loader and libraries), the three device nodes, `/run`
//! for the API socket, placeholders for the `--file` bind mounts, and the pid file. Made by the
//! supervisor before the VMM exists, removed by it once the VMM is gone.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chown, Gid, Uid};

use devices::host_file::Accept;

use super::args::JailConfig;

/// The only device nodes in the jail: path in the jail, major, minor (Linux's fixed numbers:
/// misc 10/232 and 10/200, mem 1/9).
pub const DEVICES: [(&str, u64, u64); 3] = [
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
];

/// On a nested-PVM host Kiln adapts the guest when this directory exists (see `host_quirks`);
/// the jail gets an empty one so the jailed VMM sees the host it runs on.
const PVM_MODULE: &str = "sys/module/kvm_pvm";

/// Errors in making or removing the jail directory.
#[derive(Debug, thiserror::Error)]
pub enum JailDirError {
    /// The jail's parent directory is on a file system mounted `nodev`.
    #[error("{0} is on a file system mounted nodev, where the jail's device nodes would not work; choose another --chroot-base-dir")]
    NoDev(PathBuf),
    /// Another `kiln jail` with the same id holds the jail directory's lock.
    #[error("jail {0} is in use by another `kiln jail` with the same --id")]
    InUse(PathBuf),
    /// A leftover root is not a root-owned directory, or holds a name this jail would make.
    #[error("{path} is left from an earlier jail; remove {jail} and try again")]
    Leftover {
        /// The leftover file (or the root itself).
        path: PathBuf,
        /// The jail directory to remove.
        jail: PathBuf,
    },
    /// The exec file is not a 64-bit little-endian ELF executable.
    #[error("--exec-file {0}: not a 64-bit little-endian ELF executable")]
    NotElf(PathBuf),
    /// `ldd` could not list the exec file's libraries.
    #[error(
        "finding the libraries of {exec} with ldd: {reason} (a statically linked kiln needs none)"
    )]
    Ldd {
        /// The exec file.
        exec: PathBuf,
        /// Why.
        reason: String,
    },
    /// Mounts remain under the jail directory, so it is not removed.
    #[error("mounts remain under {0}; leaving it in place (see /proc/self/mountinfo)")]
    MountsLeft(PathBuf),
    /// A file system operation in the jail directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "creating".
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailDirError {
    let path = path.to_path_buf();
    move |source| JailDirError::Io { what, path, source }
}

fn nix_error(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> JailDirError {
    let io = io_error(what, path);
    move |e| io(e.into())
}

/// The jail directory, locked (`flock`) for as long as this value lives.
#[derive(Debug)]
pub struct JailDir {
    /// `<base>/<exec-file-name>/<id>`.
    pub dir: PathBuf,
    /// `<dir>/root`.
    pub root: PathBuf,
    /// `<root>/<exec-file-name>.pid`.
    pub pid_file: PathBuf,
    _lock: Flock<File>,
}

impl JailDir {
    /// Makes the jail directory and fills its root. An id whose directory is locked by a live
    /// jail, or holds what an earlier jail left, is refused; on any later failure the directory
    /// is removed again.
    pub fn prepare(config: &JailConfig) -> Result<Self, JailDirError> {
        let parent = config.chroot_base.join(&config.exec_name);
        std::fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        let flags = statvfs(&parent).map_err(nix_error("statvfs", &parent))?;
        if flags.flags().contains(FsFlags::ST_NODEV) {
            return Err(JailDirError::NoDev(parent));
        }
        let dir = config.jail_dir();
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                return Err(io_error("creating", &dir)(e))
            }
            _ => {}
        }
        let handle = File::open(&dir).map_err(io_error("opening", &dir))?;
        let lock = Flock::lock(handle, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JailDirError::InUse(dir.clone()))?;
        let root = dir.join("root");
        let jail = Self {
            pid_file: root.join(format!("{}.pid", config.exec_name)),
            dir,
            root,
            _lock: lock,
        };
        check_existing_root(&jail.root, config).map_err(|path| JailDirError::Leftover {
            path,
            jail: jail.dir.clone(),
        })?;
        if let Err(e) = jail.fill(config) {
            let _ = jail.remove();
            return Err(e);
        }
        Ok(jail)
    }

    fn fill(&self, config: &JailConfig) -> Result<(), JailDirError> {
        let (uid, gid) = (Uid::from_raw(config.uid), Gid::from_raw(config.gid));
        let root = &self.root;
        // Root-owned while it is filled; the VMM's uid gets `/` and `/run` last (below).
        make_dir(root, 0o700)?;
        make_dir(&root.join("run"), 0o700)?;
        let exec = root.join(&config.exec_name);
        install_copy(&config.exec_file, &exec, 0o755)?;
        // The copy, not the source: what is read is what the jail runs, whatever happens to
        // the source path meanwhile.
        if let Some(interpreter) = elf_interpreter(&exec)? {
            let mut libs = vec![interpreter.clone()];
            for lib in ldd(&exec)? {
                if !libs.contains(&lib) {
                    libs.push(lib);
                }
            }
            for lib in libs {
                let mode = if lib == interpreter { 0o555 } else { 0o444 };
                let dest = inside(root, &lib);
                if let Some(dir) = dest.parent() {
                    std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
                }
                install_copy(&lib, &dest, mode)?;
            }
        }
        make_dir(&root.join("dev/net"), 0o755)?;
        for (path, major, minor) in DEVICES {
            let node = root.join(path);
            mknod(
                &node,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                makedev(major, minor),
            )
            .map_err(nix_error("mknod", &node))?;
            chown(&node, Some(uid), Some(gid)).map_err(nix_error("chown", &node))?;
        }
        if Path::new("/").join(PVM_MODULE).is_dir() {
            make_dir(&root.join(PVM_MODULE), 0o555)?;
        }
        for file in &config.files {
            let placeholder = root.join(&file.name);
            if file.is_dir {
                make_dir(&placeholder, 0o700)?;
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&placeholder)
                    .map_err(io_error("creating", &placeholder))?;
            }
        }
        // The VMM's own directories: it creates its API socket in / or /run.
        for dir in [root.clone(), root.join("run")] {
            chown(&dir, Some(uid), Some(gid)).map_err(nix_error("chown", &dir))?;
        }
        Ok(())
    }

    /// Writes the VMM's pid (as the host sees it) to `<root>/<exec-file-name>.pid`.
    pub fn write_pid(&self, pid: i32) -> Result<(), JailDirError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&self.pid_file)
            .map_err(io_error("creating", &self.pid_file))?;
        file.write_all(pid.to_string().as_bytes())
            .map_err(io_error("writing", &self.pid_file))
    }

    /// Removes the whole jail directory, unless something is still mounted under it (the
    /// jail's mounts live in the VMM's mount namespace and end with it).
    pub fn remove(&self) -> Result<(), JailDirError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_error("reading", Path::new("/proc/self/mountinfo")))?;
        if mounts_under(&mountinfo, &self.dir) {
            return Err(JailDirError::MountsLeft(self.dir.clone()));
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_error("removing", &self.dir)(e)),
            _ => Ok(()),
        }
    }
}

/// A `root` may exist before the jail starts, with images hard-linked or copied in (as with
/// Firecracker's jailer), but only as root made it: a root-owned directory holding none of the
/// names the jail fills in. Anything else is what an earlier jail left (a killed supervisor, a
/// mount that outlived it): its VMM's uid owned the root and could have planted a link there
/// that filling it as root would follow. Returns the offending path.
fn check_existing_root(root: &Path, config: &JailConfig) -> Result<(), PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = root.symlink_metadata() else {
        return Ok(());
    };
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(root.to_path_buf());
    }
    let ours = super::args::names_the_jail_makes(&config.exec_name);
    for name in ours.iter().chain(config.files.iter().map(|f| &f.name)) {
        let path = root.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(path);
        }
    }
    Ok(())
}

/// `path` (absolute, on the host) at the same place under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), JailDirError> {
    std::fs::create_dir_all(path).map_err(io_error("creating", path))?;
    std::fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io_error("chmod", path))
}

/// Copies `from` (following symlinks) to `to`, root-owned with `mode`. `from` must be a regular
/// file when it is opened, not only when the arguments were checked: a FIFO or device swapped in
/// meanwhile is refused at once instead of blocking the jail (whose stop signals are masked) or
/// being read without end.
fn install_copy(from: &Path, to: &Path, mode: u32) -> Result<(), JailDirError> {
    let copy_error = |source| JailDirError::Io {
        what: "copying into the jail",
        path: from.to_path_buf(),
        source,
    };
    let mut source = devices::host_file::open(from, false, Accept::RegularFile)
        .map_err(|e| copy_error(e.into()))?;
    let mut dest = File::create(to).map_err(io_error("creating", to))?;
    std::io::copy(&mut source, &mut dest).map_err(copy_error)?;
    std::fs::set_permissions(to, Permissions::from_mode(mode)).map_err(io_error("chmod", to))
}

/// Whether any mount point in a mountinfo text is `dir` or below it.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(&super::cgroup::unescape(mount_point)).starts_with(dir))
}

/// The ELF program interpreter (`PT_INTERP`) of `path`: `None` for a static executable.
pub fn elf_interpreter(path: &Path) -> Result<Option<PathBuf>, JailDirError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_error("reading", path))?;
    parse_interpreter(&bytes).ok_or_else(|| JailDirError::NotElf(path.to_path_buf()))
}

/// `PT_INTERP` of a 64-bit little-endian ELF image; `None` if the image is not one.
fn parse_interpreter(elf: &[u8]) -> Option<Option<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = u64_at(0x20)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let offset = u64_at(ph + 8)?;
        let size = u64_at(ph + 32)?;
        let raw = elf.get(offset..offset.checked_add(size)?)?;
        let name = raw.split(|b| *b == 0).next()?;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(name));
        return path.is_absolute().then_some(Some(path));
    }
    Some(None)
}

/// The libraries `ldd` resolves for `exec` (absolute paths; the vDSO has none).
fn ldd(exec: &Path) -> Result<Vec<PathBuf>, JailDirError> {
    let fail = |reason: String| JailDirError::Ldd {
        exec: exec.to_path_buf(),
        reason,
    };
    let out = Command::new("ldd")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(|e| fail(format!("running ldd: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "ldd {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout)).map_err(fail)
}

/// The absolute library paths in `ldd`'s output; an unresolved library is an error.
pub fn parse_ldd(out: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                target.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_copy_takes_regular_files_only_and_never_blocks() {
        let dir = std::env::temp_dir().join(format!("kiln-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let from = dir.join("kiln");
        std::fs::write(&from, b"\x7fELF binary").unwrap();
        let to = dir.join("copy");
        install_copy(&from, &to, 0o555).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"\x7fELF binary");
        assert_eq!(std::fs::metadata(&to).unwrap().mode() & 0o777, 0o555);
        // A FIFO nobody writes (as if swapped in after the arguments were checked): refused at
        // once, not waited on.
        let fifo = dir.join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let start = std::time::Instant::now();
        let err = install_copy(&fifo, &dir.join("fifo-copy"), 0o555).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(err.to_string().contains("named pipe"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd8a1f5000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0556de0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0556bfe000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0557437000)
";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").unwrap(),
            Vec::<PathBuf>::new()
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert_eq!(err, "libfoo.so.1 not found");
    }

    #[test]
    fn interpreters() {
        // This test binary is what cargo built, like kiln: dynamic on glibc, static on musl.
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).unwrap();
        if let Some(interp) = &interp {
            assert!(interp.is_absolute() && interp.exists(), "{interp:?}");
        }
        let tiny = crate::test_elf::tiny_elf(0x10_0000, &[0xf4]);
        assert_eq!(parse_interpreter(&tiny), Some(None));
        assert_eq!(parse_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(parse_interpreter(&tiny[..20]), None);
        // A PT_INTERP header pointing past the end of the image is not an ELF we can use.
        let mut bad = tiny.clone();
        let phoff = u64::from_le_bytes(bad[0x20..0x28].try_into().unwrap()) as usize;
        bad[phoff..phoff + 4].copy_from_slice(&3u32.to_le_bytes());
        bad[phoff + 8..phoff + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse_interpreter(&bad), None);
        assert!(matches!(
            elf_interpreter(Path::new("/etc/passwd")),
            Err(JailDirError::NotElf(_))
        ));
    }

    #[test]
    fn mount_detection() {
        let info = "27 1 254:0 / / rw - ext4 /dev/vda rw
90 27 254:0 /x /srv/jailer/kiln/vm1/root/vmlinux ro - ext4 /dev/vda rw
";
        assert!(mounts_under(info, Path::new("/srv/jailer/kiln/vm1")));
        assert!(!mounts_under(info, Path::new("/srv/jailer/kiln/vm10")));
        assert!(!mounts_under(info, Path::new("/srv/jailer/kiln/vm2")));
    }

    #[test]
    fn an_existing_root_must_be_roots_and_hold_nothing_the_jail_makes() {
        let base = std::env::temp_dir().join(format!("kiln-jail-root-{}", std::process::id()));
        let config = JailConfig {
            id: "vm1".into(),
            exec_file: PathBuf::from("/kiln"),
            exec_name: "kiln".into(),
            uid: 1,
            gid: 1,
            chroot_base: base.clone(),
            netns: None,
            daemonize: false,
            cgroups: Vec::new(),
            cgroup_version: None,
            parent_cgroup: "kiln".into(),
            file_size: None,
            no_file: 2048,
            files: Vec::new(),
            exec_args: Vec::new(),
        };
        let root = config.root_dir();
        assert_eq!(check_existing_root(&root, &config), Ok(()));
        // An image hard-linked in by root beforehand is fine.
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("vmlinux"), b"image").unwrap();
        let owner = std::fs::metadata(&root).unwrap().uid();
        if owner != 0 {
            // Not root (a developer's plain `cargo test`): only the refusal can be checked.
            assert_eq!(check_existing_root(&root, &config), Err(root.clone()));
            std::fs::remove_dir_all(&base).unwrap();
            return;
        }
        assert_eq!(check_existing_root(&root, &config), Ok(()));
        // A link where the jail puts its libraries, as a jailed VMM could leave one.
        std::os::unix::fs::symlink("/etc", root.join("lib")).unwrap();
        assert_eq!(check_existing_root(&root, &config), Err(root.join("lib")));
        std::fs::remove_file(root.join("lib")).unwrap();
        // A root the VMM's uid owned.
        chown(&root, Some(Uid::from_raw(1)), None).unwrap();
        assert_eq!(check_existing_root(&root, &config), Err(root.clone()));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn paths_inside_the_root() {
        assert_eq!(
            inside(Path::new("/j/root"), Path::new("/lib64/ld.so")),
            PathBuf::from("/j/root/lib64/ld.so")
        );
    }
}
