//! The virtio-mmio transport as a hostile guest's vCPU drives it, with a virtio-blk device behind
//! it: any sequence of register reads and writes (feature selection and negotiation, queue
//! selection, sizes and ring addresses anywhere, the status state machine, DRIVER_OK activation
//! with whatever queues the guest set up, resets) and config space accesses of any width, with
//! queue notifications served in between as the event loop would.
//!
//! Input: a u16-length-prefixed guest memory image, then steps of one op byte (low two bits: 0
//! register write (offset byte * 4, u32 value), 1 register read (offset byte * 4), 2 config
//! access (offset byte, width 1 to 8 from the next byte; a write when the op's bit 7 is set, its
//! bytes following), 3 queue notification).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{MmioTransport, SharedVirtioDevice};
use devices::virtio::single_queue::SingleQueueDevice;
use devices::virtio::Interrupt;
use devices::BusDevice;
use kiln_fuzz::{guest_memory, scratch_disk, Input};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where config space starts in the window.
const CONFIG: u64 = 0x100;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = guest_memory(input.frame());
    let config = BlockConfig {
        id: "fuzz-drive".into(),
        path: scratch_disk().clone(),
        read_only: false,
        rate_limiter: RateLimiterConfig::default(),
    };
    let block = Arc::new(Mutex::new(
        Block::new(&config).expect("block device on the scratch image"),
    ));
    let shared: SharedVirtioDevice = block.clone();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let mut transport = MmioTransport::new(mem, shared, interrupt);
    while !input.is_empty() {
        let op = input.u8();
        match op & 3 {
            0 => {
                let offset = u64::from(input.u8()) * 4;
                transport.write(offset, &input.u32().to_le_bytes());
            }
            1 => {
                let mut value = [0u8; 4];
                transport.read(u64::from(input.u8()) * 4, &mut value);
            }
            2 => {
                let offset = CONFIG + u64::from(input.u8());
                let width = usize::from(input.u8() % 8) + 1;
                if op & 0x80 != 0 {
                    transport.write(offset, input.bytes(width));
                } else {
                    let mut value = [0u8; 8];
                    transport.read(offset, &mut value[..width]);
                }
            }
            _ => block.lock().expect("device lock").process_queue(),
        }
    }
});
