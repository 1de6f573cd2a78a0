//! Kiln's emulated devices.
//!
//! Devices are reached through a [`Bus`] (one for port I/O, one for MMIO): the vCPU loop hands every
//! exit it cannot handle in-kernel to the bus, which finds the device that owns the address and calls
//! it with the offset inside that device's range. Devices never see absolute guest addresses.

pub mod bus;
pub mod host_file;
pub mod legacy;
pub mod mmds;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as every part of Kiln sees it: vm-memory's mmap-backed memory with a dirty-page
/// bitmap. Every write through vm-memory (a device filling a buffer, a used ring, the loader)
/// marks its pages, which is how a Diff snapshot finds the pages the VMM wrote (KVM's dirty log
/// finds the guest's).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
