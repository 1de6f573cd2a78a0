//! virtio-fs on the event loop: activation and reset requests, the backend's call eventfd, and
//! its socket (which says when the backend went away). The queues' notification eventfds are
//! the backend's to watch, never the event loop's.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Fs;
use crate::virtio::VirtioDevice;

const ACTIVATE: u32 = 0;
const CALL: u32 = 1;
const BACKEND: u32 = 2;

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (
                self.common().activate_evt().as_raw_fd(),
                ACTIVATE,
                EventSet::IN,
            ),
            (self.call_evt.as_raw_fd(), CALL, EventSet::IN),
            (
                self.frontend.as_raw_fd(),
                BACKEND,
                EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP,
            ),
        ];
        for (fd, data, set) in sources {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, set)) {
                log::error!(
                    "virtio-fs {}: cannot watch event source {data}: {e}",
                    self.tag
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                let _ = self.common().activate_evt().read();
                self.apply_pending();
            }
            CALL => self.backend_called(),
            BACKEND => {
                // Every reply is read by the request that asked for it, so anything readable
                // here is the end of the stream (or a message no request asked for, which a
                // virtio-fs backend never sends): either way the backend is of no more use.
                let fd = self.frontend.as_raw_fd();
                let _ = ops.remove(Events::with_data_raw(
                    fd,
                    BACKEND,
                    EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP,
                ));
                self.backend_gone();
            }
            other => log::warn!("virtio-fs {}: unexpected event {other}", self.tag),
        }
    }
}
