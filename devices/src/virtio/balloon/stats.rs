//! The guest's memory statistics (virtio 1.x, 5.5.6.3): a buffer of 10-byte entries, a le16 tag
//! and a le64 value each, and the shape Firecracker serves them in (`GET /balloon/statistics`).

use serde::{Deserialize, Serialize};

use super::PAGES_PER_MIB;

/// One entry's size in a statistics buffer.
pub const ENTRY_SIZE: usize = 10;

/// The tags Kiln knows, in tag order (0 = `VIRTIO_BALLOON_S_SWAP_IN` ... 15 =
/// `VIRTIO_BALLOON_S_DIRECT_RECLAIM`).
const TAGS: usize = 16;

/// The latest value the guest reported for each tag it reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    values: [Option<u64>; TAGS],
}

impl GuestStats {
    /// Takes the whole entries of `buffer`; unknown tags are ignored, a trailing partial entry
    /// too (the caller counts it as the guest's error).
    pub fn update(&mut self, buffer: &[u8]) {
        for entry in buffer.chunks_exact(ENTRY_SIZE) {
            let tag = usize::from(u16::from_le_bytes([entry[0], entry[1]]));
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..ENTRY_SIZE]);
            if let Some(slot) = self.values.get_mut(tag) {
                *slot = Some(u64::from_le_bytes(value));
            }
        }
    }

    fn get(&self, tag: usize) -> Option<u64> {
        self.values.get(tag).copied().flatten()
    }
}

/// Firecracker's `BalloonStats`: the target and actual sizes, and what the guest reported (the
/// memory figures in bytes; absent until the guest reports them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // The fields are the virtio tags' and Firecracker's, named as theirs.
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// The statistics for a balloon of `target_pages` holding `actual_pages`, with `guest`'s
    /// figures.
    pub fn new(target_pages: u32, actual_pages: u32, guest: &GuestStats) -> Self {
        Self {
            target_pages,
            actual_pages,
            target_mib: target_pages / PAGES_PER_MIB,
            actual_mib: actual_pages / PAGES_PER_MIB,
            swap_in: guest.get(0),
            swap_out: guest.get(1),
            major_faults: guest.get(2),
            minor_faults: guest.get(3),
            free_memory: guest.get(4),
            total_memory: guest.get(5),
            available_memory: guest.get(6),
            disk_caches: guest.get(7),
            hugetlb_allocations: guest.get(8),
            hugetlb_failures: guest.get(9),
            oom_kill: guest.get(10),
            alloc_stall: guest.get(11),
            async_scan: guest.get(12),
            direct_scan: guest.get(13),
            async_reclaim: guest.get(14),
            direct_reclaim: guest.get(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn entries_fill_the_named_fields_and_unknown_tags_are_ignored() {
        let mut guest = GuestStats::default();
        let mut buffer = [
            entry(4, 1 << 20),
            entry(5, 2 << 20),
            entry(99, 7),
            entry(15, 3),
        ]
        .concat();
        buffer.extend_from_slice(&[1, 2, 3]); // a partial entry
        guest.update(&buffer);
        let stats = BalloonStats::new(512, 256, &guest);
        assert_eq!((stats.target_mib, stats.actual_mib), (2, 1));
        assert_eq!(stats.free_memory, Some(1 << 20));
        assert_eq!(stats.total_memory, Some(2 << 20));
        assert_eq!(stats.direct_reclaim, Some(3));
        assert_eq!(stats.swap_in, None);
        let json = serde_json::to_value(stats).unwrap();
        assert_eq!(json["free_memory"], 1 << 20);
        assert!(
            json.get("swap_in").is_none(),
            "unreported figures are left out"
        );
        // A later report replaces a value and keeps the others.
        guest.update(&entry(4, 5));
        assert_eq!(BalloonStats::new(0, 0, &guest).free_memory, Some(5));
        assert_eq!(BalloonStats::new(0, 0, &guest).total_memory, Some(2 << 20));
    }
}
