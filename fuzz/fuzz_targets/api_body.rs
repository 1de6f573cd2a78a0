//! API body parsing and validation for every route Kiln serves: the JSON models
//! (`deny_unknown_fields`, Firecracker's field names), ID checks against the path, rate limiter
//! and MAC validation, then the fault message a refused body gets. Picking the route from a table
//! lets the fuzzer spend its time inside the bodies instead of finding path spellings.
//!
//! Input: one byte choosing a route from `api::routes::ROUTES` (path IDs filled in from a second
//! byte), then the body.

#![no_main]

use api::routes::{parse_request, ROUTES};
use kiln_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// Path IDs to fill templates with: ones seeds use, and ones that are invalid.
const IDS: &[&str] = &["rootfs", "eth0", "drive1", "", "a/b", "with space", "ü"];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let route = ROUTES[usize::from(input.u8()) % ROUTES.len()];
    let (method, template) = (route.method, route.path);
    let id = IDS[usize::from(input.u8()) % IDS.len()];
    let path = match template.split_once('{') {
        Some((prefix, _)) => format!("{prefix}{id}"),
        None => template.to_string(),
    };
    match parse_request(method, &path, input.rest()) {
        Ok(_) => {}
        Err(e) => {
            assert_eq!(e.status(), 400);
            let _ = e.fault_message();
        }
    }
});
