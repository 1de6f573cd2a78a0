//! Unit tests of the balloon against virtio-queue's mock rings in real (anonymous, private)
//! guest memory, so `MADV_DONTNEED` really drops pages.

use super::*;
use crate::virtio::test_queue::add_chains;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const MEM_SIZE: usize = 0x100_0000;
/// Where the tests put the buffers the rings point at.
const DATA: u64 = 0x10_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn all_features() -> BalloonConfig {
    BalloonConfig {
        amount_mib: 4,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    }
}

/// `count` queues of 16 entries, rings 32 KiB apart from 0.
fn queues(mem: &GuestMemoryMmap, count: usize) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..count)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x8000 * i as u64), 16))
        .collect()
}

/// Acks `acked` and activates with `vqs`.
fn activate(
    balloon: &mut Balloon,
    mem: &GuestMemoryMmap,
    vqs: &[MockSplitQueue<'_, GuestMemoryMmap>],
    acked: u64,
) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    balloon.set_acked_features(acked);
    let queues = vqs.iter().map(|vq| vq.create_queue().unwrap()).collect();
    balloon.activate(mem.clone(), int.clone(), queues).unwrap();
    int
}

fn used_count(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    vq.used().idx().load()
}

fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

/// Writes `frames` as a le32 list at `at`.
fn frame_list(mem: &GuestMemoryMmap, at: u64, frames: &[u32]) -> u32 {
    let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

fn config_u32(balloon: &Balloon, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    balloon.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn features_and_queues_follow_the_config() {
    let plain = Balloon::new(&BalloonConfig::default()).unwrap();
    assert_eq!(plain.queue_max_sizes().len(), 2);
    assert_eq!(
        plain.avail_features() & (F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING),
        0
    );
    assert_ne!(plain.avail_features() & features::VERSION_1, 0);
    let full = Balloon::new(&all_features()).unwrap();
    assert_eq!(full.queue_max_sizes(), &[QUEUE_SIZE; 5]);
    let offered = full.avail_features();
    for f in [F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_REPORTING] {
        assert_ne!(offered & f, 0, "{f:#x}");
    }
    assert_eq!(full.device_type(), device_type::BALLOON);
    assert!(matches!(
        Balloon::new(&BalloonConfig {
            amount_mib: u32::MAX,
            ..Default::default()
        }),
        Err(BalloonError::TooLarge(_))
    ));
}

#[test]
fn config_space_target_and_guest_written_actual() {
    let mut balloon = Balloon::new(&all_features()).unwrap();
    assert_eq!(config_u32(&balloon, 0), 4 * 256);
    balloon.set_target_mib(10).unwrap();
    assert_eq!(config_u32(&balloon, 0), 10 * 256);
    assert_eq!(balloon.config().amount_mib, 10);
    // The driver writes `actual`; the target and the hint command are not its to change.
    balloon.write_config(0, &[0xff; 4]);
    balloon.write_config(4, &512u32.to_le_bytes());
    balloon.write_config(8, &[0xff; 8]);
    assert_eq!(config_u32(&balloon, 0), 10 * 256);
    assert_eq!(config_u32(&balloon, 4), 512);
    assert_eq!(config_u32(&balloon, 8), 0);
    assert_eq!(balloon.actual_mib(), 2);
    // A one-byte write into `actual` changes that byte only; reads past the end are zero.
    balloon.write_config(5, &[1]);
    assert_eq!(config_u32(&balloon, 4), 256);
    assert_eq!(config_u32(&balloon, 64), 0);
    assert!(matches!(
        balloon.set_target_mib(u32::MAX / 256 + 1),
        Err(BalloonError::TooLarge(_))
    ));
}

#[test]
fn inflated_pages_go_back_to_the_host_and_read_as_zeroes() {
    let mem = mem();
    let vqs = queues(&mem, 2);
    let mut balloon = Balloon::new(&BalloonConfig::default()).unwrap();
    activate(&mut balloon, &mem, &vqs, features::VERSION_1);
    let (page_a, page_b) = (0x40_0000u64, 0x40_1000u64);
    fill(&mem, page_a, 8192, 0xab);
    fill(&mem, 0x40_2000, 4096, 0xcd);
    let len = frame_list(&mem, DATA, &[(page_a >> 12) as u32, (page_b >> 12) as u32]);
    add_chains(&vqs[0], &[&[desc(DATA, len, 0)]]);
    balloon.process_queue(0);
    assert_eq!(used_count(&vqs[0]), 1);
    assert_eq!(read(&mem, page_a, 8192), vec![0u8; 8192]);
    assert_eq!(
        read(&mem, 0x40_2000, 4096),
        vec![0xcd; 4096],
        "the next page is kept"
    );
    assert_eq!(balloon.counters().inflate_count, 1);

    // Deflate: counted, nothing else to do.
    let len = frame_list(&mem, DATA + 0x1000, &[(page_a >> 12) as u32]);
    add_chains(&vqs[1], &[&[desc(DATA + 0x1000, len, 0)]]);
    balloon.process_queue(1);
    assert_eq!(used_count(&vqs[1]), 1);
    assert_eq!(balloon.counters().deflate_count, 1);
    assert_eq!(balloon.counters().guest_errors, 0);
}

#[test]
fn frames_outside_memory_are_refused_and_the_others_served() {
    let mem = mem();
    let vqs = queues(&mem, 2);
    let mut balloon = Balloon::new(&BalloonConfig::default()).unwrap();
    activate(&mut balloon, &mem, &vqs, features::VERSION_1);
    fill(&mem, 0x50_0000, 4096, 0x11);
    let last = (MEM_SIZE as u64 >> 12) as u32 - 1;
    fill(&mem, u64::from(last) << 12, 4096, 0x22);
    // The last page, then one past the end (a run crossing it), then u32::MAX and a good one.
    let len = frame_list(&mem, DATA, &[last, last + 1, u32::MAX, 0x500]);
    add_chains(&vqs[0], &[&[desc(DATA, len, 0), desc(0xfff_0000, 64, 0)]]);
    balloon.process_queue(0);
    assert_eq!(used_count(&vqs[0]), 1, "the chain is still returned");
    assert_eq!(read(&mem, u64::from(last) << 12, 4096), vec![0u8; 4096]);
    assert_eq!(read(&mem, 0x50_0000, 4096), vec![0u8; 4096]);
    // Two bad frames and a descriptor outside memory.
    assert_eq!(balloon.counters().guest_errors, 3);
    assert!(balloon.is_activated());
}

#[test]
fn statistics_are_held_until_the_poll_and_parsed() {
    let mem = mem();
    let vqs = queues(&mem, 3);
    let mut balloon = Balloon::new(&BalloonConfig {
        stats_polling_interval_s: 1,
        ..Default::default()
    })
    .unwrap();
    activate(&mut balloon, &mem, &vqs, features::VERSION_1 | F_STATS_VQ);
    let entry = |tag: u16, value: u64| {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    };
    let buffer = [entry(4, 100 << 20), entry(5, 200 << 20)].concat();
    mem.write_slice(&buffer, GuestAddress(DATA)).unwrap();
    add_chains(&vqs[2], &[&[desc(DATA, buffer.len() as u32, 0)]]);
    balloon.process_queue(2);
    assert_eq!(used_count(&vqs[2]), 0, "held until the next poll");
    let stats = balloon.stats().unwrap();
    assert_eq!(stats.free_memory, Some(100 << 20));
    assert_eq!(stats.total_memory, Some(200 << 20));
    assert_eq!((stats.target_pages, stats.actual_pages), (0, 0));

    // The poll returns it; the guest's next buffer (an odd length) is parsed as far as it goes.
    balloon.request_stats();
    assert_eq!(used_count(&vqs[2]), 1);
    let odd = [entry(4, 7), vec![9, 9, 9]].concat();
    mem.write_slice(&odd, GuestAddress(DATA + 0x1000)).unwrap();
    crate::virtio::test_queue::add_chains_at(
        &vqs[2],
        &[&[desc(DATA + 0x1000, odd.len() as u32, 0)]],
        1,
    );
    balloon.process_queue(2);
    assert_eq!(balloon.stats().unwrap().free_memory, Some(7));
    let counters = balloon.counters();
    assert_eq!(
        (counters.stats_updates_count, counters.stats_update_fails),
        (1, 1)
    );
    assert_eq!(counters.guest_errors, 1);
}

#[test]
fn the_statistics_interval_changes_but_never_switches_statistics() {
    let mut with = Balloon::new(&BalloonConfig {
        stats_polling_interval_s: 5,
        ..Default::default()
    })
    .unwrap();
    with.set_stats_interval(1).unwrap();
    assert_eq!(with.config().stats_polling_interval_s, 1);
    assert!(matches!(
        with.set_stats_interval(0),
        Err(BalloonError::StatsToggle(true))
    ));
    let mut without = Balloon::new(&BalloonConfig::default()).unwrap();
    assert!(matches!(without.stats(), Err(BalloonError::StatsDisabled)));
    assert!(matches!(
        without.set_stats_interval(1),
        Err(BalloonError::StatsToggle(false))
    ));
    without.set_stats_interval(0).unwrap();
}

#[test]
fn queue_roles_follow_the_features_the_driver_accepted() {
    let mem = mem();
    // Offered: stats and reporting; accepted: reporting only, so queue 2 is the reporting queue.
    let mut balloon = Balloon::new(&BalloonConfig {
        stats_polling_interval_s: 1,
        free_page_reporting: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(balloon.queue_max_sizes().len(), 4);
    let vqs = queues(&mem, 3);
    activate(&mut balloon, &mem, &vqs, features::VERSION_1 | F_REPORTING);
    fill(&mem, 0x60_0000, 0x2000, 0x33);
    add_chains(&vqs[2], &[&[desc(0x60_0000, 0x2000, WRITE)]]);
    balloon.process_queue(2);
    assert_eq!(used_count(&vqs[2]), 1);
    assert_eq!(read(&mem, 0x60_0000, 0x2000), vec![0u8; 0x2000]);
    let counters = balloon.counters();
    assert_eq!(
        (
            counters.free_page_report_count,
            counters.free_page_report_freed
        ),
        (1, 0x2000)
    );

    // Fewer queues than the accepted features need: refused.
    let mut balloon = Balloon::new(&all_features()).unwrap();
    balloon.set_acked_features(balloon.avail_features());
    let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let two = queues(&mem, 2)
        .iter()
        .map(|vq| vq.create_queue().unwrap())
        .collect();
    assert_eq!(
        balloon.activate(mem.clone(), int, two),
        Err(ActivateError::QueueCount {
            expected: 5,
            given: 2
        })
    );
    assert_eq!(balloon.counters().activate_fails, 1);
}

#[test]
fn reported_ranges_outside_memory_or_partial_pages_are_not_discarded() {
    let mem = mem();
    let vqs = queues(&mem, 3);
    let mut balloon = Balloon::new(&BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    })
    .unwrap();
    activate(&mut balloon, &mem, &vqs, features::VERSION_1 | F_REPORTING);
    fill(&mem, 0x70_0000, 0x3000, 0x44);
    let end = MEM_SIZE as u64 - 0x1000;
    add_chains(
        &vqs[2],
        &[&[
            // Past the end of memory, read-only, and a range with partial pages at both ends.
            desc(end, 0x2000, WRITE),
            desc(0x70_0000, 0x1000, 0),
            desc(0x70_0800, 0x2000, WRITE),
        ]],
    );
    balloon.process_queue(2);
    assert_eq!(used_count(&vqs[2]), 1);
    assert_eq!(read(&mem, 0x70_0000, 0x1000), vec![0x44; 0x1000]);
    assert_eq!(
        read(&mem, 0x70_1000, 0x1000),
        vec![0u8; 0x1000],
        "the one whole page"
    );
    assert_eq!(read(&mem, 0x70_2000, 0x1000), vec![0x44; 0x1000]);
    let counters = balloon.counters();
    assert_eq!(counters.free_page_report_fails, 2);
    assert_eq!(counters.free_page_report_freed, 0x1000);
}

#[test]
fn hinting_runs_discard_hinted_pages_and_end_on_stop() {
    let mem = mem();
    let vqs = queues(&mem, 3);
    let mut balloon = Balloon::new(&BalloonConfig {
        free_page_hinting: true,
        ..Default::default()
    })
    .unwrap();
    let int = activate(
        &mut balloon,
        &mem,
        &vqs,
        features::VERSION_1 | F_FREE_PAGE_HINT,
    );
    assert_eq!(
        balloon.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: 0,
            guest_cmd: None
        }
    );
    balloon.start_hinting(true).unwrap();
    let run = config_u32(&balloon, 8);
    assert!(run >= 2);
    fill(&mem, 0x80_0000, 0x1000, 0x55);
    mem.write_obj(run, GuestAddress(DATA)).unwrap();
    mem.write_obj(HINT_CMD_STOP, GuestAddress(DATA + 4))
        .unwrap();
    add_chains(
        &vqs[2],
        &[
            &[desc(DATA, 4, 0)],
            &[desc(0x80_0000, 0x1000, WRITE)],
            &[desc(DATA + 4, 4, 0)],
        ],
    );
    balloon.process_queue(2);
    assert_eq!(used_count(&vqs[2]), 3);
    assert_eq!(read(&mem, 0x80_0000, 0x1000), vec![0u8; 0x1000]);
    // acknowledge_on_stop: the device ended the run and told the guest.
    assert_eq!(
        balloon.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: HINT_CMD_DONE,
            guest_cmd: Some(HINT_CMD_STOP)
        }
    );
    assert_ne!(int.status() & crate::virtio::INT_CONFIG, 0);
    assert_eq!(balloon.counters().free_page_hint_freed, 0x1000);

    // Hints for a stale run id are returned without discarding anything.
    balloon.start_hinting(false).unwrap();
    fill(&mem, 0x81_0000, 0x1000, 0x66);
    mem.write_obj(run, GuestAddress(DATA + 8)).unwrap();
    crate::virtio::test_queue::add_chains_at(
        &vqs[2],
        &[&[desc(DATA + 8, 4, 0), desc(0x81_0000, 0x1000, WRITE)]],
        3,
    );
    balloon.process_queue(2);
    assert_eq!(read(&mem, 0x81_0000, 0x1000), vec![0x66; 0x1000]);
    balloon.stop_hinting().unwrap();
    assert_eq!(config_u32(&balloon, 8), HINT_CMD_DONE);

    let mut plain = Balloon::new(&BalloonConfig::default()).unwrap();
    assert!(matches!(
        plain.start_hinting(false),
        Err(BalloonError::HintingDisabled)
    ));
    assert!(plain.hinting_status().is_err() && plain.stop_hinting().is_err());
}

#[test]
fn a_broken_ring_needs_reset() {
    let mem = mem();
    let vqs = queues(&mem, 2);
    let mut balloon = Balloon::new(&BalloonConfig::default()).unwrap();
    let int = activate(&mut balloon, &mem, &vqs, features::VERSION_1);
    vqs[0].avail().idx().store(100);
    balloon.process_queue(0);
    assert!(!balloon.is_activated());
    assert!(int.needs_reset());
    // Reset, then activation again works.
    balloon.reset();
    let vqs = queues(&mem, 2);
    activate(&mut balloon, &mem, &vqs, features::VERSION_1);
    assert!(balloon.is_activated());
}

#[test]
fn runs_coalesce_consecutive_frames() {
    assert_eq!(runs(&[1, 2, 3, 7, 8, 2]), vec![(1, 3), (7, 2), (2, 1)]);
    assert_eq!(runs(&[u32::MAX, 0]), vec![(u32::MAX, 1), (0, 1)]);
    assert!(runs(&[]).is_empty());
}

#[test]
fn metrics_use_firecrackers_names() {
    let balloon = Balloon::new(&BalloonConfig::default()).unwrap();
    let names: Vec<&str> = balloon.metric_values().iter().map(|(n, _)| *n).collect();
    for name in [
        "inflate_count",
        "deflate_count",
        "stats_updates_count",
        "free_page_report_freed",
    ] {
        assert!(names.contains(&name), "{name}");
    }
}
