//! virtio-vsock's counters under Firecracker's `vsock` metric field names.

use super::muxer::VsockCounters;

/// The counters as metric fields.
pub(super) fn values(c: &VsockCounters, guest_errors: u64) -> Vec<(&'static str, u64)> {
    vec![
        ("rx_bytes_count", c.rx_bytes),
        ("tx_bytes_count", c.tx_bytes),
        ("conns_added", c.host_connections + c.guest_connections),
        ("host_connect_fails", c.host_connect_failures),
        ("guest_connect_fails", c.guest_connect_failures),
        ("rst_sent", c.resets_sent),
        ("rst_dropped", c.resets_dropped),
        ("guest_errors", guest_errors),
    ]
}
