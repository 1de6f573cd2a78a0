//! What an x86 guest finds when it starts: its virtio devices announced on the kernel command
//! line (`virtio_mmio.device=`), the zero page (Linux 64-bit boot protocol) or the PVH start
//! info, and the MP table that lists its vCPUs and IOAPIC.

use std::path::Path;

use devices::GuestMemoryMmap;

use super::boot_params::{self, BootParamsError, ZeroPageInputs};
use super::layout::{low_ram_end, LAST_DEVICE_GSI, VIRTIO_MMIO_START};
use super::loader::{self, LoadedKernel, LoaderError};
use super::mptable::{self, MptableError};
use super::pvh;
use super::regs::EntryPoint;
use crate::device_manager::DeviceRegistry;
use devices::virtio::mmio::MMIO_WINDOW_SIZE;

/// Errors in writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The zero page.
    #[error("writing boot structures: {0}")]
    BootParams(#[from] BootParamsError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// The PVH start info.
    #[error("writing the PVH start info: {0}")]
    Pvh(#[source] vm_memory::GuestMemoryError),
}

/// The command line parameter that tells the guest's virtio-mmio driver about `slot`.
fn slot_param(base: u64, gsi: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{base:#x}:{gsi}",
        MMIO_WINDOW_SIZE >> 10
    )
}

/// The kernel command line parameters that announce every virtio device of `registry`, in slot
/// order.
pub fn announce_devices(registry: &DeviceRegistry) -> Vec<String> {
    registry
        .virtio_devices()
        .iter()
        .map(|d| slot_param(d.slot.base, d.slot.gsi))
        .collect()
}

/// Room to keep on the command line for announcing `count` devices before they exist: the
/// longest announcement (the last slot's; every window address has eight hex digits) `count`
/// times.
pub fn announcement_room(count: usize) -> Vec<String> {
    vec![slot_param(VIRTIO_MMIO_START, LAST_DEVICE_GSI); count]
}

/// Picks the entry protocol: PVH when the kernel has it and the host allows it, else 64-bit
/// Linux.
pub fn choose_entry(kernel: &LoadedKernel, allows_pvh: bool) -> EntryPoint {
    match kernel.pvh_entry {
        Some(pvh) if allows_pvh => EntryPoint::Pvh(pvh),
        _ => EntryPoint::Linux64(kernel.linux64_entry),
    }
}

/// Loads the initrd at the top of low memory, above the kernel, as bootloaders do; returns its
/// guest address and size.
pub fn place_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), LoaderError> {
    loader::load_initrd(mem, path, low_ram_end(mem_size), kernel.end)
}

/// Writes the boot structures for `entry`: the zero page or the PVH start info (pointing at the
/// command line already in memory and the initrd), then the MP table for `vcpus`.
#[allow(clippy::too_many_arguments)]
pub fn configure_system(
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    kernel: &LoadedKernel,
    cmdline: (u64, usize),
    initrd: Option<(u64, u64)>,
    mem_size: u64,
    vcpus: u8,
) -> Result<(), BootError> {
    let (cmdline_addr, cmdline_len) = cmdline;
    match entry {
        EntryPoint::Linux64(_) => {
            let params = boot_params::build_zero_page(&ZeroPageInputs {
                setup_header: kernel.setup_header,
                cmdline_addr,
                cmdline_len,
                initrd,
                mem_size,
            })?;
            boot_params::write_zero_page(mem, &params)?;
        }
        EntryPoint::Pvh(_) => {
            pvh::write_start_info(mem, cmdline_addr, initrd, mem_size).map_err(BootError::Pvh)?;
        }
    }
    mptable::write_mptable(mem, vcpus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_manager::VirtioSlot;

    fn kernel(pvh: Option<u64>) -> LoadedKernel {
        LoadedKernel {
            linux64_entry: 0x100_0000,
            pvh_entry: pvh,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn entry_choice() {
        assert_eq!(
            choose_entry(&kernel(None), true),
            EntryPoint::Linux64(0x100_0000)
        );
        assert_eq!(
            choose_entry(&kernel(Some(0x100_0400)), true),
            EntryPoint::Pvh(0x100_0400)
        );
        assert_eq!(
            choose_entry(&kernel(Some(0x100_0400)), false),
            EntryPoint::Linux64(0x100_0000)
        );
    }

    #[test]
    fn the_room_kept_for_an_announcement_fits_every_slot() {
        let longest = announcement_room(1).remove(0);
        assert_eq!(longest, "virtio_mmio.device=4K@0xd0000000:23");
        let first = VirtioSlot::nth(0).unwrap();
        assert_eq!(
            slot_param(first.base, first.gsi),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        for slot in (0..).map_while(VirtioSlot::nth) {
            assert!(
                slot_param(slot.base, slot.gsi).len() <= longest.len(),
                "{slot:?}"
            );
        }
    }
}
