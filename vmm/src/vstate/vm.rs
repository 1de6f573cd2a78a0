//! The KVM VM: capability checks, guest memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs)
//! and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::retry_interrupted;
use crate::arch::x86_64::layout::KVM_TSS_ADDR;

/// Errors in creating and configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM lacks something Kiln relies on.
    #[error("the host's KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl that failed, e.g. `KVM_CREATE_VM`.
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A guest memory region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    Unmapped(u64),
}

/// What Kiln needs from KVM, with the name to print when it is missing.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
];

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// The most vCPUs this host's KVM allows in one VM.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

/// A VM with its in-kernel interrupt controllers and timer.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM: checks capabilities, places KVM's TSS, creates the irqchip and the PIT.
    /// Must run before any vCPU is created (KVM requires the irqchip first).
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = retry_interrupted(|| kvm.create_vm()).map_err(kvm_err("KVM_CREATE_VM"))?;
        retry_interrupted(|| fd.set_tss_address(KVM_TSS_ADDR as usize))
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        retry_interrupted(|| fd.create_irq_chip()).map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        retry_interrupted(|| fd.create_pit2(pit)).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Self { fd })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    ///
    /// The caller keeps `mem` alive for as long as the VM runs (the builder stores both in the
    /// same `MicroVm`).
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::Unmapped(region.start_addr().0))?;
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host .. host + len` is a live mapping owned by `mem`, which the caller
            // keeps alive as long as the VM exists; slots are distinct and regions do not overlap.
            retry_interrupted(|| unsafe { self.fd.set_user_memory_region(memory_region) })
                .map_err(|source| VmError::Kvm {
                    what: "KVM_SET_USER_MEMORY_REGION",
                    source,
                })?;
        }
        Ok(())
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
