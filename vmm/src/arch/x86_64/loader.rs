//! Puts the kernel, initrd and command line into guest memory.
//!
//! Kernel images are recognized by their magic (ELF `vmlinux` or bzImage) and loaded through
//! linux-loader; anything else is refused with the first bytes of the file in the message, so a
//! person can tell what they passed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};

/// Errors in loading boot images. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file could not be opened or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which image: "kernel image" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("kernel image {path}: not an ELF or bzImage (first bytes {first_bytes})")]
    UnknownFormat {
        /// The kernel image.
        path: PathBuf,
        /// Its first bytes in hex, or a note that it is empty.
        first_bytes: String,
    },
    /// linux-loader refused the image.
    #[error("kernel image {path}: {source}")]
    Kernel {
        /// The kernel image.
        path: PathBuf,
        /// Why linux-loader refused it.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path}: {size} bytes do not fit in guest memory ({room} bytes free above the kernel); give the guest more memory")]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size, in bytes.
        size: u64,
        /// Bytes free between the end of the kernel and the end of low memory.
        room: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("initrd {path}: copying into guest memory: {source}")]
    InitrdCopy {
        /// The initrd.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is not acceptable to the kernel.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("kernel command line: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
}

/// What the rest of the boot needs to know about a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point of the Linux 64-bit boot protocol.
    pub linux64_entry: u64,
    /// PVH entry point, if the ELF image carries the note.
    pub pvh_entry: Option<u64>,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header (None for ELF).
    pub setup_header: Option<setup_header>,
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// True when `header` starts like a bzImage: "HdrS" at offset 0x202.
fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    let is = file.read_exact(&mut magic).is_ok() && &magic == b"HdrS";
    file.seek(SeekFrom::Start(0))?;
    Ok(is)
}

/// Opens a boot image without blocking (a FIFO would hang the build, a character device would
/// never end its copy): regular files only.
fn open_regular(path: &Path) -> std::io::Result<File> {
    Ok(devices::host_file::open(
        path,
        false,
        devices::host_file::Accept::RegularFile,
    )?)
}

/// Loads the kernel image at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = open_regular(path).map_err(io_error("kernel image", path))?;
    let mut head = [0u8; 8];
    let got = file
        .read(&mut head)
        .map_err(io_error("kernel image", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_error("kernel image", path))?;
    let kernel_error = |source| LoaderError::Kernel {
        path: path.to_path_buf(),
        source,
    };
    if got >= 4 && &head[..4] == b"\x7fELF" {
        let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_error)?;
        let pvh_entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
            _ => None,
        };
        return Ok(LoadedKernel {
            linux64_entry: result.kernel_load.0,
            pvh_entry,
            end: result.kernel_end,
            setup_header: None,
        });
    }
    if is_bzimage(&mut file).map_err(io_error("kernel image", path))? {
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_error)?;
        // The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
        return Ok(LoadedKernel {
            linux64_entry: result.kernel_load.0 + 0x200,
            pvh_entry: None,
            end: result.kernel_end,
            setup_header: result.setup_header,
        });
    }
    let first_bytes = head[..got]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    Err(LoaderError::UnknownFormat {
        path: path.to_path_buf(),
        first_bytes: if first_bytes.is_empty() {
            "none: the file is empty".into()
        } else {
            first_bytes
        },
    })
}

/// Loads the initrd at the top of low memory (page aligned, above `kernel_end`), as bootloaders do,
/// and returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_ram_end: u64,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    const PAGE: u64 = 4096;
    let mut file = open_regular(path).map_err(io_error("initrd", path))?;
    let size = file.metadata().map_err(io_error("initrd", path))?.len();
    let lowest = kernel_end.next_multiple_of(PAGE);
    let room = low_ram_end.saturating_sub(lowest);
    if size > room {
        return Err(LoaderError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            room,
        });
    }
    let addr = (low_ram_end - size) & !(PAGE - 1);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| LoaderError::InitrdCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((addr, size))
}

/// Builds a kernel command line from space-separated parts, checking the x86 size limit.
pub fn build_cmdline<'a>(parts: impl IntoIterator<Item = &'a str>) -> Result<Cmdline, LoaderError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    for part in parts {
        let part = part.trim();
        if !part.is_empty() {
            cmdline.insert_str(part).map_err(LoaderError::Cmdline)?;
        }
    }
    Ok(cmdline)
}

/// Writes `cmdline` at [`CMDLINE_ADDR`] and returns its address and length (without the NUL).
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(u64, usize), LoaderError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(LoaderError::CmdlineLoad)?;
    let len = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes()
        .len();
    Ok((CMDLINE_ADDR, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_elf::tiny_elf;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        crate::memory::create_guest_memory(32 << 20).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn loads_an_elf_kernel() {
        let mem = mem();
        let path = temp_file("ok.elf", &tiny_elf(0x20_0000, &[0xf4, 0xf4]));
        let kernel = load_kernel(&mem, &path).unwrap();
        assert_eq!(kernel.linux64_entry, 0x20_0000);
        assert_eq!(kernel.end, 0x20_0002);
        assert!(kernel.pvh_entry.is_none() && kernel.setup_header.is_none());
        let byte: u8 = mem.read_obj(GuestAddress(0x20_0001)).unwrap();
        assert_eq!(byte, 0xf4);
    }

    #[test]
    fn garbage_kernels_are_named_with_their_first_bytes() {
        let mem = mem();
        let err = load_kernel(&mem, &temp_file("garbage", b"GARBAGE!GARBAGE")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel image {}: not an ELF or bzImage (first bytes 47 41 52 42 41 47 45 21)",
                std::env::temp_dir()
                    .join(format!("kiln-loader-{}", std::process::id()))
                    .join("garbage")
                    .display()
            )
        );
        let err = load_kernel(&mem, &temp_file("empty", b"")).unwrap_err();
        assert!(err.to_string().contains("the file is empty"), "{err}");
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kernel image /nonexistent/vmlinux: "),
            "{err}"
        );
    }

    #[test]
    fn truncated_or_misplaced_elf_is_refused() {
        let mem = mem();
        let elf = tiny_elf(0x20_0000, &[0x90; 64]);
        let err = load_kernel(&mem, &temp_file("short.elf", &elf[..0x60])).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { .. }), "{err}");
        // Entry below 1 MiB would overwrite the boot structures.
        let err = load_kernel(&mem, &temp_file("low.elf", &tiny_elf(0x1000, &[0xf4]))).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { .. }), "{err}");
        // A segment beyond guest memory.
        let err = load_kernel(
            &mem,
            &temp_file("high.elf", &tiny_elf(0x1000_0000, &[0xf4])),
        )
        .unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { .. }), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = mem();
        let path = temp_file("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &path, 32 << 20, 0x20_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 32 << 20);
        let byte: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(byte, 7);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = mem();
        let path = temp_file("big-initrd", &vec![0u8; 1 << 20]);
        let err = load_initrd(&mem, &path, 32 << 20, (32 << 20) - 4096).unwrap_err();
        assert!(
            matches!(err, LoaderError::InitrdTooLarge { size: 1048576, .. }),
            "{err}"
        );
    }

    #[test]
    fn cmdline_limits() {
        let cmdline = build_cmdline(["console=ttyS0", "  ", "reboot=k panic=1"]).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k panic=1"
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(build_cmdline([long.as_str()]).is_err());
        let mem = mem();
        let (addr, len) = load_cmdline(&mem, &cmdline).unwrap();
        let mut buf = vec![0u8; len + 1];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(&buf[..len], b"console=ttyS0 reboot=k panic=1");
        assert_eq!(buf[len], 0);
    }
}
