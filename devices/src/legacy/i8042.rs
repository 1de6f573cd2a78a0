//! The i8042 PS/2 controller with one keyboard and no aux (mouse) port.
//!
//! Two things make a microVM need it:
//! - a Linux guest booted with `reboot=k` resets by writing 0xFE to port 0x64; Kiln turns that
//!   reset into a clean VMM exit, which is how a microVM guest ends itself (Firecracker's
//!   convention);
//! - the VMM asks the guest to reboot by "pressing" Ctrl+Alt+Del on the keyboard
//!   ([`I8042::trigger_ctrl_alt_del`]).
//!
//! For the second, the Linux i8042 and atkbd drivers must find a working controller and keyboard,
//! so the model answers the probe sequence: self test, CTR read/write, interface test, keyboard
//! reset / identify / LEDs. Kiln boots Linux with `i8042.noaux i8042.nomux i8042.dumbkbd
//! i8042.nopnp`, but the keyboard also answers the commands a non-dumb atkbd probe sends.
//!
//! The keyboard speaks scancode set 2; when the guest turns on the controller's translation (CTR
//! bit 6) the bytes are delivered in set 1, as a real controller would translate them.
//!
//! Invariants: a guest access never panics, never allocates (the output buffer is a fixed
//! 16-byte ring) and never waits; every command is answered synchronously, so
//! the "input buffer full" status bit is never set.

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::BusDevice;

/// The controller's data port; the command/status port is at base + 4 (0x64).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60 ..= 0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// How many bytes the controller holds for the guest to read from the data port.
const OUTPUT_BUFFER_LEN: usize = 16;

/// Offset of the data port (0x60) on the bus.
const OFS_DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64) on the bus.
const OFS_COMMAND: u64 = 4;

// Status register bits.
/// Output buffer full: the data port holds a byte for the guest.
const SR_OBF: u8 = 1 << 0;
/// System flag: mirrors the CTR's "POST passed" bit.
const SR_SYS: u8 = 1 << 2;
/// The last byte the guest wrote went to the command port (0x64), not the data port.
const SR_LAST_WAS_COMMAND: u8 = 1 << 3;
/// The keyboard is not inhibited by the (absent) key lock.
const SR_KBD_UNLOCKED: u8 = 1 << 4;

// Controller configuration byte (CTR, "command byte") bits.
/// Raise IRQ 1 when keyboard data arrives.
const CTR_KBD_INT: u8 = 1 << 0;
/// POST passed; shows in the status register as [`SR_SYS`].
const CTR_SYS: u8 = 1 << 2;
/// Keyboard clock disabled (0xAD / 0xAE).
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// Aux clock disabled (0xA7 / 0xA8).
const CTR_AUX_DISABLED: u8 = 1 << 5;
/// Translate the keyboard's scancode set 2 into set 1.
const CTR_XLATE: u8 = 1 << 6;
/// What the firmware leaves behind: keyboard interrupt on, POST passed, no aux device, no translation.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLED;

/// Output port after POST: bit 0 (CPU reset line, active low) released, bit 1 (A20 gate) on.
/// Only the 0xFE command resets the CPU; writing the output port is stored, not acted upon.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

// Bytes the keyboard sends.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// The MF2 keyboard's identity, as answered to 0xF2 (untranslated).
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// The only scancode set the keyboard speaks.
const KBD_SCANCODE_SET: u8 = 2;

// Make codes in scancode set 2 (0xE0-prefixed keys are two bytes).
const KEY_CTRL: &[u8] = &[0x14];
const KEY_ALT: &[u8] = &[0x11];
const KEY_DEL: &[u8] = &[0xe0, 0x71];

// Controller answers.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

/// Errors from host-side requests to the i8042.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not read what is already queued, so the key sequence does not fit.
    #[error(
        "i8042 output buffer full: {queued} of {capacity} bytes still unread by the guest, \
         {needed} more needed; is the guest's keyboard driver running?"
    )]
    BufferFull {
        /// Bytes waiting in the output buffer.
        queued: usize,
        /// Bytes the request needed.
        needed: usize,
        /// The buffer's size (16 bytes).
        capacity: usize,
    },
    /// Signalling the keyboard interrupt's eventfd failed (the bytes stay queued).
    #[error("i8042: could not raise the keyboard interrupt: {0}")]
    KbdInterrupt(#[source] std::io::Error),
}

/// A byte the guest wrote to the command port, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// 0x20: read the CTR.
    ReadCtr,
    /// 0x60: the next data byte is the new CTR.
    WriteCtr,
    /// 0xA7: disable the aux clock.
    DisableAux,
    /// 0xA8: enable the aux clock.
    EnableAux,
    /// 0xAA: controller self test.
    SelfTest,
    /// 0xAB: keyboard interface test.
    KbdInterfaceTest,
    /// 0xAD: disable the keyboard clock.
    DisableKbd,
    /// 0xAE: enable the keyboard clock.
    EnableKbd,
    /// 0xD0: read the output port.
    ReadOutputPort,
    /// 0xD1: the next data byte is the new output port.
    WriteOutputPort,
    /// 0xD2: the next data byte appears in the output buffer as if the keyboard sent it.
    WriteKbdOutput,
    /// 0xD3 (aux loopback) / 0xD4 (write to aux): the next data byte is for the absent aux device.
    WriteAux,
    /// 0xFE: pulse the CPU reset line.
    ResetCpu,
    /// Anything else (including the aux interface test 0xA9, which no aux port answers).
    Unsupported(u8),
}

impl From<u8> for Command {
    fn from(byte: u8) -> Self {
        match byte {
            0x20 => Self::ReadCtr,
            0x60 => Self::WriteCtr,
            0xa7 => Self::DisableAux,
            0xa8 => Self::EnableAux,
            0xaa => Self::SelfTest,
            0xab => Self::KbdInterfaceTest,
            0xad => Self::DisableKbd,
            0xae => Self::EnableKbd,
            0xd0 => Self::ReadOutputPort,
            0xd1 => Self::WriteOutputPort,
            0xd2 => Self::WriteKbdOutput,
            0xd3 | 0xd4 => Self::WriteAux,
            0xfe => Self::ResetCpu,
            other => Self::Unsupported(other),
        }
    }
}

/// Where the next data-port byte goes after a controller command that takes a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControllerParam {
    Ctr,
    OutputPort,
    KbdOutput,
    Aux,
}

/// A byte the guest sent to the keyboard (a data-port write with no controller parameter due).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KbdCommand {
    /// 0xED: set LEDs; a parameter byte follows.
    SetLeds,
    /// 0xEE: echo.
    Echo,
    /// 0xF0: get/set scancode set; a parameter byte follows.
    ScancodeSet,
    /// 0xF2: identify.
    Identify,
    /// 0xF3: set typematic rate; a parameter byte follows.
    Typematic,
    /// 0xFF: reset and self test.
    Reset,
    /// Enable/disable scanning, set defaults and the rest: acknowledged, nothing to do.
    Other(u8),
}

impl From<u8> for KbdCommand {
    fn from(byte: u8) -> Self {
        match byte {
            0xed => Self::SetLeds,
            0xee => Self::Echo,
            0xf0 => Self::ScancodeSet,
            0xf2 => Self::Identify,
            0xf3 => Self::Typematic,
            0xff => Self::Reset,
            other => Self::Other(other),
        }
    }
}

/// A fixed-size FIFO of bytes for the guest to read; never allocates after construction.
#[derive(Debug, Default)]
struct OutputBuffer {
    bytes: [u8; OUTPUT_BUFFER_LEN],
    /// Index of the oldest byte; always `< OUTPUT_BUFFER_LEN`.
    head: usize,
    /// Number of queued bytes; always `<= OUTPUT_BUFFER_LEN`.
    len: usize,
}

impl OutputBuffer {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn room(&self) -> usize {
        OUTPUT_BUFFER_LEN - self.len
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Queues `byte`; returns false (and drops it) if the buffer is full.
    fn push(&mut self, byte: u8) -> bool {
        if self.len == OUTPUT_BUFFER_LEN {
            return false;
        }
        self.bytes[(self.head + self.len) % OUTPUT_BUFFER_LEN] = byte;
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let byte = self.bytes[self.head];
        self.head = (self.head + 1) % OUTPUT_BUFFER_LEN;
        self.len -= 1;
        Some(byte)
    }
}

/// The i8042 on the port bus.
///
/// `reset` fires when the guest asks for a CPU reset (0xFE on port 0x64), and only then.
/// `kbd_interrupt` fires when keyboard bytes become readable while the guest has the keyboard
/// interrupt enabled (CTR bit 0); the VMM registers it as an irqfd on GSI 1. Controller command
/// answers (self test, CTR, ...) are polled by guests and raise no interrupt.
pub struct I8042 {
    reset: EventFdTrigger,
    kbd_interrupt: EventFdTrigger,
    output: OutputBuffer,
    /// The byte the data port showed last; a real controller keeps showing it once the buffer is
    /// empty.
    last_output: u8,
    ctr: u8,
    output_port: u8,
    /// Whether the guest's last write went to the command port (status bit 3).
    last_write_was_command: bool,
    /// Set by a controller command whose parameter is the next data-port byte.
    controller_param: Option<ControllerParam>,
    /// Set by a keyboard command whose parameter is the next byte sent to the keyboard.
    kbd_param: Option<KbdCommand>,
    counters: I8042Counters,
}

/// What the guest did with the controller, under Firecracker's `i8042` metric names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct I8042Counters {
    /// Reads of the data and status ports.
    pub read_count: u64,
    /// Writes to the data and command ports.
    pub write_count: u64,
    /// Reads of the other ports in the controller's range (0x61 ..= 0x63).
    pub missed_read_count: u64,
    /// Writes there.
    pub missed_write_count: u64,
    /// CPU reset commands (a guest's `reboot=k`).
    pub reset_count: u64,
    /// Interrupts or resets that could not be signalled.
    pub error_count: u64,
}

impl I8042 {
    /// Creates a controller in its post-firmware state. `reset` fires on the guest's reset
    /// command; `kbd_interrupt` is IRQ 1. Both eventfds should be non-blocking so that a guest
    /// access can never wait on them.
    pub fn new(reset: EventFdTrigger, kbd_interrupt: EventFdTrigger) -> Self {
        Self {
            reset,
            kbd_interrupt,
            output: OutputBuffer::default(),
            last_output: 0,
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            last_write_was_command: false,
            controller_param: None,
            kbd_param: None,
            counters: I8042Counters::default(),
        }
    }

    /// What a snapshot keeps of the controller: the guest's configuration byte and output port
    /// (unread keyboard bytes and half-given commands are not kept).
    pub fn save(&self) -> [u8; 2] {
        [self.ctr, self.output_port]
    }

    /// Takes back what [`Self::save`] gave.
    pub fn restore(&mut self, [ctr, output_port]: [u8; 2]) {
        self.ctr = ctr;
        self.output_port = output_port;
    }

    /// The counters so far.
    pub fn counters(&self) -> I8042Counters {
        self.counters
    }

    /// The counters under Firecracker's `i8042` metric field names.
    pub fn metric_values(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("read_count", c.read_count),
            ("write_count", c.write_count),
            ("missed_read_count", c.missed_read_count),
            ("missed_write_count", c.missed_write_count),
            ("reset_count", c.reset_count),
            ("error_count", c.error_count),
        ]
    }

    /// Presses Ctrl, Alt and Del (make codes only, as Firecracker does): Linux's keyboard driver
    /// turns that into a reboot request. The bytes are queued all or none, and IRQ 1 is raised if
    /// the guest has the keyboard interrupt enabled.
    ///
    /// # Errors
    /// [`I8042Error::BufferFull`] if the guest has left too much unread (nothing is queued);
    /// [`I8042Error::KbdInterrupt`] if the interrupt could not be raised (the bytes stay queued).
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let needed = KEY_CTRL.len() + KEY_ALT.len() + KEY_DEL.len();
        if self.output.room() < needed {
            return Err(I8042Error::BufferFull {
                queued: self.output.len,
                needed,
                capacity: OUTPUT_BUFFER_LEN,
            });
        }
        for &byte in KEY_CTRL.iter().chain(KEY_ALT).chain(KEY_DEL) {
            let byte = self.delivered(byte);
            self.output.push(byte);
        }
        self.raise_kbd_interrupt()
    }

    /// The status register as the guest reads it from port 0x64.
    fn status(&self) -> u8 {
        let mut status = SR_KBD_UNLOCKED;
        if !self.output.is_empty() {
            status |= SR_OBF;
        }
        if self.ctr & CTR_SYS != 0 {
            status |= SR_SYS;
        }
        if self.last_write_was_command {
            status |= SR_LAST_WAS_COMMAND;
        }
        status
    }

    /// A byte from the keyboard as the guest sees it: translated to set 1 when the CTR asks for
    /// it. Only the set-2 bytes this keyboard model ever sends that translation changes are
    /// listed; the others (0xE0, ACK, 0xAA, 0xAB, 0xEE, ...) pass through unchanged.
    fn delivered(&self, byte: u8) -> u8 {
        if self.ctr & CTR_XLATE == 0 {
            return byte;
        }
        match byte {
            0x02 | 0x83 => 0x41, // scancode set 2 / the ID's second byte
            0x11 => 0x38,        // Alt
            0x14 => 0x1d,        // Ctrl
            0x71 => 0x53,        // Del (after 0xE0)
            other => other,
        }
    }

    /// Raises IRQ 1 if the guest enabled it and there is something to read.
    fn raise_kbd_interrupt(&self) -> Result<(), I8042Error> {
        if self.ctr & CTR_KBD_INT == 0 || self.output.is_empty() {
            return Ok(());
        }
        self.kbd_interrupt
            .trigger()
            .map_err(I8042Error::KbdInterrupt)
    }

    /// Like [`Self::raise_kbd_interrupt`], for paths the guest drives: a failure is logged
    /// and counted.
    fn raise_kbd_interrupt_or_log(&mut self) {
        if let Err(e) = self.raise_kbd_interrupt() {
            self.counters.error_count += 1;
            log::error!("{e}");
        }
    }

    /// Replaces whatever is unread with a controller answer (no interrupt: guests poll for it).
    fn answer(&mut self, byte: u8) {
        self.output.clear();
        self.output.push(byte);
    }

    /// Replaces whatever is unread with the keyboard's answer and raises IRQ 1.
    /// `bytes` is at most three bytes long, so it always fits the emptied buffer.
    fn kbd_answer(&mut self, bytes: &[u8]) {
        self.output.clear();
        for &byte in bytes {
            let byte = self.delivered(byte);
            self.output.push(byte);
        }
        self.raise_kbd_interrupt_or_log();
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.pop() {
            self.last_output = byte;
            // More to read: give the guest another edge, as it handles one byte per interrupt.
            self.raise_kbd_interrupt_or_log();
        }
        self.last_output
    }

    fn write_command(&mut self, byte: u8) {
        self.last_write_was_command = true;
        // A new command abandons a parameter the guest never sent.
        self.controller_param = None;
        match Command::from(byte) {
            Command::ReadCtr => self.answer(self.ctr),
            Command::WriteCtr => self.controller_param = Some(ControllerParam::Ctr),
            Command::DisableAux => self.ctr |= CTR_AUX_DISABLED,
            Command::EnableAux => self.ctr &= !CTR_AUX_DISABLED,
            Command::SelfTest => self.answer(SELF_TEST_PASSED),
            Command::KbdInterfaceTest => self.answer(INTERFACE_TEST_PASSED),
            Command::DisableKbd => self.ctr |= CTR_KBD_DISABLED,
            Command::EnableKbd => self.ctr &= !CTR_KBD_DISABLED,
            Command::ReadOutputPort => self.answer(self.output_port),
            Command::WriteOutputPort => self.controller_param = Some(ControllerParam::OutputPort),
            Command::WriteKbdOutput => self.controller_param = Some(ControllerParam::KbdOutput),
            Command::WriteAux => self.controller_param = Some(ControllerParam::Aux),
            Command::ResetCpu => {
                self.counters.reset_count += 1;
                if let Err(e) = self.reset.trigger() {
                    self.counters.error_count += 1;
                    log::error!("i8042: could not signal the guest's reset: {e}");
                }
            }
            Command::Unsupported(_) => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_write_was_command = false;
        match self.controller_param.take() {
            Some(ControllerParam::Ctr) => {
                self.ctr = byte;
                // Data may have waited for the interrupt to be enabled.
                self.raise_kbd_interrupt_or_log();
            }
            Some(ControllerParam::OutputPort) => self.output_port = byte,
            Some(ControllerParam::KbdOutput) => {
                // Shown as-is: a real controller does not translate this byte.
                self.output.clear();
                self.output.push(byte);
                self.raise_kbd_interrupt_or_log();
            }
            Some(ControllerParam::Aux) => {} // No aux device to receive it.
            None => self.write_keyboard(byte),
        }
    }

    fn write_keyboard(&mut self, byte: u8) {
        // Parameters are below 0x80; a command byte instead starts a new command.
        if let Some(command) = self.kbd_param.take() {
            if byte < 0x80 {
                if command == KbdCommand::ScancodeSet && byte == 0 {
                    self.kbd_answer(&[KBD_ACK, KBD_SCANCODE_SET]);
                } else {
                    // LEDs, typematic rate, or a request for a set: acknowledged (the keyboard
                    // stays in set 2; the guest can check with 0xF0 0x00).
                    self.kbd_answer(&[KBD_ACK]);
                }
                return;
            }
        }
        match KbdCommand::from(byte) {
            command @ (KbdCommand::SetLeds | KbdCommand::ScancodeSet | KbdCommand::Typematic) => {
                self.kbd_param = Some(command);
                self.kbd_answer(&[KBD_ACK]);
            }
            KbdCommand::Echo => self.kbd_answer(&[KBD_ECHO]),
            KbdCommand::Identify => self.kbd_answer(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KbdCommand::Reset => self.kbd_answer(&[KBD_ACK, KBD_SELF_TEST_PASSED]),
            KbdCommand::Other(_) => self.kbd_answer(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The registers are one byte wide; wider reads see the register in the low byte.
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            OFS_DATA => {
                self.counters.read_count += 1;
                self.read_data()
            }
            OFS_COMMAND => {
                self.counters.read_count += 1;
                self.status()
            }
            _ => {
                self.counters.missed_read_count += 1;
                0
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Wider writes act with their low byte.
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            OFS_DATA => {
                self.counters.write_count += 1;
                self.write_data(byte);
            }
            OFS_COMMAND => {
                self.counters.write_count += 1;
                self.write_command(byte);
            }
            _ => self.counters.missed_write_count += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// An i8042 with the eventfds behind its reset and keyboard interrupt.
    struct Fixture {
        i8042: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    impl Fixture {
        fn new() -> Self {
            let reset = EventFd::new(EFD_NONBLOCK).unwrap();
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let i8042 = I8042::new(
                EventFdTrigger::new(reset.try_clone().unwrap()),
                EventFdTrigger::new(irq.try_clone().unwrap()),
            );
            Self { i8042, reset, irq }
        }

        fn command(&mut self, byte: u8) {
            self.i8042.write(OFS_COMMAND, &[byte]);
        }

        fn send(&mut self, byte: u8) {
            self.i8042.write(OFS_DATA, &[byte]);
        }

        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.i8042.read(OFS_COMMAND, &mut b);
            b[0]
        }

        /// Reads the data port while the status register says there is something to read,
        /// the way Linux's i8042 driver does.
        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & SR_OBF != 0 {
                let mut b = [0];
                self.i8042.read(OFS_DATA, &mut b);
                out.push(b[0]);
            }
            out
        }

        /// How many interrupts were raised since the last call.
        fn interrupts(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
    }

    #[test]
    fn linux_probe_sequence() {
        let mut f = Fixture::new();
        // Power-on state: nothing to read, system flag set.
        assert_eq!(f.status() & (SR_OBF | SR_SYS), SR_SYS);
        assert!(f.drain().is_empty());

        f.command(0xaa); // controller self test
        assert_eq!(f.status() & SR_LAST_WAS_COMMAND, SR_LAST_WAS_COMMAND);
        assert_eq!(f.drain(), [0x55]);

        f.command(0x20); // read CTR
        assert_eq!(f.drain(), [CTR_DEFAULT]);

        // Linux disables the keyboard and its interrupt while probing.
        let probing = (CTR_DEFAULT | CTR_KBD_DISABLED) & !CTR_KBD_INT;
        f.command(0x60);
        f.send(probing);
        assert_eq!(f.status() & SR_LAST_WAS_COMMAND, 0);
        f.command(0x20);
        assert_eq!(f.drain(), [probing]);

        f.command(0xab); // keyboard interface test
        assert_eq!(f.drain(), [0x00]);

        // No aux device: the aux-disable bit follows 0xA8 / 0xA7 as Linux checks.
        f.command(0xa8);
        f.command(0x20);
        assert_eq!(f.drain()[0] & CTR_AUX_DISABLED, 0);
        f.command(0xa7);
        f.command(0x20);
        assert_eq!(f.drain()[0] & CTR_AUX_DISABLED, CTR_AUX_DISABLED);

        // Keyboard port enabled, interrupt on.
        f.command(0xae);
        f.command(0x60);
        f.send(CTR_DEFAULT);
        f.command(0x20);
        assert_eq!(f.drain(), [CTR_DEFAULT]);
        assert_eq!(
            f.interrupts(),
            0,
            "controller answers are polled, not interrupts"
        );

        // atkbd: reset, identify, LEDs, scancode set query, enable.
        f.send(0xff);
        assert!(f.interrupts() > 0);
        assert_eq!(f.drain(), [0xfa, 0xaa]);
        f.send(0xf2);
        assert_eq!(f.drain(), [0xfa, 0xab, 0x83]);
        f.send(0xed);
        assert_eq!(f.drain(), [0xfa]);
        f.send(0x07);
        assert_eq!(f.drain(), [0xfa]);
        f.send(0xf0);
        f.send(0x00);
        assert_eq!(f.drain(), [0xfa, 0x02]);
        f.send(0xf5);
        assert_eq!(f.drain(), [0xfa]);
        f.send(0xf4);
        assert_eq!(f.drain(), [0xfa]);
        f.send(0xee);
        assert_eq!(f.drain(), [0xee]);

        // Output port round trip.
        f.command(0xd0);
        assert_eq!(f.drain(), [OUTPUT_PORT_DEFAULT]);
        f.command(0xd1);
        f.send(0x01);
        f.command(0xd0);
        assert_eq!(f.drain(), [0x01]);
        assert!(f.reset.read().is_err(), "nothing above resets the CPU");
    }

    #[test]
    fn keyboard_command_interrupts_the_parameter_it_was_owed() {
        let mut f = Fixture::new();
        f.send(0xed); // set LEDs, then a command instead of the LED byte
        f.send(0xff);
        assert_eq!(f.drain(), [0xfa, 0xaa]);
        f.send(0x07); // no parameter due: an unknown command, acknowledged
        assert_eq!(f.drain(), [0xfa]);
    }

    #[test]
    fn keyboard_answers_raise_no_interrupt_when_the_guest_disabled_it() {
        let mut f = Fixture::new();
        f.command(0x60);
        f.send(CTR_DEFAULT & !CTR_KBD_INT);
        f.send(0xff);
        assert_eq!(f.interrupts(), 0);
        // Enabling the interrupt with data waiting raises it.
        f.command(0x60);
        f.send(CTR_DEFAULT);
        assert_eq!(f.interrupts(), 1);
        assert_eq!(f.drain(), [0xfa, 0xaa]);
    }

    #[test]
    fn reset_command_fires_the_event_and_nothing_else_does() {
        let mut f = Fixture::new();
        f.send(0xfe); // data port: a byte for the keyboard, not a reset
        for byte in (0..=0xff_u8).filter(|&b| b != 0xfe) {
            f.command(byte);
            f.send(0x00); // feed any parameter the command wants
        }
        f.i8042.write(1, &[0xfe]); // not a port of the controller
        assert!(f.reset.read().is_err(), "no reset expected yet");
        f.command(0xfe);
        assert_eq!(f.reset.read().unwrap(), 1);
        let c = f.i8042.counters();
        assert_eq!(
            (c.reset_count, c.missed_write_count, c.error_count),
            (1, 1, 0)
        );
        assert_eq!(c.write_count, 2 + 2 * 255);
        let mut byte = [0u8];
        f.i8042.read(2, &mut byte);
        assert_eq!(f.i8042.counters().missed_read_count, 1);
        assert!(f.i8042.metric_values().contains(&("reset_count", 1)));
    }

    #[test]
    fn ctrl_alt_del_queues_set2_make_codes_and_raises_irq1() {
        let mut f = Fixture::new();
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.interrupts(), 1);
        // One byte per read; each read that leaves more behind raises the interrupt again.
        let mut b = [0];
        f.i8042.read(OFS_DATA, &mut b);
        assert_eq!(b[0], 0x14);
        assert_eq!(f.interrupts(), 1);
        assert_eq!(f.drain(), [0x11, 0xe0, 0x71]);
        assert_eq!(f.interrupts(), 2, "after the 2nd and 3rd of the 4 reads");
        assert!(f.reset.read().is_err());
    }

    #[test]
    fn ctrl_alt_del_is_translated_to_set1_when_the_guest_asks() {
        let mut f = Fixture::new();
        f.command(0x60);
        f.send(CTR_DEFAULT | CTR_XLATE);
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), [0x1d, 0x38, 0xe0, 0x53]);
        f.send(0xf2);
        assert_eq!(f.drain(), [0xfa, 0xab, 0x41]);
    }

    #[test]
    fn ctrl_alt_del_without_the_interrupt_enabled_only_queues() {
        let mut f = Fixture::new();
        f.command(0x60);
        f.send(CTR_DEFAULT & !CTR_KBD_INT);
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.interrupts(), 0);
        assert_eq!(f.drain(), [0x14, 0x11, 0xe0, 0x71]);
    }

    #[test]
    fn full_buffer_is_an_error_and_queues_nothing() {
        let mut f = Fixture::new();
        for _ in 0..OUTPUT_BUFFER_LEN / 4 {
            f.i8042.trigger_ctrl_alt_del().unwrap();
        }
        match f.i8042.trigger_ctrl_alt_del() {
            Err(I8042Error::BufferFull {
                queued: OUTPUT_BUFFER_LEN,
                needed: 4,
                capacity: OUTPUT_BUFFER_LEN,
            }) => {}
            other => panic!("expected BufferFull, got {other:?}"),
        }
        assert_eq!(f.drain().len(), OUTPUT_BUFFER_LEN);
        // Room again once the guest has read.
        f.i8042.trigger_ctrl_alt_del().unwrap();
    }

    #[test]
    fn a_buffer_with_three_free_bytes_is_full_for_ctrl_alt_del() {
        let mut f = Fixture::new();
        for _ in 0..OUTPUT_BUFFER_LEN / 4 {
            f.i8042.trigger_ctrl_alt_del().unwrap();
        }
        let mut b = [0];
        for _ in 0..3 {
            f.i8042.read(OFS_DATA, &mut b);
        }
        assert!(matches!(
            f.i8042.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull { queued: 13, .. })
        ));
    }

    #[test]
    fn empty_buffer_reads_repeat_the_last_byte() {
        let mut f = Fixture::new();
        let mut b = [0xff];
        f.i8042.read(OFS_DATA, &mut b);
        assert_eq!(b[0], 0, "nothing was ever sent");
        f.command(0xaa);
        assert_eq!(f.drain(), [0x55]);
        f.i8042.read(OFS_DATA, &mut b);
        assert_eq!(b[0], 0x55);
        assert_eq!(f.status() & SR_OBF, 0);
        assert_eq!(f.interrupts(), 0, "an empty read raises nothing");
    }

    #[test]
    fn odd_sized_and_odd_offset_accesses() {
        let mut f = Fixture::new();
        // Empty accesses do nothing.
        f.i8042.read(OFS_COMMAND, &mut []);
        f.i8042.write(OFS_COMMAND, &[]);
        f.i8042.write(OFS_DATA, &[]);
        // A wide write acts with its low byte.
        f.i8042.write(OFS_COMMAND, &[0xaa, 0xfe, 0xfe, 0xfe]);
        assert!(f.reset.read().is_err());
        // A wide read gets the register in its low byte, zeros above.
        let mut wide = [0xff; 4];
        f.i8042.read(OFS_DATA, &mut wide);
        assert_eq!(wide, [0x55, 0, 0, 0]);
        // Offsets between the two ports, and beyond, read as zero and ignore writes.
        for offset in [1, 2, 3, 5, u64::MAX] {
            let mut b = [0xff; 2];
            f.i8042.read(offset, &mut b);
            assert_eq!(b, [0, 0]);
            f.i8042.write(offset, &[0xfe]);
        }
        assert!(f.reset.read().is_err());
        assert!(f.drain().is_empty());
    }

    #[test]
    fn output_buffer_wraps_and_never_exceeds_its_size() {
        let mut buf = OutputBuffer::default();
        for round in 0..3_u8 {
            for i in 0..OUTPUT_BUFFER_LEN as u8 {
                assert!(buf.push(round.wrapping_mul(16).wrapping_add(i)));
            }
            assert!(!buf.push(0xee), "a full buffer drops");
            assert_eq!(buf.pop(), Some(round.wrapping_mul(16)));
            assert!(buf.push(0xdd));
            for i in 1..OUTPUT_BUFFER_LEN as u8 {
                assert_eq!(buf.pop(), Some(round.wrapping_mul(16).wrapping_add(i)));
            }
            assert_eq!(buf.pop(), Some(0xdd));
            assert_eq!(buf.pop(), None);
        }
    }

    #[test]
    fn guest_byte_storm_never_panics_or_overflows() {
        let mut f = Fixture::new();
        let mut b = [0];
        // Every (port, byte) pair in turn, with the keyboard never read, then reads.
        for byte in 0..=0xff_u8 {
            if byte != 0xfe {
                f.command(byte);
            }
            f.send(byte);
            f.send(byte);
            assert!(f.i8042.output.len <= OUTPUT_BUFFER_LEN);
            f.i8042.read(OFS_DATA, &mut b);
        }
        assert!(f.drain().len() <= OUTPUT_BUFFER_LEN);
    }
}
