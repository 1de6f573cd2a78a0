//! Saving and restoring an x86 vCPU's and VM's KVM state for snapshots.
//!
//! A vCPU's state is everything KVM holds for it: general, segment and debug registers, the FPU
//! and extended state (XSAVE), XCRs, the MSRs KVM lists, the local APIC, the MP state, pending
//! events, CPUID and the TSC frequency. The VM's is the in-kernel PIC pair, IOAPIC, PIT and
//! KVM clock.
//!
//! Order matters on both sides. Saving reads the MP state first (KVM flushes events it has
//! queued for the vCPU into the state it reports). Restoring sets CPUID first (it decides which
//! MSRs and XSAVE components exist), the TSC frequency before any TSC-relative MSR, the segment
//! registers before the LAPIC (its base comes from the APIC-base MSR's mode, which the segment
//! state's paging mode must already match) and the LAPIC before the MSRs (TSC_DEADLINE is only
//! accepted once the LAPIC timer is in deadline mode), and the pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::KvmCallError;

/// How many MSRs one KVM_GET_MSRS / KVM_SET_MSRS call carries (KVM's own limit is larger).
const MSR_CHUNK: usize = 128;

/// Why a vCPU's or the VM's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmCallError),
    /// The host's KVM cannot save a part of the state.
    #[error("the host's KVM lacks {0}, which a snapshot needs")]
    MissingCap(&'static str),
    /// A saved list does not fit KVM's structure (too many entries).
    #[error("the saved {what} has {count} entries, more than KVM takes")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// How many entries it has.
        count: usize,
    },
}

/// One x86 vCPU's KVM state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM_GET_MP_STATE (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU and extended state: KVM_GET_XSAVE's 4 KiB area.
    pub xsave: Box<kvm_xsave>,
    /// Extended control registers (XCR0), when the host has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: Box<kvm_lapic_state>,
    /// Every MSR KVM lists that it would read, with its value.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency in kHz, when KVM says.
    pub tsc_khz: Option<u32>,
}

/// The x86 VM's in-kernel devices: both PICs, the IOAPIC, the PIT and the KVM clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC.
    pub pic_master: Box<kvm_irqchip>,
    /// The slave PIC.
    pub pic_slave: Box<kvm_irqchip>,
    /// The IOAPIC.
    pub ioapic: Box<kvm_irqchip>,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest time).
    pub clock: kvm_clock_data,
}

/// What this host's KVM can save and restore of a vCPU, read once from /dev/kvm when the VM is
/// built (the vCPU threads cannot open it: their seccomp filter forbids it).
#[derive(Clone, Debug, Default)]
pub struct StateCaps {
    xsave: bool,
    xcrs: bool,
    get_tsc_khz: bool,
    tsc_control: bool,
    /// The MSRs KVM lists as worth saving.
    msr_indices: Vec<u32>,
}

impl StateCaps {
    /// Reads the capabilities and MSR list of `kvm`.
    pub fn of(kvm: &Kvm) -> Result<Self, StateError> {
        Ok(Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            tsc_control: kvm.check_extension(Cap::TscControl),
            msr_indices: kvm
                .get_msr_index_list()
                .map_err(KvmCallError::on("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        })
    }
}

/// Reads `indices` in chunks, leaving out the MSRs KVM refuses to read (some of its list depend
/// on CPU features the guest's CPUID lacks).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut pending = indices;
    while !pending.is_empty() {
        let chunk = &pending[..pending.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            what: "MSR list",
            count: entries.len(),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(KvmCallError::on("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        pending = &pending[(read + 1).min(pending.len())..];
    }
    Ok(saved)
}

/// Writes `msrs` in chunks; KVM stops at the first MSR it refuses (one it lists on the saving
/// host but will not take on this one): that one is skipped and the rest written. Returns the
/// refused indices.
fn write_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<Vec<u32>, StateError> {
    let mut refused = Vec::new();
    let mut pending = msrs;
    while !pending.is_empty() {
        let chunk = &pending[..pending.len().min(MSR_CHUNK)];
        let list = Msrs::from_entries(chunk).map_err(|_| StateError::TooMany {
            what: "MSR list",
            count: chunk.len(),
        })?;
        let taken = fd
            .set_msrs(&list)
            .map_err(KvmCallError::on("KVM_SET_MSRS"))?;
        if let Some(entry) = chunk.get(taken) {
            refused.push(entry.index);
        }
        pending = &pending[(taken + 1).min(pending.len())..];
    }
    Ok(refused)
}

/// Saves vCPU `fd`'s state. Call on the vCPU's own thread, while it is out of KVM_RUN.
pub fn save_vcpu(caps: &StateCaps, fd: &VcpuFd) -> Result<VcpuState, StateError> {
    let mp_state = fd
        .get_mp_state()
        .map_err(KvmCallError::on("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(KvmCallError::on("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(KvmCallError::on("KVM_GET_SREGS"))?;
    if !caps.xsave {
        return Err(StateError::MissingCap("KVM_CAP_XSAVE"));
    }
    let xsave = Box::new(fd.get_xsave().map_err(KvmCallError::on("KVM_GET_XSAVE"))?);
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(KvmCallError::on("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd
        .get_debug_regs()
        .map_err(KvmCallError::on("KVM_GET_DEBUGREGS"))?;
    let lapic = Box::new(fd.get_lapic().map_err(KvmCallError::on("KVM_GET_LAPIC"))?);
    let msrs = read_msrs(fd, &caps.msr_indices)?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(KvmCallError::on("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmCallError::on("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = if caps.get_tsc_khz {
        fd.get_tsc_khz().ok()
    } else {
        None
    };
    Ok(VcpuState {
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        cpuid,
        tsc_khz,
    })
}

/// Restores vCPU `fd` to `state`, in the order KVM needs (see the module's doc).
pub fn restore_vcpu(caps: &StateCaps, fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::TooMany {
        what: "CPUID",
        count: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(KvmCallError::on("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        // A host whose TSC runs at another rate scales the guest's, where KVM can; where it
        // cannot, the guest's clocksource sees the host's rate (its kvmclock corrects for it).
        if caps.tsc_control && fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .map_err(KvmCallError::on("KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(KvmCallError::on("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(KvmCallError::on("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(KvmCallError::on("KVM_SET_SREGS"))?;
    // SAFETY: Kiln never enables dynamically permitted XSTATE components (no
    // ARCH_REQ_XCOMP_GUEST_PERM), so KVM reads no more than the legacy 4 KiB `kvm_xsave`,
    // which `state.xsave` is in full.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(KvmCallError::on("KVM_SET_XSAVE"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs)
            .map_err(KvmCallError::on("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(KvmCallError::on("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(KvmCallError::on("KVM_SET_LAPIC"))?;
    let refused = write_msrs(fd, &state.msrs)?;
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
        log::warn!(
            "KVM refused saved MSRs {} (this host's KVM lists them but will not take them; \
             they keep their reset values)",
            list.join(", ")
        );
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(KvmCallError::on("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_irqchip(
    fd: &VmFd,
    chip_id: u32,
    what: &'static str,
) -> Result<Box<kvm_irqchip>, StateError> {
    let mut chip = Box::new(kvm_irqchip {
        chip_id,
        ..Default::default()
    });
    fd.get_irqchip(&mut chip).map_err(KvmCallError::on(what))?;
    Ok(chip)
}

/// Saves the VM's in-kernel devices and clock. Call with every vCPU out of KVM_RUN.
pub fn save_vm(fd: &VmFd) -> Result<VmState, StateError> {
    let clock = fd.get_clock().map_err(KvmCallError::on("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pic_master: get_irqchip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_irqchip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_irqchip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: fd.get_pit2().map_err(KvmCallError::on("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Restores the VM's in-kernel devices and clock (created by [`super::create_irqchip`]). With
/// `clock_realtime`, the guest's clock also moves on by the wall-clock time since the snapshot
/// (KVM_CLOCK_REALTIME), when the saved reading carries the wall-clock time; otherwise it goes
/// on from where it stood.
pub fn restore_vm(fd: &VmFd, state: &VmState, clock_realtime: bool) -> Result<(), StateError> {
    fd.set_pit2(&state.pit)
        .map_err(KvmCallError::on("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    // The saved flags describe the reading; KVM_SET_CLOCK takes KVM_CLOCK_REALTIME alone.
    clock.flags = if clock_realtime && state.clock.flags & KVM_CLOCK_REALTIME != 0 {
        KVM_CLOCK_REALTIME
    } else {
        if clock_realtime {
            log::warn!(
                "clock_realtime: the snapshot's clock reading has no wall-clock time (the \
                 saving host's KVM is older than 5.16); the guest's clock goes on from the snapshot"
            );
        }
        0
    };
    fd.set_clock(&clock)
        .map_err(KvmCallError::on("KVM_SET_CLOCK"))?;
    for (chip, what) in [
        (&state.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
        (&state.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
        (&state.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
    ] {
        fd.set_irqchip(chip).map_err(KvmCallError::on(what))?;
    }
    Ok(())
}
