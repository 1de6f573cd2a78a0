//! virtio-net on the event loop: queue notifications, TAP readiness, activation and the two rate
//! limiters' timers.
//!
//! The TAP is watched edge-triggered, so a readiness report is only repeated when a new frame
//! arrives: every handler that may read the TAP reads until it would block or must stop (no
//! guest buffers, rate limited, or its budget spent, in which case it wakes itself through the
//! rx queue eventfd). Frames that arrive before activation are left in the TAP and read on
//! ACTIVATE.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Net, NetBackend, RX_QUEUE, TX_QUEUE};

/// The data tags the event sources are registered with.
mod tag {
    pub const RX_QUEUE: u32 = 0;
    pub const TX_QUEUE: u32 = 1;
    pub const TAP: u32 = 2;
    pub const ACTIVATE: u32 = 3;
    pub const RX_RATE_LIMITER: u32 = 4;
    pub const TX_RATE_LIMITER: u32 = 5;
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (
                self.common.queue_evts()[RX_QUEUE].as_raw_fd(),
                tag::RX_QUEUE,
                EventSet::IN,
            ),
            (
                self.common.queue_evts()[TX_QUEUE].as_raw_fd(),
                tag::TX_QUEUE,
                EventSet::IN,
            ),
            (
                self.backend.as_raw_fd(),
                tag::TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (
                self.common.activate_evt().as_raw_fd(),
                tag::ACTIVATE,
                EventSet::IN,
            ),
            (
                self.rx_rate_limiter.as_raw_fd(),
                tag::RX_RATE_LIMITER,
                EventSet::IN,
            ),
            (
                self.tx_rate_limiter.as_raw_fd(),
                tag::TX_RATE_LIMITER,
                EventSet::IN,
            ),
        ];
        for (fd, data, events) in sources {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, events)) {
                log::error!("{}: cannot watch event source {data}: {e}", self.log_name);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            tag::RX_QUEUE => {
                // Drain the notification even while inactive, or epoll would report it forever.
                let _ = self.common.queue_evts()[RX_QUEUE].read();
                // New guest buffers: deliver the held frame, then whatever the TAP has.
                self.process_rx();
            }
            tag::TX_QUEUE => {
                let _ = self.common.queue_evts()[TX_QUEUE].read();
                self.process_tx();
                self.deliver_mmds_answers();
            }
            tag::TAP => {
                // Does nothing before activation; ACTIVATE reads what arrived meanwhile.
                self.process_rx();
            }
            tag::ACTIVATE => {
                let _ = self.common.activate_evt().read();
                self.process_rx();
                self.process_tx();
            }
            // A spurious wake-up (timer not yet expired) is ignored.
            tag::RX_RATE_LIMITER if self.rx_rate_limiter.event_handler().is_ok() => {
                self.process_rx();
            }
            // A spurious wake-up (timer not yet expired) is ignored.
            tag::TX_RATE_LIMITER if self.tx_rate_limiter.event_handler().is_ok() => {
                self.process_tx();
                self.deliver_mmds_answers();
            }
            _ => {}
        }
    }
}

impl<B: NetBackend> Net<B> {
    /// Frames the guest sent to MMDS were answered on the spot: hand the answers over.
    pub(super) fn deliver_mmds_answers(&mut self) {
        if self.mmds_has_frames() {
            self.process_rx();
        }
    }
}
