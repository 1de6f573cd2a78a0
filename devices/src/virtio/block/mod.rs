//! virtio-blk (virtio 1.x, 5.2) backed by a raw image file.
//!
//! Requests are parsed into [`request::Request`] (every guest value checked there), charged to the
//! rate limiter, then executed on the [`disk::DiskFile`]. A malformed request is answered
//! VIRTIO_BLK_S_IOERR when its status byte can be found and is returned with nothing written
//! otherwise; either way the device keeps serving the queue.

pub mod disk;
mod event_handler;
mod metrics;
pub mod request;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
use vm_memory::Bytes;
#[cfg(test)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::disk::{DiskError, DiskFile, IoError};
use self::request::{
    Request, RequestType, ID_BYTES, MAX_DATA_SEGMENTS, MAX_SEGMENTS, MAX_SEGMENT_BYTES,
};
use super::guest_errors::GuestErrorLog;
use super::single_queue::ActiveQueue;
use super::{
    device_type, drain_queue, features, stop_on_broken_ring, ActivateError, Chain, ChainOutcome,
    Interrupt, VirtioCommon, VirtioDevice,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, TokenType};

/// Bytes per sector, the unit of every virtio-blk offset.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Data bytes one pass over the queue reads or writes before the device yields the event loop
/// to the other devices (it comes back through its queue's eventfd): a guest's large I/O must not
/// starve net and vsock. Together with the request size cap, a pass moves at most ~32 MiB.
pub const PASS_BYTE_BUDGET: u64 = 16 << 20;

/// Feature bits (virtio 1.x, 5.2.3).
mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request status codes.
mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Size of the config space Kiln exposes (through `write_zeroes_may_unmap` and its padding).
const CONFIG_SIZE: usize = 60;

/// Errors in creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// A block device's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive's id; its first 20 bytes are the guest-visible serial (GET_ID).
    pub id: String,
    /// The image file.
    pub path: PathBuf,
    /// Refuse every write.
    pub read_only: bool,
    /// Bandwidth and IOPS limits.
    pub rate_limiter: RateLimiterConfig,
}

/// Counters, for metrics and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    /// Bytes read from the image into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the image.
    pub write_bytes: u64,
    /// Requests completed (any status).
    pub requests: u64,
    /// Requests answered with an error status or dropped.
    pub failed_requests: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// Read (IN) requests completed successfully.
    pub reads: u64,
    /// Write (OUT) requests completed successfully.
    pub writes: u64,
}

/// The block device.
pub struct Block {
    id: [u8; ID_BYTES],
    disk: DiskFile,
    common: VirtioCommon,
    rate_limiter: RateLimiter,
    active: Option<ActiveQueue>,
    errors: GuestErrorLog,
    /// The backing file's failures (full disk, EIO).
    host_errors: GuestErrorLog,
    counters: BlockCounters,
}

impl Block {
    /// Opens the image and creates the device.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let disk = DiskFile::open(&config.path, config.read_only)?;
        let mut avail_features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::FLUSH;
        avail_features |= if config.read_only {
            feature::RO
        } else {
            feature::DISCARD | feature::WRITE_ZEROES
        };
        let mut id = [0u8; ID_BYTES];
        let n = config.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        Ok(Self {
            id,
            disk,
            common: VirtioCommon::new(device_type::BLOCK, avail_features, &[QUEUE_SIZE])
                .map_err(BlockError::EventFd)?,
            rate_limiter: RateLimiter::new(&config.rate_limiter)?,
            active: None,
            errors: GuestErrorLog::default(),
            host_errors: GuestErrorLog::host(),
            counters: BlockCounters::default(),
        })
    }

    /// The counters so far.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// The disk's capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// The image currently behind the drive.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// Puts the image at `path` behind the drive (Firecracker's `PATCH /drives/{id}` after boot),
    /// opened and locked like the first one: read-only iff the drive is. The capacity in config
    /// space follows the new image at once; the guest only looks again once told, so the caller
    /// must then call [`MmioTransport::config_changed`](crate::virtio::mmio::MmioTransport::config_changed).
    ///
    /// No request is ever half done here: requests are served synchronously by
    /// [`process_queue`](Self::process_queue), on the event-loop thread, under the same device
    /// lock the caller holds to get `&mut self`. Every request taken from the queue before this
    /// call completed on the old image; every later one is served by the new image.
    ///
    /// When `path` is the file already open (same inode, e.g. the image was resized in place), a
    /// second open could not take the exclusive lock the drive itself holds, so the open file is
    /// kept, lock and all, and only its size is re-read. Otherwise the new image is opened first
    /// and the old one (and its lock) is closed only once that succeeded: on any error the drive
    /// keeps serving the old image unchanged.
    pub fn update_disk(&mut self, path: &Path) -> Result<(), BlockError> {
        match DiskFile::open(path, self.disk.read_only()) {
            Ok(disk) => {
                self.disk = disk;
                Ok(())
            }
            Err(DiskError::Locked { .. }) if self.disk.is_same_file(path) => {
                Ok(self.disk.refresh(path)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the rate limiter's buckets (Firecracker's `PATCH /drives/{id}` with a
    /// `rate_limiter`). `config` is the whole new configuration: a bucket it leaves out stops
    /// limiting, so a caller applying a partial update merges it with the drive's current
    /// configuration first. Both buckets start full. An invalid `config` changes nothing.
    /// A limiter that is holding requests back retries them at once against the new buckets.
    pub fn update_rate_limiter(&mut self, config: &RateLimiterConfig) -> Result<(), BlockError> {
        config.validate()?;
        self.rate_limiter.update_buckets(config);
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.disk.capacity_sectors().to_le_bytes());
        put(8, &MAX_SEGMENT_BYTES.to_le_bytes());
        put(12, &MAX_DATA_SEGMENTS.to_le_bytes());
        // Discard and write-zeroes limits: any size, up to MAX_SEGMENTS ranges, sector aligned.
        put(36, &u32::MAX.to_le_bytes());
        put(40, &MAX_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &u32::MAX.to_le_bytes());
        put(52, &MAX_SEGMENTS.to_le_bytes());
        put(56, &[1]);
        config
    }

    /// Serves every request the rate limiter allows.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut handler = RequestHandler {
            mem: &active.mem,
            disk: &mut self.disk,
            rate_limiter: &mut self.rate_limiter,
            errors: &mut self.errors,
            host_errors: &mut self.host_errors,
            counters: &mut self.counters,
            id: &self.id,
            pass_bytes: 0,
        };
        let result = drain_queue(&mut active.queue, &active.mem, &active.interrupt, |chain| {
            handler.handle(chain)
        });
        match result {
            Ok(drained) if drained.more => {
                self.common.renotify(0);
            }
            Ok(_) => {}
            Err(e) => {
                stop_on_broken_ring(&mut self.active, &mut self.errors, "virtio-blk", &e);
            }
        }
    }
}

/// The parts of the device one request needs, borrowed apart from the queue.
struct RequestHandler<'a> {
    mem: &'a GuestMemoryMmap,
    disk: &'a mut DiskFile,
    rate_limiter: &'a mut RateLimiter,
    errors: &'a mut GuestErrorLog,
    host_errors: &'a mut GuestErrorLog,
    counters: &'a mut BlockCounters,
    id: &'a [u8; ID_BYTES],
    /// Data bytes read or written in this pass over the queue.
    pass_bytes: u64,
}

impl RequestHandler<'_> {
    fn handle(&mut self, chain: Chain<'_>) -> ChainOutcome {
        let request = match Request::parse(chain.clone(), self.mem) {
            Ok(request) => request,
            Err(e) => {
                self.errors.record("virtio-blk", &e);
                self.counters.requests += 1;
                self.counters.failed_requests += 1;
                // Answer IOERR if the chain ends in a usable status byte, so the guest's request
                // completes instead of hanging; otherwise there is nowhere to say anything.
                return match request::status_address(chain, self.mem) {
                    Some(addr) if self.mem.write_obj(status::IOERR, addr).is_ok() => {
                        ChainOutcome::Used(1)
                    }
                    _ => ChainOutcome::Used(0),
                };
            }
        };
        if !self.charge(&request) {
            return ChainOutcome::Retry;
        }
        let (status, data_written) = self.execute(&request);
        self.counters.requests += 1;
        if status != status::OK {
            self.counters.failed_requests += 1;
        }
        // The status address was checked during parsing; should the write still fail, the guest
        // learns nothing from this request either way.
        let _ = self.mem.write_obj(status, request.status_addr);
        let used = data_written.saturating_add(1);
        if matches!(request.request_type, RequestType::In | RequestType::Out) {
            self.pass_bytes += u64::from(request.data_len);
        }
        if self.pass_bytes >= PASS_BYTE_BUDGET {
            ChainOutcome::UsedThenYield(used)
        } else {
            ChainOutcome::Used(used)
        }
    }

    /// Takes one op and the data bytes from the rate limiter; on refusal nothing is kept.
    fn charge(&mut self, request: &Request) -> bool {
        if !self.rate_limiter.consume(1, TokenType::Ops) {
            return false;
        }
        let bytes = match request.request_type {
            RequestType::In | RequestType::Out => u64::from(request.data_len),
            _ => 0,
        };
        if bytes > 0 && !self.rate_limiter.consume(bytes, TokenType::Bytes) {
            self.rate_limiter.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Does the I/O; returns the status and how many data bytes went to the guest.
    fn execute(&mut self, request: &Request) -> (u8, u32) {
        let result: Result<u32, IoError> = match request.request_type {
            RequestType::In => self
                .disk
                .read(self.mem, request.sector, request.data_len, &request.data)
                .map(|()| {
                    self.counters.reads += 1;
                    self.counters.read_bytes += u64::from(request.data_len);
                    request.data_len
                }),
            RequestType::Out => self
                .disk
                .write(self.mem, request.sector, request.data_len, &request.data)
                .map(|()| {
                    self.counters.writes += 1;
                    self.counters.write_bytes += u64::from(request.data_len);
                    0
                }),
            RequestType::Flush => {
                self.counters.flushes += 1;
                self.disk.flush().map(|()| 0)
            }
            RequestType::GetId => Ok(self.write_id(request)),
            RequestType::Discard => self.disk.discard(&request.segments).map(|()| 0),
            RequestType::WriteZeroes => self.disk.write_zeroes(&request.segments).map(|()| 0),
            RequestType::Unsupported(_) => return (status::UNSUPP, 0),
        };
        match result {
            Ok(written) => (status::OK, written),
            Err(e) => {
                let log = if e.is_host() {
                    &mut *self.host_errors
                } else {
                    &mut *self.errors
                };
                log.record("virtio-blk", &e);
                (status::IOERR, 0)
            }
        }
    }

    /// Writes the id (NUL-padded, not NUL-terminated when 20 bytes long) into the data buffers.
    fn write_id(&mut self, request: &Request) -> u32 {
        let mut remaining: &[u8] = self.id;
        let mut written = 0u32;
        for buf in &request.data {
            if remaining.is_empty() {
                break;
            }
            let n = remaining.len().min(buf.len as usize);
            if self.mem.write_slice(&remaining[..n], buf.addr).is_err() {
                break;
            }
            remaining = &remaining[n..];
            written += n as u32;
        }
        written
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueue::new(mem, interrupt, queues)?);
        self.common.wake_on_activation()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_positions(&self) -> Vec<super::QueuePosition> {
        self.active
            .iter()
            .map(|a| super::QueuePosition::of(&a.queue))
            .collect()
    }

    fn save_state(&self) -> serde_json::Value {
        super::save_limiters(&[("rate_limiter", &self.rate_limiter)])
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        super::restore_limiters(state, &mut [("rate_limiter", &mut self.rate_limiter)])
    }

    fn metric_values(&self) -> Vec<(&'static str, u64)> {
        metrics::values(&self.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::request::tests::{desc, mem, write_header, WRITE};
    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    const T_IN: u32 = 0;
    const T_OUT: u32 = 1;
    const T_FLUSH: u32 = 4;
    const T_GET_ID: u32 = 8;
    const T_WRITE_ZEROES: u32 = 13;

    fn image(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-blk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn block(path: &Path, read_only: bool) -> Block {
        Block::new(&BlockConfig {
            id: "drive-serial-0123456789".into(),
            path: path.to_owned(),
            read_only,
            rate_limiter: RateLimiterConfig::default(),
        })
        .unwrap()
    }

    fn activate(dev: &mut Block, mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) {
        let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), int, vec![vq.create_queue().unwrap()])
            .unwrap();
    }

    fn used(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
        let base = vq.used_addr().unchecked_add(4 + 8 * i);
        (
            mem.read_obj(base).unwrap(),
            mem.read_obj(base.unchecked_add(4)).unwrap(),
        )
    }

    fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn config_space_and_features() {
        let path = image("cfg", &[0u8; 8192]);
        let rw = block(&path, false);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        assert_ne!(rw.avail_features() & feature::DISCARD, 0);
        assert_eq!(rw.avail_features() & feature::RO, 0);
        drop(rw);
        let ro = block(&path, true);
        assert_ne!(ro.avail_features() & feature::RO, 0);
        assert_eq!(
            ro.avail_features() & (feature::DISCARD | feature::WRITE_ZEROES),
            0
        );
        let mut seg_max = [0u8; 4];
        ro.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 254);
        let mut size_max = [0u8; 4];
        ro.read_config(8, &mut size_max);
        assert_eq!(u32::from_le_bytes(size_max), 64 << 10);
        assert_ne!(ro.avail_features() & feature::SIZE_MAX, 0);
    }

    #[test]
    fn a_pass_yields_once_it_has_moved_its_byte_budget() {
        // Three 8 MiB reads: two fill the pass's budget, the third waits for the next pass,
        // which the device asks for through its queue's eventfd.
        const EIGHT_MIB: u32 = 8 << 20;
        let path = image("budget", &vec![0u8; EIGHT_MIB as usize]);
        let mem = mem();
        let mut dev = block(&path, true);
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_IN, 0);
        let chain = [
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, EIGHT_MIB, WRITE),
            desc(0x40_0000, 1, WRITE),
        ];
        super::super::test_queue::add_chains(&vq, &[&chain, &chain, &chain]);
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(
            dev.common.queue_evts()[0].read().unwrap(),
            1,
            "a next pass asked for"
        );
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 3);
        assert!(
            dev.common.queue_evts()[0].read().is_err(),
            "nothing more to do"
        );
        assert_eq!(dev.counters().read_bytes, 3 * u64::from(EIGHT_MIB));
    }

    #[test]
    fn read_write_flush_get_id() {
        let path = image("io", &[0u8; 8192]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[0x5a; 1024], GuestAddress(0x20_0000))
            .unwrap();
        write_header(&mem, 0x10_0000, T_OUT, 4);
        write_header(&mem, 0x10_1000, T_FLUSH, 0);
        write_header(&mem, 0x10_2000, T_IN, 4);
        write_header(&mem, 0x10_3000, T_GET_ID, 0);
        super::super::test_queue::add_chains(
            &vq,
            &[
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 1024, 0),
                    desc(0x40_0000, 1, WRITE),
                ],
                &[desc(0x10_1000, 16, 0), desc(0x40_0001, 1, WRITE)],
                &[
                    desc(0x10_2000, 16, 0),
                    desc(0x30_0000, 1024, WRITE),
                    desc(0x40_0002, 1, WRITE),
                ],
                &[
                    desc(0x10_3000, 16, 0),
                    desc(0x50_0000, 64, WRITE),
                    desc(0x40_0003, 1, WRITE),
                ],
            ],
        );
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 4);
        for i in 0..4 {
            assert_eq!(status_at(&mem, 0x40_0000 + i), status::OK, "request {i}");
        }
        assert_eq!(used(&mem, &vq, 0).1, 1);
        assert_eq!(used(&mem, &vq, 2).1, 1025);
        assert_eq!(used(&mem, &vq, 3).1, 21);
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(back, [0x5a; 1024]);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x50_0000)).unwrap();
        assert_eq!(&id, b"drive-serial-0123456");
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[2048..3072], &[0x5a; 1024][..]);
        let c = dev.counters();
        assert_eq!((c.read_bytes, c.write_bytes, c.flushes), (1024, 1024, 1));
        assert_eq!((c.reads, c.writes, c.requests), (1, 1, 4));
    }

    #[test]
    fn read_only_drive_answers_ioerr_and_keeps_the_file() {
        let original = vec![0x33u8; 4096];
        let path = image("ro", &original);
        let mem = mem();
        let mut dev = block(&path, true);
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_OUT, 0);
        write_header(&mem, 0x10_1000, T_WRITE_ZEROES, 0);
        mem.write_obj(0u64, GuestAddress(0x20_1000)).unwrap();
        mem.write_obj(1u32, GuestAddress(0x20_1008)).unwrap();
        super::super::test_queue::add_chains(
            &vq,
            &[
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0x20_0000, 512, 0),
                    desc(0x40_0000, 1, WRITE),
                ],
                &[
                    desc(0x10_1000, 16, 0),
                    desc(0x20_1000, 16, 0),
                    desc(0x40_0001, 1, WRITE),
                ],
            ],
        );
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(status_at(&mem, 0x40_0000), status::IOERR);
        assert_eq!(status_at(&mem, 0x40_0001), status::IOERR);
        assert_eq!(std::fs::read(&path).unwrap(), original);
    }

    #[test]
    fn hostile_chains_fail_alone() {
        let path = image("hostile", &[0u8; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_IN, 0);
        write_header(&mem, 0x10_1000, T_IN, 1_000_000);
        write_header(&mem, 0x10_2000, 0x77, 0);
        write_header(&mem, 0x10_3000, T_IN, 0);
        super::super::test_queue::add_chains(
            &vq,
            &[
                // Data outside guest memory.
                &[
                    desc(0x10_0000, 16, 0),
                    desc(0xfff_0000, 512, WRITE),
                    desc(0x40_0000, 1, WRITE),
                ],
                // Past the end of the disk.
                &[
                    desc(0x10_1000, 16, 0),
                    desc(0x20_0000, 512, WRITE),
                    desc(0x40_0001, 1, WRITE),
                ],
                // Unknown type.
                &[desc(0x10_2000, 16, 0), desc(0x40_0002, 1, WRITE)],
                // A good one afterwards still works.
                &[
                    desc(0x10_3000, 16, 0),
                    desc(0x20_0000, 512, WRITE),
                    desc(0x40_0003, 1, WRITE),
                ],
            ],
        );
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 4);
        assert_eq!(status_at(&mem, 0x40_0000), status::IOERR);
        assert_eq!(status_at(&mem, 0x40_0001), status::IOERR);
        assert_eq!(status_at(&mem, 0x40_0002), status::UNSUPP);
        assert_eq!(status_at(&mem, 0x40_0003), status::OK);
        assert!(dev.is_activated());
        assert_eq!(dev.counters().failed_requests, 3);
    }

    #[test]
    fn chain_without_status_is_returned_empty() {
        let path = image("nostatus", &[0u8; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_IN, 0);
        vq.build_desc_chain(&[desc(0x10_0000, 16, 0), desc(0x20_0000, 512, 0)])
            .unwrap();
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(used(&mem, &vq, 0).1, 0);
    }

    #[test]
    fn looping_chain_ends() {
        let path = image("loop", &[0u8; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_IN, 0);
        // Descriptor 1 points back at descriptor 0.
        use super::request::tests::NEXT;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        vq.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, NEXT, 1)),
            )
            .unwrap();
        vq.desc_table()
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(0x20_0000, 512, NEXT | WRITE, 0)),
            )
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        assert!(dev.is_activated());
    }

    #[test]
    fn broken_ring_needs_reset() {
        let path = image("ring", &[0u8; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);
        vq.avail().idx().store(40);
        dev.process_queue();
        assert!(!dev.is_activated());
    }

    #[test]
    fn ops_limit_holds_requests_back() {
        let path = image("limit", &[0u8; 4096]);
        let mem = mem();
        let mut dev = Block::new(&BlockConfig {
            id: "x".into(),
            path: path.clone(),
            read_only: false,
            rate_limiter: RateLimiterConfig {
                bandwidth: None,
                ops: Some(crate::rate_limiter::TokenBucketConfig {
                    size: 1,
                    one_time_burst: None,
                    refill_time: 100_000,
                }),
            },
        })
        .unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, 0x10_0000, T_FLUSH, 0);
        super::super::test_queue::add_chains(
            &vq,
            &[
                &[desc(0x10_0000, 16, 0), desc(0x40_0000, 1, WRITE)],
                &[desc(0x10_0000, 16, 0), desc(0x40_0001, 1, WRITE)],
            ],
        );
        activate(&mut dev, &mem, &vq);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
    }

    /// Reads `sector` through the queue (one IN request, data at 0x30_0000, status at 0x40_0000)
    /// and returns the status and the data.
    fn read_sector(
        dev: &mut Block,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        sector: u64,
    ) -> (u8, Vec<u8>) {
        write_header(mem, 0x10_0000, T_IN, sector);
        mem.write_slice(&[0u8; 512], GuestAddress(0x30_0000))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x40_0000)).unwrap();
        super::super::test_queue::add_chains(
            vq,
            &[&[
                desc(0x10_0000, 16, 0),
                desc(0x30_0000, 512, WRITE),
                desc(0x40_0000, 1, WRITE),
            ]],
        );
        dev.process_queue();
        let mut data = vec![0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x30_0000)).unwrap();
        (status_at(mem, 0x40_0000), data)
    }

    fn config_capacity(dev: &Block) -> u64 {
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        u64::from_le_bytes(cap)
    }

    #[test]
    fn swapped_image_serves_later_requests() {
        let old = image("swap-old", &[0x11; 4096]);
        let new = image("swap-new", &[0x22; 16384]);
        let mem = mem();
        let mut dev = block(&old, false);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);
        assert_eq!(
            read_sector(&mut dev, &mem, &vq, 0),
            (status::OK, vec![0x11; 512])
        );
        assert_eq!(read_sector(&mut dev, &mem, &vq, 20).0, status::IOERR);

        dev.update_disk(&new).unwrap();
        assert_eq!(dev.capacity_sectors(), 32);
        assert_eq!(config_capacity(&dev), 32);
        assert_eq!(dev.path(), new);
        assert_eq!(
            read_sector(&mut dev, &mem, &vq, 0),
            (status::OK, vec![0x22; 512])
        );
        assert_eq!(
            read_sector(&mut dev, &mem, &vq, 20),
            (status::OK, vec![0x22; 512])
        );
        assert!(dev.is_activated());
        // The old image was closed, and its lock with it.
        DiskFile::open(&old, false).unwrap();
        // The new one is held.
        assert!(matches!(
            DiskFile::open(&new, true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn failed_swap_keeps_the_old_image() {
        let old = image("swap-keep", &[0x11; 4096]);
        let busy = image("swap-busy", &[0x22; 16384]);
        let mem = mem();
        let mut dev = block(&old, false);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);

        assert!(matches!(
            dev.update_disk(&old.with_extension("missing")),
            Err(BlockError::Disk(DiskError::Open { .. }))
        ));
        // Locked by someone else (another VMM): not to be mistaken for a reopen.
        let other = DiskFile::open(&busy, false).unwrap();
        assert!(matches!(
            dev.update_disk(&busy),
            Err(BlockError::Disk(DiskError::Locked { .. }))
        ));
        drop(other);
        assert!(matches!(
            dev.update_disk(old.parent().unwrap()),
            Err(BlockError::Disk(
                DiskError::NotAFile { .. } | DiskError::Open { .. }
            ))
        ));

        assert_eq!(dev.path(), old);
        assert_eq!(config_capacity(&dev), 8);
        assert_eq!(
            read_sector(&mut dev, &mem, &vq, 7),
            (status::OK, vec![0x11; 512])
        );
        // Still locked by the drive.
        assert!(matches!(
            DiskFile::open(&old, true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn swap_to_the_same_image_rereads_its_size() {
        let path = image("swap-same", &[0x11; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);
        // Grown in place, as when a placeholder drive's file is resized before the PATCH.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8192)
            .unwrap();
        dev.update_disk(&path).unwrap();
        assert_eq!(config_capacity(&dev), 16);
        assert_eq!(
            read_sector(&mut dev, &mem, &vq, 12),
            (status::OK, vec![0; 512])
        );
        // The drive kept its exclusive lock throughout.
        assert!(matches!(
            DiskFile::open(&path, true),
            Err(DiskError::Locked { .. })
        ));
        // Another name for the same file is the same file.
        let link = path.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        dev.update_disk(&link).unwrap();
        assert_eq!(dev.path(), link);

        // A read-only drive's shared lock lets the image be opened again: a plain swap.
        drop(dev);
        let mut ro = block(&path, true);
        ro.update_disk(&path).unwrap();
        assert_eq!(ro.capacity_sectors(), 16);
    }

    #[test]
    fn read_only_drive_stays_read_only_after_swap() {
        let old = image("swap-ro-old", &[0x11; 4096]);
        let new = image("swap-ro-new", &[0x22; 8192]);
        let mem = mem();
        let mut dev = block(&old, true);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);
        dev.update_disk(&new).unwrap();
        assert!(dev.disk.read_only());
        assert_ne!(dev.avail_features() & feature::RO, 0);
        write_header(&mem, 0x10_0000, T_OUT, 0);
        super::super::test_queue::add_chains(
            &vq,
            &[&[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 512, 0),
                desc(0x40_0000, 1, WRITE),
            ]],
        );
        dev.process_queue();
        assert_eq!(status_at(&mem, 0x40_0000), status::IOERR);
        assert_eq!(std::fs::read(&new).unwrap(), vec![0x22; 8192]);
        // Opened under a shared lock: other readers may, writers may not.
        DiskFile::open(&new, true).unwrap();
        assert!(matches!(
            DiskFile::open(&new, false),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn rate_limiter_update_takes_effect() {
        let path = image("limit-update", &[0u8; 4096]);
        let mem = mem();
        let mut dev = block(&path, false);
        let vq = MockSplitQueue::new(&mem, 16);
        activate(&mut dev, &mem, &vq);
        let flushes = |n: usize| {
            write_header(&mem, 0x10_0000, T_FLUSH, 0);
            let chain = [desc(0x10_0000, 16, 0), desc(0x40_0000, 1, WRITE)];
            super::super::test_queue::add_chains(&vq, &vec![&chain[..]; n]);
        };
        flushes(2);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 2, "unlimited at first");

        let one_op = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 100_000,
            }),
        };
        dev.update_rate_limiter(&one_op).unwrap();
        flushes(2);
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 3, "one op, then held back");
        assert!(dev.rate_limiter.is_blocked());

        // An invalid config is refused and changes nothing.
        let invalid = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 0,
            }),
            ops: None,
        };
        assert!(matches!(
            dev.update_rate_limiter(&invalid),
            Err(BlockError::RateLimiter(_))
        ));
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 3);

        // Lifting the limit wakes the event loop at once to retry the held request.
        dev.update_rate_limiter(&RateLimiterConfig::default())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        dev.rate_limiter.event_handler().unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 4);
    }
}
