//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings through vm-memory, so a page costs host
//! memory only once the guest touches it. A VM with a vhost-user device has its RAM in one
//! memfd instead, mapped shared, so the backend process can map the same pages (a page still
//! costs memory only once touched).

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::FileOffset;

use vm_memory::GuestAddress;

use devices::GuestMemoryMmap;

use crate::arch::layout::{self, LayoutError};

/// Errors in creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size does not fit the guest layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The memfd could not be created or sized.
    #[error("creating {size} bytes of shared guest memory: {source}")]
    Memfd {
        /// The guest memory size asked for, in bytes.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host refused the mapping.
    #[error("mapping {size} bytes of guest memory: {source}")]
    Mmap {
        /// The guest memory size asked for, in bytes.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Creates `mem_size` bytes of guest RAM laid out around the MMIO gap.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)?
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Mmap {
        size: mem_size,
        source,
    })
}

/// Creates `mem_size` bytes of guest RAM as [`create_guest_memory`] does, but in one memfd mapped
/// shared (each region at its own offset), for vhost-user backends to map.
pub fn create_shared_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = layout::ram_regions(mem_size)?;
    let memfd_error = |source| MemoryError::Memfd {
        size: mem_size,
        source,
    };
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"kiln-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_error(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor this function alone owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size).map_err(memfd_error)?;
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(regions.len());
    for (addr, len) in regions {
        let clone = file.try_clone().map_err(memfd_error)?;
        ranges.push((addr, len as usize, Some(FileOffset::new(clone, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| MemoryError::Mmap {
        size: mem_size,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_addressable_on_both_sides_of_the_gap() {
        let mem = create_guest_memory(4 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xabu8, GuestAddress((1 << 32) + 10)).unwrap();
        assert!(mem
            .write_obj(0u8, GuestAddress(layout::MMIO_GAP_START))
            .is_err());
    }

    #[test]
    fn rejects_tiny_memory() {
        assert!(matches!(
            create_guest_memory(4096),
            Err(MemoryError::Layout(LayoutError::TooSmall(4096)))
        ));
    }
}
