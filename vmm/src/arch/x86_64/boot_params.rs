//! The Linux zero page (`struct boot_params`) and its e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_ADDR};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

/// Errors in building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The e820 map does not fit in `boot_params`.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    /// An address does not fit the 32-bit field the boot protocol gives it.
    #[error("{what} at {addr:#x} is beyond the 4 GiB the boot protocol can address")]
    AddressTooHigh {
        /// What the value is, e.g. "the command line" or "the initrd's size".
        what: &'static str,
        /// The address (or size) that does not fit in 32 bits.
        addr: u64,
    },
    /// Writing the zero page into guest memory failed.
    #[error("writing the zero page: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM: conventional memory up to the EBDA, the MP table area
/// reserved, then RAM from 1 MiB up to the MMIO gap, and the rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Where the kernel finds its command line and initrd.
#[derive(Clone, Copy, Debug)]
pub struct ZeroPageInputs {
    /// The bzImage's own setup header, or `None` for an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Its length without the NUL.
    pub cmdline_len: usize,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest RAM in bytes.
    pub mem_size: u64,
}

fn low32(what: &'static str, addr: u64) -> Result<u32, BootParamsError> {
    u32::try_from(addr).map_err(|_| BootParamsError::AddressTooHigh { what, addr })
}

/// Builds the zero page.
pub fn build_zero_page(inputs: &ZeroPageInputs) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = inputs.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = low32("the command line", inputs.cmdline_addr)?;
    params.hdr.cmdline_size = inputs.cmdline_len as u32;
    if let Some((addr, size)) = inputs.initrd {
        params.hdr.ramdisk_image = low32("the initrd", addr)?;
        params.hdr.ramdisk_size = low32("the initrd's size", size)?;
    }
    let map = e820_map(inputs.mem_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::GuestMemoryMmap;
    use vm_memory::Bytes;

    #[test]
    fn e820_of_a_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 1 << 20,
                size: (128 << 20) - (1 << 20),
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_of_a_large_guest_skips_the_gap() {
        let map = e820_map(8 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, 1 << 32);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Only the 384 KiB between the EBDA and 1 MiB is withheld.
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }

    #[test]
    fn zero_page_fields() {
        let params = build_zero_page(&ZeroPageInputs {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x20_0000)),
            mem_size: 128 << 20,
        })
        .unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x20_0000);
        assert_eq!(params.e820_entries, 3);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_zero_page(&mem, &params).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x202)).unwrap();
        assert_eq!(magic, 0x5372_6448);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
    }

    #[test]
    fn keeps_the_bzimage_header() {
        let hdr = setup_header {
            version: 0x20f,
            loadflags: 1,
            ..Default::default()
        };
        let params = build_zero_page(&ZeroPageInputs {
            setup_header: Some(hdr),
            cmdline_addr: 0x20000,
            cmdline_len: 1,
            initrd: None,
            mem_size: 64 << 20,
        })
        .unwrap();
        assert_eq!({ params.hdr.version }, 0x20f);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn rejects_addresses_above_4g() {
        let err = build_zero_page(&ZeroPageInputs {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 1,
            initrd: Some((1 << 33, 10)),
            mem_size: 64 << 20,
        })
        .unwrap_err();
        assert!(matches!(err, BootParamsError::AddressTooHigh { .. }));
    }
}
