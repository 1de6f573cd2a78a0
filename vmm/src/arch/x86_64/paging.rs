//! Identity-mapped boot page tables: the first GiB in 2-MiB pages, which covers everything the
//! 64-bit boot protocol requires mapped (kernel, zero page, command line, boot stack).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;

/// Writes PML4 → PDPT → PD and returns the value for CR3.
pub fn write_identity_map<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PDE_ADDR | PRESENT_WRITABLE, GuestAddress(PDPTE_ADDR))?;
    let mut pd = [0u8; 512 * 8];
    for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
        let value = ((i as u64) << 21) | PRESENT_WRITABLE | HUGE_PAGE;
        entry.copy_from_slice(&value.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_ADDR))?;
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::GuestMemoryMmap;

    /// Walks the tables the way the MMU does for a 2-MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pml4e & 1, 1);
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pdpte & 1, 1);
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81);
        (pde & !0x1f_ffff) | (va & 0x1f_ffff)
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cr3 = write_identity_map(&mem).unwrap();
        assert_eq!(cr3, PML4_ADDR);
        for va in [0u64, 0x7000, 0x100_0000, 0x3fff_ffff, 0x1234_5678] {
            assert_eq!(translate(&mem, cr3, va), va);
        }
    }

    #[test]
    fn fails_cleanly_without_room() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_identity_map(&mem).is_err());
    }
}
