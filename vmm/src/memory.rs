//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings through vm-memory, so a page costs host
//! memory only once the guest touches it.

use vm_memory::GuestAddress;

use devices::GuestMemoryMmap;

use crate::arch::layout::{self, LayoutError};

/// Errors in creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size does not fit the guest layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
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
