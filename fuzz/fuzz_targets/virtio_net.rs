//! virtio-net's receive and transmit queues against a hostile guest: transmit chains (vnet
//! header, frame gathered from many descriptors, oversized frames) and receive chains (too
//! small, read-only, mergeable buffers across chains) for frames a fake TAP delivers, with
//! whatever offloads the guest acks. Every chain must be used or the device reset, never a panic.
//!
//! Input: one byte of frame count, then that many u16-length-prefixed frames the TAP holds for
//! the guest, then `kiln_fuzz::Guest::read`'s layout. Frames the device transmits are dropped.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::rate_limiter::RateLimiterConfig;
use devices::mmds::{MmdsStack, MmdsStackConfig, MmdsStore};
use devices::virtio::net::{Net, NetBackend, NetDeviceConfig};
use kiln_fuzz::{run_event_loop, Guest, Input};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A TAP that holds the input's frames and swallows what the guest sends; its fd (an eventfd
/// written once) polls readable, as a TAP with frames waiting does.
struct FuzzTap {
    frames: VecDeque<Vec<u8>>,
    readable: EventFd,
}

impl Read for FuzzTap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .frames
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // A TAP truncates a frame longer than the read, as here.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
}

impl Write for FuzzTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for FuzzTap {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl NetBackend for FuzzTap {
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let count = input.u8() % 8;
    let frames = (0..count).map(|_| input.frame().to_vec()).collect();
    let readable = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    readable.write(1).expect("eventfd write");
    let config = NetDeviceConfig {
        id: "fuzz-net".into(),
        tap: FuzzTap { frames, readable },
        mac: Some([0x02, 0, 0, 0, 0, 0x01]),
        mtu: None,
        rx_rate_limiter: RateLimiterConfig::default(),
        tx_rate_limiter: RateLimiterConfig::default(),
        // MMDS on: guest frames to its address take the stack's path instead of the TAP's.
        mmds: Some(MmdsStack::new(MmdsStackConfig {
            ipv4: std::net::Ipv4Addr::new(169, 254, 169, 254),
            store: MmdsStore::shared(1024),
        })),
    };
    let mut net = Net::new(config).expect("net device");
    let Some(guest) = Guest::read(input, &net) else {
        return;
    };
    guest.activate(&mut net);
    run_event_loop(Arc::new(Mutex::new(net)), 3);
});
