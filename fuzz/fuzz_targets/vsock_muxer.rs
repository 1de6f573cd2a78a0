//! The vsock muxer's connection state machine against a sequence of guest packets, host-side
//! reads into receive buffers of any size, and time passing (deadlines, sweeps): header parsing,
//! every op in every connection state, credit accounting, the 1024-connection limit. Nothing the
//! guest sends may panic the muxer.
//!
//! Input: a sequence of steps, each one byte of op then its argument: 0 a guest packet (u16
//! length, bytes), 1 a receive buffer (u16 capacity), 2 time passes (u16 ms) and the muxer
//! sweeps, 3 host socket events are served.

#![no_main]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use devices::virtio::vsock::muxer::{Muxer, ReadPacket, WritePacket};
use kiln_fuzz::{scratch_path, Input};
use libfuzzer_sys::fuzz_target;

/// A guest transmit buffer over a slice of the input.
struct Packet<'a> {
    bytes: &'a [u8],
}

impl Read for Packet<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bytes.read(buf)
    }
}

impl ReadPacket for Packet<'_> {
    fn available(&self) -> usize {
        self.bytes.len()
    }

    fn as_read(&mut self) -> &mut dyn Read {
        self
    }
}

/// A guest receive buffer of a given capacity.
struct RxBuffer {
    data: Vec<u8>,
    capacity: usize,
}

impl Write for RxBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.capacity - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WritePacket for RxBuffer {
    fn available(&self) -> usize {
        self.capacity - self.data.len()
    }
}

fuzz_target!(|data: &[u8]| {
    let uds_path = scratch_path("muxer.sock");
    let _ = std::fs::remove_file(&uds_path);
    let listener = UnixListener::bind(&uds_path).expect("vsock listener");
    let mut muxer = Muxer::new(3, listener, uds_path).expect("muxer");
    let mut input = Input::new(data);
    let mut now = Instant::now();
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let mut packet = Packet {
                    bytes: input.frame(),
                };
                muxer.handle_guest_packet(&mut packet, now);
            }
            1 => {
                let capacity = usize::from(input.u16());
                let mut buf = RxBuffer {
                    data: Vec::with_capacity(capacity),
                    capacity,
                };
                let _ = muxer.fill_rx(&mut buf);
            }
            2 => {
                now += Duration::from_millis(u64::from(input.u16()));
                muxer.sweep(now);
            }
            _ => muxer.process_host_events(now),
        }
    }
});
