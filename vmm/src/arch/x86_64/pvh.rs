//! The PVH boot protocol's `hvm_start_info`, memory map and module list.
//!
//! Serialized field by field (little endian, the layout of Xen's `arch-x86/hvm/start_info.h`), so
//! no packed struct or `unsafe` is needed.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::boot_params::e820_map;
use super::regs::PVH_INFO_ADDR;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The module list (the initrd) follows the 56-byte start info.
pub const PVH_MODLIST_ADDR: u64 = PVH_INFO_ADDR + 0x40;
/// The memory map follows the module list.
pub const PVH_MEMMAP_ADDR: u64 = PVH_MODLIST_ADDR + 0x40;

/// Writes the start info for a guest with `mem_size` bytes of RAM, the command line at
/// `cmdline_addr` and an optional initrd `(addr, size)`.
pub fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    let map = e820_map(mem_size);
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for entry in &map {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&entry.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes());
    info.extend_from_slice(&PVH_MODLIST_ADDR.to_le_bytes());
    info.extend_from_slice(&cmdline_addr.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // no ACPI RSDP
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());

    if let Some((addr, size)) = initrd {
        let mut module = Vec::with_capacity(32);
        for field in [addr, size, 0, 0] {
            module.extend_from_slice(&field.to_le_bytes());
        }
        mem.write_slice(&module, GuestAddress(PVH_MODLIST_ADDR))?;
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_ADDR))?;
    mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ZERO_PAGE_ADDR;
    use devices::GuestMemoryMmap;

    #[test]
    fn start_info_points_at_its_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_start_info(&mem, 0x20000, Some((0x80_0000, 0x1000)), 128 << 20).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let nr_modules: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let cmdline: u64 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 24)).unwrap();
        assert_eq!(cmdline, 0x20000);
        let memmap_entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 48)).unwrap();
        assert_eq!(memmap_entries as usize, e820_map(128 << 20).len());
        let initrd: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(initrd, 0x80_0000);
        let last_map_byte = PVH_MEMMAP_ADDR + 24 * memmap_entries as u64;
        assert!(
            last_map_byte <= ZERO_PAGE_ADDR,
            "stays clear of the zero page"
        );
    }
}
