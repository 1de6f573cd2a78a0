//! virtio-blk's request queue against a hostile guest: request parsing (`request.rs`: header,
//! type, sector, data and status descriptors, discard/write-zeroes segments, GET_ID) and the I/O
//! it leads to on a small scratch image, for a writable and a read-only drive. Every chain must
//! end with a status (or be dropped when it has no status byte), or the device in NEEDS_RESET.
//!
//! Input: one byte of flags (bit 0: read-only drive), then `kiln_fuzz::Guest::read`'s layout.

#![no_main]

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::single_queue::SingleQueueDevice;
use devices::virtio::VirtioDevice;
use kiln_fuzz::{scratch_disk, Guest, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let config = BlockConfig {
        id: "fuzz-drive".into(),
        path: scratch_disk().clone(),
        read_only: flags & 1 != 0,
        rate_limiter: RateLimiterConfig::default(),
    };
    let mut block = Block::new(&config).expect("block device on the scratch image");
    let mut config_space = [0u8; 8];
    block.read_config(u64::from(flags >> 1), &mut config_space);
    let Some(guest) = Guest::read(input, &block) else {
        return;
    };
    guest.activate(&mut block);
    block.process_queue();
    block.process_queue();
});
