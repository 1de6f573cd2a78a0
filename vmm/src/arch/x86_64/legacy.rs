//! The legacy devices of an x86 guest: COM1 (a 16550 at port 0x3f8, IRQ 4) as the serial
//! console, the i8042 keyboard controller (ports 0x60/0x64, IRQ 1), whose reset line is how
//! a guest with `reboot=k` ends the VM and through which the VMM sends Ctrl+Alt+Del, and the
//! CMOS clock (ports 0x70/0x71), from which the guest reads the time at boot.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{
    CmosRtc, EventFdTrigger, I8042Error, OutputLimits, SerialConsole, SerialConsoleState,
    CMOS_PORT_BASE, CMOS_PORT_LEN, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};
use devices::Bus;
use serde::{Deserialize, Serialize};
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
    cmos: Arc<Mutex<CmosRtc>>,
}

/// What a snapshot keeps of the legacy devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1's registers and unread input.
    pub serial: SerialConsoleState,
    /// The i8042's configuration byte and output port.
    pub i8042: [u8; 2],
    /// The CMOS index register.
    pub cmos_index: u8,
    /// The CMOS NVRAM.
    pub cmos_nvram: Vec<u8>,
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
    /// clock on `io_bus`, each with its interrupt line, in their reset state or in a snapshot's
    /// `state`; the guest's reset through the i8042 writes `reset`.
    pub fn attach(
        vm: &Vm,
        io_bus: &mut Bus,
        console_out: Box<dyn Write + Send>,
        console_limits: OutputLimits,
        reset: EventFd,
        state: Option<&LegacyState>,
    ) -> Result<Self, DeviceError> {
        let serial_irq = EventFdTrigger::new(irq_line(vm, SERIAL_GSI)?);
        let console = match state {
            None => SerialConsole::new(serial_irq, console_out, console_limits),
            Some(state) => {
                SerialConsole::from_state(serial_irq, console_out, console_limits, &state.serial)
                    .map_err(DeviceError::EventFd)?
            }
        };
        let console = Arc::new(Mutex::new(console));
        io_bus.insert(console.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
        let mut i8042 = I8042::new(
            EventFdTrigger::new(reset),
            EventFdTrigger::new(irq_line(vm, KEYBOARD_GSI)?),
        );
        let mut cmos = CmosRtc::new();
        if let Some(state) = state {
            i8042.restore(state.i8042);
            cmos.restore(state.cmos_index, &state.cmos_nvram);
        }
        let i8042 = Arc::new(Mutex::new(i8042));
        io_bus.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
        let cmos = Arc::new(Mutex::new(cmos));
        io_bus.insert(cmos.clone(), CMOS_PORT_BASE, CMOS_PORT_LEN)?;
        Ok(Self {
            console,
            i8042,
            cmos,
        })
    }

    /// The devices' state, for a snapshot.
    pub fn save(&self) -> LegacyState {
        let (cmos_index, cmos_nvram) = locked(&self.cmos).save();
        LegacyState {
            serial: locked(&self.console).save(),
            i8042: locked(&self.i8042).save(),
            cmos_index,
            cmos_nvram,
        }
    }

    /// The legacy devices' counters for the metrics, each with its group's name (the console's
    /// `uart` is the registry's own).
    pub fn metric_sources(&self) -> Vec<(&'static str, MetricSource)> {
        let i8042 = self.i8042.clone();
        let cmos = self.cmos.clone();
        vec![
            ("i8042", Arc::new(move || locked(&i8042).metric_values())),
            ("rtc", Arc::new(move || locked(&cmos).metric_values())),
        ]
    }

    /// Sends the guest Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`), through the keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        locked(&self.i8042).trigger_ctrl_alt_del()
    }
}
