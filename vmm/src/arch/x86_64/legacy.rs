//! The legacy devices of an x86 guest: COM1 (a 16550 at port 0x3f8, IRQ 4) as the serial
//! console, the i8042 keyboard controller (ports 0x60/0x64, IRQ 1), whose reset line is how
//! a guest with `reboot=k` ends the VM and through which the VMM sends Ctrl+Alt+Del, and the
//! CMOS clock (ports 0x70/0x71), from which the guest reads the time at boot.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{
    CmosRtc, EventFdTrigger, I8042Error, OutputLimits, SerialConsole, CMOS_PORT_BASE,
    CMOS_PORT_LEN, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use devices::Bus;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device_manager::{locked, DeviceError, MetricSource};
use crate::vstate::vm::Vm;

/// COM1's interrupt line.
const SERIAL_GSI: u32 = 4;
/// The i8042 keyboard's interrupt line.
const KEYBOARD_GSI: u32 = 1;

/// The legacy devices, on the port bus.
pub struct LegacyDevices {
    /// The serial console, shared with whoever feeds it input.
    pub console: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
}

fn irq_line(vm: &Vm, gsi: u32) -> Result<EventFd, DeviceError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.fd()
        .register_irqfd(&evt, gsi)
        .map_err(|source| DeviceError::Irqfd { gsi, source })?;
    Ok(evt)
}

impl LegacyDevices {
    /// Puts COM1 (writing to `console_out` within `console_limits`), the i8042 and the CMOS
    /// clock on `io_bus`,
    /// each with its interrupt line; the guest's reset through the i8042 writes `reset`.
    pub fn attach(
        vm: &Vm,
        io_bus: &mut Bus,
        console_out: Box<dyn Write + Send>,
        console_limits: OutputLimits,
        reset: EventFd,
    ) -> Result<Self, DeviceError> {
        let console = Arc::new(Mutex::new(SerialConsole::new(
            EventFdTrigger::new(irq_line(vm, SERIAL_GSI)?),
            console_out,
            console_limits,
        )));
        io_bus.insert(console.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new(reset),
            EventFdTrigger::new(irq_line(vm, KEYBOARD_GSI)?),
        )));
        io_bus.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
        io_bus.insert(
            Arc::new(Mutex::new(CmosRtc::new())),
            CMOS_PORT_BASE,
            CMOS_PORT_LEN,
        )?;
        Ok(Self { console, i8042 })
    }

    /// The legacy devices' counters for the metrics, each with its group's name (the console's
    /// `uart` is the registry's own).
    pub fn metric_sources(&self) -> Vec<(&'static str, MetricSource)> {
        let i8042 = self.i8042.clone();
        vec![("i8042", Arc::new(move || locked(&i8042).metric_values()))]
    }

    /// Sends the guest Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`), through the keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        locked(&self.i8042).trigger_ctrl_alt_del()
    }
}
