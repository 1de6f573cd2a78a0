//! The `Uffd` memory backend, in Firecracker's protocol, so the page servers written for
//! Firecracker serve Kiln too.
//!
//! Guest memory is anonymous and empty; Kiln registers it with a userfaultfd (missing-page
//! faults, plus remove events, which the balloon's `MADV_DONTNEED` causes) and sends the
//! userfaultfd, as `SCM_RIGHTS`, over the Unix socket the load names, with a JSON list of the
//! regions: `[{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}]`, where
//! `offset` is the region's place in the snapshot's memory file. From then on the handler fills
//! each page on its first touch (`UFFDIO_COPY` from the memory file, usually).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use devices::GuestMemoryMmap;
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::memory::{check_layout, MemoryFileError, MemoryRegionState};

/// `struct uffdio_api` (linux/userfaultfd.h).
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// The userfaultfd ioctl numbers (`_IOWR(0xAA, nr, struct)`).
mod ioctls {
    #![allow(missing_docs)]
    use super::{UffdioApi, UffdioRegister};
    use vmm_sys_util::ioctl_iowr_nr;

    const UFFDIO: u32 = 0xaa;
    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
}
use ioctls::{UFFDIO_API, UFFDIO_REGISTER};

/// One region as Firecracker describes it to its page-fault handler.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GuestRegionUffdMapping {
    /// Where the region is mapped in Kiln's address space.
    pub base_host_virt_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its offset in the snapshot's memory file.
    pub offset: u64,
    /// The page size the handler serves (4 KiB).
    pub page_size: u64,
    /// The same in KiB (Firecracker's older field, still sent).
    pub page_size_kib: u64,
}

fn io_error(path: &Path, what: &str, source: std::io::Error) -> MemoryFileError {
    MemoryFileError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    }
}

/// Creates a userfaultfd (nonblocking, close-on-exec) with the remove events the handler needs
/// to follow the balloon, if the kernel has them.
fn create_userfaultfd() -> std::io::Result<File> {
    // SAFETY: the syscall takes flags only and returns a new file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    for features in [UFFD_FEATURE_EVENT_REMOVE, 0] {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), UFFDIO_API(), &mut api) };
        if ret == 0 {
            return Ok(file);
        }
    }
    Err(std::io::Error::last_os_error())
}

/// Registers `len` bytes at `start` for missing-page faults.
fn register(uffd: &File, start: u64, len: u64) -> std::io::Result<()> {
    let mut range = UffdioRegister {
        start,
        len,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which `range` is;
    // the range is a live mapping of guest memory, which outlives the registration.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER(), &mut range) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Empty guest memory laid out as `layout`, registered with a userfaultfd that is handed, with
/// the regions' description, to the page-fault handler listening at `socket`. Returns the
/// memory and Kiln's own copy of the userfaultfd (kept while the VM lives, as Firecracker does).
pub fn restore_with_handler(
    socket: &Path,
    layout: &[MemoryRegionState],
) -> Result<(GuestMemoryMmap, File), MemoryFileError> {
    check_layout(layout)?;
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryFileError::Guest(e.to_string()))?;
    let uffd = create_userfaultfd().map_err(|e| io_error(socket, "userfaultfd", e))?;
    let mut mappings = Vec::with_capacity(layout.len());
    for (region, state) in mem.iter().zip(layout) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryFileError::Guest(e.to_string()))? as u64;
        register(&uffd, host, region.len()).map_err(|e| io_error(socket, "UFFDIO_REGISTER", e))?;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: host,
            size: region.len(),
            offset: state.file_offset,
            page_size: 4096,
            page_size_kib: 4,
        });
    }
    let body = serde_json::to_vec(&mappings).map_err(|e| MemoryFileError::Guest(e.to_string()))?;
    let stream = UnixStream::connect(socket).map_err(|e| io_error(socket, "connecting", e))?;
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|e| io_error(socket, "sending the userfaultfd", e.into()))?;
    Ok((mem, uffd))
}
