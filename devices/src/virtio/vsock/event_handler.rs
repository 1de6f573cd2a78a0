//! virtio-vsock on the event loop: queue notifications, activation, the muxer's host sockets
//! (one nested epoll fd) and its deadline timer.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

/// The data tags the event sources are registered with.
mod tag {
    pub const RX_QUEUE: u32 = 0;
    pub const TX_QUEUE: u32 = 1;
    pub const EVENT_QUEUE: u32 = 2;
    pub const ACTIVATE: u32 = 3;
    pub const HOST_SOCKETS: u32 = 4;
    pub const SWEEP: u32 = 5;
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (
                self.common.queue_evts()[RX_QUEUE].as_raw_fd(),
                tag::RX_QUEUE,
            ),
            (
                self.common.queue_evts()[TX_QUEUE].as_raw_fd(),
                tag::TX_QUEUE,
            ),
            (
                self.common.queue_evts()[EVENT_QUEUE].as_raw_fd(),
                tag::EVENT_QUEUE,
            ),
            (self.common.activate_evt().as_raw_fd(), tag::ACTIVATE),
            (self.muxer.epoll_fd(), tag::HOST_SOCKETS),
            (self.muxer.sweep_fd(), tag::SWEEP),
        ];
        for (fd, data) in sources {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("{}: cannot watch event source {data}: {e}", self.log_name);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            tag::RX_QUEUE => {
                // Drain the notification even while inactive, or epoll would report it forever.
                let _ = self.common.queue_evts()[RX_QUEUE].read();
                self.process_rx();
            }
            tag::TX_QUEUE => {
                let _ = self.common.queue_evts()[TX_QUEUE].read();
                self.process_tx();
            }
            tag::EVENT_QUEUE => {
                // New event buffers: kept for events the device never sends.
                let _ = self.common.queue_evts()[EVENT_QUEUE].read();
            }
            tag::ACTIVATE => {
                let _ = self.common.activate_evt().read();
                self.process_tx();
            }
            tag::HOST_SOCKETS => self.process_host_events(),
            tag::SWEEP => self.process_sweep(),
            _ => {}
        }
    }
}
