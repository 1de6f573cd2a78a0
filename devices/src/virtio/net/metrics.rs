//! virtio-net's counters under Firecracker's `net` metric field names.

use super::NetCounters;

/// The counters as metric fields.
pub(super) fn values(c: &NetCounters) -> Vec<(&'static str, u64)> {
    vec![
        ("rx_bytes_count", c.rx_bytes),
        ("rx_packets_count", c.rx_frames),
        ("rx_fails", c.rx_dropped),
        ("tx_bytes_count", c.tx_bytes),
        ("tx_packets_count", c.tx_frames),
        ("tap_write_fails", c.tx_dropped),
        ("guest_errors", c.guest_errors),
    ]
}
