//! The x86 VM's in-kernel interrupt controllers and timer: PIC, IOAPIC and LAPICs
//! (`KVM_CREATE_IRQCHIP`) and the PIT, created with the VM, before any vCPU.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, VmFd};

use super::layout::KVM_TSS_ADDR;
use crate::arch::KvmCallError;
use crate::vstate::retry_interrupted;

/// What Kiln needs from KVM on x86, with the name to print when it is missing.
pub const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
];

/// Places KVM's TSS and creates the irqchip and the PIT. KVM wants the irqchip before the
/// first vCPU.
pub fn create_irqchip(fd: &VmFd) -> Result<(), KvmCallError> {
    retry_interrupted(|| fd.set_tss_address(KVM_TSS_ADDR as usize))
        .map_err(KvmCallError::on("KVM_SET_TSS_ADDR"))?;
    retry_interrupted(|| fd.create_irq_chip()).map_err(KvmCallError::on("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    retry_interrupted(|| fd.create_pit2(pit)).map_err(KvmCallError::on("KVM_CREATE_PIT2"))
}

/// Nothing is left to create once the vCPUs exist on x86 (arm64 creates its GIC here).
pub fn finish_irqchip(_fd: &VmFd, _vcpus: u8) -> Result<(), KvmCallError> {
    Ok(())
}
