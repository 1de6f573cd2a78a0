//! virtio-net's counters under Firecracker's `net` metric field names.

use super::NetCounters;
use crate::mmds::stack::MmdsCounters;

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

/// MMDS's counters on an interface under Firecracker's `mmds` field names.
pub(super) fn mmds_values(c: &MmdsCounters) -> Vec<(&'static str, u64)> {
    vec![
        ("rx_accepted", c.frames_taken),
        ("rx_count", c.requests),
        ("rx_accepted_err", c.bad_requests),
        ("tx_frames", c.frames_sent),
        ("tx_count", c.frames_sent),
        ("tx_bytes", c.bytes_sent),
        ("tx_errors", c.frames_dropped),
        ("connections_created", c.connections),
    ]
}
