//! The architecture layer: what the builder and the KVM glue need that differs between
//! architectures, under one set of names. The rest of the VMM names only these, never an
//! architecture's own concepts (ports, zero pages, MP tables, GICs).
//!
//! An architecture module provides:
//! - `layout`: where RAM, the virtio-mmio windows, the boot timer and the interrupt lines are
//!   (`ram_regions`, `VIRTIO_MMIO_START`, `FIRST_DEVICE_GSI`, `LAST_DEVICE_GSI`,
//!   `BOOT_TIMER_ADDR`, `MIN_MEM_SIZE`), and `MAX_VCPUS`;
//! - the kernel loader: `load_kernel`, `place_initrd`, `build_cmdline`, `load_cmdline`,
//!   [`LoadedKernel`], `LoaderError`;
//! - the VM's interrupt controller: `REQUIRED_CAPS`, `create_irqchip` (before the vCPUs) and
//!   `finish_irqchip` (after them: where arm64's GIC is created);
//! - vCPU set-up and diagnostics: `configure_vcpu`, `program_counter`, `instruction_at_pc`;
//! - the legacy devices every guest gets (`LegacyDevices`: the serial console and the reset
//!   device) and how the guest learns of the virtio devices (`announce_devices`,
//!   `announcement_room`);
//! - the boot structures: `choose_entry` and `configure_system`;
//! - `HostQuirks`: what the guest needs on this kind of host (nested KVM through PVM on x86);
//! - snapshots: `VcpuState` and `VmState` (plain data, serde), `save_vcpu` / `restore_vcpu`,
//!   `save_vm` / `restore_vm`, and `StateCaps` (what the host's KVM can save), `StateError`.
//!
//! `x86_64` is the one implementation today; the data-only pieces (layout, e820, GDT, page
//! tables, MP table, CPUID normalization) are plain code with unit tests.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    announce_devices, announcement_room, build_cmdline, choose_entry, configure_system,
    configure_vcpu, create_irqchip, finish_irqchip, instruction_at_pc, layout, load_cmdline,
    load_kernel, place_initrd, program_counter, restore_vcpu, restore_vm, save_vcpu, save_vm,
    BootError, EntryPoint, HostQuirks, LegacyDevices, LegacyState, LoadedKernel, LoaderError,
    StateCaps, StateError, VcpuConfigError, VcpuState, VmState, MAX_VCPUS, REQUIRED_CAPS,
};

/// A KVM ioctl that failed during set-up, with its name.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KvmCallError {
    /// The ioctl, e.g. `KVM_CREATE_IRQCHIP`.
    pub what: &'static str,
    /// The error KVM returned.
    #[source]
    pub source: kvm_ioctls::Error,
}

impl KvmCallError {
    /// A constructor for `map_err`: `.map_err(KvmCallError::on("KVM_SET_CPUID2"))`.
    pub fn on(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self { what, source }
    }
}
