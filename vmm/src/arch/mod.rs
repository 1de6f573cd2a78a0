//! Architecture-specific boot logic.
//!
//! The x86_64 pieces that only compute data (memory layout, e820, GDT, page tables, MP table,
//! CPUID normalization) are plain code with unit tests; the KVM glue that pushes them into a vCPU
//! lives in `x86_64::regs` and `vstate`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
