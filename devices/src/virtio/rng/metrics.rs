//! virtio-rng's counters under Firecracker's `entropy` metric field names.

use super::RngCounters;

/// The counters as metric fields.
pub(super) fn values(c: &RngCounters) -> Vec<(&'static str, u64)> {
    vec![
        ("entropy_bytes", c.bytes),
        ("entropy_event_count", c.requests),
        ("host_rng_fails", c.host_failures),
        ("guest_errors", c.guest_errors),
    ]
}
