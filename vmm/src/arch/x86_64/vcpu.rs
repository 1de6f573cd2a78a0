//! An x86 vCPU's boot state (CPUID, boot MSRs, LAPIC LINT pins, registers for the entry
//! protocol) and what a fatal-exit report reads from it (RIP, the instruction bytes there).

use devices::GuestMemoryMmap;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::cpuid::{self, CpuidError};
use super::regs::{self, EntryPoint, RegsError};
use crate::arch::KvmCallError;

/// Linux maps the kernel image at this virtual address + its physical address.
const KERNEL_TEXT_BASE: u64 = 0xffff_ffff_8000_0000;
/// How many instruction bytes a fatal-exit report shows.
const INSTRUCTION_BYTES: usize = 16;
/// CR0's paging bit.
const X86_CR0_PG: u64 = 0x8000_0000;

/// Why a vCPU could not be put in its boot state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuConfigError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmCallError),
    /// Boot register set-up failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// CPUID normalization failed.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
}

/// Sets vCPU `index` (of `count`) up to enter the kernel at `entry`: CPUID, boot MSRs, LAPIC LINT
/// pins and registers. Returns the boot MSRs KVM refused (kept at their reset values).
pub fn configure_vcpu(
    kvm: &Kvm,
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    index: u8,
    count: u8,
    entry: EntryPoint,
) -> Result<Vec<u32>, VcpuConfigError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmCallError::on("KVM_GET_SUPPORTED_CPUID"))?;
    cpuid::normalize(
        &mut cpuid,
        index,
        count,
        kvm.check_extension(Cap::TscDeadlineTimer),
    )?;
    fd.set_cpuid2(&cpuid)
        .map_err(KvmCallError::on("KVM_SET_CPUID2"))?;
    let refused = regs::set_boot_msrs(fd);
    regs::setup_boot_vcpu(fd, mem, entry)?;
    regs::set_lint(fd)?;
    Ok(refused)
}

/// The guest's RIP, if KVM will say.
pub fn program_counter(fd: &VcpuFd) -> Option<u64> {
    fd.get_regs().ok().map(|r| r.rip)
}

/// Up to 16 bytes at RIP, located through KVM's translation or, failing that, the kernel's fixed
/// text mapping (paging on) or the identity of physical and linear addresses (paging off).
pub fn instruction_at_pc(fd: &VcpuFd, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
    let rip = program_counter(fd)?;
    let paging = fd
        .get_sregs()
        .map(|s| s.cr0 & X86_CR0_PG != 0)
        .unwrap_or(true);
    let translated = fd
        .translate_gva(rip)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| t.physical_address);
    let phys = translated.or(if !paging {
        Some(rip)
    } else if rip >= KERNEL_TEXT_BASE {
        Some(rip - KERNEL_TEXT_BASE)
    } else {
        None
    })?;
    let mut bytes = vec![0u8; INSTRUCTION_BYTES];
    let read = mem.read(&mut bytes, GuestAddress(phys)).ok()?;
    bytes.truncate(read);
    Some(bytes)
}
