//! virtio-net (virtio 1.x, 5.1) backed by a TAP interface.
//!
//! Queue [`RX_QUEUE`] carries frames to the guest, queue [`TX_QUEUE`] frames from it. Every frame
//! starts with the 12-byte `virtio_net_hdr_v1` that the TAP uses too ([`VNET_HDR_LEN`]), so
//! headers pass through untouched, apart from `num_buffers`, which the device fills in on receive.
//!
//! - Transmit (`tx.rs`): each chain's readable buffers are gathered into one bounded buffer and
//!   written to the TAP in a single write(2). A frame the TAP cannot take right now is dropped and
//!   counted, as on a real NIC.
//! - Receive (`rx.rs`): the TAP is read until it would block. A frame that has nowhere to go yet
//!   (no guest buffers, or the rate limiter says wait) is held; at most one frame is ever held,
//!   the rest wait in the kernel's TAP queue.
//!
//! Invariants, whatever the guest does:
//! - The device's memory is its two frame buffers ([`MAX_BUFFER_LEN`] bytes each, allocated
//!   once) and per-frame bookkeeping bounded by the queue size.
//! - Guest memory is only reached through vm-memory, at descriptors on an activated queue, and
//!   only writable descriptors are written.
//! - A malformed chain is returned to the guest with used length 0 and logged through
//!   [`GuestErrorLog`]; the requests after it are served normally. Only a broken ring (indices
//!   or rings outside memory) stops the device, in DEVICE_NEEDS_RESET.

mod event_handler;
mod metrics;
mod rx;
pub mod tap;
mod tx;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_net;
use virtio_queue::{Queue, QueueT};
#[cfg(test)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::rx::RxOutcome;
pub use self::tap::{tap_offload_flags, Tap, TapError};
use super::guest_errors::GuestErrorLog;
use super::{
    device_type, drain_queue, features, notify_if_needed, stop_on_broken_ring, ActivateError,
    ActiveState, ChainOutcome, Interrupt, VirtioCommon, VirtioDevice, DRAIN_BUDGET,
};
use crate::mmds::stack::MmdsCounters;
use crate::mmds::MmdsStack;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, TokenType};

/// Index of the receive queue (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → device).
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which starts every frame on both queues and on the TAP.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of the header's little-endian `num_buffers` field: how many receive chains one frame
/// spans.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Longest Ethernet frame handled (a 64 KiB GSO frame with its Ethernet and VLAN headers, as in
/// Firecracker).
pub const MAX_FRAME_LEN: usize = 65562;
/// Longest frame plus its vnet header: the size of each of the device's two frame buffers.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Smallest MTU a device may offer (virtio 1.x, 5.1.4.1; IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// Config space size: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_SIZE: usize = 12;

/// Feature bits (virtio 1.x, 5.1.3).
pub mod feature {
    use virtio_bindings::virtio_net as bits;

    /// The device takes frames with a partial checksum.
    pub const CSUM: u64 = 1 << bits::VIRTIO_NET_F_CSUM;
    /// The guest takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << bits::VIRTIO_NET_F_GUEST_CSUM;
    /// The config space's `mtu` is valid.
    pub const MTU: u64 = 1 << bits::VIRTIO_NET_F_MTU;
    /// The config space's `mac` is valid.
    pub const MAC: u64 = 1 << bits::VIRTIO_NET_F_MAC;
    /// The guest takes TCPv4 GSO frames.
    pub const GUEST_TSO4: u64 = 1 << bits::VIRTIO_NET_F_GUEST_TSO4;
    /// The guest takes TCPv6 GSO frames.
    pub const GUEST_TSO6: u64 = 1 << bits::VIRTIO_NET_F_GUEST_TSO6;
    /// The guest takes UFO frames.
    pub const GUEST_UFO: u64 = 1 << bits::VIRTIO_NET_F_GUEST_UFO;
    /// The device takes TCPv4 GSO frames.
    pub const HOST_TSO4: u64 = 1 << bits::VIRTIO_NET_F_HOST_TSO4;
    /// The device takes TCPv6 GSO frames.
    pub const HOST_TSO6: u64 = 1 << bits::VIRTIO_NET_F_HOST_TSO6;
    /// The device takes UFO frames.
    pub const HOST_UFO: u64 = 1 << bits::VIRTIO_NET_F_HOST_UFO;
    /// A received frame may span several chains (`num_buffers` says how many).
    pub const MRG_RXBUF: u64 = 1 << bits::VIRTIO_NET_F_MRG_RXBUF;
}

/// The host side of the device: a [`Tap`] in production, a fake in tests.
///
/// Each read or write moves one whole frame, vnet header first; neither ever blocks (they fail
/// with `WouldBlock` instead), and the fd polls readable when a frame is waiting.
pub trait NetBackend: Read + Write + AsRawFd + Send + 'static {
    /// Sets which offloads (`TUN_F_*`, see [`tap_offload_flags`]) frames read from the backend
    /// may carry.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// Errors in creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The receive rate limiter.
    #[error("rx rate limiter: {0}")]
    RxRateLimiter(#[source] RateLimiterError),
    /// The transmit rate limiter.
    #[error("tx rate limiter: {0}")]
    TxRateLimiter(#[source] RateLimiterError),
    /// The MTU is below [`MIN_MTU`].
    #[error("mtu {0} is below the minimum of {MIN_MTU}")]
    MtuTooSmall(u16),
    /// The MAC cannot be an interface's address.
    #[error("mac {}: {reason}", format_mac(.mac))]
    InvalidMac {
        /// The address given.
        mac: [u8; 6],
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Backend failures (not the guest's doing), logged with sampling like guest errors.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("writing a frame to the tap: {0}")]
    Write(io::Error),
    #[error("reading a frame from the tap: {0}")]
    Read(io::Error),
}

/// A network device's settings.
#[derive(Debug)]
pub struct NetDeviceConfig<B = Tap> {
    /// The device's id, used in log messages.
    pub id: String,
    /// The host side, already open.
    pub tap: B,
    /// The guest's MAC address; without one the device does not offer F_MAC and the guest picks
    /// its own.
    pub mac: Option<[u8; 6]>,
    /// The MTU to offer (F_MTU); at least [`MIN_MTU`].
    pub mtu: Option<u16>,
    /// Limits on frames and bytes delivered to the guest.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on frames and bytes sent by the guest.
    pub tx_rate_limiter: RateLimiterConfig,
    /// MMDS on this interface: frames for its address go to it instead of the TAP.
    pub mmds: Option<MmdsStack>,
}

/// Counters, for metrics and tests. Byte counts are Ethernet bytes, without the vnet header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames read from the TAP and never delivered (too big for the guest's buffers, shorter
    /// than a vnet header, or held when the device was reset).
    pub rx_dropped: u64,
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Bytes written to the TAP.
    pub tx_bytes: u64,
    /// Well-formed guest frames the TAP did not take (full, or an error).
    pub tx_dropped: u64,
    /// Malformed chains or rings the guest submitted, on either queue.
    pub guest_errors: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx_queue: Queue,
    tx_queue: Queue,
}

impl ActiveState for Active {
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// The network device.
pub struct Net<B = Tap> {
    id: String,
    /// `virtio-net ID`, the prefix of every log line.
    log_name: String,
    backend: B,
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    common: VirtioCommon,
    rx_rate_limiter: RateLimiter,
    tx_rate_limiter: RateLimiter,
    active: Option<Active>,
    /// Receive buffer; `rx_frame[..len]` holds a frame not yet delivered iff `rx_pending` is
    /// `Some(len)`.
    rx_frame: Box<[u8]>,
    rx_pending: Option<usize>,
    /// Transmit buffer, only meaningful while one chain is handled.
    tx_frame: Box<[u8]>,
    errors: GuestErrorLog,
    backend_errors: GuestErrorLog,
    counters: NetCounters,
    mmds: Option<MmdsStack>,
}

impl<B: NetBackend> Net<B> {
    /// Creates the device around an open backend.
    pub fn new(config: NetDeviceConfig<B>) -> Result<Self, NetError> {
        if let Some(mac) = config.mac {
            validate_mac(mac)?;
        }
        if let Some(mtu) = config.mtu.filter(|&mtu| mtu < MIN_MTU) {
            return Err(NetError::MtuTooSmall(mtu));
        }
        let mut avail_features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::MRG_RXBUF
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6
            | feature::GUEST_UFO
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::HOST_UFO;
        if config.mac.is_some() {
            avail_features |= feature::MAC;
        }
        if config.mtu.is_some() {
            avail_features |= feature::MTU;
        }
        Ok(Self {
            log_name: format!("virtio-net {}", config.id),
            id: config.id,
            backend: config.tap,
            mac: config.mac,
            mtu: config.mtu,
            common: VirtioCommon::new(device_type::NET, avail_features, &[QUEUE_SIZE, QUEUE_SIZE])
                .map_err(NetError::EventFd)?,
            rx_rate_limiter: RateLimiter::new(&config.rx_rate_limiter)
                .map_err(NetError::RxRateLimiter)?,
            tx_rate_limiter: RateLimiter::new(&config.tx_rate_limiter)
                .map_err(NetError::TxRateLimiter)?,
            active: None,
            rx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
            rx_pending: None,
            tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
            errors: GuestErrorLog::default(),
            backend_errors: GuestErrorLog::host(),
            counters: NetCounters::default(),
            mmds: config.mmds,
        })
    }

    /// MMDS's counters on this interface, if it serves MMDS.
    pub fn mmds_counters(&self) -> Option<MmdsCounters> {
        self.mmds.as_ref().map(MmdsStack::counters)
    }

    /// Whether MMDS has frames waiting for the guest.
    fn mmds_has_frames(&self) -> bool {
        self.mmds.as_ref().is_some_and(MmdsStack::has_frames)
    }

    /// The device's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the buckets of the receive and/or transmit rate limiter (Firecracker's
    /// `PATCH /network-interfaces/{id}`); `None` leaves that limiter as it is. Each given config is
    /// the limiter's whole new configuration: a bucket it leaves out stops limiting, so a caller
    /// applying a partial update merges it with the current configuration first. New buckets
    /// start full, and a limiter that is holding frames back retries them at once.
    ///
    /// Both configs are validated before either is applied, so an error changes nothing.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), NetError> {
        if let Some(rx) = rx {
            rx.validate().map_err(NetError::RxRateLimiter)?;
        }
        if let Some(tx) = tx {
            tx.validate().map_err(NetError::TxRateLimiter)?;
        }
        if let Some(rx) = rx {
            self.rx_rate_limiter.update_buckets(rx);
        }
        if let Some(tx) = tx {
            self.tx_rate_limiter.update_buckets(tx);
        }
        Ok(())
    }

    /// The counters so far.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            guest_errors: self.errors.count(),
            ..self.counters
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..6].copy_from_slice(&self.mac.unwrap_or_default());
        // Only meaningful with F_STATUS, which is not offered: the link is always up.
        let link_up = virtio_net::VIRTIO_NET_S_LINK_UP as u16;
        config[6..8].copy_from_slice(&link_up.to_le_bytes());
        // max_virtqueue_pairs: one rx/tx pair (F_MQ is not offered).
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    /// Sends every transmit chain the rate limiter allows to the backend.
    fn process_tx(&mut self) {
        let Self {
            active,
            backend,
            tx_rate_limiter,
            tx_frame,
            errors,
            backend_errors,
            counters,
            log_name,
            common,
            mmds,
            ..
        } = self;
        let Some(state) = active.as_mut() else {
            return;
        };
        if tx_rate_limiter.is_blocked() {
            // Retried when the limiter's timer fires.
            return;
        }
        let mem = &state.mem;
        let result = drain_queue(&mut state.tx_queue, mem, &state.interrupt, |chain| {
            let len = match tx::gather_frame(chain, mem, tx_frame) {
                Ok(len) => len,
                Err(e) => {
                    errors.record(log_name, &e);
                    return ChainOutcome::Used(0);
                }
            };
            let frame_bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
            if !charge(tx_rate_limiter, frame_bytes) {
                return ChainOutcome::Retry;
            }
            if let Some(stack) = mmds.as_mut() {
                let frame = &tx_frame[VNET_HDR_LEN..len];
                if stack.is_for_mmds(frame) {
                    // Never reaches the TAP: MMDS answers it, through the receive queue.
                    stack.take_frame(frame);
                    return ChainOutcome::Used(0);
                }
            }
            match backend.write(&tx_frame[..len]) {
                Ok(_) => {
                    counters.tx_frames += 1;
                    counters.tx_bytes += frame_bytes;
                }
                Err(e) => {
                    // A full TAP queue drops the frame, like a busy NIC; TCP will resend.
                    counters.tx_dropped += 1;
                    if e.kind() != io::ErrorKind::WouldBlock {
                        backend_errors.record(log_name, &BackendError::Write(e));
                    }
                }
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
                stop_on_broken_ring(active, errors, log_name, &e);
            }
        }
    }

    /// Delivers the held frame, then reads and delivers frames from the backend until it would
    /// block, the guest has no room, or the rate limiter says wait. Interrupts the guest at most
    /// once, at the end.
    fn process_rx(&mut self) {
        let Self {
            active,
            backend,
            rx_rate_limiter,
            rx_frame,
            rx_pending,
            errors,
            backend_errors,
            counters,
            log_name,
            common,
            mmds,
            ..
        } = self;
        let Some(state) = active.as_mut() else {
            return;
        };
        let mergeable = common.has_acked(feature::MRG_RXBUF);
        let used_before = state.rx_queue.next_used();
        let mut frames_read = 0u32;
        let result = loop {
            if rx_rate_limiter.is_blocked() {
                // Retried when the limiter's timer fires.
                break Ok(());
            }
            let len = match *rx_pending {
                Some(len) => len,
                None => {
                    // MMDS's answers first: they are few, and a guest is waiting on them.
                    if let Some(frame) = mmds.as_mut().and_then(MmdsStack::next_frame) {
                        let len = VNET_HDR_LEN + frame.len();
                        if let Some(dest) = rx_frame.get_mut(..len) {
                            // A zero vnet header: no offloads, checksums complete.
                            dest[..VNET_HDR_LEN].fill(0);
                            dest[VNET_HDR_LEN..].copy_from_slice(&frame);
                            *rx_pending = Some(len);
                            continue;
                        }
                    }
                    if frames_read >= DRAIN_BUDGET {
                        // Come back through the queue eventfd so other devices get their turn:
                        // the edge-triggered TAP would not report the frames still queued.
                        common.renotify(RX_QUEUE);
                        break Ok(());
                    }
                    match backend.read(rx_frame) {
                        Ok(len) => {
                            frames_read += 1;
                            len
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            backend_errors.record(log_name, &BackendError::Read(e));
                            break Ok(());
                        }
                    }
                }
            };
            *rx_pending = None;
            let Some(frame) = rx_frame.get_mut(..len).filter(|f| f.len() >= VNET_HDR_LEN) else {
                counters.rx_dropped += 1;
                continue;
            };
            let frame_bytes = (len - VNET_HDR_LEN) as u64;
            if !charge(rx_rate_limiter, frame_bytes) {
                *rx_pending = Some(len);
                break Ok(());
            }
            let outcome = rx::deliver_frame(
                &mut state.rx_queue,
                &state.mem,
                frame,
                mergeable,
                errors,
                log_name,
            );
            match outcome {
                Ok(RxOutcome::Delivered) => {
                    counters.rx_frames += 1;
                    counters.rx_bytes += frame_bytes;
                }
                Ok(RxOutcome::NoBuffers) => {
                    refund(rx_rate_limiter, frame_bytes);
                    *rx_pending = Some(len);
                    break Ok(());
                }
                Ok(RxOutcome::DoesNotFit) => {
                    refund(rx_rate_limiter, frame_bytes);
                    counters.rx_dropped += 1;
                }
                Err(e) => {
                    counters.rx_dropped += 1;
                    break Err(e);
                }
            }
        };
        if state.rx_queue.next_used() != used_before {
            notify_if_needed(&mut state.rx_queue, &state.mem, &state.interrupt);
        }
        if let Err(e) = result {
            stop_on_broken_ring(active, errors, log_name, &e);
        }
    }
}

/// Takes one op and `bytes` from `limiter`; on refusal nothing is kept and the limiter's timer
/// is armed.
fn charge(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// Gives back what [`charge`] took, for a frame that was not delivered after all.
fn refund(limiter: &mut RateLimiter, bytes: u64) {
    limiter.manual_replenish(1, TokenType::Ops);
    if bytes > 0 {
        limiter.manual_replenish(bytes, TokenType::Bytes);
    }
}

/// Refuses addresses no interface may have.
fn validate_mac(mac: [u8; 6]) -> Result<(), NetError> {
    let reason = if mac[0] & 1 != 0 {
        "a multicast address cannot be an interface's address"
    } else if mac == [0; 6] {
        "the all-zero address cannot be an interface's address"
    } else {
        return Ok(());
    };
    Err(NetError::InvalidMac { mac, reason })
}

fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let given = queues.len();
        let [rx_queue, tx_queue]: [Queue; 2] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 2, given })?;
        let offloads = tap_offload_flags(self.common.acked_features());
        if let Err(e) = self.backend.set_offload(offloads) {
            // Without offloads the TAP hands over only finished frames, which every guest takes;
            // clear whatever an earlier activation enabled.
            log::warn!(
                "{}: enabling tap offloads {offloads:#x}: {e}",
                self.log_name
            );
            let _ = self.backend.set_offload(0);
        }
        self.active = Some(Active {
            mem,
            interrupt,
            rx_queue,
            tx_queue,
        });
        self.common.wake_on_activation()
    }

    fn reset(&mut self) {
        self.active = None;
        if self.rx_pending.take().is_some() {
            self.counters.rx_dropped += 1;
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_positions(&self) -> Vec<super::QueuePosition> {
        self.active
            .iter()
            .flat_map(|a| [&a.rx_queue, &a.tx_queue])
            .map(super::QueuePosition::of)
            .collect()
    }

    fn save_state(&self) -> serde_json::Value {
        super::save_limiters(&[
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ])
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        super::restore_limiters(
            state,
            &mut [
                ("rx_rate_limiter", &mut self.rx_rate_limiter),
                ("tx_rate_limiter", &mut self.tx_rate_limiter),
            ],
        )
    }

    fn metric_values(&self) -> Vec<(&'static str, u64)> {
        metrics::values(&self.counters())
    }

    fn service_metric_groups(&self) -> Vec<(&'static str, Vec<(&'static str, u64)>)> {
        self.mmds_counters()
            .map(|c| vec![("mmds", metrics::mmds_values(&c))])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
