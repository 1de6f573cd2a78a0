//! Boot-time vCPU state for the two x86_64 entry protocols Kiln supports:
//!
//! - **Linux 64-bit boot protocol**: long mode, paging on with the identity map, flat segments,
//!   `rsi` = zero page. Used for bzImage and for ELF vmlinux without a PVH note.
//! - **PVH**: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`. Used for ELF vmlinux
//!   carrying the Xen PVH note when the host allows it.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{self, BOOT_GDT, CODE_INDEX, DATA_INDEX, PVH_GDT, TSS_INDEX};
use super::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, ZERO_PAGE_ADDR};
use super::paging;

/// Where the PVH `hvm_start_info` is written.
pub const PVH_INFO_ADDR: u64 = 0x6000;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// The Linux 64-bit boot protocol at this address.
    Linux64(u64),
    /// The PVH entry at this address.
    Pvh(u64),
}

/// Errors in setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl that failed, e.g. `KVM_SET_SREGS`.
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot tables into guest memory failed.
    #[error("writing boot tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// General-purpose registers at the entry point.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_ADDR,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_ADDR,
            ..Default::default()
        },
    }
}

/// Writes the GDT, IDT and (for long mode) page tables, and returns the special registers that
/// go with them, starting from the vCPU's current `sregs`.
pub fn boot_sregs<M: GuestMemoryBackend>(
    mem: &M,
    entry: EntryPoint,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let table = match entry {
        EntryPoint::Linux64(_) => &BOOT_GDT,
        EntryPoint::Pvh(_) => &PVH_GDT,
    };
    for (i, descriptor) in table.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(BOOT_GDT_ADDR + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))?;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = gdt::kvm_segment(table, CODE_INDEX);
    let data = gdt::kvm_segment(table, DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::kvm_segment(table, TSS_INDEX);

    match entry {
        EntryPoint::Linux64(_) => {
            sregs.cr3 = paging::write_identity_map(mem)?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// The x87/SSE state Linux expects: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs cleared or set at boot: the SYSENTER/SYSCALL MSRs zeroed, TSC 0, fast strings on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs one at a time and returns the ones KVM refused. Hosts differ in what they
/// accept (nested PVM refuses some that hardware KVM takes); a refused boot MSR keeps its reset
/// value, which for all of these is what Linux expects anyway.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Vec<u32> {
    boot_msrs()
        .into_iter()
        .filter(|entry| {
            let accepted = Msrs::from_entries(&[*entry])
                .ok()
                .and_then(|msrs| vcpu.set_msrs(&msrs).ok())
                == Some(1);
            !accepted
        })
        .map(|entry| entry.index)
        .collect()
}

/// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI (virtual-wire mode), which the MP
/// table announces.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Puts `vcpu` in the boot state for `entry`.
pub fn setup_boot_vcpu<M: GuestMemoryBackend>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(mem, entry, sregs)?)
        .map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_state() {
        let mem = mem();
        let sregs =
            boot_sregs(&mem, EntryPoint::Linux64(0x100_0000), kvm_sregs::default()).unwrap();
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.gdt.limit, 31);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_ADDR + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
        let regs = boot_regs(EntryPoint::Linux64(0x100_0000));
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_POINTER, 2)
        );
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let mem = mem();
        let start = kvm_sregs {
            cr0: X86_CR0_PG | X86_CR0_PE,
            efer: EFER_LME,
            ..Default::default()
        };
        let sregs = boot_sregs(&mem, EntryPoint::Pvh(0x100_0400), start).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        let regs = boot_regs(EntryPoint::Pvh(0x100_0400));
        assert_eq!((regs.rip, regs.rbx), (0x100_0400, PVH_INFO_ADDR));
    }

    #[test]
    fn boot_msrs_enable_fast_strings() {
        let msrs = boot_msrs();
        assert!(msrs.iter().any(|m| m.index == 0x1a0 && m.data == 1));
        assert!(msrs
            .iter()
            .filter(|m| m.index != 0x1a0)
            .all(|m| m.data == 0));
    }
}
