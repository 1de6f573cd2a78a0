//! Creates the guest's devices and wires them to the buses and to KVM's interrupt lines.
//!
//! Virtio devices sit on virtio-mmio transports: slot N has the 4 KiB window at
//! `VIRTIO_MMIO_START + N * 4 KiB` and GSI `FIRST_DEVICE_GSI + N`. The guest's notifications reach the
//! device through an ioeventfd on the window's QueueNotify register (so a vCPU never runs device
//! code), and the device's interrupts leave through an irqfd. The devices' event handlers are
//! collected here for the VMM's event loop.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::http::{bind_api_socket, BindError, SocketGuard};
use devices::legacy::{OutputLimits, SerialConsole};
use devices::mmds::MmdsStack;
use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonError};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::fs::{Fs, FsConfig, FsError};
use devices::virtio::mmio::{
    lock as lock_device, MmioTransport, RestoreError, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::net::{Net, NetDeviceConfig, NetError, Tap, TapError};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig, VsockError};
use devices::virtio::{Interrupt, VirtioDevice};
use devices::GuestMemoryMmap;
use devices::{Bus, BusError};
use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{BOOT_TIMER_ADDR, FIRST_DEVICE_GSI, LAST_DEVICE_GSI, VIRTIO_MMIO_START};
use crate::arch::{LegacyDevices, LegacyState};
use crate::device_config::{DriveConfig, NetConfig, RngConfig, VsockConfig};
use crate::persist::VirtioDeviceState;
use crate::vstate::vm::Vm;

mod registry;

pub use registry::{
    locked, DeviceKind, DeviceRegistry, MetricSource, RegisteredDevice, RegistryError,
};

/// A device's event handler, as the VMM's event loop holds it.
pub type SharedSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Where a virtio device sits: its MMIO window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base address of the 4 KiB register window.
    pub base: u64,
    /// The interrupt line (GSI) its interrupts arrive on.
    pub gsi: u32,
}

impl VirtioSlot {
    /// The `index`th slot, or `None` when the interrupt lines have run out.
    pub fn nth(index: usize) -> Option<Self> {
        let index = u32::try_from(index).ok()?;
        let gsi = FIRST_DEVICE_GSI.checked_add(index)?;
        (gsi <= LAST_DEVICE_GSI).then(|| Self {
            base: VIRTIO_MMIO_START + u64::from(index) * MMIO_WINDOW_SIZE,
            gsi,
        })
    }
}

/// Errors in creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("registering the irqfd for GSI {gsi}: {source}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused an ioeventfd.
    #[error("registering the ioeventfd for queue {queue} at {addr:#x}: {source}")]
    Ioeventfd {
        /// Guest physical address of the device's QueueNotify register.
        addr: u64,
        /// Index of the queue.
        queue: usize,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two devices claimed the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// More virtio devices than interrupt lines.
    #[error("no MMIO slot or interrupt line left for another virtio device")]
    NoSlot,
    /// A virtio device type the registry has no kind for (a Kiln bug).
    #[error("virtio device type with no registry kind")]
    UnknownKind,
    /// A drive could not be set up (its image, usually).
    #[error("drive {id}: {source}")]
    Drive {
        /// The drive's id (empty if it has none).
        id: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// A TAP device could not be opened.
    #[error("network interface {id}: TAP {tap}: {source}")]
    Tap {
        /// The network interface's id (empty if it has none).
        id: String,
        /// The TAP device's name.
        tap: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// A network device could not be set up.
    #[error("network interface {id}: {source}")]
    Net {
        /// The network interface's id (empty if it has none).
        id: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// The entropy device could not be set up.
    #[error("entropy device: {0}")]
    Rng(#[source] RngError),
    /// The vsock device's host socket could not be created.
    #[error("vsock socket: {0}")]
    VsockSocket(#[source] BindError),
    /// The vsock device could not be set up.
    #[error("vsock device: {0}")]
    Vsock(#[source] VsockError),
    /// A virtio-fs device could not be set up (its backend, usually).
    #[error("virtio-fs {tag}: {source}")]
    Fs {
        /// The device's tag.
        tag: String,
        /// Why.
        #[source]
        source: FsError,
    },
    /// The balloon device could not be set up.
    #[error("balloon device: {0}")]
    Balloon(#[source] BalloonError),
    /// A snapshot's devices are not the ones its configuration builds.
    #[error("the snapshot's devices ({saved}) are not the configured ones ({built})")]
    SnapshotDevices {
        /// The saved devices' ids, in slot order.
        saved: String,
        /// The built devices' ids, in slot order.
        built: String,
    },
    /// A snapshot's device state could not be restored.
    #[error("restoring device {id}: {source}")]
    Restore {
        /// The device's id.
        id: String,
        /// Why.
        #[source]
        source: RestoreError,
    },
}

impl DeviceError {
    /// True when the error is about what the user gave: an image that cannot be opened or is
    /// locked, a TAP that does not exist or is busy.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Drive {
                source: BlockError::Disk(_),
                ..
            } | Self::Tap { .. }
                | Self::VsockSocket(_)
                | Self::Fs {
                    source: FsError::Connect { .. } | FsError::Tag(_) | FsError::Queues(_),
                    ..
                }
        )
    }
}

/// The guest's devices, reachable through the buses the vCPUs dispatch to.
pub struct DeviceManager {
    /// Port I/O bus (x86's legacy devices; empty elsewhere).
    pub io_bus: Bus,
    /// MMIO bus.
    pub mmio_bus: Bus,
    /// The serial console, shared with whoever feeds it input.
    pub console: Arc<Mutex<SerialConsole>>,
    /// Fires when the guest resets the machine through a legacy device.
    pub reset_evt: EventFd,
    /// The architecture's legacy devices (the console and the reset device).
    pub legacy: LegacyDevices,
    /// The device registry: every device, virtio ones in slot order. It hands out the slots, and
    /// the guest learns of the devices from it ([`crate::arch::announce_devices`]).
    pub registry: DeviceRegistry,
    /// The virtio devices' event handlers, for the event loop.
    pub subscribers: Vec<SharedSubscriber>,
    /// Removes the vsock device's host socket when the VM is gone.
    pub vsock_socket: Option<SocketGuard>,
}

impl DeviceManager {
    /// Creates the architecture's legacy devices, the console writing to `console_out`, in
    /// their reset state or a snapshot's `legacy_state`.
    pub fn new(
        vm: &Vm,
        console_out: Box<dyn Write + Send>,
        console_limits: OutputLimits,
        legacy_state: Option<&LegacyState>,
    ) -> Result<Self, DeviceError> {
        let mut io_bus = Bus::new();
        // Blocking: the VMM's reset watcher waits on it.
        let reset_evt = EventFd::new(0).map_err(DeviceError::EventFd)?;
        let reset_trigger = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        let legacy = LegacyDevices::attach(
            vm,
            &mut io_bus,
            console_out,
            console_limits,
            reset_trigger,
            legacy_state,
        )?;
        let console = legacy.console.clone();
        let mut registry = DeviceRegistry::new(console.clone());
        for (name, source) in legacy.metric_sources() {
            registry.add_legacy_metrics(name, source);
        }
        Ok(Self {
            io_bus,
            mmio_bus: Bus::new(),
            registry,
            console,
            reset_evt,
            legacy,
            subscribers: Vec::new(),
            vsock_socket: None,
        })
    }

    /// Puts `device` (named `id`) in the registry's next slot: transport on the MMIO bus, an
    /// ioeventfd per queue, an irqfd, and its event handler for the event loop. Runtime updates
    /// find it in the registry by kind and id.
    pub fn attach_virtio<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: String,
        device: D,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let slot = self.registry.next_slot().ok_or(DeviceError::NoSlot)?;
        let kind = DeviceKind::of(device.device_type()).ok_or(DeviceError::UnknownKind)?;
        let notify_addr = slot.base + QUEUE_NOTIFY_OFFSET;
        for (queue, evt) in device.queue_events().iter().enumerate() {
            // The datamatch is the queue index the driver writes to QueueNotify.
            vm.fd()
                .register_ioevent(evt, &IoEventAddress::Mmio(notify_addr), queue as u32)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: notify_addr,
                    queue,
                    source,
                })?;
        }
        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd()
            .register_irqfd(&irq, slot.gsi)
            .map_err(|source| DeviceError::Irqfd {
                gsi: slot.gsi,
                source,
            })?;
        let device = Arc::new(Mutex::new(device));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            mem.clone(),
            device.clone(),
            Arc::new(Interrupt::new(irq)),
        )));
        self.mmio_bus
            .insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)?;
        self.subscribers.push(device.clone());
        self.registry.push(RegisteredDevice {
            id,
            kind,
            slot,
            device,
            transport,
        });
        Ok(())
    }
}

impl DeviceManager {
    /// The legacy devices' state, for a snapshot.
    pub fn save_legacy(&self) -> LegacyState {
        self.legacy.save()
    }

    /// Every virtio device's state, in slot order, for a snapshot; `during` runs while every
    /// device is locked, so no device's data path changes guest memory or a queue until it
    /// returns (the snapshot saves guest memory there).
    pub fn save_virtio<T>(&self, during: impl FnOnce() -> T) -> (Vec<VirtioDeviceState>, T) {
        let entries = self.registry.virtio_devices();
        let devices: Vec<_> = entries.iter().map(|e| lock_device(&e.device)).collect();
        let states = entries
            .iter()
            .zip(&devices)
            .map(|(entry, device)| VirtioDeviceState {
                id: entry.id.clone(),
                transport: locked(&entry.transport).save_with(&**device),
            })
            .collect();
        let result = during();
        drop(devices);
        (states, result)
    }

    /// Puts the virtio devices, attached from the snapshot's configuration, in their saved
    /// state. The saved devices must be the attached ones, slot for slot.
    pub fn restore_virtio(&self, saved: &[VirtioDeviceState]) -> Result<(), DeviceError> {
        let entries = self.registry.virtio_devices();
        let same =
            entries.len() == saved.len() && entries.iter().zip(saved).all(|(e, s)| e.id == s.id);
        if !same {
            let ids = |ids: Vec<&str>| ids.join(", ");
            return Err(DeviceError::SnapshotDevices {
                saved: ids(saved.iter().map(|s| s.id.as_str()).collect()),
                built: ids(entries.iter().map(|e| e.id.as_str()).collect()),
            });
        }
        for (entry, state) in entries.iter().zip(saved) {
            locked(&entry.transport)
                .restore(&state.transport)
                .map_err(|source| DeviceError::Restore {
                    id: entry.id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Puts Firecracker's boot-timer device at [`BOOT_TIMER_ADDR`] on the MMIO bus, below the
    /// virtio windows and never over RAM. Call before the vCPUs are created: each takes a copy
    /// of the bus.
    pub fn attach_boot_timer(
        &mut self,
        timer: devices::legacy::BootTimer,
    ) -> Result<(), DeviceError> {
        let timer = Arc::new(Mutex::new(timer));
        self.mmio_bus
            .insert(timer, BOOT_TIMER_ADDR, devices::legacy::BOOT_TIMER_LEN)?;
        Ok(())
    }
}

/// Opens `drive`'s image and creates its block device.
pub fn create_drive(drive: &DriveConfig) -> Result<Block, DeviceError> {
    let id = drive.id.clone().unwrap_or_default();
    Block::new(&BlockConfig {
        id: id.clone(),
        path: drive.path.clone(),
        read_only: drive.read_only,
        rate_limiter: drive.rate_limiter,
    })
    .map_err(|source| DeviceError::Drive { id, source })
}

/// Opens `net`'s TAP device and creates its network device, with `mmds` serving MMDS on it.
pub fn create_net(net: &NetConfig, mmds: Option<MmdsStack>) -> Result<Net, DeviceError> {
    let id = net.id.clone().unwrap_or_default();
    let tap = Tap::open_named(&net.tap).map_err(|source| DeviceError::Tap {
        id: id.clone(),
        tap: net.tap.clone(),
        source,
    })?;
    Net::new(NetDeviceConfig {
        id: id.clone(),
        tap,
        mac: net.mac,
        mtu: net.mtu,
        rx_rate_limiter: net.rx_rate_limiter,
        tx_rate_limiter: net.tx_rate_limiter,
        mmds,
    })
    .map_err(|source| DeviceError::Net { id, source })
}

/// Connects to `fs`'s vhost-user backend and creates its device.
pub fn create_fs(fs: &FsConfig) -> Result<Fs, DeviceError> {
    Fs::new(fs).map_err(|source| DeviceError::Fs {
        tag: fs.tag.clone(),
        source,
    })
}

/// The balloon's id in the registry: a VM has at most one, and Firecracker names it so.
pub const BALLOON_ID: &str = "balloon";

/// Creates the balloon device.
pub fn create_balloon(balloon: &BalloonConfig) -> Result<Balloon, DeviceError> {
    Balloon::new(balloon).map_err(DeviceError::Balloon)
}

/// Creates the entropy device.
pub fn create_rng(rng: &RngConfig) -> Result<Rng, DeviceError> {
    Rng::new(&rng.rate_limiter).map_err(DeviceError::Rng)
}

/// A vsock device with its host socket bound at the configured path (owner-only, a stale
/// socket replaced, a live one or any other file refused), and the guard that removes it.
pub fn create_vsock(vsock: &VsockConfig) -> Result<(Vsock, SocketGuard), DeviceError> {
    let listener = bind_api_socket(&vsock.uds_path).map_err(DeviceError::VsockSocket)?;
    let guard = SocketGuard::new(&vsock.uds_path);
    let device = Vsock::new(VsockDeviceConfig {
        guest_cid: vsock.guest_cid,
        uds_path: PathBuf::from(&vsock.uds_path),
        listener,
    })
    .map_err(DeviceError::Vsock)?;
    Ok((device, guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_gsis() {
        let first = VirtioSlot::nth(0).unwrap();
        assert_eq!((first.base, first.gsi), (0xd000_0000, 5));
        let last = VirtioSlot::nth(18).unwrap();
        assert_eq!((last.base, last.gsi), (0xd001_2000, 23));
        assert_eq!(VirtioSlot::nth(19), None);
        assert_eq!(VirtioSlot::nth(usize::MAX), None);
    }
}
