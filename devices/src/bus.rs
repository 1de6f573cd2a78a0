//! Address-range dispatch for port I/O and MMIO exits.
//!
//! Invariant: ranges registered on one [`Bus`] never overlap, so an address belongs to at most one
//! device. Accesses that fall outside every range are reported to the caller as `None`, never as a
//! panic: the guest may poke any port or address it likes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes inside its own address range.
///
/// `offset` is relative to the start of the range the device was registered at; `data.len()` is the
/// access width the guest used (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// Fills `data` with the value the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Applies a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from registering a device on a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the end of the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// First address of the rejected range.
        base: u64,
        /// Number of addresses in the rejected range.
        len: u64,
    },
    /// The range overlaps a device that is already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device at {other:#x}")]
    Overlap {
        /// First address of the new range.
        base: u64,
        /// Number of addresses in the new range.
        len: u64,
        /// First address of the registered range it overlaps.
        other: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        // Cannot overflow: checked in `Bus::insert`.
        self.base + self.len
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// A shared device handle as stored on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Maps address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedBusDevice>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for the addresses `base .. base + len`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let range = BusRange { base, len };
        if let Some(other) = self.devices.keys().find(|r| r.overlaps(&range)) {
            return Err(BusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        self.devices.insert(range, device);
        Ok(())
    }

    /// Finds the device owning `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&SharedBusDevice, u64)> {
        let probe = BusRange {
            base: addr,
            len: u64::MAX,
        };
        let (range, device) = self.devices.range(..=probe).next_back()?;
        (addr < range.end()).then(|| (device, addr - range.base))
    }

    /// Dispatches a read. Returns `false` when no device owns `addr` (the caller decides what an
    /// unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns `false` when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device's state is plain data, and a panic on
/// another vCPU thread has already ended the VMM's useful life, so there is nothing better to do.
fn lock(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with the offset.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn unclaimed_addresses_are_reported() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.read(0x110, &mut data));
        assert!(!bus.write(u64::MAX, &data));
        assert!(bus.read(0x10f, &mut data));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert!(bus.insert(dev(), 0xf8, 8).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0x0, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
