//! virtio-balloon's queues against a hostile guest: inflate and deflate page-frame lists (frames
//! outside guest memory, odd lengths, every chain shape), statistics buffers of any length and
//! tag, free page hints and reports (ranges past guest memory, wrapping, zero-length). Every
//! chain must end in a used entry or NEEDS_RESET, never a panic or a `madvise` outside guest
//! memory.
//!
//! Input: `kiln_fuzz::Guest::read`'s layout (all five queues offered: inflate, deflate, stats,
//! hinting, reporting; those past what the acked features call for are dropped).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::balloon::{queue_count, Balloon, BalloonConfig};
use kiln_fuzz::{run_event_loop, Guest, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut balloon = Balloon::new(&BalloonConfig {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    })
    .expect("balloon device");
    let Some(mut guest) = Guest::read(Input::new(data), &balloon) else {
        return;
    };
    // A driver sets up only the queues its features call for (statistics, hinting and
    // reporting each add one), as the transport hands them over.
    guest.queues.truncate(queue_count(guest.acked));
    guest.activate(&mut balloon);
    // A hinting run, so free page hints are taken rather than ignored.
    let _ = balloon.start_hinting(false);
    run_event_loop(Arc::new(Mutex::new(balloon)), 3);
});
