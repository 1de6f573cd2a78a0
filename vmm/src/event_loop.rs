//! The VMM's event loop: one thread (`kiln_vmm`) that runs every device's event handler (queue
//! notifications, TAP readiness, rate limiter timers), apart from the vCPU threads, and the
//! metrics' periodic flush ([`crate::metrics::PeriodicFlush`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device_manager::SharedSubscriber;
use crate::metrics::{DeviceGroup, PeriodicFlush, FLUSH_PERIOD, METRICS};
use crate::seccomp::{spawn_filtered, SeccompFilters, ThreadKind};

/// Errors in creating the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll failed.
    #[error("epoll: {0}")]
    Epoll(#[source] event_manager::Error),
    /// The stop eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The metrics flush timer could not be created.
    #[error("creating the metrics timer: {0}")]
    Timer(#[source] std::io::Error),
}

/// Ends the loop when its eventfd is written.
struct StopSignal {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSignal {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch its stop eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }
}

/// An event loop with every device registered, not yet running.
pub struct EventLoop {
    manager: EventManager<SharedSubscriber>,
    stop_evt: EventFd,
    stopped: Arc<AtomicBool>,
}

/// A running event loop.
pub struct RunningEventLoop {
    stop_evt: EventFd,
    thread: JoinHandle<()>,
}

impl EventLoop {
    /// Creates the loop and registers `subscribers` (each one's `init` runs here), and the timer
    /// that flushes the process's metrics every [`FLUSH_PERIOD`] (a no-op until they have an
    /// output) with the groups `device_metrics` reports (the registry walked).
    pub fn new(
        subscribers: &[SharedSubscriber],
        device_metrics: Box<dyn Fn() -> Vec<DeviceGroup> + Send>,
    ) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::new().map_err(EventLoopError::Epoll)?;
        for subscriber in subscribers {
            manager.add_subscriber(subscriber.clone());
        }
        let flush: SharedSubscriber = Arc::new(Mutex::new(
            PeriodicFlush::new(&METRICS, FLUSH_PERIOD, device_metrics)
                .map_err(EventLoopError::Timer)?,
        ));
        manager.add_subscriber(flush);
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop: SharedSubscriber = Arc::new(Mutex::new(StopSignal {
            evt: stop_evt.try_clone().map_err(EventLoopError::EventFd)?,
            stopped: stopped.clone(),
        }));
        manager.add_subscriber(stop);
        Ok(Self {
            manager,
            stop_evt,
            stopped,
        })
    }

    /// Runs the loop on its own thread, confined by the `vmm` filter of `filters`, until stopped;
    /// `on_error` is called (on that thread) if epoll itself fails, which ends the loop.
    pub fn spawn(
        mut self,
        filters: &Arc<SeccompFilters>,
        on_error: impl FnOnce(event_manager::Error) + Send + 'static,
    ) -> std::io::Result<RunningEventLoop> {
        let stop_evt = self.stop_evt.try_clone()?;
        let thread = spawn_filtered("kiln_vmm", filters, ThreadKind::Vmm, move || {
            while !self.stopped.load(Ordering::Acquire) {
                match self.manager.run() {
                    Ok(dispatched) => METRICS.vmm.device_events.add(dispatched as u64),
                    Err(e) => {
                        on_error(e);
                        return;
                    }
                }
            }
        })?;
        Ok(RunningEventLoop { stop_evt, thread })
    }
}

impl RunningEventLoop {
    /// Stops the loop and waits for its thread: the devices are idle afterwards.
    pub fn stop(self) {
        if self.stop_evt.write(1).is_ok() {
            let _ = self.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Counts reads of its eventfd.
    struct Counter {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                let _ = self.seen.send(n);
            }
        }
    }

    #[test]
    fn runs_handlers_and_stops() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let counter: SharedSubscriber = Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        }));
        let running = EventLoop::new(&[counter], Box::new(Vec::new))
            .unwrap()
            .spawn(&Arc::new(SeccompFilters::disabled()), |_| {})
            .unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        running.stop();
    }
}
