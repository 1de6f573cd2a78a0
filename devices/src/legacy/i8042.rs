//! The i8042 keyboard controller, reduced to what a microVM needs: the guest's CPU-reset command.
//!
//! A Linux guest booted with `reboot=k` resets by writing 0xFE to port 0x64; Kiln turns that reset
//! into a clean VMM exit, which is how a microVM guest ends itself (Firecracker's convention).

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::BusDevice;

/// The controller's data port; the command/status port is at base + 4 (0x64).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60 ..= 0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042 on the port bus. `reset` fires when the guest asks for a CPU reset.
pub struct I8042 {
    controller: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Creates a controller that signals `reset` on the guest's reset command.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            controller: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.controller.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.controller.write(offset, value) {
                eprintln!("kiln: i8042: could not signal the guest's reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_event_and_nothing_else_does() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        i8042.write(0, &[0xfe]); // data port: not a command
        i8042.write(4, &[0xaa]); // self-test command: ignored
        assert!(evt.read().is_err(), "no reset expected yet");
        i8042.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
