//! What every virtio device holds the same way: its type, the features it offers and the ones the
//! driver accepted, its queues' sizes and notification eventfds, and the eventfd that wakes its
//! event handler on activation. [`VirtioDevice`](super::VirtioDevice)'s provided methods read it,
//! so a device implements only what is its own (config space, activation, reset, counters).
//!
//! Invariants: the acked features are always a subset of the offered ones; there is one
//! notification eventfd per queue, in queue order.

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ActivateError;

/// The state every virtio device shares.
#[derive(Debug)]
pub struct VirtioCommon {
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
}

impl VirtioCommon {
    /// A device of `device_type` offering `avail_features`, with one queue per entry of
    /// `queue_sizes` (its maximum size) and a nonblocking eventfd for each.
    pub fn new(
        device_type: u32,
        avail_features: u64,
        queue_sizes: &[u16],
    ) -> std::io::Result<Self> {
        let queue_evts = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device_type,
            avail_features,
            acked_features: 0,
            queue_sizes: queue_sizes.to_vec(),
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Changes the offer (before a driver has seen it, e.g. a setting changed before boot).
    pub fn set_avail_features(&mut self, features: u64) {
        self.avail_features = features;
        self.acked_features &= features;
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// True if the driver accepted every bit of `feature`.
    pub fn has_acked(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// Records the driver's choice, keeping only offered bits.
    pub fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    /// Each queue's maximum size.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// The queues' notification eventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Queue `index`'s notification eventfd (`None` past the last queue).
    pub fn queue_evt(&self, index: usize) -> Option<&EventFd> {
        self.queue_evts.get(index)
    }

    /// Makes the event loop come back to queue `index`, as a guest notification would (a
    /// device whose budget ran out asks for another pass this way).
    pub fn renotify(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            // Only fails if the counter would overflow: a pass is already due.
            let _ = evt.write(1);
        }
    }

    /// The eventfd written on activation.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Wakes the device's event handler after activation, so requests the driver queued before
    /// DRIVER_OK are served.
    pub fn wake_on_activation(&self) -> Result<(), ActivateError> {
        self.activate_evt
            .write(1)
            .map_err(|e| ActivateError::Wake(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_features_stay_within_the_offer() {
        let mut common = VirtioCommon::new(4, 0b1010, &[16, 32]).unwrap();
        assert_eq!(common.queue_sizes(), &[16, 32]);
        assert_eq!(common.queue_evts().len(), 2);
        assert!(common.queue_evt(2).is_none());
        common.set_acked_features(0b1111);
        assert_eq!(common.acked_features(), 0b1010);
        assert!(common.has_acked(0b1000) && !common.has_acked(0b0100));
        common.set_avail_features(0b0010);
        assert_eq!(common.acked_features(), 0b0010);
    }

    #[test]
    fn renotify_and_activation_wake_their_eventfds() {
        let common = VirtioCommon::new(4, 0, &[16]).unwrap();
        common.renotify(0);
        common.renotify(7);
        assert_eq!(common.queue_evts()[0].read().unwrap(), 1);
        common.wake_on_activation().unwrap();
        assert_eq!(common.activate_evt().read().unwrap(), 1);
    }
}
