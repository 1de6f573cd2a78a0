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
