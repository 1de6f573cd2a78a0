//! virtio-vsock (virtio 1.x, 5.10) with Firecracker's hybrid Unix-socket host side.
//!
//! Queues: [`RX_QUEUE`] carries packets to the guest, [`TX_QUEUE`] packets from it, and
//! [`EVENT_QUEUE`] is for transport events: the one this device sends is the transport reset
//! of a restored snapshot, whose host connections are gone. Only stream sockets are offered. The host side lives in
//! [`muxer`]: see there for the Unix-socket protocol and its bounds, and `connection.rs` for
//! each stream's state machine and credit accounting.
//!
//! Invariants, whatever the guest does:
//! - Guest memory is reached only through virtio-queue's `Reader`/`Writer` over chains from an
//!   activated queue (readable descriptors read, writable ones written).
//! - A malformed packet (short, oversized, wrong source CID) is consumed and logged through
//!   [`GuestErrorLog`]; one that names a connection resets that connection only. A broken ring
//!   puts the device in DEVICE_NEEDS_RESET.
//! - The device's memory is bounded (see [`muxer`]).

mod connection;
mod event_handler;
mod metrics;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
#[cfg(test)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::connection::BUF_ALLOC;
pub use self::muxer::VsockCounters;
use self::muxer::{Muxer, RxFill};
use super::guest_errors::GuestErrorLog;
use super::{
    device_type, drain_queue, features, notify_if_needed, pop_chain, stop_on_broken_ring,
    ActivateError, ActiveState, ChainOutcome, Interrupt, VirtioCommon, VirtioDevice, DRAIN_BUDGET,
};

/// Index of the receive queue (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Smallest CID a guest may have (0-2 are the hypervisor, local and host addresses).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest CID a guest may have: the config field is 64 bits but its upper half is reserved,
/// and `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Errors in creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or out of range.
    #[error("guest cid {0} is outside {MIN_GUEST_CID}..={MAX_GUEST_CID}")]
    InvalidCid(u64),
    /// An eventfd, epoll fd or timer could not be created, or the listener not set up.
    #[error("setting up the vsock device: {0}")]
    Setup(#[source] io::Error),
}

/// Why the device could not serve a queue.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("{0}")]
    Ring(#[from] virtio_queue::Error),
}

/// A vsock device's settings.
#[derive(Debug)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// Where host clients connect; also the prefix of the sockets guest connections reach.
    pub uds_path: PathBuf,
    /// The socket already bound at `uds_path`.
    pub listener: UnixListener,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx_queue: Queue,
    tx_queue: Queue,
    /// The guest's event buffers: a restored device sends its transport reset here.
    event_queue: Queue,
}

impl ActiveState for Active {
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    log_name: String,
    common: VirtioCommon,
    muxer: Muxer,
    active: Option<Active>,
    errors: GuestErrorLog,
}

impl Vsock {
    /// Creates the device around a bound listener.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let muxer = Muxer::new(config.guest_cid, config.listener, config.uds_path.clone())
            .map_err(VsockError::Setup)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            log_name: format!("virtio-vsock {}", config.uds_path.display()),
            uds_path: config.uds_path,
            common: VirtioCommon::new(
                device_type::VSOCK,
                features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC,
                &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE],
            )
            .map_err(VsockError::Setup)?,
            muxer,
            active: None,
            errors: GuestErrorLog::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The counters so far.
    pub fn counters(&self) -> VsockCounters {
        self.muxer.counters()
    }

    /// Malformed packets and rings the guest submitted.
    pub fn guest_errors(&self) -> u64 {
        self.errors.count() + self.muxer.guest_errors()
    }

    /// Handles every packet the guest queued, then sends what that produced.
    fn process_tx(&mut self) {
        let Self {
            active,
            muxer,
            errors,
            log_name,
            common,
            ..
        } = self;
        let Some(state) = active.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mem = &state.mem;
        let result = drain_queue(&mut state.tx_queue, mem, &state.interrupt, |chain| {
            match Reader::new(mem, chain) {
                Ok(mut reader) => muxer.handle_guest_packet(&mut reader, now),
                Err(e) => errors.record(log_name, &e),
            }
            // Transmit buffers are read-only: nothing was written into them.
            ChainOutcome::Used(0)
        });
        match result {
            Ok(drained) if drained.more => {
                common.renotify(TX_QUEUE);
            }
            Ok(_) => {}
            Err(e) => {
                stop_on_broken_ring(active, errors, log_name, &QueueError::from(e));
                // The guest will not reset a device in NEEDS_RESET on its own: end the host
                // streams now rather than leave them open with no EOF.
                muxer.reset();
                return;
            }
        }
        self.process_rx();
    }

    /// Fills guest rx buffers with waiting packets until either runs out. Interrupts the guest
    /// at most once, at the end.
    fn process_rx(&mut self) {
        let Self {
            active,
            muxer,
            errors,
            log_name,
            common,
            ..
        } = self;
        let Some(state) = active.as_mut() else {
            return;
        };
        let mem = &state.mem;
        let queue = &mut state.rx_queue;
        let mut used = 0u32;
        let result: Result<(), virtio_queue::Error> = (|| {
            while muxer.has_rx() {
                if used >= DRAIN_BUDGET {
                    // Come back through the queue eventfd so other devices get their turn.
                    common.renotify(RX_QUEUE);
                    return Ok(());
                }
                let Some(chain) = pop_chain(queue, mem)? else {
                    // Out of buffers: ask to be told when the guest adds some (and catch any
                    // added meanwhile).
                    if queue.enable_notification(mem)? {
                        continue;
                    }
                    return Ok(());
                };
                let head = chain.head_index();
                let fill = match Writer::new(mem, chain) {
                    Ok(mut writer) => muxer.fill_rx(&mut writer),
                    Err(e) => {
                        errors.record(log_name, &e);
                        RxFill::Used(0)
                    }
                };
                match fill {
                    RxFill::Used(len) => {
                        queue.add_used(mem, head, len)?;
                        used += 1;
                    }
                    RxFill::Nothing => {
                        queue.go_to_previous_position();
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        if used > 0 {
            notify_if_needed(queue, mem, &state.interrupt);
        }
        if let Err(e) = result {
            stop_on_broken_ring(active, errors, log_name, &QueueError::from(e));
            muxer.reset();
        }
    }

    fn process_host_events(&mut self) {
        self.muxer.process_host_events(Instant::now());
        self.process_rx();
    }

    fn process_sweep(&mut self) {
        self.muxer.consume_sweep_timer();
        self.muxer.sweep(Instant::now());
        self.process_rx();
    }
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let given = queues.len();
        let [rx_queue, tx_queue, event_queue]: [Queue; 3] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 3, given })?;
        self.active = Some(Active {
            mem,
            interrupt,
            rx_queue,
            tx_queue,
            event_queue,
        });
        self.common.wake_on_activation()
    }

    fn reset(&mut self) {
        // The guest driver is gone: so are its sockets. Host peers see their streams close.
        self.active = None;
        self.muxer.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_positions(&self) -> Vec<super::QueuePosition> {
        self.active
            .iter()
            .flat_map(|a| [&a.rx_queue, &a.tx_queue, &a.event_queue])
            .map(super::QueuePosition::of)
            .collect()
    }

    /// Host connections do not survive a snapshot: the guest is told its transport was reset
    /// (virtio 1.2, 5.10.6.6), so it drops its connections and reads its CID again; new
    /// connections work as before.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let sent = send_transport_reset(&mut active.event_queue, &active.mem)
            .map_err(|e| format!("sending the transport reset event: {e}"))?;
        if sent {
            active.interrupt.signal_used_queue();
        } else {
            log::warn!(
                "{}: the guest left no event buffer; its connections from before the snapshot \
                 stay open until they time out",
                self.log_name
            );
        }
        Ok(())
    }

    fn metric_values(&self) -> Vec<(&'static str, u64)> {
        metrics::values(&self.counters(), self.guest_errors())
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2, 5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Puts one transport-reset event (`struct virtio_vsock_event { le32 id; }`) in the guest's
/// next event buffer; false if the guest left none.
fn send_transport_reset(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, Box<dyn std::error::Error>> {
    let Some(chain) = super::pop_chain(queue, mem)? else {
        return Ok(false);
    };
    let head = chain.head_index();
    let mut writer = Writer::new(mem, chain)?;
    let written = std::io::Write::write(&mut writer, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
    queue.add_used(mem, head, u32::try_from(written)?)?;
    Ok(true)
}
