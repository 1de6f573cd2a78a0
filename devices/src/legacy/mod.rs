//! Legacy PC devices on the port I/O bus: the 16550 UART, the i8042 controller and the CMOS
//! real-time clock; and
//! Firecracker's boot-timer pseudo device on the MMIO bus.
//!
//! The UART wraps vm-superio's model; the i8042 is Kiln's own (a controller with one PS/2
//! keyboard). This module adds the bus glue and the eventfd triggers that connect them to KVM
//! (irqfds for the UART's and the keyboard's interrupt lines, an eventfd the VMM waits on for the
//! i8042's CPU-reset command).

mod boot_timer;
mod cmos;
mod i8042;
mod serial;

pub use boot_timer::{process_cpu_time, BootTime, BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_MAGIC};

pub use cmos::{CivilTime, CmosRtc, RtcCounters, CMOS_PORT_BASE, CMOS_PORT_LEN};
pub use i8042::{I8042Error, I8042};
pub use i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{
    ConsoleCounters, OutputLimits, SerialConsole, SerialConsoleState, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};

use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] usable as a vm-superio [`vm_superio::Trigger`].
///
/// For an interrupt line the eventfd is registered with KVM as an irqfd, so `trigger` injects the
/// interrupt without a round trip through the VMM.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped eventfd (to register as an irqfd or to wait on).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
