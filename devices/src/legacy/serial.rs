//! The 16550 UART at COM1 (port 0x3f8, IRQ 4), backed by vm-superio.
//!
//! What the guest writes goes through [`LimitedOutput`] on its way to the sink: Firecracker's
//! `PUT /serial` `rate_limiter` (bytes over the rate are dropped), a cap on the bytes a console
//! may write in all (a guest cannot fill the host's disk through a console file), and a sink that
//! cannot take more right now (a full pipe) dropping the byte instead of stalling the vCPU.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::rate_limiter::token_bucket::{Reduction, TokenBucket};
use crate::rate_limiter::TokenBucketConfig;
use crate::BusDevice;

/// COM1's first port.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// A 16550 decodes eight ports.
pub const SERIAL_PORT_LEN: u64 = 8;
/// vm-superio's receive FIFO (64 bytes): more saved input than this cannot be restored.
const UART_FIFO_SIZE: usize = 64;

/// How much of the guest's console output may reach its sink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputLimits {
    /// Bytes over this bucket's rate are dropped (Firecracker's `PUT /serial` `rate_limiter`).
    pub rate: Option<TokenBucketConfig>,
    /// At most this many bytes reach the sink in all; the rest are dropped.
    pub max_bytes: Option<u64>,
}

/// Running totals of the console's output (the `uart` metrics group).
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    /// Bytes that reached the sink.
    pub written_bytes: AtomicU64,
    /// Bytes dropped because the sink could not take them (full, closed or failing).
    pub missed_bytes: AtomicU64,
    /// Bytes dropped by the rate limiter.
    pub rate_limiter_dropped_bytes: AtomicU64,
    /// Bytes dropped once the output cap was reached.
    pub cap_dropped_bytes: AtomicU64,
}

/// The sink behind the UART, with the limits applied. Never fails and never blocks on the
/// guest's account: what cannot or may not be written is counted and dropped.
pub struct LimitedOutput {
    out: Box<dyn Write + Send>,
    bucket: Option<TokenBucket>,
    max_bytes: Option<u64>,
    written: u64,
    counters: Arc<ConsoleCounters>,
    /// Each kind of loss is logged once, not per byte.
    cap_logged: bool,
    failure_logged: bool,
}

impl LimitedOutput {
    /// `out` with `limits`, counting into `counters`.
    pub fn new(
        out: Box<dyn Write + Send>,
        limits: OutputLimits,
        counters: Arc<ConsoleCounters>,
    ) -> Self {
        LimitedOutput {
            out,
            bucket: limits
                .rate
                .and_then(|config| TokenBucket::new(&config, Instant::now())),
            max_bytes: limits.max_bytes,
            written: 0,
            counters,
            cap_logged: false,
            failure_logged: false,
        }
    }

    fn drop_bytes(counter: &AtomicU64, len: usize) -> io::Result<usize> {
        counter.fetch_add(len as u64, Ordering::Relaxed);
        Ok(len)
    }
}

impl Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len();
        if let Some(bucket) = &mut self.bucket {
            if let Reduction::Failure { .. } = bucket.reduce(len as u64, Instant::now()) {
                return Self::drop_bytes(&self.counters.rate_limiter_dropped_bytes, len);
            }
        }
        if let Some(max) = self.max_bytes {
            if self.written.saturating_add(len as u64) > max {
                if !self.cap_logged {
                    self.cap_logged = true;
                    log::warn!(
                        "serial console: {max} bytes written, the output cap; further output is dropped"
                    );
                }
                return Self::drop_bytes(&self.counters.cap_dropped_bytes, len);
            }
        }
        match self.out.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                self.counters
                    .written_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            // A reader that is slow (a full pipe) loses this output, the guest does not wait.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Self::drop_bytes(&self.counters.missed_bytes, len)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => {
                if !self.failure_logged {
                    self.failure_logged = true;
                    log::error!("serial console output failed, its output is dropped: {e}");
                }
                Self::drop_bytes(&self.counters.missed_bytes, len)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            result => result,
        }
    }
}

/// The guest's serial console: what the guest writes goes to its sink through
/// [`LimitedOutput`], what the host enqueues with [`SerialConsole::enqueue_input`] is what the
/// guest reads.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, LimitedOutput>,
    counters: Arc<ConsoleCounters>,
}

/// The UART's registers and unread input, for a snapshot (vm-superio's `SerialState` as plain
/// serde data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low and high bytes.
    pub baud_divisor: [u8; 2],
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl SerialConsole {
    /// Creates a UART that raises its interrupt through `irq` and writes guest output to `out`
    /// within `limits`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>, limits: OutputLimits) -> Self {
        let counters = Arc::new(ConsoleCounters::default());
        Self {
            uart: Serial::new(irq, LimitedOutput::new(out, limits, counters.clone())),
            counters,
        }
    }

    /// Like [`Self::new`], with the registers of a snapshot's UART (raising its interrupt if
    /// they say one is due). Input longer than the UART's FIFO is cut to it.
    pub fn from_state(
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        limits: OutputLimits,
        state: &SerialConsoleState,
    ) -> io::Result<Self> {
        let counters = Arc::new(ConsoleCounters::default());
        let mut in_buffer = state.in_buffer.clone();
        in_buffer.truncate(UART_FIFO_SIZE);
        let registers = SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer,
        };
        let out = LimitedOutput::new(out, limits, counters.clone());
        let uart = Serial::from_state(&registers, irq, NoEvents, out)
            .map_err(|e| io::Error::other(format!("restoring the UART: {e:?}")))?;
        Ok(Self { uart, counters })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save(&self) -> SerialConsoleState {
        let state = self.uart.state();
        SerialConsoleState {
            baud_divisor: [state.baud_divisor_low, state.baud_divisor_high],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        }
    }

    /// The output's running totals.
    pub fn counters(&self) -> &Arc<ConsoleCounters> {
        &self.counters
    }

    /// The totals under Firecracker's `uart` metric field names (`cap_dropped_bytes` is Kiln's).
    pub fn metric_values(&self) -> Vec<(&'static str, u64)> {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let c = &self.counters;
        vec![
            ("write_count", load(&c.written_bytes)),
            ("missed_write_count", load(&c.missed_bytes)),
            (
                "rate_limiter_dropped_bytes",
                load(&c.rate_limiter_dropped_bytes),
            ),
            ("cap_dropped_bytes", load(&c.cap_dropped_bytes)),
        ]
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
        // The output never fails (LimitedOutput drops what it cannot write), so an error here
        // is the UART's own, which has none for a write today; the guest goes on either way.
        if let Err(e) = self.uart.write(offset, value) {
            log::debug!("serial console: {e}");
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
            OutputLimits::default(),
        );
        (console, buf, irq)
    }

    fn write_all(console: &mut SerialConsole, bytes: &[u8]) {
        for b in bytes {
            console.write(0, &[*b]);
        }
    }

    #[test]
    fn the_cap_and_the_rate_limiter_drop_and_count_what_is_over() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let buf = SharedBuf::default();
        let limits = OutputLimits {
            rate: None,
            max_bytes: Some(4),
        };
        let mut console = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(buf.clone()),
            limits,
        );
        write_all(&mut console, b"abcdefgh");
        assert_eq!(&*buf.0.lock().unwrap(), b"abcd");
        let c = console.counters();
        assert_eq!(c.written_bytes.load(Ordering::Relaxed), 4);
        assert_eq!(c.cap_dropped_bytes.load(Ordering::Relaxed), 4);

        // A bucket of 3 bytes that refills over an hour: three go through, the rest are dropped.
        let buf = SharedBuf::default();
        let limits = OutputLimits {
            rate: Some(TokenBucketConfig {
                size: 3,
                one_time_burst: None,
                refill_time: 3_600_000,
            }),
            max_bytes: None,
        };
        let mut console = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(buf.clone()),
            limits,
        );
        write_all(&mut console, b"12345");
        assert_eq!(&*buf.0.lock().unwrap(), b"123");
        let c = console.counters();
        assert_eq!(c.rate_limiter_dropped_bytes.load(Ordering::Relaxed), 2);
    }

    /// A sink that takes nothing: full (`WouldBlock`) or broken.
    struct Refusing(io::ErrorKind);

    impl Write for Refusing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(self.0))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(self.0))
        }
    }

    #[test]
    fn a_full_or_broken_sink_drops_the_output_and_the_guest_goes_on() {
        for kind in [io::ErrorKind::WouldBlock, io::ErrorKind::BrokenPipe] {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut console = SerialConsole::new(
                EventFdTrigger::new(irq),
                Box::new(Refusing(kind)),
                OutputLimits::default(),
            );
            write_all(&mut console, b"lost");
            console.flush();
            // The transmitter is empty again: the guest may write on (LSR bit 5, THR empty).
            let mut lsr = [0u8];
            console.read(5, &mut lsr);
            assert_ne!(lsr[0] & 0x20, 0, "{kind:?}");
            assert_eq!(console.counters().missed_bytes.load(Ordering::Relaxed), 4);
        }
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
