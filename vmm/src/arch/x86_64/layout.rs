//! The guest-physical memory map of an x86_64 Kiln guest.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT                 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD      0x0002_0000  kernel command line
//! 0x0009_fc00  MP floating pointer (start of the EBDA: Linux scans here)
//! 0x000f_0000  MP configuration table (BIOS area: reserved, never RAM in the e820 map)
//! 0x0010_0000  kernel (HIMEM_START) ... initrd at the top of low RAM
//! 0xc000_0000 .. 0x1_0000_0000  MMIO gap (1 GiB, never RAM):
//!     0xc000_0000  boot timer (--boot-timer), Firecracker's address for it
//!     0xd000_0000  virtio-mmio windows, 4 KiB each
//!     0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC, 0xfffb_d000 KVM's TSS
//! 0x1_0000_0000  RAM beyond the gap, when the guest has more than 3 GiB
//! ```
//!
//! Invariant: every MMIO address Kiln gives a device is inside the gap, so it never shadows RAM
//! whatever the guest's size.

use vm_memory::GuestAddress;

/// Where the boot GDT is written.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Where the (empty) boot IDT is written.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// First level of the identity-mapped boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// Second level.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Third level: 512 2-MiB pages, identity-mapping the first GiB.
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// x86's COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The start of the EBDA; conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer structure.
pub const MPTABLE_POINTER_ADDR: u64 = EBDA_START;
/// The MP configuration table (room for 64 KiB, enough for 254 CPUs).
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// The end of the MP table area.
pub const MPTABLE_END: u64 = 0x100000;
/// Where high memory starts and the kernel is loaded.
pub const HIMEM_START: u64 = 0x100000;
/// The MMIO gap below 4 GiB: no RAM here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Firecracker's boot-timer device: the guest writes 123 here when it has booted.
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
/// The first virtio-mmio window (slot N is `N * 4 KiB` above it).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The end of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO address.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// Three pages that KVM needs for its TSS on Intel hosts; inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// First GSI free for devices: 0..=4 are taken by the timer, keyboard, cascade, COM2 and COM1.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Last GSI an IOAPIC pin serves.
pub const LAST_DEVICE_GSI: u32 = 23;

/// Errors in laying out guest RAM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Guest RAM must hold the boot structures and a kernel.
    #[error("guest memory of {0} bytes is too small: at least {min} bytes are needed", min = MIN_MEM_SIZE)]
    TooSmall(u64),
    /// The address space cannot hold this much RAM.
    #[error("guest memory of {0} bytes is too large")]
    TooLarge(u64),
}

/// Kiln refuses guests smaller than this: the kernel loads at 1 MiB and needs room above it.
pub const MIN_MEM_SIZE: u64 = 8 << 20;

/// Splits `mem_size` bytes of guest RAM around the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Result<Vec<(GuestAddress, u64)>, LayoutError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(LayoutError::TooSmall(mem_size));
    }
    // 46 bits of physical address space is what every x86_64 host KVM supports offers at least.
    if mem_size > (1u64 << 46) - MMIO_GAP_END {
        return Err(LayoutError::TooLarge(mem_size));
    }
    if mem_size <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), mem_size)]);
    }
    Ok(vec![
        (GuestAddress(0), MMIO_GAP_START),
        (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
    ])
}

/// The end of RAM below the MMIO gap (exclusive).
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(
            ram_regions(128 << 20).unwrap(),
            vec![(GuestAddress(0), 128 << 20)]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let regions = ram_regions(4 << 30).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn three_and_a_half_gib_end_below_the_boot_timer() {
        let regions = ram_regions(3584 << 20).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(1 << 32), 512 << 20)
            ]
        );
        assert_eq!(ram_regions(3 << 30).unwrap().len(), 1);
        assert_eq!(low_ram_end(3584 << 20), BOOT_TIMER_ADDR);
    }

    #[test]
    fn device_addresses_are_inside_the_gap_in_order() {
        // 19 virtio windows (one per GSI 5..=23) of 4 KiB each.
        let virtio_end =
            VIRTIO_MMIO_START + u64::from(LAST_DEVICE_GSI - FIRST_DEVICE_GSI + 1) * 0x1000;
        let order = [
            MMIO_GAP_START,
            BOOT_TIMER_ADDR,
            BOOT_TIMER_ADDR + 0x1000,
            VIRTIO_MMIO_START,
            virtio_end,
            IOAPIC_ADDR,
            APIC_ADDR,
            KVM_TSS_ADDR,
            KVM_TSS_ADDR + 3 * 0x1000,
            MMIO_GAP_END,
        ];
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:x?}");
    }

    #[test]
    fn rejects_absurd_sizes() {
        assert_eq!(ram_regions(0), Err(LayoutError::TooSmall(0)));
        assert_eq!(ram_regions(1 << 20), Err(LayoutError::TooSmall(1 << 20)));
        assert!(matches!(
            ram_regions(u64::MAX),
            Err(LayoutError::TooLarge(_))
        ));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_ADDR, 4 * 8),
            (BOOT_IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPTE_ADDR, 0x1000),
            (PDE_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_POINTER_ADDR, 16),
            (MPTABLE_ADDR, MPTABLE_END - MPTABLE_ADDR),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= HIMEM_START);
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const { assert!(BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 0x1000 && BOOT_STACK_POINTER < PML4_ADDR) };
    }
}
