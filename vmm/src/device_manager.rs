//! Creates the guest's devices and wires them to the buses and to KVM's interrupt lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{
    EventFdTrigger, SerialConsole, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};
use devices::{Bus, BusError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::vm::Vm;

/// COM1's interrupt line.
const SERIAL_GSI: u32 = 4;

/// Errors in creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("registering the irqfd for GSI {gsi}: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two devices claimed the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The guest's devices, reachable through the buses the vCPUs dispatch to.
pub struct DeviceManager {
    /// Port I/O bus.
    pub io_bus: Bus,
    /// MMIO bus.
    pub mmio_bus: Bus,
    /// The serial console, shared with whoever feeds it input.
    pub console: Arc<Mutex<SerialConsole>>,
    /// Fires when the guest resets the machine through the i8042.
    pub reset_evt: EventFd,
}

impl DeviceManager {
    /// Creates the legacy devices (COM1 writing to `console_out`, i8042) on a fresh port bus.
    pub fn new(vm: &Vm, console_out: Box<dyn Write + Send>) -> Result<Self, DeviceError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd);
        let mut io_bus = Bus::new();

        let serial_irq = eventfd()?;
        vm.fd()
            .register_irqfd(&serial_irq, SERIAL_GSI)
            .map_err(|source| DeviceError::Irqfd {
                gsi: SERIAL_GSI,
                source,
            })?;
        let console = Arc::new(Mutex::new(SerialConsole::new(
            EventFdTrigger::new(serial_irq),
            console_out,
        )));
        io_bus.insert(console.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;

        // Blocking: the VMM's reset watcher waits on it.
        let reset_evt = EventFd::new(0).map_err(DeviceError::EventFd)?;
        let reset_trigger = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(reset_trigger))));
        io_bus.insert(i8042, I8042_PORT_BASE, I8042_PORT_LEN)?;

        Ok(Self {
            io_bus,
            mmio_bus: Bus::new(),
            console,
            reset_evt,
        })
    }
}
