//! virtio-rng (virtio 1.x, 5.4): the guest posts writable buffers, the device fills them with
//! bytes from the host's getrandom(2).
//!
//! Invariants: at most [`MAX_BYTES_PER_REQUEST`] bytes are produced per buffer, whatever length the
//! guest claims, so a guest cannot make the VMM allocate or spin on a huge request; the rate
//! limiter is charged for every byte before it is produced.

mod event_handler;
mod metrics;

use std::io::Write;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
#[cfg(test)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest_errors::GuestErrorLog;
use super::single_queue::ActiveQueue;
use super::{
    device_type, drain_queue, features, stop_on_broken_ring, ActivateError, ChainOutcome,
    Interrupt, VirtioCommon, VirtioDevice,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, TokenType};

/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes produced for one buffer (Linux asks for at most a page or so at a time).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Errors in creating the device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter could not be created.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// What went wrong with one guest request.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("buffer is not writable or not in guest memory: {0}")]
    Buffer(virtio_queue::Error),
    #[error("host getrandom failed: {0}")]
    Entropy(getrandom::Error),
    #[error("writing to the guest buffer: {0}")]
    Write(std::io::Error),
}

/// Counters, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngCounters {
    /// Bytes handed to the guest.
    pub bytes: u64,
    /// Buffers filled (empty ones are not counted).
    pub requests: u64,
    /// Buffers left unfilled because the host's getrandom(2) failed.
    pub host_failures: u64,
    /// Unusable buffers or rings the guest submitted.
    pub guest_errors: u64,
}

/// The entropy device.
pub struct Rng {
    common: VirtioCommon,
    rate_limiter: RateLimiter,
    active: Option<ActiveQueue>,
    errors: GuestErrorLog,
    /// getrandom(2) failures: the host's fault, counted apart from the guest's.
    host_errors: GuestErrorLog,
    /// Bytes handed to the guest so far.
    bytes_served: u64,
    /// Buffers filled so far (empty ones are not counted).
    requests_served: u64,
}

impl Rng {
    /// Creates the device, limited by `rate_limit`.
    pub fn new(rate_limit: &RateLimiterConfig) -> Result<Self, RngError> {
        let features =
            features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC;
        Ok(Self {
            common: VirtioCommon::new(device_type::RNG, features, &[QUEUE_SIZE])
                .map_err(RngError::EventFd)?,
            rate_limiter: RateLimiter::new(rate_limit)?,
            active: None,
            errors: GuestErrorLog::default(),
            host_errors: GuestErrorLog::default(),
            bytes_served: 0,
            requests_served: 0,
        })
    }

    /// Bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// The counters so far.
    pub fn counters(&self) -> RngCounters {
        RngCounters {
            bytes: self.bytes_served,
            requests: self.requests_served,
            host_failures: self.host_errors.count(),
            guest_errors: self.errors.count(),
        }
    }

    /// Serves every available buffer the rate limiter allows, then interrupts the guest if it
    /// asked to be told.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let rate_limiter = &mut self.rate_limiter;
        let errors = &mut self.errors;
        let host_errors = &mut self.host_errors;
        let bytes_served = &mut self.bytes_served;
        let requests_served = &mut self.requests_served;
        let result = drain_queue(&mut active.queue, mem, &active.interrupt, |chain| {
            let mut writer = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => {
                    errors.record("virtio-rng", &RequestError::Buffer(e));
                    return ChainOutcome::Used(0);
                }
            };
            let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
            if len > 0 && !rate_limiter.consume(len as u64, TokenType::Bytes) {
                // Retried when the limiter's timer fires.
                return ChainOutcome::Retry;
            }
            match fill_random(&mut writer, len) {
                Ok(()) => {
                    *bytes_served += len as u64;
                    *requests_served += u64::from(len > 0);
                    ChainOutcome::Used(len as u32)
                }
                Err(e @ RequestError::Entropy(_)) => {
                    host_errors.record("virtio-rng", &e);
                    ChainOutcome::Used(0)
                }
                Err(e) => {
                    errors.record("virtio-rng", &e);
                    ChainOutcome::Used(0)
                }
            }
        });
        match result {
            Ok(drained) if drained.more => {
                self.common.renotify(0);
            }
            Ok(_) => {}
            Err(e) => {
                stop_on_broken_ring(&mut self.active, &mut self.errors, "virtio-rng", &e);
            }
        }
    }
}

/// Writes `len` random bytes to `writer`, a page at a time.
fn fill_random(writer: &mut impl Write, mut len: usize) -> Result<(), RequestError> {
    let mut buf = [0u8; 4096];
    while len > 0 {
        let n = len.min(buf.len());
        getrandom::fill(&mut buf[..n]).map_err(RequestError::Entropy)?;
        writer.write_all(&buf[..n]).map_err(RequestError::Write)?;
        len -= n;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        super::read_config_bytes(&[], offset, data);
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
        metrics::values(&self.counters())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn activate(rng: &mut Rng, mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) {
        let int = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let queue: Queue = vq.create_queue().unwrap();
        rng.activate(mem.clone(), int, vec![queue]).unwrap();
    }

    fn used_len(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> u32 {
        mem.read_obj(vq.used_addr().unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 64, WRITE, 0,
        ))];
        vq.build_desc_chain(&descs).unwrap();
        let mut rng = Rng::new(&RateLimiterConfig::default()).unwrap();
        activate(&mut rng, &mem, &vq);
        rng.process_queue();
        assert_eq!(used_len(&mem, &vq, 0), 64);
        let mut out = [0u8; 64];
        mem.read_slice(&mut out, GuestAddress(0x10_0000)).unwrap();
        assert_ne!(out, [0u8; 64]);
        assert_eq!(rng.bytes_served(), 64);
        let counters = rng.counters();
        assert_eq!((counters.bytes, counters.requests), (64, 1));
        assert_eq!((counters.host_failures, counters.guest_errors), (0, 0));
    }

    #[test]
    fn huge_buffers_are_capped() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 0x80_0000, WRITE, 0,
        ))];
        vq.build_desc_chain(&descs).unwrap();
        let mut rng = Rng::new(&RateLimiterConfig::default()).unwrap();
        activate(&mut rng, &mem, &vq);
        rng.process_queue();
        assert_eq!(used_len(&mem, &vq, 0), MAX_BYTES_PER_REQUEST as u32);
    }

    #[test]
    fn read_only_or_outside_buffers_get_nothing() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 64, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0xfff_0000, 64, WRITE, 0)),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut rng = Rng::new(&RateLimiterConfig::default()).unwrap();
        activate(&mut rng, &mem, &vq);
        rng.process_queue();
        assert_eq!(used_len(&mem, &vq, 0), 0);
        assert_eq!(used_len(&mem, &vq, 1), 0);
        let mut out = [0xaau8; 64];
        mem.read_slice(&mut out, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(out, [0u8; 64], "a read-only buffer must not be written");
        assert!(rng.is_activated());
        // The read-only buffer is an empty one to this device; the one outside memory is an error.
        assert_eq!(rng.counters().guest_errors, 1);
        assert_eq!(rng.counters().requests, 0);
    }

    #[test]
    fn broken_avail_index_needs_reset() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new(&RateLimiterConfig::default()).unwrap();
        activate(&mut rng, &mem, &vq);
        // 100 entries "available" in a 16-entry ring.
        vq.avail().idx().store(100);
        rng.process_queue();
        assert!(!rng.is_activated());
    }

    #[test]
    fn rate_limited_requests_wait() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 1000, WRITE, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1000, WRITE, 0)),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let limit = RateLimiterConfig {
            bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 100_000,
            }),
            ops: None,
        };
        let mut rng = Rng::new(&limit).unwrap();
        activate(&mut rng, &mem, &vq);
        rng.process_queue();
        assert_eq!(used_len(&mem, &vq, 0), 1000);
        assert_eq!(
            vq.used().idx().load(),
            1,
            "the second buffer waits for tokens"
        );
        assert_eq!(rng.bytes_served(), 1000);
    }
}
