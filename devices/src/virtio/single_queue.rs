//! What the one-queue devices (block, rng) share: their state while active, and their event-loop
//! glue (queue notification, activation, rate limiter timer), which does not depend on what the
//! device does with a request.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Queue;

use super::{ActivateError, Interrupt};
use crate::rate_limiter::RateLimiter;

/// A one-queue device's state between activation and reset.
pub struct ActiveQueue {
    /// Guest memory the queue lives in.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The request queue, valid in `mem` (the transport checked it).
    pub queue: Queue,
}

impl ActiveQueue {
    /// Takes the driver's queues for a device that has exactly one.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<Self, ActivateError> {
        let given = queues.len();
        match <[Queue; 1]>::try_from(queues) {
            Ok([queue]) => Ok(Self {
                mem,
                interrupt,
                queue,
            }),
            Err(_) => Err(ActivateError::QueueCount { expected: 1, given }),
        }
    }
}

impl super::ActiveState for ActiveQueue {
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// The event-loop side of a one-queue device (its queue and activation eventfds are its
/// [`VirtioCommon`](super::VirtioCommon)'s).
pub trait SingleQueueDevice: super::VirtioDevice {
    /// The device's name in log lines ("virtio-blk").
    const LOG_NAME: &'static str;
    /// The device's rate limiter (its timerfd is watched).
    fn rate_limiter(&mut self) -> &mut RateLimiter;
    /// Serves what the queue holds, as far as the rate limiter allows.
    fn process_queue(&mut self);
}

const QUEUE: u32 = 0;
const ACTIVATE: u32 = 1;
const RATE_LIMITER: u32 = 2;

/// `MutEventSubscriber::init` for a one-queue device.
pub fn init<D: SingleQueueDevice>(device: &mut D, ops: &mut EventOps) {
    let queue_fd = match device.common().queue_evt(0) {
        Some(evt) => evt.as_raw_fd(),
        None => return,
    };
    let sources = [
        (queue_fd, QUEUE),
        (device.common().activate_evt().as_raw_fd(), ACTIVATE),
        (device.rate_limiter().as_raw_fd(), RATE_LIMITER),
    ];
    for (fd, data) in sources {
        if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
            log::error!("{}: cannot watch event source {data}: {e}", D::LOG_NAME);
        }
    }
}

/// `MutEventSubscriber::process` for a one-queue device.
pub fn process<D: SingleQueueDevice>(device: &mut D, events: Events) {
    match events.data() {
        QUEUE => {
            // Drain the notification even while inactive, or epoll would report it forever.
            if let Some(evt) = device.common().queue_evt(0) {
                let _ = evt.read();
            }
            device.process_queue();
        }
        ACTIVATE => {
            let _ = device.common().activate_evt().read();
            device.process_queue();
        }
        RATE_LIMITER if device.rate_limiter().event_handler().is_ok() => {
            device.process_queue();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn exactly_one_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        for count in [0, 2] {
            let queues = (0..count).map(|_| Queue::new(16).unwrap()).collect();
            let err = ActiveQueue::new(mem.clone(), interrupt.clone(), queues).err();
            assert!(
                matches!(err, Some(ActivateError::QueueCount { expected: 1, given }) if given == count)
            );
        }
        assert!(ActiveQueue::new(mem, interrupt, vec![Queue::new(16).unwrap()]).is_ok());
    }
}
