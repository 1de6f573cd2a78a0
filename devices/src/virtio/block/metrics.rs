//! virtio-blk's counters under Firecracker's `block` metric field names.

use super::BlockCounters;

/// The counters as metric fields.
pub(super) fn values(c: &BlockCounters) -> Vec<(&'static str, u64)> {
    vec![
        ("read_bytes", c.read_bytes),
        ("write_bytes", c.write_bytes),
        ("read_count", c.reads),
        ("write_count", c.writes),
        ("flush_count", c.flushes),
        ("execute_fails", c.failed_requests),
    ]
}
