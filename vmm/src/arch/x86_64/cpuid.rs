//! CPUID normalization: KVM's supported CPUID, adjusted so each vCPU reports its own APIC id and a
//! topology of `n` single-threaded cores in one package, and knows it runs under a hypervisor.
//!
//! On hosts where CPUID is not intercepted (nested PVM) the guest sees the host's values whatever
//! we set; the command line is the lever there (see `host_quirks`).

#[cfg(test)]
use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0": what Linux looks for to enable its KVM guest support.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Errors in normalizing CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM's table is full and the hypervisor leaf could not be added.
    #[error("no room in the CPUID table for the hypervisor leaf")]
    TableFull,
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Applies Kiln's topology and identity to `cpuid` for vCPU `cpu` of `cpus`.
pub fn normalize(
    cpuid: &mut CpuId,
    cpu: u8,
    cpus: u8,
    tsc_deadline: bool,
) -> Result<(), CpuidError> {
    let apic_id = u32::from(cpu);
    let count = u32::from(cpus.max(1));
    let mut has_hypervisor_leaf = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (entry.ebx & 0xff);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                // L1 and L2 are private to a core; L3 is shared by the package.
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = LEVEL_TYPE_SMT << 8;
                    }
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                    }
                    index => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = index;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                has_hypervisor_leaf = true;
                entry.eax = entry.eax.max(LEAF_HYPERVISOR + 1);
                [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
            }
            LEAF_AMD_SIZE => {
                entry.ecx = (id_bits(count) << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
    if !has_hypervisor_leaf {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR,
                eax: LEAF_HYPERVISOR + 1,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
                ..Default::default()
            })
            .map_err(|_| CpuidError::TableFull)?;
    }
    Ok(())
}

/// Marks `entry` as depending on its sub-leaf index (for tests building tables by hand).
#[cfg(test)]
fn indexed(function: u32, index: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        let entries = vec![
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xff00_00ab,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                eax: 0x121, // L1 data cache
                ..indexed(LEAF_CACHE_PARAMS, 0)
            },
            kvm_cpuid_entry2 {
                eax: 0x163, // L3 unified cache
                ..indexed(LEAF_CACHE_PARAMS, 3)
            },
            indexed(LEAF_TOPOLOGY, 0),
            indexed(LEAF_TOPOLOGY, 1),
            indexed(LEAF_TOPOLOGY, 2),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_topology() {
        let mut cpuid = table();
        normalize(&mut cpuid, 3, 4, true).unwrap();
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xff, 0xab, "brand index kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);

        let smt = find(&cpuid, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 3));
        let core = find(&cpuid, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 3));
        let invalid = find(&cpuid, LEAF_TOPOLOGY, 2);
        assert_eq!((invalid.ebx, invalid.ecx >> 8), (0, 0));

        let l1 = find(&cpuid, LEAF_CACHE_PARAMS, 0);
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (3, 0));
        let l3 = find(&cpuid, LEAF_CACHE_PARAMS, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (3, 3));
        assert_eq!(l3.eax & 0x3fff, 0x163);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_deadline_timer_without_support() {
        let mut cpuid = table();
        normalize(&mut cpuid, 0, 1, false).unwrap();
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&cpuid, LEAF_TOPOLOGY, 1).eax, 0);
    }

    #[test]
    fn adds_the_kvm_signature() {
        let mut cpuid = table();
        normalize(&mut cpuid, 0, 2, false).unwrap();
        let hv = find(&cpuid, LEAF_HYPERVISOR, 0);
        let mut sig = Vec::new();
        for reg in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert!(hv.eax > LEAF_HYPERVISOR);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
