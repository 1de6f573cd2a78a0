//! The KVM VM: capability checks, guest memory slots, and the architecture's in-kernel interrupt
//! controller ([`crate::arch::create_irqchip`]).

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::retry_interrupted;
use crate::arch::{self, KvmCallError};

impl From<KvmCallError> for VmError {
    fn from(e: KvmCallError) -> Self {
        VmError::Kvm {
            what: e.what,
            source: e.source,
        }
    }
}

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
    /// KVM logs the guest's writes to memory (for Diff snapshots).
    tracks_dirty_pages: bool,
}

impl Vm {
    /// Creates the VM after checking the host's capabilities. Its memory comes next
    /// ([`Self::register_memory`]), then its interrupt controller ([`Self::create_irqchip`]).
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        for (cap, name) in arch::REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = retry_interrupted(|| kvm.create_vm()).map_err(|source| VmError::Kvm {
            what: "KVM_CREATE_VM",
            source,
        })?;
        Ok(Self {
            fd,
            tracks_dirty_pages: false,
        })
    }

    /// Creates what of the interrupt controller must exist before any vCPU (all of it on x86).
    /// Call after [`Self::register_memory`]: on a nested PVM host, a memory slot added once the
    /// irqchip exists costs KVM about 7 ms (seen for 128 MiB: 0.3 ms the other way round),
    /// which a boot and a snapshot load would both wait for.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        Ok(arch::create_irqchip(&self.fd)?)
    }

    /// Finishes the interrupt controller once the `vcpus` vCPUs exist (arm64's GIC).
    pub fn finish_irqchip(&self, vcpus: u8) -> Result<(), VmError> {
        Ok(arch::finish_irqchip(&self.fd, vcpus)?)
    }

    /// Registers every region of `mem` as a KVM memory slot, with KVM logging the guest's
    /// writes when `track_dirty_pages` (Diff snapshots read the log).
    ///
    /// The caller keeps `mem` alive for as long as the VM runs (the builder stores both in the
    /// same `MicroVm`).
    pub fn register_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        self.tracks_dirty_pages = track_dirty_pages;
        let flags = if track_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::Unmapped(region.start_addr().0))?;
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
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

    /// True when KVM logs the guest's writes to memory.
    pub fn tracks_dirty_pages(&self) -> bool {
        self.tracks_dirty_pages
    }

    /// The pages the guest wrote since the last call (or since the slots were registered), one
    /// bitmap per region of `mem` (bit N of word N / 64: page N); KVM clears its log as it
    /// answers. Only with dirty-page tracking on.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|source| VmError::Kvm {
                        what: "KVM_GET_DIRTY_LOG",
                        source,
                    })
            })
            .collect()
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
