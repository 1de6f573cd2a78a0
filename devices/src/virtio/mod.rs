//! Virtio devices and the virtio-mmio transport that presents them to the guest.
//!
//! Split of work:
//! - [`mmio::MmioTransport`] runs on vCPU threads (it is a [`crate::BusDevice`]): registers, feature
//!   negotiation, queue setup and the status state machine. On DRIVER_OK it hands the configured
//!   queues to the device through [`VirtioDevice::activate`].
//! - Each device runs on the VMM's event-loop thread (it is an event-manager subscriber): the guest's
//!   queue notifications arrive on the device's queue eventfds (KVM ioeventfds), and the device
//!   raises interrupts through its [`Interrupt`] (a KVM irqfd). The data path never runs on a vCPU.
//!
//! Invariant: a device only touches guest memory through vm-memory, and only at addresses a
//! descriptor the guest placed on an activated queue names.

pub mod balloon;
pub mod block;
pub mod common;
pub mod fs;
pub mod guest_errors;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod single_queue;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::GuestMemoryMmap;
pub use common::VirtioCommon;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Device type ids (virtio 1.x, 5 "Device Types").
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// File system device (virtio-fs).
    pub const FS: u32 = 26;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from until reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bits shared by every device type.
pub mod features {
    /// Descriptors may point at indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (non-legacy) device; required by the mmio transport version 2.
    pub const VERSION_1: u64 = 1 << 32;
}

/// InterruptStatus bits (virtio 1.x, 4.2.2).
pub const INT_USED_RING: u32 = 1;
/// The configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register shared with the transport, the irqfd
/// that raises the guest interrupt, and the device's request for a reset.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
}

impl Interrupt {
    /// Wraps an irqfd (already registered with KVM for the device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd,
        }
    }

    /// Tells the guest that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the guest that the config space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// Marks the device DEVICE_NEEDS_RESET (the guest broke a queue's invariants) and tells the guest.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.raise(INT_CONFIG);
    }

    /// True after [`Self::signal_needs_reset`], until the transport resets the device.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the given bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the InterruptStatus register to a saved value without raising the interrupt again
    /// (a snapshot's interrupt controller state already holds whether it is pending).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }

    /// Raises the interrupt line again for the bits already set (a restored device).
    pub fn reraise(&self) {
        // Only fails if the counter would overflow: the interrupt is pending already.
        let _ = self.irqfd.write(1);
    }

    /// Clears every bit and the reset request (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // An irqfd write only fails when the counter would overflow, i.e. the interrupt is already
        // pending many times over: nothing is lost by ignoring it.
        let _ = self.irqfd.write(1);
    }

    /// The irqfd, for tests that check an interrupt was raised.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("the driver readied {given} queues, the device needs {expected}")]
    QueueCount {
        /// How many queues the device has.
        expected: usize,
        /// How many queues the driver readied.
        given: usize,
    },
    /// The device's activation eventfd could not be written.
    #[error("waking the device's event loop: {0}")]
    Wake(String),
}

/// What a virtio device offers the transport.
///
/// Called with the device locked, from vCPU threads (config, activation, reset) and from the event
/// loop (processing). Implementations keep every guest-controlled value checked. The provided
/// methods read the device's [`VirtioCommon`]; a device implements what is its own: config space,
/// activation, reset and its counters.
pub trait VirtioDevice: Send + std::any::Any {
    /// The state every device holds the same way.
    fn common(&self) -> &VirtioCommon;
    /// The same, to change.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }
    /// The eventfds the guest's notifications for each queue arrive on (same order as the queues).
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_evts()
    }
    /// Features the device offers.
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// Features the driver accepted: always a subset of [`Self::avail_features`].
    fn set_acked_features(&mut self, acked: u64) {
        self.common_mut().set_acked_features(acked);
    }
    /// Reads config space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes config space at `offset` (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the queues the driver readied (each valid in `mem`, in queue
    /// order: a device whose queue count depends on the features checks it) and its interrupt
    /// line.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues, ready for a new activation.
    fn reset(&mut self);
    /// True between a successful activation and the next reset.
    fn is_activated(&self) -> bool;
    /// Every counter since the device was created, under Firecracker's metric field names.
    fn metric_values(&self) -> Vec<(&'static str, u64)>;
    /// Each live queue's position, in queue order; empty when the device is not activated. A
    /// chain the device holds unanswered is not counted as taken ([`QueuePosition::giving_back`]).
    fn queue_positions(&self) -> Vec<QueuePosition>;
    /// The device's own state for a snapshot, beyond its configuration (which the VM's
    /// description holds) and its queues (which the transport saves): JSON, `null` for none.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes back what [`Self::save_state`] gave, once the transport has activated the restored
    /// device (when the snapshot's driver had). A value the device cannot use is an error.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Counters the device keeps for a service it carries, each under Firecracker's top-level
    /// group for it (a network interface's MMDS: `mmds`); summed over the devices that report
    /// the group.
    fn service_metric_groups(&self) -> Vec<(&'static str, Vec<(&'static str, u64)>)> {
        Vec::new()
    }
}

/// A live queue's progress, the part of its state the device alone advances: what a snapshot
/// saves of it beside the transport's [`mmio::QueueRegisters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueuePosition {
    /// Where `queue` stands.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Where `queue` stands with the last `held` chains it took given back: a device that holds
    /// chains unanswered (the balloon's statistics buffer) saves this, so the restored device
    /// takes them again from the ring.
    pub fn giving_back(queue: &Queue, held: u16) -> Self {
        Self {
            next_avail: queue.next_avail().wrapping_sub(held),
            next_used: queue.next_used(),
        }
    }

    /// Puts `queue` at this position.
    pub fn apply(&self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
    }
}

/// A device's rate limiters' budgets as its snapshot state (`{"NAME": budgets, ...}`).
pub fn save_limiters(limiters: &[(&str, &crate::rate_limiter::RateLimiter)]) -> serde_json::Value {
    let map = limiters
        .iter()
        .map(|(name, limiter)| {
            let budgets = serde_json::to_value(limiter.budgets()).unwrap_or_default();
            ((*name).to_string(), budgets)
        })
        .collect();
    serde_json::Value::Object(map)
}

/// Takes back what [`save_limiters`] gave; a limiter the state does not name keeps its full
/// buckets, a malformed entry is an error.
pub fn restore_limiters(
    state: &serde_json::Value,
    limiters: &mut [(&str, &mut crate::rate_limiter::RateLimiter)],
) -> Result<(), String> {
    for (name, limiter) in limiters.iter_mut() {
        if let Some(saved) = state.get(*name) {
            let budgets: crate::rate_limiter::RateLimiterBudgets =
                serde_json::from_value(saved.clone())
                    .map_err(|e| format!("rate limiter {name}: {e}"))?;
            limiter.restore_budgets(&budgets);
        }
    }
    Ok(())
}

/// What a device holds between activation and reset: its queues, the guest memory they live
/// in, and its interrupt line.
pub trait ActiveState {
    /// The device's interrupt line.
    fn interrupt(&self) -> &Interrupt;
}

/// Takes a device out of service after its guest broke a ring (rings outside memory, an
/// impossible index): records `error`, marks the device DEVICE_NEEDS_RESET (which interrupts
/// the guest) and drops `active`, so nothing more is read from the ring until the driver resets
/// the device and sets it up again.
pub fn stop_on_broken_ring<A: ActiveState>(
    active: &mut Option<A>,
    errors: &mut guest_errors::GuestErrorLog,
    device: &str,
    error: &dyn std::fmt::Display,
) {
    errors.record(device, error);
    if let Some(state) = active.take() {
        state.interrupt().signal_needs_reset();
    }
}

/// A descriptor chain popped from a queue, borrowing guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Pops the next available chain. Unlike `Queue::pop_descriptor_chain`, a broken available ring
/// (an index that jumped by more than the queue size, a ring outside memory) is an error, so the
/// device can put itself in DEVICE_NEEDS_RESET instead of silently stalling.
pub fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<Chain<'a>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// What a device did with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Done: return it to the guest with this many bytes written into its writable buffers.
    Used(u32),
    /// Done as [`ChainOutcome::Used`], and the device has had its share of this pass (bytes, not
    /// only chains, count): stop here with [`Drained::more`] set, so the device comes back
    /// through its queue's eventfd after the other devices had their turn.
    UsedThenYield(u32),
    /// Not now (rate limited, host busy): leave it at the head of the queue for a later retry.
    Retry,
}

/// How a [`drain_queue`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Chains returned to the guest.
    pub used: u32,
    /// The device asked to retry a chain later.
    pub stalled: bool,
    /// The budget ran out with chains still waiting: the caller must come back (e.g. by writing
    /// its own queue eventfd) so other devices on the event loop get their turn.
    pub more: bool,
}

/// Most chains handled per [`drain_queue`] call, so one busy guest queue cannot monopolise the
/// event loop.
pub const DRAIN_BUDGET: u32 = 1024;

/// Hands each available chain to `handle` and returns the handled ones to the guest, until the
/// queue is empty with notifications re-armed (EVENT_IDX's avail_event written), `handle` asks for a
/// retry, or [`DRAIN_BUDGET`] chains were handled. Interrupts the guest once at the end if it asked.
///
/// Errors mean the guest broke the queue (rings outside memory, an impossible available index):
/// the device should stop using the queue and ask for a reset.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: impl FnMut(Chain<'_>) -> ChainOutcome,
) -> Result<Drained, virtio_queue::Error> {
    let mut drained = Drained::default();
    let result = (|| loop {
        while let Some(chain) = pop_chain(queue, mem)? {
            let head = chain.head_index();
            match handle(chain) {
                ChainOutcome::Used(len) => {
                    queue.add_used(mem, head, len)?;
                    drained.used += 1;
                }
                ChainOutcome::UsedThenYield(len) => {
                    queue.add_used(mem, head, len)?;
                    drained.used += 1;
                    drained.more = true;
                    return Ok(());
                }
                ChainOutcome::Retry => {
                    queue.go_to_previous_position();
                    drained.stalled = true;
                    return Ok(());
                }
            }
            if drained.used >= DRAIN_BUDGET {
                drained.more = true;
                return Ok(());
            }
        }
        if !queue.enable_notification(mem)? {
            return Ok(());
        }
    })();
    if drained.used > 0 {
        notify_if_needed(queue, mem, interrupt);
    }
    result.map(|()| drained)
}

/// Interrupts the guest if, after a batch of `add_used` calls, it asked to be told.
pub fn notify_if_needed(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    // A used_event that cannot be read means a broken ring; interrupting is the safe answer.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

/// Reads `data.len()` bytes at `offset` of a config space image; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Test helpers shared by the devices' unit tests.
#[cfg(test)]
pub(crate) mod test_queue {
    use crate::GuestMemoryMmap;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    /// Makes each slice of `chains` one available chain: the mock's own multi-chain builder takes
    /// the NEXT flags and indices as given, so they are set here.
    pub fn add_chains(vq: &MockSplitQueue<GuestMemoryMmap>, chains: &[&[RawDescriptor]]) {
        add_chains_at(vq, chains, 0);
    }

    /// [`add_chains`] with the descriptors stored from table index `first` on, so chains added
    /// by earlier calls stay intact.
    pub fn add_chains_at(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        chains: &[&[RawDescriptor]],
        first: u16,
    ) {
        let mut linked = Vec::new();
        for chain in chains {
            for (i, raw) in chain.iter().enumerate() {
                let d = SplitDescriptor::from(*raw);
                let index = first + linked.len() as u16;
                let (flags, next) = if i + 1 == chain.len() {
                    (d.flags() & !(VRING_DESC_F_NEXT as u16), 0)
                } else {
                    (d.flags() | VRING_DESC_F_NEXT as u16, index + 1)
                };
                linked.push(RawDescriptor::from(SplitDescriptor::new(
                    d.addr().0,
                    d.len(),
                    flags,
                    next,
                )));
            }
        }
        vq.add_desc_chains(&linked, first)
            .expect("test chains fit the queue");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Queues(Arc<Interrupt>);

    impl ActiveState for Queues {
        fn interrupt(&self) -> &Interrupt {
            &self.0
        }
    }

    #[test]
    fn a_broken_ring_stops_the_device_until_reset() {
        let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut active = Some(Queues(int.clone()));
        let mut errors = guest_errors::GuestErrorLog::default();
        stop_on_broken_ring(
            &mut active,
            &mut errors,
            "virtio-test",
            &"avail index jumped",
        );
        assert!(active.is_none());
        assert_eq!(errors.count(), 1);
        assert!(int.needs_reset());
        assert_eq!(int.status(), INT_CONFIG);
        // Already stopped (a second broken queue in the same pass): counted, nothing else.
        stop_on_broken_ring(&mut active, &mut errors, "virtio-test", &"again");
        assert_eq!(errors.count(), 2);
        assert_eq!(int.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let int = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        int.signal_used_queue();
        int.signal_config_change();
        assert_eq!(int.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(int.irqfd().read().unwrap(), 2);
        int.acknowledge(INT_USED_RING);
        assert_eq!(int.status(), INT_CONFIG);
        int.signal_needs_reset();
        assert!(int.needs_reset());
        int.reset();
        assert_eq!(int.status(), 0);
        assert!(!int.needs_reset());
    }

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
