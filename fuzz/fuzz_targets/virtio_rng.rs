//! virtio-rng's request queue against a hostile guest: every writable descriptor chain shape
//! (read-only buffers, zero lengths, chains past guest memory, loops, indirect tables) must end
//! in a used entry or NEEDS_RESET, never a panic or a write outside the chain's buffers.
//!
//! Input: see `kiln_fuzz::Guest::read` (features, queue size, guest memory image).

#![no_main]

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::rng::Rng;
use devices::virtio::single_queue::SingleQueueDevice;
use kiln_fuzz::{Guest, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::new(&RateLimiterConfig::default()).expect("rng device");
    let Some(guest) = Guest::read(Input::new(data), &rng) else {
        return;
    };
    guest.activate(&mut rng);
    rng.process_queue();
    // A second pass finds the queue empty (or broken): it must stay quiet.
    rng.process_queue();
});
