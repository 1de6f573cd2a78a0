//! virtio-vsock's queues against a hostile guest: transmit chains become packets (header parsed,
//! payload gathered across descriptors) for the muxer, whose answers (resets for ports nobody
//! listens on, credit updates) fill receive chains of any shape. Every chain must be used or the
//! device reset, never a panic.
//!
//! Input: `kiln_fuzz::Guest::read`'s layout (three queues: rx, tx, event). The device's host
//! side is a real Unix socket in the scratch directory; no host peer ever connects.

#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use devices::virtio::vsock::{Vsock, VsockConfig};
use kiln_fuzz::{run_event_loop, scratch_path, Guest, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let uds_path = scratch_path("vsock.sock");
    let _ = std::fs::remove_file(&uds_path);
    let listener = UnixListener::bind(&uds_path).expect("vsock listener");
    let mut vsock = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path,
        listener,
    })
    .expect("vsock device");
    let Some(guest) = Guest::read(Input::new(data), &vsock) else {
        return;
    };
    guest.activate(&mut vsock);
    run_event_loop(Arc::new(Mutex::new(vsock)), 3);
});
