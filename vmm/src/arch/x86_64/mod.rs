//! x86_64 Linux boot: layout, zero page, descriptor tables, page tables, MP table, CPUID, registers.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod pvh;
pub mod regs;
