//! virtio-blk on the event loop: queue notifications, activation and the rate limiter's timer.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;

const QUEUE: u32 = 0;
const ACTIVATE: u32 = 1;
const RATE_LIMITER: u32 = 2;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (self.queue_evts[0].as_raw_fd(), QUEUE),
            (self.activate_evt.as_raw_fd(), ACTIVATE),
            (self.rate_limiter.as_raw_fd(), RATE_LIMITER),
        ];
        for (fd, data) in sources {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                eprintln!("kiln: virtio-blk: cannot watch event source {data}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            QUEUE => {
                // Drain the notification even while inactive, or epoll would report it forever.
                let _ = self.queue_evts[0].read();
                self.process_queue();
            }
            ACTIVATE => {
                let _ = self.activate_evt.read();
                self.process_queue();
            }
            RATE_LIMITER if self.rate_limiter.event_handler().is_ok() => {
                self.process_queue();
            }
            _ => {}
        }
    }
}
