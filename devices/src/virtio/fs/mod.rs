//! virtio-fs (virtio 1.x, 5.11) as a vhost-user frontend: the guest's FUSE requests are served
//! by a vhost-user backend (virtiofsd) that maps guest memory and works the queues itself. Kiln
//! presents the device (config space: the tag and the number of request queues), negotiates
//! features with both sides, and hands the backend the guest memory table, each queue's rings,
//! the queue's notification eventfd (the KVM ioeventfd, so a guest kick reaches the backend
//! without the VMM) and a call eventfd, which the event handler turns into the device's
//! interrupt (so the InterruptStatus register stays the transport's).
//!
//! Every message to the backend is sent from the event-loop thread: activation and reset, which
//! the transport calls on a vCPU thread, only record what to do and wake the handler. A vCPU
//! therefore never blocks on the backend, and only the event loop's seccomp filter allows the
//! socket's `sendmsg`/`recvmsg`.
//!
//! Invariants: guest memory given to the backend is shared (file-backed) memory, checked at
//! activation; the backend's socket has a receive timeout ([`BACKEND_TIMEOUT`]), so a hung
//! backend cannot wedge the event loop; a backend that closes its socket leaves the device in
//! DEVICE_NEEDS_RESET, and the VMM goes on.

mod event_handler;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    device_type, features, ActivateError, Interrupt, QueuePosition, VirtioCommon, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// Longest tag (virtio 1.x, 5.11.4: a 36-byte field, NUL-padded).
pub const MAX_TAG_LEN: usize = 36;
/// Each queue's maximum size (virtiofsd's default).
pub const QUEUE_SIZE: u16 = 1024;
/// How long one reply from the backend may take before the device gives up on it.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the device waits for the backend's socket to appear and accept (a daemon started
/// just before the VM may not listen yet).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a virtio-fs device is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The vhost-user backend's Unix socket.
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue).
    pub num_request_queues: u16,
    /// Each queue's maximum size.
    pub queue_size: u16,
}

/// Errors in creating the device or talking to its backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than the config field.
    #[error("tag {0:?} must be 1 to {MAX_TAG_LEN} bytes")]
    Tag(String),
    /// The queue settings are out of range.
    #[error("{0}")]
    Queues(String),
    /// The backend's socket could not be reached.
    #[error("connecting to the vhost-user backend at {socket}: {source}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request}: {source}")]
    Backend {
        /// The request.
        request: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something virtio-fs needs.
    #[error("the vhost-user backend {0}")]
    Unsupported(String),
    /// Guest memory is private: a backend cannot map it.
    #[error(
        "guest memory is not shared memory (a vhost-user device needs file-backed guest memory)"
    )]
    PrivateMemory,
    /// An eventfd could not be created or the socket configured.
    #[error("{0}")]
    Io(#[source] std::io::Error),
}

fn backend(request: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::Backend { request, source }
}

/// The driver's queues, waiting for the event loop to hand them to the backend.
struct Activation {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// What the backend is doing with the queues.
#[derive(Default)]
enum BackendState {
    /// No queues (before activation, after a reset the backend was told of).
    #[default]
    Idle,
    /// Activated by the driver; the event loop has yet to set the backend up.
    Pending(Activation),
    /// The backend works the queues.
    Running {
        interrupt: Arc<Interrupt>,
        positions: Vec<QueuePosition>,
    },
    /// Setting up failed or the backend went away: nothing runs until the driver resets.
    Failed,
}

/// Counters, for metrics (Firecracker's `vhost_user_*` groups).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsCounters {
    /// Activations the backend refused.
    pub activate_fails: u64,
    /// Microseconds connecting and negotiating with the backend at creation.
    pub init_time_us: u64,
    /// Microseconds the last activation took.
    pub activate_time_us: u64,
    /// Times the backend closed its socket.
    pub backend_disconnects: u64,
}

/// The virtio-fs device.
pub struct Fs {
    common: VirtioCommon,
    tag: String,
    num_request_queues: u16,
    frontend: Frontend,
    /// Features the backend offers, VHOST_USER_F_PROTOCOL_FEATURES included.
    backend_features: u64,
    /// Fires when the backend has used buffers for the guest.
    call_evt: EventFd,
    state: BackendState,
    /// The backend's rings must be stopped before anything else (the driver reset the device).
    stop_pending: bool,
    /// The backend's socket is closed (it is no longer watched).
    disconnected: bool,
    counters: FsCounters,
}

/// The feature bits Kiln passes between the driver and the backend.
const GUEST_FEATURES: u64 =
    features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;

impl Fs {
    /// Connects to the backend at `config.socket` (waiting up to [`CONNECT_TIMEOUT`] for it to
    /// listen) and negotiates what can be before the guest sees the device.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        if config.tag.is_empty() || config.tag.len() > MAX_TAG_LEN {
            return Err(FsError::Tag(config.tag.clone()));
        }
        if config.num_request_queues == 0 || config.num_request_queues > 64 {
            return Err(FsError::Queues(format!(
                "num_request_queues must be 1 to 64, not {}",
                config.num_request_queues
            )));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size > 32768 {
            return Err(FsError::Queues(format!(
                "queue_size must be a power of two up to 32768, not {}",
                config.queue_size
            )));
        }
        let started = Instant::now();
        let queue_count = 1 + usize::from(config.num_request_queues);
        let frontend = connect(&config.socket, queue_count as u64, CONNECT_TIMEOUT)?;
        frontend.set_owner().map_err(backend("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(backend("GET_FEATURES"))?;
        if backend_features & features::VERSION_1 == 0 {
            return Err(FsError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let mut frontend = frontend;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if backend_features & protocol != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(backend("GET_PROTOCOL_FEATURES"))?;
            // Only MQ: Kiln sends no request that needs REPLY_ACK.
            let wanted = VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(backend("SET_PROTOCOL_FEATURES"))?;
            if offered.contains(VhostUserProtocolFeatures::MQ) {
                let max = frontend.get_queue_num().map_err(backend("GET_QUEUE_NUM"))?;
                if (queue_count as u64) > max {
                    return Err(FsError::Unsupported(format!(
                        "serves at most {max} queues, the device has {queue_count}"
                    )));
                }
            }
        }
        let sizes = vec![config.queue_size; queue_count];
        let common = VirtioCommon::new(device_type::FS, backend_features & GUEST_FEATURES, &sizes)
            .map_err(FsError::Io)?;
        Ok(Self {
            common,
            tag: config.tag.clone(),
            num_request_queues: config.num_request_queues,
            frontend,
            backend_features,
            call_evt: EventFd::new(EFD_NONBLOCK).map_err(FsError::Io)?,
            state: BackendState::Idle,
            stop_pending: false,
            disconnected: false,
            counters: FsCounters {
                init_time_us: micros(started.elapsed()),
                ..FsCounters::default()
            },
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The counters so far.
    pub fn counters(&self) -> FsCounters {
        self.counters
    }

    /// The config space: the NUL-padded tag, then the number of request queues (LE).
    fn config_space(&self) -> [u8; MAX_TAG_LEN + 4] {
        let mut config = [0u8; MAX_TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[MAX_TAG_LEN..].copy_from_slice(&u32::from(self.num_request_queues).to_le_bytes());
        config
    }

    /// Does what activation and reset asked for: on the event loop, never on a vCPU.
    fn apply_pending(&mut self) {
        if self.stop_pending {
            self.stop_pending = false;
            self.stop_backend();
        }
        if let BackendState::Pending(_) = self.state {
            let BackendState::Pending(activation) = std::mem::take(&mut self.state) else {
                return;
            };
            let started = Instant::now();
            let interrupt = activation.interrupt.clone();
            match self.start_backend(&activation) {
                Ok(()) => {
                    self.counters.activate_time_us = micros(started.elapsed());
                    self.state = BackendState::Running {
                        interrupt,
                        positions: activation.queues.iter().map(QueuePosition::of).collect(),
                    };
                }
                Err(e) => {
                    self.counters.activate_fails += 1;
                    log::error!("virtio-fs {}: activation failed: {e}", self.tag);
                    self.state = BackendState::Failed;
                    interrupt.signal_needs_reset();
                }
            }
        }
    }

    /// Hands the backend the features the driver took, guest memory, and each queue.
    fn start_backend(&mut self, activation: &Activation) -> Result<(), FsError> {
        if self.disconnected {
            return Err(FsError::Unsupported("closed its socket".into()));
        }
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let acked = self.common.acked_features() | (self.backend_features & protocol);
        self.frontend
            .set_features(acked)
            .map_err(backend("SET_FEATURES"))?;
        let regions = memory_table(&activation.mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(backend("SET_MEM_TABLE"))?;
        let kick_evts = self.common.queue_evts();
        for (index, queue) in activation.queues.iter().enumerate() {
            let config = ring_addresses(&activation.mem, queue)?;
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(backend("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(backend("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(backend("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &self.call_evt)
                .map_err(backend("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &kick_evts[index])
                .map_err(backend("SET_VRING_KICK"))?;
            if acked & protocol != 0 {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(backend("SET_VRING_ENABLE"))?;
            }
        }
        // Kicks the driver made before the backend watched the eventfds are still counted in
        // them, so the backend sees them at once; nothing to replay.
        Ok(())
    }

    /// Stops every ring the backend works (GET_VRING_BASE), after a reset.
    fn stop_backend(&mut self) {
        if self.disconnected {
            return;
        }
        for index in 0..self.common.queue_sizes().len() {
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("virtio-fs {}: stopping queue {index}: {e}", self.tag);
                return;
            }
        }
    }

    /// The backend's used buffers: raise the interrupt.
    fn backend_called(&mut self) {
        let _ = self.call_evt.read();
        if let BackendState::Running { interrupt, .. } = &self.state {
            interrupt.signal_used_queue();
        }
    }

    /// The backend's socket closed (or spoke out of turn): the device can do nothing more.
    fn backend_gone(&mut self) {
        if self.disconnected {
            return;
        }
        self.disconnected = true;
        self.counters.backend_disconnects += 1;
        log::error!(
            "virtio-fs {}: the vhost-user backend closed its socket; the device stops",
            self.tag
        );
        if let BackendState::Running { interrupt, .. } = std::mem::take(&mut self.state) {
            interrupt.signal_needs_reset();
        }
        self.state = BackendState::Failed;
    }
}

/// Connects to `socket`, retrying while it does not exist or refuses, up to `timeout`, and
/// gives every later reply [`BACKEND_TIMEOUT`] to arrive, so a backend that never answers fails
/// the request instead of wedging the event loop.
fn connect(socket: &Path, queues: u64, timeout: Duration) -> Result<Frontend, FsError> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(FsError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                })
            }
        }
    };
    stream
        .set_read_timeout(Some(BACKEND_TIMEOUT))
        .map_err(FsError::Io)?;
    Ok(Frontend::from_stream(stream, queues))
}

/// Guest memory as the backend maps it: each region's file, offset and address in this process.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| FsError::PrivateMemory)
        })
        .collect()
}

/// A queue's rings as the backend finds them: addresses in this process (vhost-user translates
/// them through the memory table's `userspace_addr`).
fn ring_addresses(mem: &GuestMemoryMmap, queue: &Queue) -> Result<VringConfigData, FsError> {
    let host = |gpa: u64| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|ptr| ptr as u64)
            .map_err(|_| FsError::Queues(format!("queue ring at {gpa:#x} is not in guest memory")))
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host(queue.desc_table())?,
        used_ring_addr: host(queue.used_ring())?,
        avail_ring_addr: host(queue.avail_ring())?,
        log_addr: None,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl VirtioDevice for Fs {
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
        let expected = self.common.queue_sizes().len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                given: queues.len(),
            });
        }
        self.state = BackendState::Pending(Activation {
            mem,
            interrupt,
            queues,
        });
        self.common.wake_on_activation()
    }

    fn reset(&mut self) {
        if matches!(self.state, BackendState::Running { .. }) {
            self.stop_pending = true;
            // The event loop stops the backend's rings; only fails on counter overflow, when
            // a wake-up is due anyway.
            let _ = self.common.activate_evt().write(1);
        }
        self.state = BackendState::Idle;
    }

    fn is_activated(&self) -> bool {
        !matches!(self.state, BackendState::Idle)
    }

    fn metric_values(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("activate_fails", c.activate_fails),
            ("init_time_us", c.init_time_us),
            ("activate_time_us", c.activate_time_us),
            ("backend_disconnects", c.backend_disconnects),
        ]
    }

    /// The backend owns the rings' progress; what is given is where they started. A VM with a
    /// vhost-user device cannot be snapshotted (the snapshot code refuses it), so these are
    /// never restored.
    fn queue_positions(&self) -> Vec<QueuePosition> {
        match &self.state {
            BackendState::Running { positions, .. } => positions.clone(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
