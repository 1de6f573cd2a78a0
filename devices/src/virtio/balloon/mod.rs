//! virtio-balloon (virtio 1.x, 5.5): the host asks the guest for memory back by setting a
//! target size; the guest's driver takes that many pages from its allocator and reports their
//! frame numbers on the inflate queue, and the device gives each page back to the host
//! (`madvise(MADV_DONTNEED)`: the host frees it, and the page reads as zeroes when the guest
//! takes it back through the deflate queue). Optional, as the VMM configures them
//! (Firecracker's fields): the guest may take pages back when it runs out of memory
//! (`deflate_on_oom`), it reports memory statistics when asked (`stats_polling_interval_s`),
//! hints its free pages during a host-started run (`free_page_hinting`) and reports the free
//! pages it does not use (`free_page_reporting`); the device gives hinted and reported pages
//! back to the host the same way.
//!
//! Invariants:
//! - the device only ever discards whole pages inside guest memory: a frame number or range
//!   outside it is refused (and counted) before any `madvise`, so a guest cannot make the VMM
//!   unmap its own memory;
//! - the queues' number is fixed at creation (the VMM registers a notification per queue); each
//!   queue's role comes from the features the driver accepted, as the spec lays them out;
//! - a guest's buffer is read at most [`MAX_BUFFER_BYTES`] at a time, whatever it claims.

mod event_handler;
mod metrics;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::timerfd::TimerFd;

pub use stats::BalloonStats;

use super::guest_errors::GuestErrorLog;
use super::{
    device_type, drain_queue, features, notify_if_needed, pop_chain, stop_on_broken_ring,
    ActivateError, ActiveState, Chain, ChainOutcome, Interrupt, VirtioCommon, VirtioDevice,
};
use stats::GuestStats;

/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size: frame numbers and sizes are in 4 KiB pages, whatever the guest's.
pub const PAGE_SIZE: u64 = 4096;
/// Pages in a MiB.
const PAGES_PER_MIB: u32 = 256;
/// Most bytes read from one guest buffer (a page-frame list or a statistics buffer).
pub const MAX_BUFFER_BYTES: usize = 64 * 1024;

/// The device reports its statistics queue (`VIRTIO_BALLOON_F_STATS_VQ`).
pub const F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate on memory pressure (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`).
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`).
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Free page reporting (`VIRTIO_BALLOON_F_REPORTING`).
pub const F_REPORTING: u64 = 1 << 5;

/// Free page hinting's host command: stop hinting.
pub const HINT_CMD_STOP: u32 = 0;
/// Free page hinting's host command: the run is over, the guest may reuse the hinted pages.
pub const HINT_CMD_DONE: u32 = 1;
/// The first id of a hinting run (ids below are commands).
const HINT_FIRST_RUN_ID: u32 = 2;

/// The config space: `num_pages`, `actual`, `free_page_hint_cmd_id`, `poison_val` (le32 each).
const CONFIG_SIZE: usize = 16;
const ACTUAL_OFFSET: u64 = 4;

/// The balloon's settings, as the VMM gives them (Firecracker's `balloon` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Whether the guest may take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 turns statistics off (no statistics queue).
    pub stats_polling_interval_s: u16,
    /// Whether free page hinting is offered.
    pub free_page_hinting: bool,
    /// Whether free page reporting is offered.
    pub free_page_reporting: bool,
}

/// Free page hinting's state, as `GET /balloon/hinting/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HintingStatus {
    /// The last command the host issued (a run id, or [`HINT_CMD_STOP`] / [`HINT_CMD_DONE`]).
    pub host_cmd: u32,
    /// The last command id the guest sent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// Errors of the balloon's settings and requests.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A size whose page count does not fit the device's 32-bit counter.
    #[error("Amount of pages requested is too large: {0} MiB.")]
    TooLarge(u32),
    /// Statistics were asked for on a balloon without them (Firecracker's text).
    #[error("Statistics for the balloon device are not enabled")]
    StatsDisabled,
    /// Statistics switched on or off after creation.
    #[error(
        "Statistics cannot be turned on or off once the balloon exists: the polling interval \
         must stay {}.",
        if *.0 { "non-zero" } else { "zero" }
    )]
    StatsToggle(bool),
    /// A hinting command on a balloon without free page hinting.
    #[error("Free page hinting is not enabled for the balloon device")]
    HintingDisabled,
    /// An eventfd or the statistics timer could not be created or armed.
    #[error("balloon device: {0}")]
    Io(#[from] std::io::Error),
}

/// What each queue is for, in the order the spec lays them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Hint,
    Report,
}

/// The queues' roles for `features`: inflate and deflate, then one queue per feature that has one.
fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    for (feature, role) in [
        (F_STATS_VQ, QueueRole::Stats),
        (F_FREE_PAGE_HINT, QueueRole::Hint),
        (F_REPORTING, QueueRole::Report),
    ] {
        if features & feature != 0 {
            roles.push(role);
        }
    }
    roles
}

/// How many queues a driver that acked `features` sets up (what activation expects).
pub fn queue_count(features: u64) -> usize {
    queue_roles(features).len()
}

/// What a guest did wrong with one buffer.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("buffer of {len} bytes at {addr:#x} is not in guest memory")]
    Buffer { addr: u64, len: u32 },
    #[error("page frame {0:#x} is not in guest memory")]
    Frame(u32),
    #[error("range of {len} bytes at {addr:#x} is not in guest memory")]
    Range { addr: u64, len: u64 },
    #[error("a {what} buffer in the wrong direction")]
    Direction { what: &'static str },
    #[error("statistics buffer of {0} bytes is not a whole number of 10-byte entries")]
    StatsLength(usize),
}

/// Counters, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Activations that failed.
    pub activate_fails: u64,
    /// Inflate buffers served.
    pub inflate_count: u64,
    /// Deflate buffers served.
    pub deflate_count: u64,
    /// Statistics buffers parsed.
    pub stats_updates_count: u64,
    /// Statistics buffers that could not be parsed.
    pub stats_update_fails: u64,
    /// Free page reports served.
    pub free_page_report_count: u64,
    /// Bytes given back to the host through reports.
    pub free_page_report_freed: u64,
    /// Reported ranges refused.
    pub free_page_report_fails: u64,
    /// Free page hints served.
    pub free_page_hint_count: u64,
    /// Bytes given back to the host through hints.
    pub free_page_hint_freed: u64,
    /// Hinted ranges refused.
    pub free_page_hint_fails: u64,
    /// `madvise` calls the host refused.
    pub event_fails: u64,
    /// Unusable buffers or rings the guest submitted.
    pub guest_errors: u64,
}

/// The device's state between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// The driver's queues, each with its role.
    queues: Vec<(QueueRole, Queue)>,
}

impl ActiveState for Active {
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// Free page hinting's host and guest state.
#[derive(Debug, Clone, Copy, Default)]
struct Hinting {
    host_cmd: u32,
    guest_cmd: Option<u32>,
    /// The run the guest is hinting for (its start command matched the host's id).
    guest_run: Option<u32>,
    acknowledge_on_stop: bool,
    last_run_id: u32,
}

/// The balloon device.
pub struct Balloon {
    common: VirtioCommon,
    config: BalloonConfig,
    /// The guest's `actual` field: pages it holds in the balloon.
    actual_pages: u32,
    hinting: Hinting,
    stats_timer: TimerFd,
    /// The statistics buffer the guest gave, held until the next poll.
    held_stats: Option<u16>,
    latest_stats: GuestStats,
    active: Option<Active>,
    errors: GuestErrorLog,
    counters: BalloonCounters,
}

/// The target in pages for `amount_mib`, if it fits the 32-bit counter.
fn pages_of(amount_mib: u32) -> Result<u32, BalloonError> {
    amount_mib
        .checked_mul(PAGES_PER_MIB)
        .ok_or(BalloonError::TooLarge(amount_mib))
}

impl Balloon {
    /// Creates the balloon with `config`'s features and target.
    pub fn new(config: &BalloonConfig) -> Result<Self, BalloonError> {
        pages_of(config.amount_mib)?;
        let mut offered = features::VERSION_1 | features::RING_INDIRECT_DESC;
        for (on, feature) in [
            (config.stats_polling_interval_s > 0, F_STATS_VQ),
            (config.deflate_on_oom, F_DEFLATE_ON_OOM),
            (config.free_page_hinting, F_FREE_PAGE_HINT),
            (config.free_page_reporting, F_REPORTING),
        ] {
            if on {
                offered |= feature;
            }
        }
        let sizes = vec![QUEUE_SIZE; queue_roles(offered).len()];
        Ok(Self {
            common: VirtioCommon::new(device_type::BALLOON, offered, &sizes)?,
            config: *config,
            actual_pages: 0,
            hinting: Hinting::default(),
            stats_timer: TimerFd::new().map_err(std::io::Error::from)?,
            held_stats: None,
            latest_stats: GuestStats::default(),
            active: None,
            errors: GuestErrorLog::default(),
            counters: BalloonCounters::default(),
        })
    }

    /// The settings as they stand (`amount_mib` is the current target).
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The guest's balloon size in MiB, from the `actual` field it writes.
    pub fn actual_mib(&self) -> u32 {
        self.actual_pages / PAGES_PER_MIB
    }

    /// A new target; the caller tells the guest (a config-change interrupt through the
    /// transport).
    pub fn set_target_mib(&mut self, amount_mib: u32) -> Result<(), BalloonError> {
        pages_of(amount_mib)?;
        self.config.amount_mib = amount_mib;
        Ok(())
    }

    /// A new statistics polling interval, and a statistics update now. Statistics cannot be
    /// switched on or off: the statistics queue exists from creation or not at all.
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<(), BalloonError> {
        let enabled = self.config.stats_polling_interval_s > 0;
        if enabled != (seconds > 0) {
            return Err(BalloonError::StatsToggle(enabled));
        }
        self.config.stats_polling_interval_s = seconds;
        if self.active.is_some() {
            self.arm_stats_timer()?;
            self.request_stats();
        }
        Ok(())
    }

    /// The guest's latest statistics with the target and actual sizes.
    pub fn stats(&self) -> Result<BalloonStats, BalloonError> {
        if self.config.stats_polling_interval_s == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        Ok(BalloonStats::new(
            pages_of(self.config.amount_mib)?,
            self.actual_pages,
            &self.latest_stats,
        ))
    }

    /// Starts a free page hinting run (a new command id in the config space; the caller tells
    /// the guest). With `acknowledge_on_stop` the device ends the run itself when the guest has
    /// hinted everything.
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), BalloonError> {
        self.check_hinting()?;
        let id = self
            .hinting
            .last_run_id
            .checked_add(1)
            .filter(|id| *id >= HINT_FIRST_RUN_ID)
            .unwrap_or(HINT_FIRST_RUN_ID);
        self.hinting.last_run_id = id;
        self.hinting.host_cmd = id;
        self.hinting.acknowledge_on_stop = acknowledge_on_stop;
        Ok(())
    }

    /// The hinting run's last host and guest commands.
    pub fn hinting_status(&self) -> Result<HintingStatus, BalloonError> {
        self.check_hinting()?;
        Ok(HintingStatus {
            host_cmd: self.hinting.host_cmd,
            guest_cmd: self.hinting.guest_cmd,
        })
    }

    /// Ends the hinting run: the guest may reuse the pages it hinted (the caller tells it).
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        self.check_hinting()?;
        self.hinting.host_cmd = HINT_CMD_DONE;
        self.hinting.guest_run = None;
        Ok(())
    }

    /// The counters so far.
    pub fn counters(&self) -> BalloonCounters {
        BalloonCounters {
            guest_errors: self.errors.count(),
            ..self.counters
        }
    }

    fn check_hinting(&self) -> Result<(), BalloonError> {
        if self.config.free_page_hinting {
            Ok(())
        } else {
            Err(BalloonError::HintingDisabled)
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut space = [0u8; CONFIG_SIZE];
        // Checked on every change: the target always fits.
        let num_pages = self.config.amount_mib.saturating_mul(PAGES_PER_MIB);
        space[0..4].copy_from_slice(&num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        space[8..12].copy_from_slice(&self.hinting.host_cmd.to_le_bytes());
        // poison_val stays 0: VIRTIO_BALLOON_F_PAGE_POISON is not offered.
        space
    }

    /// Arms the statistics timer with the polling interval (disarms it at 0). Called on the
    /// event loop or the control loop, never on a vCPU thread (whose filter has no timer calls).
    fn arm_stats_timer(&mut self) -> std::io::Result<()> {
        let armed = match self.config.stats_polling_interval_s {
            0 => self.stats_timer.clear(),
            seconds => {
                let period = Duration::from_secs(u64::from(seconds));
                self.stats_timer.reset(period, Some(period))
            }
        };
        armed.map_err(std::io::Error::from)
    }

    /// Returns the held statistics buffer, which makes the guest send fresh statistics.
    fn request_stats(&mut self) {
        let Some(head) = self.held_stats else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some((_, queue)) = active
            .queues
            .iter_mut()
            .find(|(r, _)| *r == QueueRole::Stats)
        else {
            return;
        };
        self.held_stats = None;
        match queue.add_used(&active.mem, head, 0) {
            Ok(()) => notify_if_needed(queue, &active.mem, &active.interrupt),
            Err(e) => stop_on_broken_ring(&mut self.active, &mut self.errors, "virtio-balloon", &e),
        }
    }

    /// Serves queue `index` according to its role.
    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some((role, queue)) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let interrupt = &active.interrupt;
        let errors = &mut self.errors;
        let counters = &mut self.counters;
        let result = match *role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let inflate = *role == QueueRole::Inflate;
                drain_queue(queue, mem, interrupt, |chain| {
                    page_frames(chain, mem, inflate, counters, errors);
                    ChainOutcome::Used(0)
                })
                .map(|drained| drained.more)
            }
            QueueRole::Report => drain_queue(queue, mem, interrupt, |chain| {
                free_page_report(chain, mem, counters, errors);
                ChainOutcome::Used(0)
            })
            .map(|drained| drained.more),
            QueueRole::Hint => {
                let hinting = &mut self.hinting;
                let mut acknowledged = false;
                let result = drain_queue(queue, mem, interrupt, |chain| {
                    acknowledged |= free_page_hint(chain, mem, hinting, counters, errors);
                    ChainOutcome::Used(0)
                })
                .map(|drained| drained.more);
                if acknowledged {
                    interrupt.signal_config_change();
                }
                result
            }
            QueueRole::Stats => {
                let held = &mut self.held_stats;
                let latest = &mut self.latest_stats;
                take_stats(queue, mem, interrupt, held, latest, counters, errors).map(|()| false)
            }
        };
        match result {
            Ok(true) => self.common.renotify(index),
            Ok(false) => {}
            Err(e) => stop_on_broken_ring(&mut self.active, &mut self.errors, "virtio-balloon", &e),
        }
    }

    /// The statistics timer fired: ask the guest for fresh statistics.
    fn stats_tick(&mut self) {
        let _ = self.stats_timer.wait();
        self.request_stats();
    }
}

/// Reads the page-frame list of one inflate or deflate buffer; inflated pages go back to the
/// host. Frames outside guest memory are refused one by one.
fn page_frames(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    inflate: bool,
    counters: &mut BalloonCounters,
    errors: &mut GuestErrorLog,
) {
    let mut frames = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            errors.record(
                "virtio-balloon",
                &RequestError::Direction {
                    what: "page-frame list",
                },
            );
            continue;
        }
        match read_buffer(mem, desc.addr(), desc.len()) {
            Ok(bytes) => frames.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Err(e) => errors.record("virtio-balloon", &e),
        }
    }
    if inflate {
        counters.inflate_count += 1;
        for (first, count) in runs(&frames) {
            let addr = u64::from(first) * PAGE_SIZE;
            let len = u64::from(count) * PAGE_SIZE;
            if mem.check_range(GuestAddress(addr), len as usize) {
                if discard(mem, addr, len).is_err() {
                    counters.event_fails += 1;
                }
            } else {
                // Refuse the frames one by one, so the guest's log names the bad one.
                for frame in (0..count).filter_map(|i| first.checked_add(i)) {
                    let page = u64::from(frame) * PAGE_SIZE;
                    if !mem.check_range(GuestAddress(page), PAGE_SIZE as usize) {
                        errors.record("virtio-balloon", &RequestError::Frame(frame));
                    } else if discard(mem, page, PAGE_SIZE).is_err() {
                        counters.event_fails += 1;
                    }
                }
            }
        }
    } else {
        // Nothing to do on the host: a page the guest takes back faults in zeroed.
        counters.deflate_count += 1;
    }
}

/// Consecutive runs of frame numbers, as (first, count), so one `madvise` covers each.
fn runs(frames: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &frame in frames {
        match runs.last_mut() {
            Some((first, count)) if first.checked_add(*count) == Some(frame) => *count += 1,
            _ => runs.push((frame, 1)),
        }
    }
    runs
}

/// One free page report: every writable descriptor is a range of free guest pages.
fn free_page_report(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    counters: &mut BalloonCounters,
    errors: &mut GuestErrorLog,
) {
    counters.free_page_report_count += 1;
    for desc in chain {
        if !desc.is_write_only() {
            errors.record(
                "virtio-balloon",
                &RequestError::Direction {
                    what: "free page report",
                },
            );
            counters.free_page_report_fails += 1;
            continue;
        }
        match discard_range(mem, desc.addr().0, u64::from(desc.len())) {
            Ok(freed) => counters.free_page_report_freed += freed,
            Err(DiscardError::Guest(e)) => {
                errors.record("virtio-balloon", &e);
                counters.free_page_report_fails += 1;
            }
            Err(DiscardError::Host) => {
                counters.event_fails += 1;
                counters.free_page_report_fails += 1;
            }
        }
    }
}

/// One chain of the hinting queue: readable descriptors carry the guest's command id (a run's
/// start, or STOP when it has hinted everything), writable ones the free pages it hints.
/// Returns true when the guest's STOP ended the run by itself (`acknowledge_on_stop`).
fn free_page_hint(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    hinting: &mut Hinting,
    counters: &mut BalloonCounters,
    errors: &mut GuestErrorLog,
) -> bool {
    let mut acknowledged = false;
    for desc in chain {
        if !desc.is_write_only() {
            let Ok(bytes) = read_buffer(mem, desc.addr(), desc.len().min(4)) else {
                errors.record(
                    "virtio-balloon",
                    &RequestError::Buffer {
                        addr: desc.addr().0,
                        len: desc.len(),
                    },
                );
                continue;
            };
            let Ok(id) = <[u8; 4]>::try_from(bytes.as_slice()).map(u32::from_le_bytes) else {
                errors.record(
                    "virtio-balloon",
                    &RequestError::Buffer {
                        addr: desc.addr().0,
                        len: desc.len(),
                    },
                );
                continue;
            };
            hinting.guest_cmd = Some(id);
            if id >= HINT_FIRST_RUN_ID {
                hinting.guest_run = (id == hinting.host_cmd).then_some(id);
            } else if id == HINT_CMD_STOP {
                hinting.guest_run = None;
                if hinting.acknowledge_on_stop && hinting.host_cmd >= HINT_FIRST_RUN_ID {
                    hinting.host_cmd = HINT_CMD_DONE;
                    acknowledged = true;
                }
            }
            continue;
        }
        // Hints for a run other than the host's current one are stale: returned, not used.
        if hinting.guest_run.is_none() || hinting.guest_run != Some(hinting.host_cmd) {
            continue;
        }
        counters.free_page_hint_count += 1;
        match discard_range(mem, desc.addr().0, u64::from(desc.len())) {
            Ok(freed) => counters.free_page_hint_freed += freed,
            Err(DiscardError::Guest(e)) => {
                errors.record("virtio-balloon", &e);
                counters.free_page_hint_fails += 1;
            }
            Err(DiscardError::Host) => {
                counters.event_fails += 1;
                counters.free_page_hint_fails += 1;
            }
        }
    }
    acknowledged
}

/// Takes the statistics buffers the guest queued: parses each and holds the last one until the
/// next poll returns it (an earlier one still held is returned first).
fn take_stats(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    held: &mut Option<u16>,
    latest: &mut GuestStats,
    counters: &mut BalloonCounters,
    errors: &mut GuestErrorLog,
) -> Result<(), virtio_queue::Error> {
    let mut returned = false;
    loop {
        while let Some(chain) = pop_chain(queue, mem)? {
            let head = chain.head_index();
            if let Some(previous) = held.replace(head) {
                queue.add_used(mem, previous, 0)?;
                returned = true;
            }
            let mut bytes = Vec::new();
            for desc in chain {
                if desc.is_write_only() {
                    continue;
                }
                let room = MAX_BUFFER_BYTES.saturating_sub(bytes.len());
                let len = desc.len().min(u32::try_from(room).unwrap_or(u32::MAX));
                match read_buffer(mem, desc.addr(), len) {
                    Ok(b) => bytes.extend_from_slice(&b),
                    Err(e) => errors.record("virtio-balloon", &e),
                }
            }
            if bytes.len() % stats::ENTRY_SIZE != 0 {
                errors.record("virtio-balloon", &RequestError::StatsLength(bytes.len()));
                counters.stats_update_fails += 1;
            } else {
                counters.stats_updates_count += 1;
            }
            latest.update(&bytes);
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if returned {
        notify_if_needed(queue, mem, interrupt);
    }
    Ok(())
}

/// Copies a guest buffer of `len` bytes (at most [`MAX_BUFFER_BYTES`]) out of guest memory.
fn read_buffer(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
) -> Result<Vec<u8>, RequestError> {
    let len = (len as usize).min(MAX_BUFFER_BYTES);
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, addr)
        .map_err(|_| RequestError::Buffer {
            addr: addr.0,
            len: len as u32,
        })?;
    Ok(bytes)
}

/// Why a range could not be given back.
#[derive(Debug)]
enum DiscardError {
    /// The range is not in guest memory.
    Guest(RequestError),
    /// The host refused the `madvise`.
    Host,
}

/// Gives the whole pages inside `[addr, addr + len)` back to the host; returns the bytes freed.
/// The range must lie in guest memory.
fn discard_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<u64, DiscardError> {
    let out = || DiscardError::Guest(RequestError::Range { addr, len });
    let end = addr.checked_add(len).ok_or_else(out)?;
    if len == 0 || !mem.check_range(GuestAddress(addr), len as usize) {
        return Err(out());
    }
    // Only whole pages: a partial page at either end may hold data the guest still uses.
    let start = addr.next_multiple_of(PAGE_SIZE);
    let end = end - end % PAGE_SIZE;
    if start >= end {
        return Ok(0);
    }
    discard(mem, start, end - start).map_err(|()| DiscardError::Host)?;
    Ok(end - start)
}

/// `madvise(MADV_DONTNEED)` on the host mapping of `[addr, addr + len)`, page aligned and inside
/// guest memory (the callers checked), region by region.
fn discard(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), ()> {
    let mut addr = addr;
    let end = addr + len;
    while addr < end {
        let region = mem.find_region(GuestAddress(addr)).ok_or(())?;
        let offset = addr - region.start_addr().0;
        let chunk = (region.len() - offset).min(end - addr);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| ())?;
        let chunk_len = usize::try_from(chunk).map_err(|_| ())?;
        // SAFETY: `host .. host + chunk_len` lies inside this region's live anonymous private
        // mapping, which guest memory owns (the range was checked against the region); it is
        // page aligned (guest regions are, and so are `addr` and `len`). MADV_DONTNEED on such a
        // mapping only drops the pages: the next access reads zeroes, which is what the balloon
        // protocol promises the guest, and no Rust reference into guest memory exists (it is
        // only ever accessed through volatile copies).
        let ret = unsafe { libc::madvise(host.cast(), chunk_len, libc::MADV_DONTNEED) };
        if ret != 0 {
            log::warn!(
                "virtio-balloon: madvise of {chunk_len} bytes at guest {addr:#x}: {}",
                std::io::Error::last_os_error()
            );
            return Err(());
        }
        addr += chunk;
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        let mut actual = self.actual_pages.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                return;
            };
            if (ACTUAL_OFFSET..ACTUAL_OFFSET + 4).contains(&at) {
                actual[(at - ACTUAL_OFFSET) as usize] = *byte;
            }
        }
        self.actual_pages = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let roles = queue_roles(self.common.acked_features());
        if queues.len() != roles.len() {
            self.counters.activate_fails += 1;
            return Err(ActivateError::QueueCount {
                expected: roles.len(),
                given: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues: roles.into_iter().zip(queues).collect(),
        });
        self.held_stats = None;
        // The statistics timer is armed by the event handler on activation: this runs on a vCPU
        // thread, whose seccomp filter allows no timer calls.
        self.common.wake_on_activation()
    }

    fn reset(&mut self) {
        // The timer keeps running (a vCPU thread may not touch it); a tick without an active
        // device does nothing.
        self.active = None;
        self.held_stats = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_positions(&self) -> Vec<super::QueuePosition> {
        let held = u16::from(self.held_stats.is_some());
        self.active
            .iter()
            .flat_map(|a| &a.queues)
            .map(|(role, queue)| match role {
                // The held statistics buffer is given back: the restored device takes it again
                // and answers it at its next poll.
                QueueRole::Stats => super::QueuePosition::giving_back(queue, held),
                _ => super::QueuePosition::of(queue),
            })
            .collect()
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "actual_pages": self.actual_pages })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let actual = state
            .get("actual_pages")
            .and_then(serde_json::Value::as_u64)
            .and_then(|pages| u32::try_from(pages).ok())
            .ok_or_else(|| format!("balloon state without a valid actual_pages: {state}"))?;
        self.actual_pages = actual;
        Ok(())
    }

    fn metric_values(&self) -> Vec<(&'static str, u64)> {
        metrics::values(&self.counters())
    }
}

#[cfg(test)]
mod tests;
