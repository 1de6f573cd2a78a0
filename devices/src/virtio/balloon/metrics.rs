//! virtio-balloon's counters under Firecracker's `balloon` metric field names.

use super::BalloonCounters;

/// The counters as metric fields.
pub(super) fn values(c: &BalloonCounters) -> Vec<(&'static str, u64)> {
    vec![
        ("activate_fails", c.activate_fails),
        ("inflate_count", c.inflate_count),
        ("stats_updates_count", c.stats_updates_count),
        ("stats_update_fails", c.stats_update_fails),
        ("deflate_count", c.deflate_count),
        ("event_fails", c.event_fails),
        ("free_page_report_count", c.free_page_report_count),
        ("free_page_report_freed", c.free_page_report_freed),
        ("free_page_report_fails", c.free_page_report_fails),
        ("free_page_hint_count", c.free_page_hint_count),
        ("free_page_hint_freed", c.free_page_hint_freed),
        ("free_page_hint_fails", c.free_page_hint_fails),
        ("guest_errors", c.guest_errors),
    ]
}
