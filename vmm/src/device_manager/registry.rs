//! The device registry: every device attached to the VM, in slot order, each behind one trait.
//!
//! It hands out the virtio slots (MMIO window and interrupt line), and whatever needs to know the
//! VM's devices walks it: the architecture's announcement of them to the guest
//! ([`crate::arch::announce_devices`]), the runtime API (a drive, an interface or the balloon by
//! its id) and the metrics writer.
//!
//! Invariants: slot N belongs to the Nth virtio device registered, and no two entries of one
//! kind share an id.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::legacy::SerialConsole;
use devices::virtio::mmio::{MmioTransport, SharedVirtioDevice};
use devices::virtio::{device_type, VirtioDevice};

use super::VirtioSlot;
use crate::metrics::DeviceGroup;

/// What a virtio device is, as the VMM tells them apart (metrics groups, API lookups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-rng.
    Rng,
    /// virtio-vsock.
    Vsock,
    /// virtio-balloon.
    Balloon,
    /// virtio-fs (a vhost-user frontend).
    Fs,
}

impl DeviceKind {
    /// The kind of a virtio device type, if Kiln has such devices.
    pub fn of(virtio_type: u32) -> Option<Self> {
        Some(match virtio_type {
            device_type::BLOCK => Self::Block,
            device_type::NET => Self::Net,
            device_type::RNG => Self::Rng,
            device_type::VSOCK => Self::Vsock,
            device_type::BALLOON => Self::Balloon,
            device_type::FS => Self::Fs,
            _ => return None,
        })
    }

    /// Firecracker's metrics group for the kind.
    pub fn metrics_group(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Net => "net",
            Self::Rng => "entropy",
            Self::Vsock => "vsock",
            Self::Balloon => "balloon",
            // Firecracker's vhost-user devices report as `vhost_user_<id>`.
            Self::Fs => "vhost_user",
        }
    }

    /// True for kinds with a group per device (`block_<id>`) as well as the sum, as Firecracker.
    fn has_per_device_metrics(self) -> bool {
        matches!(self, Self::Block | Self::Net | Self::Fs)
    }
}

/// One virtio device in the registry.
#[derive(Clone)]
pub struct RegisteredDevice {
    /// The device's id (drive_id, iface_id; `rng`, `vsock`, `balloon` for the single ones).
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Its MMIO window and interrupt line.
    pub slot: VirtioSlot,
    /// The device, shared with its transport and the event loop.
    pub device: SharedVirtioDevice,
    /// Its transport (registers, queue registers), shared with the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Why a registry lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No device of that kind with that id.
    #[error("no {kind} device with id {id}", kind = kind.metrics_group())]
    NotFound {
        /// The kind looked for.
        kind: DeviceKind,
        /// The id looked for.
        id: String,
    },
    /// The entry's device is not of the type its kind says (a Kiln bug).
    #[error("device {0} is not of the type its registry entry says")]
    WrongType(String),
}

/// The VM's devices. Cloning it shares the same devices (every field is shared), which is how
/// the event loop's periodic metrics flush sees them.
#[derive(Clone)]
pub struct DeviceRegistry {
    virtio: Vec<RegisteredDevice>,
    console: Arc<Mutex<SerialConsole>>,
    /// The legacy devices' counters, each under its metric group's name (x86's `i8042`).
    legacy_metrics: Vec<(&'static str, MetricSource)>,
}

/// Reads one device's counters, as `(field, value)` pairs.
pub type MetricSource = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Locks a device or transport, going on if a thread panicked while holding it: the device's own
/// state checks still hold, and refusing every later call would only wedge the VMM.
pub fn locked<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DeviceRegistry {
    /// A registry with the serial console and no virtio device yet.
    pub fn new(console: Arc<Mutex<SerialConsole>>) -> Self {
        Self {
            virtio: Vec::new(),
            console,
            legacy_metrics: Vec::new(),
        }
    }

    /// Adds a legacy device's counters to the metrics, as group `name`.
    pub fn add_legacy_metrics(&mut self, name: &'static str, source: MetricSource) {
        self.legacy_metrics.push((name, source));
    }

    /// The slot the next virtio device gets, or `None` when the interrupt lines have run out.
    pub fn next_slot(&self) -> Option<VirtioSlot> {
        VirtioSlot::nth(self.virtio.len())
    }

    /// Adds a device in the slot [`Self::next_slot`] gave.
    pub(super) fn push(&mut self, entry: RegisteredDevice) {
        self.virtio.push(entry);
    }

    /// Every virtio device, in slot order.
    pub fn virtio_devices(&self) -> &[RegisteredDevice] {
        &self.virtio
    }

    /// The serial console.
    pub fn console(&self) -> &Arc<Mutex<SerialConsole>> {
        &self.console
    }

    /// The device of `kind` named `id`.
    pub fn find(&self, kind: DeviceKind, id: &str) -> Result<&RegisteredDevice, RegistryError> {
        self.virtio
            .iter()
            .find(|d| d.kind == kind && d.id == id)
            .ok_or_else(|| RegistryError::NotFound {
                kind,
                id: id.to_string(),
            })
    }

    /// The first device of `kind` (for kinds a VM has at most one of).
    pub fn first(&self, kind: DeviceKind) -> Option<&RegisteredDevice> {
        self.virtio.iter().find(|d| d.kind == kind)
    }

    /// Runs `f` on the device of `kind` named `id`, as its concrete type `D`, with its transport
    /// (to tell the guest its config space changed). Locks the transport, then the device: the
    /// order a vCPU's MMIO access takes them in.
    pub fn with_device<D: VirtioDevice, R>(
        &self,
        kind: DeviceKind,
        id: &str,
        f: impl FnOnce(&mut D, &mut MmioTransport) -> R,
    ) -> Result<R, RegistryError> {
        let entry = self.find(kind, id)?;
        let mut transport = locked(&entry.transport);
        let mut device = locked(&entry.device);
        let any: &mut dyn std::any::Any = &mut *device;
        let device = any
            .downcast_mut::<D>()
            .ok_or_else(|| RegistryError::WrongType(entry.id.clone()))?;
        Ok(f(device, &mut transport))
    }

    /// Every device's counters: the console's `uart` and the other legacy devices' groups, then
    /// per kind in order of first
    /// appearance each device's own group (block and net, named `<group>_<id>`) and the kind's
    /// sum under the group's name; then the groups of the services devices carry (MMDS on
    /// network interfaces: `mmds`), summed over the devices.
    pub fn metric_groups(&self) -> Vec<DeviceGroup> {
        let mut groups = vec![DeviceGroup {
            name: "uart".to_string(),
            values: locked(&self.console).metric_values(),
        }];
        for (name, source) in &self.legacy_metrics {
            groups.push(DeviceGroup {
                name: (*name).to_string(),
                values: source(),
            });
        }
        let mut kinds: Vec<DeviceKind> = Vec::new();
        for entry in &self.virtio {
            if !kinds.contains(&entry.kind) {
                kinds.push(entry.kind);
            }
        }
        let mut services: Vec<DeviceGroup> = Vec::new();
        for entry in &self.virtio {
            for (name, values) in locked(&entry.device).service_metric_groups() {
                match services.iter_mut().find(|g| g.name == name) {
                    Some(group) => add_into(&mut group.values, &values),
                    None => services.push(DeviceGroup {
                        name: name.to_string(),
                        values,
                    }),
                }
            }
        }
        for kind in kinds {
            let group = kind.metrics_group();
            let mut sum: Vec<(&'static str, u64)> = Vec::new();
            for entry in self.virtio.iter().filter(|d| d.kind == kind) {
                let values = locked(&entry.device).metric_values();
                add_into(&mut sum, &values);
                if kind.has_per_device_metrics() {
                    groups.push(DeviceGroup {
                        name: format!("{group}_{}", entry.id),
                        values,
                    });
                }
            }
            groups.push(DeviceGroup {
                name: group.to_string(),
                values: sum,
            });
        }
        groups.extend(services);
        groups
    }
}

/// Adds each of `values` to the field of the same name in `sum` (appending new fields).
fn add_into(sum: &mut Vec<(&'static str, u64)>, values: &[(&'static str, u64)]) {
    for &(field, value) in values {
        match sum.iter_mut().find(|(f, _)| *f == field) {
            Some((_, total)) => *total = total.saturating_add(value),
            None => sum.push((field, value)),
        }
    }
}
