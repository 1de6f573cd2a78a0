//! The boot GDT: flat 64-bit code and data segments plus a TSS descriptor, as the Linux 64-bit boot
//! protocol asks (`__BOOT_CS` = 0x10 is not required; any flat long-mode code segment works).

use kvm_bindings::kvm_segment;

/// Index of the code segment (selector 0x08).
pub const CODE_INDEX: usize = 1;
/// Index of the data segment (selector 0x10).
pub const DATA_INDEX: usize = 2;
/// Index of the TSS (selector 0x18).
pub const TSS_INDEX: usize = 3;

/// Builds one 8-byte segment descriptor from its access/flags word, base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0xa09b), data (0xc093), TSS (0x808b).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The GDT of a 32-bit protected-mode entry (PVH): flat 32-bit code (0xc09b), data, TSS.
pub const PVH_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    if granularity(entry) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

fn granularity(entry: u64) -> u8 {
    bit(entry, 55)
}

/// The `kvm_segment` a vCPU holds after loading descriptor `table[index]`.
pub fn kvm_segment(table: &[u64; 4], index: usize) -> kvm_segment {
    let entry = table[index];
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: granularity(entry),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_long_mode() {
        let cs = kvm_segment(&BOOT_GDT, CODE_INDEX);
        assert_eq!(cs.selector, 0x08);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.g), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = kvm_segment(&BOOT_GDT, DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 0x3, 1, 0));
        let tr = kvm_segment(&BOOT_GDT, TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        let null = kvm_segment(&BOOT_GDT, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment(&[0, e, 0, 0], 1);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        let pvh_cs = kvm_segment(&PVH_GDT, CODE_INDEX);
        assert_eq!((pvh_cs.db, pvh_cs.l, pvh_cs.limit), (1, 0, 0xffff_ffff));
    }
}
