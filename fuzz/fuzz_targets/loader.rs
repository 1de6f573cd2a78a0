//! The boot image loaders on hostile files: kernel images (ELF `vmlinux`: program headers,
//! segment addresses and sizes, the PVH note; bzImage: setup header, setup sectors, protocol
//! version), the initrd's placement against the memory layout, and the kernel command line. A
//! bad image must be an error (`kiln: ...`, exit 2), never a panic or a write outside guest
//! memory.
//!
//! Input: one byte choosing what to load (0 kernel, 1 initrd, 2 command line); for the initrd,
//! a u32 end of low memory and a u32 kernel end; then the file (or, for the command line,
//! newline-separated parts). The file is written to the scratch directory, as the loaders read
//! paths.

#![no_main]

use std::sync::OnceLock;

use kiln_fuzz::{scratch_path, Input};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use devices::GuestMemoryMmap;
use vmm::arch::x86_64::loader::{build_cmdline, load_cmdline, load_initrd, load_kernel};

/// Guest memory: 32 MiB, one region, shared by every run in this process (the loaders only
/// write into it).
const MEM_BYTES: usize = 32 << 20;

fn mem() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => {
            let path = scratch_path("kernel");
            std::fs::write(&path, input.rest()).expect("scratch kernel image");
            let _ = load_kernel(mem(), &path);
        }
        1 => {
            let low_ram_end = u64::from(input.u32());
            let kernel_end = u64::from(input.u32());
            let path = scratch_path("initrd");
            std::fs::write(&path, input.rest()).expect("scratch initrd");
            // An empty initrd has no bytes to misplace (its address is never used).
            if let Ok((addr, size)) = load_initrd(mem(), &path, low_ram_end, kernel_end) {
                assert!(size == 0 || (addr >= kernel_end && addr + size <= low_ram_end));
            }
        }
        _ => {
            let text = String::from_utf8_lossy(input.rest());
            if let Ok(cmdline) = build_cmdline(text.split('\n')) {
                let _ = load_cmdline(mem(), &cmdline);
            }
        }
    }
});
