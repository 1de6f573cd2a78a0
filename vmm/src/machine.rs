//! A built microVM and its control loop.
//!
//! Threads: one per vCPU (`kiln_vcpu N`, or Firecracker's `fc_vcpu N` under its name), the device event loop (`kiln_vmm`), one waiting on the
//! legacy reset device's eventfd, one turning signals into events, one feeding stdin to the
//! serial console. They all report to the control loop in [`MicroVm::run`] over one channel; the
//! control loop alone decides when the VM ends.
//!
//! Every thread installs its seccomp filter ([`crate::seccomp`]) as it starts. The vCPU threads
//! start paused and are released only once every other thread, the main one last, is confined.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use devices::legacy::SerialConsole;
use devices::GuestMemoryMmap;
use signal_hook::consts::SIGUSR1;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use api::outcome::{VmmActionError, VmmOutcome};
use api::routes::ApiRequest;

use crate::arch;
use crate::device_manager::{DeviceKind, DeviceManager};
use crate::event_loop::{EventLoop, RunningEventLoop};
use crate::metrics::METRICS;
use crate::persist::{self, MicrovmState, SnapshotError};
use crate::personality::Personality;
use crate::resources::VmResources;
use crate::seccomp::{spawn_filtered, SeccompFilters, ThreadKind, PROCESS_SIGNALS};
use crate::vstate::vcpu::{StuckDetector, Vcpu, VcpuError, VcpuRequests, VcpuStop};
use crate::vstate::vm::Vm;

/// How often the watchdog samples each vCPU.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Consecutive identical running samples before a vCPU is reported stuck (one minute).
const STUCK_SAMPLES: u32 = 12;
/// How long to keep kicking a vCPU that has not answered a request.
const KICK_ATTEMPTS: u32 = 50;
const KICK_INTERVAL: Duration = Duration::from_millis(20);

/// Why the microVM ended.
#[derive(Debug)]
pub enum ExitReason {
    /// The guest rebooted (its way to end a microVM).
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// A vCPU failed.
    Fatal(VcpuError),
    /// Kiln was told to stop by this signal.
    Signal(i32),
    /// The device event loop failed (epoll itself), so the devices stopped.
    EventLoopFailed(event_manager::Error),
    /// Every thread that reports to the control loop ended without saying why (a Kiln bug: the
    /// signal watcher never ends on its own).
    EventSourcesGone,
}

/// What the control loop hears about.
pub enum VmmEvent {
    /// A vCPU thread left its run loop.
    VcpuStopped(Result<Option<VcpuStop>, VcpuError>),
    /// The guest reset the machine through its legacy reset device (x86's i8042).
    GuestReset,
    /// A signal arrived.
    Signal(i32),
    /// The device event loop failed.
    EventLoopFailed(event_manager::Error),
    /// A request from the API thread, answered on its reply channel.
    Api(ApiCall),
}

/// An API request on its way to the VMM, with the channel its answer goes back on.
pub struct ApiCall {
    /// The parsed, validated request.
    pub request: ApiRequest,
    /// Where the answer goes (the API thread waits on it).
    pub reply: Sender<VmmOutcome>,
}

/// Answers the API requests that arrive while the VM runs.
pub type RuntimeApiHandler<'a> = dyn FnMut(ApiRequest, &mut Vmm) -> VmmOutcome + 'a;

/// Why the VM could not be paused.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {0} did not stop within {PAUSE_TIMEOUT:?}")]
pub struct PauseError(usize);

/// How long a pause waits for each vCPU to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The running microVM: it owns the KVM VM and guest memory, the vCPU threads, the devices (and
/// their registry) and the device event loop, and has a method for each thing a running VM is
/// asked to do (see also `vmm_actions.rs`). It exists only between a successful start and the
/// end of the run, so a runtime action cannot reach a VM that is not running: before the start
/// there is no `Vmm` to call.
pub struct Vmm {
    // Field order is drop order: vCPU threads and the event loop before the VM and memory.
    handles: Vec<VcpuHandle>,
    event_loop: Option<RunningEventLoop>,
    devices: DeviceManager,
    paused: bool,
    /// What the VM was built from, kept up to date by every runtime change: the one
    /// description `GET /vm/config` reads after the start.
    resources: VmResources,
    vm: Vm,
    mem: GuestMemoryMmap,
    _memory_handler: Option<std::fs::File>,
}

impl Vmm {
    /// Saves the paused VM: its state to `snapshot_path`, guest memory to `mem_path` (all of
    /// it, or with `diff` the pages written since the last snapshot or the restore; see
    /// [`crate::persist`]). The VM stays paused.
    pub fn snapshot(
        &self,
        snapshot_path: &Path,
        mem_path: &Path,
        diff: bool,
    ) -> Result<(), SnapshotError> {
        if !self.paused {
            return Err(SnapshotError::NotPaused);
        }
        if diff && !self.vm.tracks_dirty_pages() {
            return Err(SnapshotError::DiffWithoutTracking);
        }
        if let Some(fs) = self
            .devices
            .registry
            .virtio_devices()
            .iter()
            .find(|d| d.kind == DeviceKind::Fs)
        {
            return Err(SnapshotError::VhostUser(fs.id.clone()));
        }
        let vcpus = persist::save_vcpus(self.handles.len(), |index, timeout| {
            self.handles[index].requests.save_state(timeout)
        })?;
        let legacy = self.devices.save_legacy();
        // With every device locked, no device raises an interrupt or touches memory: the
        // interrupt controllers, the devices and memory are saved at one instant.
        let (virtio, saved) = self.devices.save_virtio(|| {
            let vm = arch::save_vm(self.vm.fd())?;
            // KVM's log is taken (and cleared) with every snapshot, so a Diff holds what the
            // guest wrote since the last one.
            let kvm_log = if self.vm.tracks_dirty_pages() {
                self.vm.take_dirty_log(&self.mem)?
            } else {
                Vec::new()
            };
            let pages = if diff {
                persist::memory::Pages::Dirty(&kvm_log)
            } else {
                persist::memory::Pages::All
            };
            let memory = persist::memory::save(&self.mem, mem_path, pages)?;
            Ok::<_, SnapshotError>((vm, memory))
        });
        let (vm, memory) = saved?;
        let state = MicrovmState {
            vm_config: self.resources.full_config(),
            memory,
            vm,
            vcpus,
            legacy,
            virtio,
        };
        persist::write_state(&state, snapshot_path)
    }

    /// The VM's description as it stands (runtime changes included).
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// The description, for the runtime actions that change the VM (`vmm_actions.rs`).
    pub(crate) fn resources_mut(&mut self) -> &mut VmResources {
        &mut self.resources
    }

    /// True while the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU outside KVM_RUN; the guest's clock stands still for it (devices keep
    /// serving requests already queued). Resumes them again if one does not stop in time.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        for handle in &self.handles {
            handle.requests.pause.store(true, Ordering::Release);
        }
        for (index, handle) in self.handles.iter().enumerate() {
            let mut parked = false;
            for _ in 0..KICK_ATTEMPTS {
                if handle.thread.is_finished() {
                    parked = true;
                    break;
                }
                let _ = handle.thread.kill(SIGRTMIN());
                if handle.requests.wait_parked(KICK_INTERVAL) {
                    parked = true;
                    break;
                }
            }
            if !parked && !handle.requests.wait_parked(PAUSE_TIMEOUT) {
                self.resume();
                return Err(PauseError(index));
            }
        }
        self.paused = true;
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) {
        for handle in &self.handles {
            handle.requests.resume();
        }
        self.paused = false;
    }

    /// The VM's devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The guest's memory.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Answers control-loop events (API calls with `api`, signals, vCPU and device news) until
    /// the VM ends; returns why.
    pub fn run_control_loop(
        &mut self,
        rx: &Receiver<VmmEvent>,
        api: &mut RuntimeApiHandler<'_>,
    ) -> ExitReason {
        loop {
            match rx.recv_timeout(SAMPLE_INTERVAL) {
                Ok(VmmEvent::GuestReset) => return ExitReason::GuestReset,
                Ok(VmmEvent::VcpuStopped(Ok(Some(VcpuStop::Reset)))) => {
                    return ExitReason::GuestReset
                }
                Ok(VmmEvent::VcpuStopped(Ok(Some(VcpuStop::Shutdown)))) => {
                    return ExitReason::GuestPowerOff
                }
                Ok(VmmEvent::VcpuStopped(Err(e))) => return ExitReason::Fatal(e),
                // A vCPU only leaves its loop unasked when told to stop, which happens below.
                Ok(VmmEvent::VcpuStopped(Ok(None))) => {}
                Ok(VmmEvent::Signal(SIGUSR1)) => {
                    for handle in &self.handles {
                        request(handle, &handle.requests.report);
                    }
                }
                Ok(VmmEvent::Signal(signal)) => return ExitReason::Signal(signal),
                Ok(VmmEvent::EventLoopFailed(e)) => return ExitReason::EventLoopFailed(e),
                Ok(VmmEvent::Api(call)) => {
                    let response = api(call.request, self);
                    let _ = call.reply.send(response);
                }
                // Parked vCPUs take no samples; a paused VM is not a stuck one.
                Err(RecvTimeoutError::Timeout) if self.paused => {}
                Err(RecvTimeoutError::Timeout) => {
                    for handle in &self.handles {
                        request(handle, &handle.requests.sample);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return ExitReason::EventSourcesGone,
            }
        }
    }

    /// Ends the run: stops the vCPUs and the event loop, flushes the console and writes the
    /// metrics' last line with the devices' counters (Firecracker writes one on its way out).
    pub fn shut_down(mut self) {
        stop_vcpus(&self.handles);
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.stop();
        }
        if let Ok(mut console) = self.devices.console.lock() {
            console.flush();
        }
        METRICS.flush_at_vm_end(&self.devices.registry.metric_groups());
    }
}

struct VcpuHandle {
    requests: Arc<VcpuRequests>,
    thread: JoinHandle<()>,
}

/// A microVM that has been built and not yet started.
pub struct MicroVm {
    // Field order is drop order: vCPUs (threads) go before the VM and memory they use.
    vcpus: Vec<Vcpu>,
    event_loop: Option<EventLoop>,
    devices: DeviceManager,
    resources: VmResources,
    /// The vCPUs stay paused once started (a snapshot loaded without `resume_vm`).
    start_paused: bool,
    _vm: Vm,
    _mem: GuestMemoryMmap,
    /// The userfaultfd guest memory is registered with, when a page-fault handler serves it.
    memory_handler: Option<std::fs::File>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

impl MicroVm {
    /// Assembles a microVM from its built parts.
    pub fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        devices: DeviceManager,
        event_loop: EventLoop,
        vcpus: Vec<Vcpu>,
        resources: VmResources,
    ) -> Self {
        Self {
            vcpus,
            event_loop: Some(event_loop),
            devices,
            resources,
            start_paused: false,
            _vm: vm,
            _mem: mem,
            memory_handler: None,
        }
    }

    /// The microVM with the userfaultfd its memory's page-fault handler serves (kept open
    /// while the VM lives).
    pub fn with_memory_handler(self, uffd: std::fs::File) -> Self {
        Self {
            memory_handler: Some(uffd),
            ..self
        }
    }

    /// The microVM with its vCPUs left paused when it starts (`PATCH /vm` resumes them).
    pub fn paused(self) -> Self {
        Self {
            start_paused: true,
            ..self
        }
    }

    /// The serial console (to feed input or flush output).
    pub fn console(&self) -> Arc<Mutex<SerialConsole>> {
        self.devices.console.clone()
    }

    /// Starts the vCPUs and runs until the guest ends, a vCPU fails or a stop signal arrives.
    /// Each thread, this one included, is confined by its kind's filter in `filters` before the
    /// guest runs.
    pub fn run(
        self,
        forward_stdin: bool,
        filters: &Arc<SeccompFilters>,
    ) -> std::io::Result<ExitReason> {
        let (tx, rx) = mpsc::channel();
        spawn_signal_watcher(tx.clone(), filters)?;
        self.run_with(forward_stdin, filters, tx, rx, &mut |_, _| {
            Err(VmmActionError::refused("there is no API in this mode"))
        })
    }

    /// Like [`Self::run`], on a control channel the caller made (the API thread holds a sender),
    /// answering API calls with `api`. The caller watches signals ([`spawn_signal_watcher`]), from
    /// before the VM exists if it likes.
    pub fn run_with(
        self,
        forward_stdin: bool,
        filters: &Arc<SeccompFilters>,
        tx: Sender<VmmEvent>,
        rx: Receiver<VmmEvent>,
        api: &mut RuntimeApiHandler<'_>,
    ) -> std::io::Result<ExitReason> {
        let mut vmm = self.start(forward_stdin, filters, tx)?;
        let reason = vmm.run_control_loop(&rx, api);
        vmm.shut_down();
        Ok(reason)
    }

    /// Starts the microVM: the reset watcher, stdin forwarding, the device event loop and the
    /// vCPU threads, each confined by its filter in `filters` (this thread last, before the
    /// vCPUs enter the guest). Every thread reports on `tx`.
    pub fn start(
        mut self,
        forward_stdin: bool,
        filters: &Arc<SeccompFilters>,
        tx: Sender<VmmEvent>,
    ) -> std::io::Result<Vmm> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(std::io::Error::other)?;
        self.spawn_reset_watcher(tx.clone(), filters)?;
        if forward_stdin {
            spawn_stdin_forwarder(self.console(), filters)?;
        }
        let event_loop = match self.event_loop.take() {
            Some(event_loop) => {
                let tx = tx.clone();
                Some(event_loop.spawn(filters, move |e| {
                    let _ = tx.send(VmmEvent::EventLoopFailed(e));
                })?)
            }
            None => None,
        };
        // The vCPUs start parked: none enters the guest before every thread is confined.
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            match spawn_vcpu(vcpu, tx.clone(), filters) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    stop_vcpus(&handles);
                    return Err(e);
                }
            }
        }
        drop(tx);
        if let Err(e) = filters.install(ThreadKind::Vmm) {
            stop_vcpus(&handles);
            return Err(e.into());
        }
        if !self.start_paused {
            for handle in &handles {
                handle.requests.resume();
            }
        }
        Ok(Vmm {
            handles,
            event_loop,
            devices: self.devices,
            paused: self.start_paused,
            resources: self.resources,
            vm: self._vm,
            mem: self._mem,
            _memory_handler: self.memory_handler.take(),
        })
    }

    fn spawn_reset_watcher(
        &self,
        tx: Sender<VmmEvent>,
        filters: &Arc<SeccompFilters>,
    ) -> std::io::Result<()> {
        let reset = self.devices.reset_evt.try_clone()?;
        spawn_filtered("kiln_reset", filters, ThreadKind::Vmm, move || {
            if reset.read().is_ok() {
                let _ = tx.send(VmmEvent::GuestReset);
            }
        })?;
        Ok(())
    }
}

/// Sets `flag` and kicks the vCPU out of KVM_RUN until it has taken the request. A kick that lands
/// just before the vCPU enters KVM_RUN is lost, hence the retries.
fn request(handle: &VcpuHandle, flag: &std::sync::atomic::AtomicBool) {
    flag.store(true, Ordering::Release);
    for _ in 0..KICK_ATTEMPTS {
        if !flag.load(Ordering::Acquire) || handle.thread.is_finished() {
            return;
        }
        let _ = handle.thread.kill(SIGRTMIN());
        if wait_taken(flag, KICK_INTERVAL) {
            return;
        }
    }
}

/// Waits up to `within` for a vCPU to clear `flag`. A kicked vCPU usually takes its request
/// within microseconds, so it looks early and then less often: sleeping the whole interval would
/// hold the control loop (and every API call behind it) for each SIGUSR1 and watchdog sample.
fn wait_taken(flag: &std::sync::atomic::AtomicBool, within: Duration) -> bool {
    wait_for(within, || !flag.load(Ordering::Acquire))
}

/// Waits up to `within` for `done`, looking after 20 us and then less and less often.
fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    let mut nap = Duration::from_micros(20);
    while start.elapsed() < within {
        thread::sleep(nap);
        if done() {
            return true;
        }
        nap = (nap * 2).min(within / 4);
    }
    done()
}

fn stop_vcpus(handles: &[VcpuHandle]) {
    for handle in handles {
        handle.requests.request_stop();
    }
    let all_finished = || handles.iter().all(|h| h.thread.is_finished());
    for _ in 0..KICK_ATTEMPTS {
        if all_finished() {
            return;
        }
        for handle in handles.iter().filter(|h| !h.thread.is_finished()) {
            let _ = handle.thread.kill(SIGRTMIN());
        }
        // Kicked vCPUs leave within microseconds: look again soon (every stop of the VM, and so
        // every start/stop cycle, waits here).
        if wait_for(KICK_INTERVAL, all_finished) {
            return;
        }
    }
}

/// Spawns a vCPU thread, confined and parked: it runs the guest once its requests are resumed.
fn spawn_vcpu(
    mut vcpu: Vcpu,
    tx: Sender<VmmEvent>,
    filters: &Arc<SeccompFilters>,
) -> std::io::Result<VcpuHandle> {
    let requests = Arc::new(VcpuRequests::default());
    requests.pause.store(true, Ordering::Release);
    let thread_requests = requests.clone();
    let index = vcpu.index();
    let thread = spawn_filtered(
        &Personality::current().vcpu_thread_name(index),
        filters,
        ThreadKind::Vcpu,
        move || {
            let mut detector = StuckDetector::default();
            let result = vcpu.run_until_stop(&thread_requests, |cpu, sample| {
                if detector.observe(sample, STUCK_SAMPLES) {
                    log::warn!(
                        "warning: vCPU {cpu} has been running at RIP {:#x} for {} s without moving; \
                         the guest may be wedged (send SIGUSR1 for exit counts)",
                        sample.rip.unwrap_or(0),
                        STUCK_SAMPLES as u64 * SAMPLE_INTERVAL.as_secs()
                    );
                }
            });
            let _ = tx.send(VmmEvent::VcpuStopped(result));
        },
    )?;
    Ok(VcpuHandle { requests, thread })
}

/// Turns SIGUSR1 (report), SIGINT, SIGTERM and SIGHUP (stop) into control-loop events.
/// The thread is confined by the `vmm` filter.
pub fn spawn_signal_watcher(
    tx: Sender<VmmEvent>,
    filters: &Arc<SeccompFilters>,
) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(PROCESS_SIGNALS)?;
    spawn_filtered("kiln_signals", filters, ThreadKind::Vmm, move || {
        for signal in signals.forever() {
            METRICS.signals.record(signal);
            if tx.send(VmmEvent::Signal(signal)).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

/// Copies Kiln's stdin into the guest's serial input, waiting while the UART's FIFO is full.
fn spawn_stdin_forwarder(
    console: Arc<Mutex<SerialConsole>>,
    filters: &Arc<SeccompFilters>,
) -> std::io::Result<()> {
    spawn_filtered("kiln_stdin", filters, ThreadKind::Vmm, move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                let taken = match console.lock() {
                    Ok(mut console) => console.enqueue_input(pending).unwrap_or(0),
                    Err(_) => return,
                };
                pending = &pending[taken..];
                if taken == 0 {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    })?;
    Ok(())
}
