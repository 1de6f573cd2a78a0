//! The virtio-mmio transport, register layout version 2 (virtio 1.x, 4.2.2).
//!
//! The transport owns what the driver configures (status, features, and each queue's registers as
//! plain data, [`QueueRegisters`], which is what a snapshot saves) and on DRIVER_OK builds the
//! live queues from them and hands them to the device, which alone advances them: no queue state
//! is kept twice. It runs on vCPU threads; the
//! device's data path does not: QueueNotify writes normally never reach it because KVM turns them
//! into writes of the queue's ioeventfd. When one does arrive here (an access KVM did not match,
//! or no KVM at all in tests), the transport writes the same eventfd itself.
//!
//! Invariants:
//! - the device only ever sees features it offered, and only after FEATURES_OK was accepted;
//! - queue registers change only between FEATURES_OK and DRIVER_OK;
//! - the device is activated at most once per reset, and only with queues that are valid in guest
//!   memory.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::{features, status, Interrupt, QueuePosition, VirtioDevice};
use crate::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x (non-legacy).
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("KILN").
const VENDOR_ID: u32 = 0x4e4c_494b;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of QueueNotify inside the window, for registering ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One queue's registers as the driver wrote them (virtio 1.x, 4.2.2): plain data, so a
/// transport's state can be saved and restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    /// QueueNumMax: the device's limit.
    pub max_size: u16,
    /// QueueNum: a power of two no larger than `max_size` (the driver's writes that are not are
    /// ignored).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: the descriptor table's guest address.
    pub desc_table: u64,
    /// QueueDriver: the available ring's guest address.
    pub avail_ring: u64,
    /// QueueDevice: the used ring's guest address.
    pub used_ring: u64,
}

impl QueueRegisters {
    /// A queue of at most `max_size` entries, at its reset values (size = max).
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// Back to the reset values.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The live queue these registers describe, or `None` if it is not valid in `mem` (rings
    /// outside memory or misaligned, a bad size).
    pub fn to_queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Option<Queue> {
        let mut queue = Queue::new(self.max_size).ok()?;
        queue.try_set_size(self.size).ok()?;
        queue
            .try_set_desc_table_address(vm_memory::GuestAddress(self.desc_table))
            .ok()?;
        queue
            .try_set_avail_ring_address(vm_memory::GuestAddress(self.avail_ring))
            .ok()?;
        queue
            .try_set_used_ring_address(vm_memory::GuestAddress(self.used_ring))
            .ok()?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue.is_valid(mem).then_some(queue)
    }
}

/// Sets the low (`Some(low), None`) or high half of a 64-bit register.
fn set_half(value: &mut u64, low: Option<u32>, high: Option<u32>) {
    if let Some(low) = low {
        *value = (*value & 0xffff_ffff_0000_0000) | u64::from(low);
    }
    if let Some(high) = high {
        *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
    }
}

/// What a snapshot saves of one virtio-mmio device: the transport's registers, each live queue's
/// position and the device's own state. Plain data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device type (checked against the device it is restored into).
    pub device_type: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The Status register (without DEVICE_NEEDS_RESET, which `needs_reset` carries).
    pub status: u32,
    /// The device asked to be reset (a broken ring).
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegisters>,
    /// Each live queue's position (empty when the device was not activated).
    pub positions: Vec<QueuePosition>,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

/// Why a saved transport could not be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The saved device is of another type.
    #[error("the saved device is of virtio type {saved}, this one of type {actual}")]
    DeviceType {
        /// The saved type.
        saved: u32,
        /// This device's type.
        actual: u32,
    },
    /// The saved queues do not match the device's (count or maximum sizes).
    #[error("the saved queues ({saved:?}) do not match the device's maximum sizes {actual:?}")]
    Queues {
        /// The saved maximum sizes.
        saved: Vec<u16>,
        /// The device's.
        actual: Vec<u16>,
    },
    /// The saved driver accepted features this device does not offer.
    #[error("the saved driver features {acked:#x} are not all offered ({offered:#x})")]
    Features {
        /// The saved acked features.
        acked: u64,
        /// What this device offers.
        offered: u64,
    },
    /// A running device's queues are not valid in guest memory.
    #[error("saved queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    /// The device refused its queues or its own state.
    #[error("the device refused its saved state: {0}")]
    Device(String),
}

/// A device behind the transport, shared with the event loop that runs its data path.
pub type SharedVirtioDevice = Arc<Mutex<dyn VirtioDevice>>;

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: SharedVirtioDevice,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueRegisters>,
    /// Offered features, cached: the device's offer never changes.
    avail_features: u64,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Puts `device` behind a transport. `interrupt` wraps the irqfd of the device's GSI.
    pub fn new(
        mem: GuestMemoryMmap,
        device: SharedVirtioDevice,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let (avail_features, queues) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueRegisters::new(max))
                .collect();
            (dev.avail_features(), queues)
        };
        Self {
            device,
            mem,
            interrupt,
            queues,
            avail_features,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device behind the transport.
    pub fn device(&self) -> &SharedVirtioDevice {
        &self.device
    }

    /// The Status register as the guest reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Records that the device changed its config space (e.g. a new disk size) and tells the guest.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may change only while the driver is setting up: after FEATURES_OK and
    /// before DRIVER_OK (virtio 1.x, 3.1.1).
    fn queue_setup_allowed(&self) -> bool {
        self.has_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)
            && self.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    /// Each queue's registers, in queue order.
    pub fn queue_registers(&self) -> &[QueueRegisters] {
        &self.queues
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegisters> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table as u32),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.avail_ring as u32),
            reg::QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.avail_ring >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.used_ring as u32),
            reg::QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.used_ring >> 32) as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: a length of all ones says "none" (virtio 1.2, 4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features may only be written between DRIVER and FEATURES_OK.
        if !self.has_status(status::ACKNOWLEDGE | status::DRIVER)
            || self.status & status::FEATURES_OK != 0
        {
            return;
        }
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => return,
        };
        // Bits the device did not offer are dropped here, so they can never reach the device.
        self.acked_features =
            (self.acked_features & !mask) | ((u64::from(value) << shift) & self.avail_features);
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            return;
        }
        let Some(queue) = self.selected_queue() else {
            return;
        };
        match offset {
            // Sizes that are zero, too big or not a power of two are ignored; the size then stays
            // as it was.
            reg::QUEUE_NUM => {
                if let Ok(size) = u16::try_from(value) {
                    if size.is_power_of_two() && size <= queue.max_size {
                        queue.size = size;
                    }
                }
            }
            reg::QUEUE_READY => queue.ready = value == 1,
            reg::QUEUE_DESC_LOW => set_half(&mut queue.desc_table, Some(value), None),
            reg::QUEUE_DESC_HIGH => set_half(&mut queue.desc_table, None, Some(value)),
            reg::QUEUE_DRIVER_LOW => set_half(&mut queue.avail_ring, Some(value), None),
            reg::QUEUE_DRIVER_HIGH => set_half(&mut queue.avail_ring, None, Some(value)),
            reg::QUEUE_DEVICE_LOW => set_half(&mut queue.used_ring, Some(value), None),
            reg::QUEUE_DEVICE_HIGH => set_half(&mut queue.used_ring, None, Some(value)),
            _ => {}
        }
    }

    fn notify(&self, value: u32) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        let device = lock(&self.device);
        if let Some(evt) = device.queue_events().get(value as usize) {
            let _ = evt.write(1);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver sets bits one step at a time and never clears one except by writing 0
        // (virtio 1.x, 3.1.1); anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        let allowed = match self.status {
            0 => status::ACKNOWLEDGE,
            s if s == status::ACKNOWLEDGE => status::DRIVER,
            s if s == status::ACKNOWLEDGE | status::DRIVER => status::FEATURES_OK,
            s if s == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK => {
                status::DRIVER_OK
            }
            _ => 0,
        };
        if new_bits != allowed {
            return;
        }
        match new_bits {
            status::FEATURES_OK => {
                // A version 2 transport only speaks to virtio 1.x drivers; leaving FEATURES_OK
                // unset tells the driver its feature set was refused.
                if self.acked_features & features::VERSION_1 == 0 {
                    return;
                }
                lock(&self.device).set_acked_features(self.acked_features);
            }
            status::DRIVER_OK => {
                self.status |= status::DRIVER_OK;
                self.activate();
                return;
            }
            _ => {}
        }
        self.status |= new_bits;
    }

    /// Hands the queues the driver readied to the device: those from queue 0 up to the first one
    /// not ready (a device whose queues depend on its features, like the balloon, gets only
    /// the ones the driver uses, and checks their count). A ready queue after one that is not,
    /// a queue that is not valid in guest memory, or a device that refuses to start, leaves the
    /// device in DEVICE_NEEDS_RESET rather than running on a broken setup.
    fn activate(&mut self) {
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let readied = self.queues.iter().take_while(|q| q.ready).count();
        if self.queues[readied..].iter().any(|q| q.ready) {
            self.interrupt.signal_needs_reset();
            return;
        }
        let mut queues = Vec::with_capacity(readied);
        for registers in &self.queues[..readied] {
            match registers.to_queue(&self.mem, event_idx) {
                Some(queue) => queues.push(queue),
                None => {
                    self.interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        let mut device = lock(&self.device);
        if device.is_activated() {
            return;
        }
        if let Err(e) = device.activate(self.mem.clone(), self.interrupt.clone(), queues) {
            log::error!("virtio device type {}: {e}", device.device_type());
            drop(device);
            self.interrupt.signal_needs_reset();
        }
    }

    /// The transport's and its device's state, for a snapshot (taken with the vCPUs paused and
    /// the device idle).
    pub fn save(&self) -> TransportState {
        self.save_with(&*lock(&self.device))
    }

    /// [`Self::save`] with the device already locked by the caller (`device` is this
    /// transport's).
    pub fn save_with(&self, device: &dyn VirtioDevice) -> TransportState {
        TransportState {
            device_type: device.device_type(),
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.clone(),
            positions: device.queue_positions(),
            device: device.save_state(),
        }
    }

    /// Puts a new transport (and its new device) in a saved state: registers, features, and,
    /// when the saved driver had started the device, the device activated on its queues at
    /// their saved positions with its own state. Every queue is then notified once, so requests
    /// the guest queued before the snapshot are served. Everything is checked before anything
    /// changes but the device's own activation and state; on error the VM being restored is
    /// discarded.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let actual_type = lock(&self.device).device_type();
        if state.device_type != actual_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                actual: actual_type,
            });
        }
        let sizes = |queues: &[QueueRegisters]| queues.iter().map(|q| q.max_size).collect();
        let (saved_sizes, actual_sizes): (Vec<u16>, Vec<u16>) =
            (sizes(&state.queues), sizes(&self.queues));
        if saved_sizes != actual_sizes
            || state.queues.iter().any(|q| q.size > q.max_size)
            || state.positions.len() > state.queues.len()
        {
            return Err(RestoreError::Queues {
                saved: saved_sizes,
                actual: actual_sizes,
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(RestoreError::Features {
                acked: state.acked_features,
                offered: self.avail_features,
            });
        }
        let running = state.status & status::DRIVER_OK != 0 && !state.needs_reset;
        let event_idx = state.acked_features & features::RING_EVENT_IDX != 0;
        let mut live = Vec::new();
        if running {
            for (index, position) in state.positions.iter().enumerate() {
                let mut queue = state.queues[index]
                    .to_queue(&self.mem, event_idx)
                    .ok_or(RestoreError::InvalidQueue(index))?;
                position.apply(&mut queue);
                live.push(queue);
            }
        }
        self.queues.clone_from(&state.queues);
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        let mut device = lock(&self.device);
        if state.status & status::FEATURES_OK != 0 {
            device.set_acked_features(state.acked_features);
        }
        if state.needs_reset {
            self.interrupt.signal_needs_reset();
        }
        if running {
            device
                .activate(self.mem.clone(), self.interrupt.clone(), live)
                .map_err(|e| RestoreError::Device(e.to_string()))?;
            device
                .restore_state(&state.device)
                .map_err(RestoreError::Device)?;
            for evt in device.queue_events() {
                // Only fails if the counter would overflow: a pass is already due.
                let _ = evt.write(1);
            }
            // An interrupt the saved driver had not acknowledged is raised again: whether the
            // saved interrupt controller still held it pending or not, the driver then reads
            // the status and serves it (a spurious one is only read and acknowledged).
            if state.interrupt_status != 0 {
                self.interrupt.reraise();
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such (virtio 1.x, 4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Config writes are only meaningful to a driver that is setting the device up or
            // running it, never before the driver has acknowledged the device.
            if self.status & status::DRIVER != 0 {
                lock(&self.device).write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// Locks a device, recovering a poisoned lock (see [`crate::bus`]: a panic elsewhere has already
/// ended the VMM's useful life).
pub fn lock(device: &SharedVirtioDevice) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, VirtioCommon};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that records what the transport tells it.
    struct FakeDevice {
        common: VirtioCommon,
        acked: u64,
        activated: Option<usize>,
        queues: Vec<Queue>,
        resets: u32,
        config: [u8; 8],
        refuse: bool,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                common: VirtioCommon::new(
                    2,
                    features::VERSION_1 | features::RING_EVENT_IDX | 1,
                    &[16, 16],
                )
                .unwrap(),
                acked: 0,
                activated: None,
                queues: Vec::new(),
                resets: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                refuse: false,
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn metric_values(&self) -> Vec<(&'static str, u64)> {
            Vec::new()
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.acked = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self
                .config
                .get_mut(offset as usize..offset as usize + data.len())
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.refuse || queues.len() != 2 {
                return Err(ActivateError::QueueCount {
                    expected: 2,
                    given: queues.len(),
                });
            }
            self.activated = Some(queues.len());
            self.queues = queues;
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.queues.clear();
            self.resets += 1;
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn queue_positions(&self) -> Vec<QueuePosition> {
            self.queues.iter().map(QueuePosition::of).collect()
        }
        fn save_state(&self) -> serde_json::Value {
            serde_json::json!(self.config)
        }
        fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
            self.config = serde_json::from_value(state.clone()).map_err(|e| e.to_string())?;
            Ok(())
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(FakeDevice::new()));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(mem, device.clone(), interrupt), device)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, reg::DRIVER_FEATURES_SEL, 0);
        write(t, reg::DRIVER_FEATURES, features as u32);
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write(t, reg::QUEUE_SEL, index);
        write(t, reg::QUEUE_NUM, 16);
        write(t, reg::QUEUE_DESC_LOW, base as u32);
        write(t, reg::QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        write(t, reg::QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        write(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(read(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, reg::VERSION), 2);
        assert_eq!(read(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(read(&mut t, reg::VENDOR_ID), VENDOR_ID);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 1);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), (1 << 29) | 1);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 0);
        write(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 16);
        write(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn full_bring_up_activates_with_negotiated_features() {
        let (mut t, dev) = setup();
        // Bit 40 was never offered: it must not reach the device.
        negotiate(
            &mut t,
            features::VERSION_1 | features::RING_EVENT_IDX | (1 << 40),
        );
        assert_eq!(
            dev.lock().unwrap().acked,
            features::VERSION_1 | features::RING_EVENT_IDX
        );
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(read(&mut t, reg::QUEUE_DESC_LOW), 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(read(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
    }

    #[test]
    fn driver_without_version_1_is_refused() {
        let (mut t, dev) = setup();
        negotiate(&mut t, 1);
        assert_eq!(
            read(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert_eq!(dev.lock().unwrap().acked, 0);
    }

    #[test]
    fn out_of_order_status_writes_are_ignored() {
        let (mut t, dev) = setup();
        // Straight to DRIVER_OK.
        write(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(read(&mut t, reg::STATUS), 0);
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        // Skipping DRIVER.
        write(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(read(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        // Clearing a bit without a reset.
        write(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(read(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        assert!(dev.lock().unwrap().activated.is_none());
        // FAILED is accepted at any time.
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(
            read(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
    }

    #[test]
    fn queue_registers_are_frozen_outside_setup() {
        let (mut t, _) = setup();
        // Before FEATURES_OK.
        write(&mut t, reg::QUEUE_SEL, 0);
        write(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(read(&mut t, reg::QUEUE_DESC_LOW), 0);
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        // After DRIVER_OK.
        write(&mut t, reg::QUEUE_SEL, 0);
        write(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(read(&mut t, reg::QUEUE_DESC_LOW), 0x1000);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let (mut t, dev) = setup();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        // Past the end of the 1 MiB of guest memory.
        setup_queue(&mut t, 1, 0x20_0000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            read(&mut t, reg::INTERRUPT_STATUS) & super::super::INT_CONFIG,
            0
        );
        // A reset clears it.
        write(&mut t, reg::STATUS, 0);
        assert_eq!(read(&mut t, reg::STATUS), 0);
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_not_ready_or_bad_size_needs_reset() {
        let (mut t, dev) = setup();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write(&mut t, reg::QUEUE_SEL, 1);
        write(&mut t, reg::QUEUE_NUM, 17); // not a power of two: refused, size stays the max
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn only_the_readied_prefix_of_the_queues_reaches_the_device() {
        // Queue 1 ready without queue 0: not a prefix, so the setup is broken.
        let (mut t, dev) = setup();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 1, 0x1000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The registers are plain data the transport keeps (a snapshot saves them).
        let regs = t.queue_registers()[1];
        assert!(regs.ready);
        assert_eq!((regs.max_size, regs.size), (16, 16));
        assert_eq!(t.queue_registers()[0], QueueRegisters::new(16));
    }

    #[test]
    fn activation_refused_by_device_needs_reset() {
        let (mut t, dev) = setup();
        dev.lock().unwrap().refuse = true;
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_resets_device_and_queues() {
        let (mut t, dev) = setup();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        write(&mut t, reg::STATUS, 0);
        let d = dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert!(d.activated.is_none());
        drop(d);
        write(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(read(&mut t, reg::QUEUE_DESC_LOW), 0);
        // And the device can be brought up again.
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
    }

    #[test]
    fn notify_falls_back_to_the_queue_eventfd() {
        let (mut t, dev) = setup();
        write(&mut t, reg::QUEUE_NOTIFY, 1);
        assert!(
            dev.lock().unwrap().common.queue_evts()[1].read().is_err(),
            "no notify before DRIVER_OK"
        );
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        write(&mut t, reg::QUEUE_NOTIFY, 1);
        write(&mut t, reg::QUEUE_NOTIFY, 99);
        assert_eq!(
            dev.lock().unwrap().common.queue_evts()[1].read().unwrap(),
            1
        );
    }

    #[test]
    fn interrupt_ack_and_config_space() {
        let (mut t, dev) = setup();
        t.interrupt().signal_used_queue();
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 1);
        write(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 0);

        let mut byte = [0u8; 1];
        t.read(reg::CONFIG + 2, &mut byte);
        assert_eq!(byte, [3]);
        // Config writes before the driver is there are dropped.
        t.write(reg::CONFIG, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 1);
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        t.write(reg::CONFIG, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 9);
        let gen = read(&mut t, reg::CONFIG_GENERATION);
        t.config_changed();
        assert_eq!(read(&mut t, reg::CONFIG_GENERATION), gen + 1);
    }

    /// The VMM's flow for `PATCH /drives/{id}` after boot: swap the image under the device lock,
    /// then `config_changed`. The guest reads the new capacity through the transport and is
    /// interrupted with INT_CONFIG.
    #[test]
    fn block_capacity_change_reaches_the_guest() {
        use crate::virtio::block::{Block, BlockConfig};
        let dir = std::env::temp_dir().join(format!("kiln-mmio-{}-resize", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (small, big) = (dir.join("small.img"), dir.join("big.img"));
        std::fs::write(&small, [0u8; 4096]).unwrap();
        std::fs::write(&big, [0u8; 1 << 20]).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(&BlockConfig {
                id: "rootfs".into(),
                path: small,
                read_only: false,
                rate_limiter: Default::default(),
            })
            .unwrap(),
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        // The VMM keeps the typed handle; the transport gets the same device as a trait object.
        let mut t = MmioTransport::new(mem, block.clone(), interrupt.clone());
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(lock(t.device()).is_activated());
        let capacity = |t: &mut MmioTransport| {
            let mut cap = [0u8; 8];
            t.read(reg::CONFIG, &mut cap);
            u64::from_le_bytes(cap)
        };
        assert_eq!(capacity(&mut t), 8);
        let generation = read(&mut t, reg::CONFIG_GENERATION);

        block.lock().unwrap().update_disk(&big).unwrap();
        t.config_changed();

        assert_eq!(capacity(&mut t), 2048);
        assert_eq!(read(&mut t, reg::CONFIG_GENERATION), generation + 1);
        assert_eq!(
            read(&mut t, reg::INTERRUPT_STATUS),
            super::super::INT_CONFIG
        );
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        write(&mut t, reg::INTERRUPT_ACK, super::super::INT_CONFIG);
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let (mut t, _) = setup();
        let mut one = [0xffu8; 1];
        t.read(reg::MAGIC, &mut one);
        assert_eq!(one, [0]);
        let mut four = [0xffu8; 4];
        t.read(reg::MAGIC + 1, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(read(&mut t, reg::STATUS), 0);
        t.read(0xfff, &mut one);
        t.write(u64::MAX, &[0; 8]);
    }

    /// A running transport saved and restored into a new one: registers, features, interrupt
    /// status, the device's own state, and its queues at their positions.
    #[test]
    fn a_saved_transport_restores_into_a_new_one() {
        let (mut t, dev) = setup();
        negotiate(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        write(&mut t, reg::CONFIG, 0xabcd);
        write(&mut t, reg::QUEUE_SEL, 1);
        {
            let mut dev = dev.lock().unwrap();
            dev.queues[0].set_next_avail(7);
            dev.queues[0].set_next_used(5);
            dev.queues[1].set_next_avail(3);
            dev.queues[1].set_next_used(3);
        }
        t.interrupt().signal_used_queue();
        let saved = t.save();
        assert_eq!(
            saved.positions[0],
            QueuePosition {
                next_avail: 7,
                next_used: 5
            }
        );
        // Through its serde form, as a snapshot file carries it.
        let saved: TransportState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let (mut restored, restored_dev) = setup();
        restored.restore(&saved).unwrap();
        assert_eq!(read(&mut restored, reg::STATUS), ALL_OK);
        assert_eq!(
            read(&mut restored, reg::QUEUE_SEL),
            0,
            "write-only register"
        );
        assert_eq!(
            read(&mut restored, reg::QUEUE_DESC_LOW),
            0x2000,
            "queue 1 selected"
        );
        assert_eq!(
            read(&mut restored, reg::INTERRUPT_STATUS),
            super::super::INT_USED_RING
        );
        // The interrupt the driver had not acknowledged is raised again.
        assert_eq!(restored.interrupt().irqfd().read().unwrap(), 1);
        assert_eq!(read(&mut restored, reg::CONFIG), 0xabcd);
        let dev = restored_dev.lock().unwrap();
        assert_eq!(dev.acked, features::VERSION_1 | features::RING_EVENT_IDX);
        assert_eq!(dev.activated, Some(2));
        assert_eq!(dev.queue_positions(), saved.positions);
        // Each queue is notified once, so what the guest queued meanwhile is served.
        for evt in dev.queue_events() {
            assert_eq!(evt.read().unwrap(), 1);
        }
    }

    #[test]
    fn a_saved_transport_that_does_not_fit_is_refused() {
        let (mut t, _dev) = setup();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        write(&mut t, reg::STATUS, ALL_OK);
        let saved = t.save();
        type Damage = fn(&mut TransportState);
        let cases: [(Damage, &str); 4] = [
            (|s| s.device_type = 1, "virtio type"),
            (|s| s.queues[1].max_size = 32, "queues"),
            (|s| s.acked_features |= 1 << 50, "features"),
            (|s| s.queues[0].desc_table = u64::MAX - 8, "not valid"),
        ];
        for (damage, expected) in cases {
            let mut bad = saved.clone();
            damage(&mut bad);
            let (mut restored, dev) = setup();
            let err = restored.restore(&bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert_eq!(dev.lock().unwrap().activated, None);
        }
        // A device that was never started comes back unstarted.
        let (fresh, _) = setup();
        let (mut restored, dev) = setup();
        restored.restore(&fresh.save()).unwrap();
        assert_eq!(read(&mut restored, reg::STATUS), 0);
        assert_eq!(dev.lock().unwrap().activated, None);
    }
}
