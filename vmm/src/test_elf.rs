//! Tiny ELF kernels for tests: one `PT_LOAD` segment of hand-written machine code.
//! Compiled for unit tests and, with the `test-support` feature, for the integration tests.

/// A minimal valid x86_64 ELF executable with one PT_LOAD segment of `code` at `addr`, which is
/// also the entry point.
pub fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 0x40;
    const PHDR: usize = 0x38;
    let mut elf = vec![0u8; EHDR + PHDR];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // ELF version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&addr.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // ehsize
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let len = (code.len() as u64).to_le_bytes();
    let ph = &mut elf[EHDR..];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&((EHDR + PHDR) as u64).to_le_bytes()); // file offset
    ph[16..24].copy_from_slice(&addr.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&addr.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&len); // filesz
    ph[40..48].copy_from_slice(&len); // memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(code);
    elf
}
