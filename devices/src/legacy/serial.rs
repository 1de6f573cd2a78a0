//! The 16550 UART at COM1 (port 0x3f8, IRQ 4), backed by vm-superio.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::BusDevice;

/// COM1's first port.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// A 16550 decodes eight ports.
pub const SERIAL_PORT_LEN: u64 = 8;

/// The guest's serial console: what the guest writes goes to `out`, what the host enqueues with
/// [`SerialConsole::enqueue_input`] is what the guest reads.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Set once writing to `out` failed, so that a closed console is reported once, not per byte.
    output_failed: bool,
}

impl SerialConsole {
    /// Creates a UART that raises its interrupt through `irq` and writes guest output to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
            output_failed: false,
        }
    }

    /// Queues host input for the guest to read, as far as the UART's FIFO has room.
    /// Returns how many bytes were taken.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        let room = self.uart.fifo_capacity().min(input.len());
        self.uart
            .enqueue_raw_bytes(&input[..room])
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are one byte wide; wider reads see the register in the low byte.
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            // The guest keeps running without a console rather than dying with it.
            if !self.output_failed {
                self.output_failed = true;
                log::error!("serial console output failed, further output is dropped: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A `Write` that appends to a shared buffer the test can inspect.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, SharedBuf, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let buf = SharedBuf::default();
        let console = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(buf.clone()),
        );
        (console, buf, irq)
    }

    #[test]
    fn guest_writes_reach_the_sink() {
        let (mut console, buf, _irq) = console();
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_raises_the_interrupt_when_enabled() {
        let (mut console, _buf, irq) = console();
        // IER: enable "received data available".
        console.write(1, &[0x01]);
        assert_eq!(console.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut data = [0u8; 1];
        console.read(0, &mut data);
        assert_eq!(data, [b'a']);
    }

    #[test]
    fn odd_offsets_and_widths_do_not_panic() {
        let (mut console, _buf, _irq) = console();
        let mut wide = [0xffu8; 4];
        console.read(7, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        console.read(u64::MAX, &mut wide);
        console.write(u64::MAX, &[1]);
        console.write(0, &[]);
        console.read(0, &mut []);
    }
}
