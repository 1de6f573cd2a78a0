//! virtio-blk on the event loop: the one-queue glue of [`single_queue`](crate::virtio::single_queue).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::Block;
use crate::rate_limiter::RateLimiter;
use crate::virtio::single_queue::{self, SingleQueueDevice};

impl SingleQueueDevice for Block {
    const LOG_NAME: &'static str = "virtio-blk";

    fn rate_limiter(&mut self) -> &mut RateLimiter {
        &mut self.rate_limiter
    }

    fn process_queue(&mut self) {
        Block::process_queue(self);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        single_queue::process(self, events);
    }
}
