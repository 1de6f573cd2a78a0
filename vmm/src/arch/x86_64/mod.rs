//! x86_64: layout, Linux and PVH boot structures, descriptor and page tables, MP table, CPUID,
//! registers, the in-kernel PIC/IOAPIC/PIT, and the port-I/O legacy devices.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod host_quirks;
pub mod layout;
pub mod legacy;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod pvh;
pub mod regs;
pub mod state;
mod system;
mod vcpu;
mod vm;

pub use host_quirks::HostQuirks;
pub use legacy::{LegacyDevices, LegacyState};
pub use loader::{build_cmdline, load_cmdline, load_kernel, LoadedKernel, LoaderError};
pub use regs::EntryPoint;
pub use state::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, StateCaps, StateError, VcpuState, VmState,
};
pub use system::{
    announce_devices, announcement_room, choose_entry, configure_system, place_initrd, BootError,
};
pub use vcpu::{configure_vcpu, instruction_at_pc, program_counter, VcpuConfigError};
pub use vm::{create_irqchip, finish_irqchip, REQUIRED_CAPS};

/// The most vCPUs a guest can have: what the MP table can describe.
pub const MAX_VCPUS: u8 = mptable::MAX_CPUS;
