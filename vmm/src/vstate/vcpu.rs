//! vCPUs: boot configuration, the run loop with port-I/O and MMIO dispatch, exit accounting, and
//! the diagnostics that make a wedged guest visible (fatal-exit reports, RIP samples).
//!
//! Invariant: every KVM exit is either handled (I/O dispatched to a bus), a clean stop the guest
//! asked for (reset / shutdown), or a [`FatalExit`] carrying the reason, RIP and instruction bytes.
//! No exit is ignored and none loops forever.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use devices::Bus;
use devices::GuestMemoryMmap;
use kvm_bindings::KVM_MP_STATE_HALTED;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::vm::Vm;
use crate::arch::{self, EntryPoint, StateCaps, StateError, VcpuConfigError, VcpuState};
use crate::metrics::METRICS;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Errors from a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed while setting the vCPU up.
    #[error("vCPU {cpu}: {what}: {source}")]
    Kvm {
        /// The vCPU's index.
        cpu: u8,
        /// The ioctl that failed, e.g. `KVM_CREATE_VCPU`.
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU could not be put in its boot state.
    #[error("vCPU {cpu}: {source}")]
    Configure {
        /// The vCPU's index.
        cpu: u8,
        /// Why.
        #[source]
        source: VcpuConfigError,
    },
    /// The guest stopped in a way that is not a clean reset or power-off.
    #[error("{0}")]
    Fatal(FatalExit),
    /// The vCPU's state could not be saved or restored.
    #[error("vCPU {cpu}: {source}")]
    State {
        /// The vCPU's index.
        cpu: u8,
        /// Why.
        #[source]
        source: StateError,
    },
}

/// A vCPU exit the VMM cannot continue from, with what is known of where the guest was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatalExit {
    /// The vCPU's index.
    pub cpu: u8,
    /// The exit reason in KVM's words, with its details.
    pub reason: String,
    /// The guest's program counter (RIP), if the registers could be read.
    pub rip: Option<u64>,
    /// Up to 16 bytes there, if they could be located in guest memory.
    pub instruction: Option<Vec<u8>>,
}

impl fmt::Display for FatalExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.cpu, self.reason)?;
        match self.rip {
            Some(rip) => write!(f, " at RIP {rip:#x}")?,
            None => write!(f, " (RIP unavailable)")?,
        }
        if let Some(bytes) = &self.instruction {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, ", instruction bytes {}", hex.join(" "))?;
        }
        Ok(())
    }
}

/// How a vCPU's run ended when the guest asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reset the machine (`reboot`): a microVM's normal end.
    Reset,
    /// The guest powered the machine off.
    Shutdown,
}

/// What one `KVM_RUN` came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// An exit was handled; run again.
    Handled,
    /// A signal kicked the vCPU out of `KVM_RUN` (diagnostics or stop requests).
    Interrupted,
    /// The guest asked to stop.
    Stopped(VcpuStop),
}

/// Exit counts by reason, for the SIGUSR1 report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Port or MMIO accesses no device claimed.
    pub unclaimed: u64,
    /// Returns from `KVM_RUN` because of a signal.
    pub interrupted: u64,
}

impl fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "io_in {}, io_out {}, mmio_read {}, mmio_write {}, unclaimed {}, interrupted {}",
            self.io_in,
            self.io_out,
            self.mmio_read,
            self.mmio_write,
            self.unclaimed,
            self.interrupted
        )
    }
}

/// A point-in-time view of a vCPU, taken on its own thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSample {
    /// The guest's RIP (None if KVM would not say).
    pub rip: Option<u64>,
    /// True when the vCPU sits in HLT waiting for an interrupt (an idle guest, not a stuck one).
    pub halted: bool,
    /// Exit counts so far.
    pub exits: ExitCounts,
}

/// Requests another thread makes of a running vCPU; it acts on them between runs.
#[derive(Debug, Default)]
pub struct VcpuRequests {
    /// Log a report (RIP, exit counts).
    pub report: AtomicBool,
    /// Take a sample for the stuck-vCPU watchdog.
    pub sample: AtomicBool,
    /// Leave the run loop.
    pub stop: AtomicBool,
    /// Stay out of KVM_RUN until cleared (the VM is paused).
    pub pause: AtomicBool,
    /// Save the vCPU's state (asked of a paused vCPU, by [`Self::save_state`]).
    save: AtomicBool,
    /// The saved state, until [`Self::save_state`] takes it.
    saved: Mutex<Option<Result<VcpuState, String>>>,
    /// Signalled when `saved` is filled.
    saved_changed: Condvar,
    /// True while the vCPU is parked for a pause; guarded so [`Self::wait_parked`] can wait for it.
    parked: Mutex<bool>,
    /// Signalled when `parked` changes or the pause or stop flags are changed.
    changed: Condvar,
}

impl VcpuRequests {
    /// Parks the calling vCPU thread while `pause` is set and `stop` is not.
    fn park_while_paused(&self) {
        let Ok(mut parked) = self.parked.lock() else {
            return;
        };
        *parked = true;
        self.changed.notify_all();
        while self.pause.load(Ordering::Acquire)
            && !self.stop.load(Ordering::Acquire)
            && !self.save.load(Ordering::Acquire)
        {
            parked = match self.changed.wait(parked) {
                Ok(guard) => guard,
                Err(_) => return,
            };
        }
        *parked = false;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the vCPU to be parked; true if it is.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let Ok(parked) = self.parked.lock() else {
            return false;
        };
        self.changed
            .wait_timeout_while(parked, timeout, |parked| !*parked)
            .map(|(parked, _)| *parked)
            .unwrap_or(false)
    }

    /// Clears `pause` and wakes the parked vCPU.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        if let Ok(_guard) = self.parked.lock() {
            self.changed.notify_all();
        }
    }

    /// Asks the vCPU (paused, or about to park) for its state and waits up to `timeout` for it.
    /// The vCPU saves it on its own thread, the only one that may use its fd, and parks again.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, String> {
        if let Ok(mut saved) = self.saved.lock() {
            *saved = None;
        }
        self.save.store(true, Ordering::Release);
        if let Ok(_guard) = self.parked.lock() {
            self.changed.notify_all();
        }
        let saved = self
            .saved
            .lock()
            .map_err(|_| "the vCPU's state lock is poisoned".to_string())?;
        let (mut saved, _) = self
            .saved_changed
            .wait_timeout_while(saved, timeout, |saved| saved.is_none())
            .map_err(|_| "the vCPU's state lock is poisoned".to_string())?;
        saved.take().unwrap_or_else(|| {
            Err(format!(
                "the vCPU did not save its state within {timeout:?}"
            ))
        })
    }

    /// The vCPU's side of [`Self::save_state`]: saves with `save` if asked to.
    fn serve_save(&self, save: impl FnOnce() -> Result<VcpuState, String>) {
        if !self.save.swap(false, Ordering::AcqRel) {
            return;
        }
        let result = save();
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(result);
            self.saved_changed.notify_all();
        }
    }

    /// Sets `stop` and wakes the vCPU if it is parked.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(_guard) = self.parked.lock() {
            self.changed.notify_all();
        }
    }
}

/// Notices a vCPU that stays at one RIP, running (not halted), over many consecutive samples:
/// the signature of the emulator spinning on an instruction it cannot complete.
#[derive(Debug, Default)]
pub struct StuckDetector {
    last_rip: Option<u64>,
    repeats: u32,
}

impl StuckDetector {
    /// Feeds one sample; returns true exactly once per stuck period, when `threshold` consecutive
    /// samples saw the same RIP with the vCPU running.
    pub fn observe(&mut self, sample: &VcpuSample, threshold: u32) -> bool {
        match sample.rip {
            Some(rip) if !sample.halted && self.last_rip == Some(rip) => {
                self.repeats += 1;
                self.repeats == threshold
            }
            rip => {
                self.last_rip = if sample.halted { None } else { rip };
                self.repeats = 0;
                false
            }
        }
    }
}

/// One KVM vCPU with the buses its exits are dispatched to.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    state_caps: Arc<StateCaps>,
    io_bus: Bus,
    mmio_bus: Bus,
    mem: GuestMemoryMmap,
    exits: ExitCounts,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`; `state_caps` says what a snapshot saves of it.
    pub fn new(
        vm: &Vm,
        index: u8,
        io_bus: Bus,
        mmio_bus: Bus,
        mem: GuestMemoryMmap,
        state_caps: Arc<StateCaps>,
    ) -> Result<Self, VcpuError> {
        let fd = super::retry_interrupted(|| vm.fd().create_vcpu(u64::from(index))).map_err(
            |source| VcpuError::Kvm {
                cpu: index,
                what: "KVM_CREATE_VCPU",
                source,
            },
        )?;
        Ok(Self {
            index,
            fd,
            state_caps,
            io_bus,
            mmio_bus,
            mem,
            exits: ExitCounts::default(),
        })
    }

    /// This vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Puts the vCPU in its boot state for `entry` (one of `cpus`). Returns the boot registers
    /// KVM refused and left at their reset values (x86's MSRs), for a warning.
    pub fn configure(&self, kvm: &Kvm, cpus: u8, entry: EntryPoint) -> Result<Vec<u32>, VcpuError> {
        arch::configure_vcpu(kvm, &self.fd, &self.mem, self.index, cpus, entry).map_err(|source| {
            VcpuError::Configure {
                cpu: self.index,
                source,
            }
        })
    }

    /// Puts the vCPU in a saved state (a snapshot's), instead of its boot state.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        arch::restore_vcpu(&self.state_caps, &self.fd, state).map_err(|source| VcpuError::State {
            cpu: self.index,
            source,
        })
    }

    /// The vCPU's state, for a snapshot. Call on the vCPU's own thread, between runs.
    ///
    /// An I/O exit the VMM answered is completed by KVM only on the next KVM_RUN (the data
    /// lands in a register, the instruction pointer moves past the access): one KVM_RUN with
    /// `immediate_exit` set does that without running the guest, so the saved state is not
    /// caught halfway through an instruction.
    pub fn save(&mut self) -> Result<VcpuState, VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        arch::save_vcpu(&self.state_caps, &self.fd).map_err(|source| VcpuError::State {
            cpu: self.index,
            source,
        })
    }

    /// Runs the guest until the next exit and handles it.
    pub fn run_once(&mut self) -> Result<VcpuEvent, VcpuError> {
        let fatal_reason = match self.fd.run() {
            #[cfg(target_arch = "x86_64")]
            Ok(VcpuExit::IoIn(port, data)) => {
                self.exits.io_in += 1;
                METRICS.vcpu.exit_io_in.inc();
                if !self.io_bus.read(u64::from(port), data) {
                    // An absent ISA device floats the bus high.
                    data.fill(0xff);
                    self.exits.unclaimed += 1;
                }
                return Ok(VcpuEvent::Handled);
            }
            #[cfg(target_arch = "x86_64")]
            Ok(VcpuExit::IoOut(port, data)) => {
                self.exits.io_out += 1;
                METRICS.vcpu.exit_io_out.inc();
                if !self.io_bus.write(u64::from(port), data) {
                    self.exits.unclaimed += 1;
                }
                return Ok(VcpuEvent::Handled);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.exits.mmio_read += 1;
                METRICS.vcpu.exit_mmio_read.inc();
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                    self.exits.unclaimed += 1;
                }
                return Ok(VcpuEvent::Handled);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.exits.mmio_write += 1;
                METRICS.vcpu.exit_mmio_write.inc();
                if !self.mmio_bus.write(addr, data) {
                    self.exits.unclaimed += 1;
                }
                return Ok(VcpuEvent::Handled);
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                return Ok(VcpuEvent::Stopped(VcpuStop::Reset))
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return Ok(VcpuEvent::Stopped(VcpuStop::Shutdown))
            }
            Ok(VcpuExit::SystemEvent(kind, data)) => {
                format!("KVM_EXIT_SYSTEM_EVENT type {kind} data {data:x?}")
            }
            Ok(VcpuExit::Shutdown) => "KVM_EXIT_SHUTDOWN (triple fault)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})")
            }
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union: the exit reason
                // is KVM_EXIT_INTERNAL_ERROR, which is what `run()` just decoded.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                format!("KVM_EXIT_INTERNAL_ERROR (suberror {suberror}: the host cannot emulate an instruction)")
            }
            Ok(VcpuExit::Hlt) => {
                "KVM_EXIT_HLT (halted with no interrupt controller to wake it)".to_string()
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => {
                self.exits.interrupted += 1;
                return Ok(VcpuEvent::Interrupted);
            }
            Err(e) if e.errno() == libc::EAGAIN => return Ok(VcpuEvent::Handled),
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        METRICS.vcpu.failures.inc();
        Err(VcpuError::Fatal(self.fatal_exit(fatal_reason)))
    }

    /// Runs until the guest stops or `requests.stop` is set, serving report and sample requests
    /// between runs. `on_sample` sees every watchdog sample.
    pub fn run_until_stop(
        &mut self,
        requests: &VcpuRequests,
        mut on_sample: impl FnMut(u8, &VcpuSample),
    ) -> Result<Option<VcpuStop>, VcpuError> {
        loop {
            if requests.stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            if requests.report.swap(false, Ordering::AcqRel) {
                log::info!("{}", self.report());
            }
            if requests.sample.swap(false, Ordering::AcqRel) {
                let sample = self.sample();
                on_sample(self.index, &sample);
            }
            requests.serve_save(|| self.save().map_err(|e| e.to_string()));
            if requests.pause.load(Ordering::Acquire) {
                requests.park_while_paused();
                continue;
            }
            if let VcpuEvent::Stopped(stop) = self.run_once()? {
                return Ok(Some(stop));
            }
        }
    }

    /// Reads RIP, the halted state and the exit counts. Call on the vCPU's own thread, between runs.
    pub fn sample(&self) -> VcpuSample {
        VcpuSample {
            rip: arch::program_counter(&self.fd),
            halted: self
                .fd
                .get_mp_state()
                .map(|s| s.mp_state == KVM_MP_STATE_HALTED)
                .unwrap_or(false),
            exits: self.exits,
        }
    }

    /// The one-line SIGUSR1 report (the logger adds `kiln: `).
    pub fn report(&self) -> String {
        let sample = self.sample();
        let rip = sample
            .rip
            .map_or_else(|| "unavailable".to_string(), |rip| format!("{rip:#x}"));
        let state = if sample.halted { "halted" } else { "running" };
        format!(
            "vCPU {}: RIP {rip} ({state}); exits: {}",
            self.index, sample.exits
        )
    }

    fn fatal_exit(&self, reason: String) -> FatalExit {
        FatalExit {
            cpu: self.index,
            reason,
            rip: arch::program_counter(&self.fd),
            instruction: arch::instruction_at_pc(&self.fd, &self.mem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_parks_until_resumed_or_stopped() {
        for end_with_stop in [false, true] {
            let requests = Arc::new(VcpuRequests::default());
            requests.pause.store(true, Ordering::Release);
            let thread_requests = requests.clone();
            let vcpu = std::thread::spawn(move || thread_requests.park_while_paused());
            assert!(requests.wait_parked(Duration::from_secs(10)));
            assert!(!vcpu.is_finished());
            if end_with_stop {
                requests.request_stop();
            } else {
                requests.resume();
            }
            vcpu.join().unwrap();
            assert!(!requests.wait_parked(Duration::ZERO));
        }
    }

    fn sample(rip: u64, halted: bool) -> VcpuSample {
        VcpuSample {
            rip: Some(rip),
            halted,
            exits: ExitCounts::default(),
        }
    }

    #[test]
    fn stuck_detector_fires_once_after_threshold_repeats() {
        let mut detector = StuckDetector::default();
        assert!(!detector.observe(&sample(0x10, false), 3));
        assert!(!detector.observe(&sample(0x10, false), 3));
        assert!(!detector.observe(&sample(0x10, false), 3));
        assert!(detector.observe(&sample(0x10, false), 3));
        assert!(!detector.observe(&sample(0x10, false), 3), "reported once");
        assert!(!detector.observe(&sample(0x20, false), 3), "moved on");
    }

    #[test]
    fn halted_vcpus_are_idle_not_stuck() {
        let mut detector = StuckDetector::default();
        for _ in 0..10 {
            assert!(!detector.observe(&sample(0x10, true), 3));
        }
    }

    #[test]
    fn fatal_exit_message_names_reason_rip_and_bytes() {
        let exit = FatalExit {
            cpu: 1,
            reason: "KVM_EXIT_SHUTDOWN (triple fault)".into(),
            rip: Some(0xffff_ffff_8100_0000),
            instruction: Some(vec![0x0f, 0x01, 0xca]),
        };
        assert_eq!(
            exit.to_string(),
            "vCPU 1: KVM_EXIT_SHUTDOWN (triple fault) at RIP 0xffffffff81000000, instruction bytes 0f 01 ca"
        );
        let unknown = FatalExit {
            rip: None,
            instruction: None,
            ..exit
        };
        assert!(unknown.to_string().ends_with("(RIP unavailable)"));
    }
}
