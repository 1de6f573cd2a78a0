//! virtio-balloon on the event loop: each queue's notification, activation, and the statistics
//! timer.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Balloon;

/// The data tags of the non-queue event sources (queue `i` is tagged `i`).
mod tag {
    pub const ACTIVATE: u32 = 100;
    pub const STATS_TIMER: u32 = 101;
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        let queues = self
            .common
            .queue_evts()
            .iter()
            .zip(0u32..)
            .map(|(evt, index)| (evt.as_raw_fd(), index));
        let others = [
            (self.common.activate_evt().as_raw_fd(), tag::ACTIVATE),
            (self.stats_timer.as_raw_fd(), tag::STATS_TIMER),
        ];
        for (fd, data) in queues.chain(others) {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch event source {data}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            tag::ACTIVATE => {
                let _ = self.common.activate_evt().read();
                if let Err(e) = self.arm_stats_timer() {
                    log::error!("virtio-balloon: arming the statistics timer: {e}");
                    self.counters.event_fails += 1;
                }
                // Buffers the driver queued before DRIVER_OK (its first statistics, say).
                for index in 0..self.common.queue_evts().len() {
                    self.process_queue(index);
                }
            }
            tag::STATS_TIMER => self.stats_tick(),
            index => {
                let index = index as usize;
                // Drain the notification even while inactive, or epoll would report it forever.
                if let Some(evt) = self.common.queue_evt(index) {
                    let _ = evt.read();
                }
                self.process_queue(index);
            }
        }
    }
}
