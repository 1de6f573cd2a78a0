//! The Intel MultiProcessor table (MP spec 1.4), which tells a guest without ACPI how many CPUs it
//! has, where the IOAPIC is and how the ISA interrupts are wired.
//!
//! The table is serialized byte by byte (little endian) rather than through packed structs: it is
//! written once at boot and this keeps it free of `unsafe`.
//!
//! Layout: the 16-byte floating pointer at [`MPTABLE_POINTER_ADDR`] (the EBDA, which Linux scans)
//! points at the configuration table at [`MPTABLE_ADDR`] (the BIOS area, reserved in the e820 map).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_ADDR, MPTABLE_END, MPTABLE_POINTER_ADDR};

/// The most vCPUs an MP table can describe: xAPIC ids are 8 bits, 0xff is broadcast, and the
/// IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9); // FPU, APIC
const IOAPIC_USABLE: u8 = 1;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// ISA IRQs wired to IOAPIC pins 0..=23.
const IRQ_PINS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

/// Errors in building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is 0 or above [`MAX_CPUS`].
    #[error("an MP table describes 1 to {MAX_CPUS} CPUs, not {0}")]
    CpuCount(u8),
    /// Guest memory does not reach the table's area.
    #[error("writing the MP table: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Appends little-endian fields to a byte vector.
#[derive(Default)]
struct TableWriter(Vec<u8>);

impl TableWriter {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The byte that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The configuration table (header and entries) for `cpus` CPUs, checksummed.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = TableWriter::default();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries
            .u8(ENTRY_PROCESSOR)
            .u8(cpu)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .u32(0)
            .u32(0);
        count += 1;
    }
    entries.u8(ENTRY_BUS).u8(0).bytes(b"ISA   ");
    entries
        .u8(ENTRY_IOAPIC)
        .u8(ioapic_id)
        .u8(IOAPIC_VERSION)
        .u8(IOAPIC_USABLE)
        .u32(IOAPIC_ADDR as u32);
    count += 2;
    for irq in 0..IRQ_PINS {
        // Every ISA IRQ, the timer's included, is an ordinary IOAPIC input: this is how KVM's
        // default routing wires them (an ExtINT pin 0 makes Linux's timer check fail).
        entries
            .u8(ENTRY_INTSRC)
            .u8(MP_INT)
            .u16(0)
            .u8(0)
            .u8(irq)
            .u8(ioapic_id)
            .u8(irq);
        count += 1;
    }
    // LINT0 of the boot CPU's local APIC is ExtINT (the PIC, virtual-wire mode); every LINT1 is NMI.
    entries
        .u8(ENTRY_LINTSRC)
        .u8(MP_EXTINT)
        .u16(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0);
    entries
        .u8(ENTRY_LINTSRC)
        .u8(MP_NMI)
        .u16(0)
        .u8(0)
        .u8(0)
        .u8(0xff)
        .u8(1);
    count += 2;

    const HEADER_LEN: usize = 44;
    let length = (HEADER_LEN + entries.0.len()) as u16;
    let mut table = TableWriter::default();
    table
        .bytes(b"PCMP")
        .u16(length)
        .u8(4) // spec revision 1.4
        .u8(0) // checksum, patched below
        .bytes(b"KILN    ")
        .bytes(b"MICROVM     ")
        .u32(0) // no OEM table
        .u16(0)
        .u16(count)
        .u32(APIC_ADDR as u32)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0)
        .bytes(&entries.0);
    let mut bytes = table.0;
    bytes[7] = checksum(&bytes);
    bytes
}

/// The 16-byte floating pointer structure that leads to the table at `table_addr`.
fn floating_pointer(table_addr: u32) -> Vec<u8> {
    let mut fp = TableWriter::default();
    fp.bytes(b"_MP_")
        .u32(table_addr)
        .u8(1) // length in 16-byte units
        .u8(4) // spec revision 1.4
        .u8(0) // checksum, patched below
        .bytes(&[0; 5]); // feature bytes: 0 = a configuration table is present
    let mut bytes = fp.0;
    bytes[10] = checksum(&bytes);
    bytes
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let table = config_table(cpus);
    debug_assert!(MPTABLE_ADDR + table.len() as u64 <= MPTABLE_END);
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))?;
    mem.write_slice(
        &floating_pointer(MPTABLE_ADDR as u32),
        GuestAddress(MPTABLE_POINTER_ADDR),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn checksums_are_zero_and_pointer_leads_to_table() {
        let mem = mem();
        write_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_POINTER_ADDR))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
    }

    #[test]
    fn lists_every_cpu_once_with_one_boot_processor() {
        for cpus in [1u8, 2, 7, MAX_CPUS] {
            let table = config_table(cpus);
            assert_eq!(sum(&table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            let mut offset = 44;
            let (mut seen_cpus, mut boot) = (0, 0);
            for _ in 0..count {
                let len = if table[offset] == ENTRY_PROCESSOR {
                    20
                } else {
                    8
                };
                if table[offset] == ENTRY_PROCESSOR {
                    assert_eq!(table[offset + 1], seen_cpus as u8, "APIC ids are 0..n");
                    seen_cpus += 1;
                    boot += usize::from(table[offset + 3] & CPU_BOOTPROCESSOR != 0);
                }
                offset += len;
            }
            assert_eq!(offset, table.len());
            assert_eq!((seen_cpus, boot), (cpus as usize, 1));
            assert!(MPTABLE_ADDR + table.len() as u64 <= MPTABLE_END);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts_and_small_memory() {
        assert!(matches!(
            write_mptable(&mem(), 0),
            Err(MptableError::CpuCount(0))
        ));
        assert!(matches!(
            write_mptable(&mem(), 255),
            Err(MptableError::CpuCount(255))
        ));
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_mptable(&tiny, 1),
            Err(MptableError::Write(_))
        ));
    }
}
