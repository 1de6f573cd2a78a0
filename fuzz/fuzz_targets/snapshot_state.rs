//! `PUT /snapshot/load`'s state file: the bytes as a whole file (header, length, checksum), and
//! the same bytes framed as a valid file's state, so the fuzzer reaches the state's parser and
//! checks behind the checksum. What parses must also give the resources a restore builds from
//! (with an override of each kind), or a clear error; never a panic.
//!
//! Input: the file's bytes.

#![no_main]

use api::models::{SnapshotLoadParams, VsockOverride};
use libfuzzer_sys::fuzz_target;
use vmm::persist::{format, parse_state, restored_resources};
use vmm::resources::VmResources;

fuzz_target!(|data: &[u8]| {
    let _ = parse_state(&mut &data[..]);
    let framed = format::frame(data);
    let Ok(state) = parse_state(&mut &framed[..]) else {
        return;
    };
    let load = SnapshotLoadParams {
        snapshot_path: "/s".into(),
        mem_file_path: Some("/m".into()),
        mem_backend: None,
        enable_diff_snapshots: false,
        track_dirty_pages: true,
        resume_vm: true,
        network_overrides: Vec::new(),
        vsock_override: Some(VsockOverride {
            uds_path: "/v".into(),
        }),
        clock_realtime: false,
        huge_pages: Default::default(),
        drive_overrides: Vec::new(),
    };
    let _ = restored_resources(&state.vm_config, &load, &VmResources::default());
});
