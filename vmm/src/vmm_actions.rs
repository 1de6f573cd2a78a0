//! What a running microVM is asked to do: the [`RunningVm`] trait (pause and resume,
//! Ctrl+Alt+Del, a drive's new backing file or rate limits, an interface's rate limits, the
//! balloon's target, statistics and hinting, a metrics flush) and its implementation for
//! [`Vmm`], where each action finds its device in the registry and answers with a [`VmmError`].
//! Nothing here knows of HTTP or of the API's bodies. The controller's runtime phase asks only
//! this trait, so its unit tests run against a double, without KVM.

use std::path::Path;

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonError, BalloonStats, HintingStatus};
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::Net;

use crate::device_manager::{DeviceKind, RegistryError, BALLOON_ID};
use crate::machine::Vmm;
use crate::metrics::{MetricsError, METRICS};
use crate::resources::VmResources;

/// Why a runtime action failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// No such device (`No balloon device found.` for the balloon, as Firecracker).
    #[error("{0}")]
    NoDevice(String),
    /// The device refused the change.
    #[error("{0}")]
    Device(String),
    /// The registry's entry is not the device its kind says (a Kiln bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// The metrics could not be written.
    #[error("Metrics error: {0}")]
    Metrics(#[from] MetricsError),
}

impl From<RegistryError> for VmmError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound {
                kind: DeviceKind::Balloon,
                ..
            } => VmmError::NoDevice("No balloon device found.".to_string()),
            RegistryError::NotFound { .. } => VmmError::NoDevice(e.to_string()),
            RegistryError::WrongType(_) => VmmError::Internal(e.to_string()),
        }
    }
}

impl From<BalloonError> for VmmError {
    fn from(e: BalloonError) -> Self {
        VmmError::Device(e.to_string())
    }
}

/// What a running VM is asked to do, each action answered with a [`VmmError`].
pub trait RunningVm {
    /// The VM's description as it stands (runtime changes included).
    fn resources(&self) -> &VmResources;
    /// True while the vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// Stops every vCPU (the guest's clock stands still).
    fn pause(&mut self) -> Result<(), VmmError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self);
    /// Sends the guest Ctrl+Alt+Del.
    fn send_ctrl_alt_del(&self) -> Result<(), VmmError>;
    /// Writes a metrics line now.
    fn flush_metrics(&self) -> Result<(), VmmError>;
    /// Saves the paused VM to a state file and a memory file (all of memory, or with `diff` the
    /// pages written since the last snapshot).
    fn create_snapshot(
        &mut self,
        snapshot_path: &Path,
        mem_path: &Path,
        diff: bool,
    ) -> Result<(), VmmError>;
    /// A drive's new backing file and/or rate limits (Firecracker's PATCH: buckets left out
    /// keep their settings).
    fn update_drive(
        &mut self,
        id: &str,
        path: Option<&Path>,
        limits: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError>;
    /// An interface's new receive and/or transmit rate limits (PATCH semantics as above).
    fn update_net_rate_limits(
        &mut self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError>;
    /// The balloon's settings as they stand.
    fn balloon_config(&self) -> Result<BalloonConfig, VmmError>;
    /// The balloon's new target.
    fn update_balloon(&mut self, amount_mib: u32) -> Result<(), VmmError>;
    /// The guest's last memory statistics.
    fn balloon_stats(&self) -> Result<BalloonStats, VmmError>;
    /// A new statistics polling interval.
    fn update_balloon_stats_interval(&mut self, seconds: u16) -> Result<(), VmmError>;
    /// Starts a free page hinting run.
    fn start_balloon_hinting(&self, acknowledge_on_stop: bool) -> Result<(), VmmError>;
    /// The hinting run's last host and guest commands.
    fn balloon_hinting_status(&self) -> Result<HintingStatus, VmmError>;
    /// Ends the hinting run.
    fn stop_balloon_hinting(&self) -> Result<(), VmmError>;
}

impl Vmm {
    /// Runs `f` on the balloon and its transport.
    fn with_balloon<R>(
        &self,
        f: impl FnOnce(&mut Balloon, &mut MmioTransport) -> Result<R, BalloonError>,
    ) -> Result<R, VmmError> {
        Ok(self.devices().registry.with_device::<Balloon, _>(
            DeviceKind::Balloon,
            BALLOON_ID,
            f,
        )??)
    }
}

impl RunningVm for Vmm {
    fn resources(&self) -> &VmResources {
        Vmm::resources(self)
    }

    fn is_paused(&self) -> bool {
        Vmm::is_paused(self)
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        Vmm::pause(self).map_err(|e| VmmError::Device(e.to_string()))
    }

    fn resume(&mut self) {
        Vmm::resume(self)
    }

    /// Sends the guest Ctrl+Alt+Del through its legacy devices.
    fn send_ctrl_alt_del(&self) -> Result<(), VmmError> {
        self.devices()
            .legacy
            .send_ctrl_alt_del()
            .map_err(|e| VmmError::Device(format!("Failed to send Ctrl+Alt+Del: {e}")))
    }

    /// Writes a metrics line now, with every device's counters. Without a metrics output there
    /// is nothing to flush, and that is not an error (Firecracker's clients flush on a timer
    /// whether or not metrics were set up).
    fn flush_metrics(&self) -> Result<(), VmmError> {
        match METRICS.flush(&self.devices().registry.metric_groups()) {
            Ok(()) | Err(MetricsError::NotConfigured) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn create_snapshot(
        &mut self,
        snapshot_path: &Path,
        mem_path: &Path,
        diff: bool,
    ) -> Result<(), VmmError> {
        self.snapshot(snapshot_path, mem_path, diff)
            .map_err(|e| VmmError::Device(e.to_string()))
    }

    /// Gives drive `id` the image at `path` (the guest is told its capacity may have changed)
    /// and/or new rate limits: `limits` is Firecracker's PATCH, whose buckets left out keep
    /// their settings. The VM's description changes only once the device took the change.
    fn update_drive(
        &mut self,
        id: &str,
        path: Option<&Path>,
        limits: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError> {
        let stored = self
            .resources()
            .drives
            .iter()
            .position(|d| d.id.as_deref() == Some(id))
            .ok_or_else(|| VmmError::NoDevice(format!("no drive with id {id}")))?;
        let merged =
            limits.map(|patch| merge_limits(self.resources().drives[stored].rate_limiter, patch));
        self.devices().registry.with_device::<Block, _>(
            DeviceKind::Block,
            id,
            |block, transport| {
                if let Some(path) = path {
                    block
                        .update_disk(path)
                        .map_err(|e| VmmError::Device(e.to_string()))?;
                    transport.config_changed();
                }
                if let Some(limits) = &merged {
                    block
                        .update_rate_limiter(limits)
                        .map_err(|e| VmmError::Device(e.to_string()))?;
                }
                Ok::<(), VmmError>(())
            },
        )??;
        let drive = &mut self.resources_mut().drives[stored];
        if let Some(path) = path {
            drive.path = path.to_path_buf();
        }
        if let Some(merged) = merged {
            drive.rate_limiter = merged;
        }
        Ok(())
    }

    /// Gives network interface `id` new receive and/or transmit rate limits (Firecracker's
    /// PATCH: buckets left out keep their settings).
    fn update_net_rate_limits(
        &mut self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), VmmError> {
        let stored = self
            .resources()
            .nets
            .iter()
            .position(|n| n.id.as_deref() == Some(id))
            .ok_or_else(|| VmmError::NoDevice(format!("no network interface with id {id}")))?;
        let net_config = &self.resources().nets[stored];
        let rx = rx.map(|patch| merge_limits(net_config.rx_rate_limiter, patch));
        let tx = tx.map(|patch| merge_limits(net_config.tx_rate_limiter, patch));
        self.devices()
            .registry
            .with_device::<Net, _>(DeviceKind::Net, id, |net, _| {
                net.update_rate_limiters(rx.as_ref(), tx.as_ref())
                    .map_err(|e| VmmError::Device(e.to_string()))
            })??;
        let net_config = &mut self.resources_mut().nets[stored];
        if let Some(rx) = rx {
            net_config.rx_rate_limiter = rx;
        }
        if let Some(tx) = tx {
            net_config.tx_rate_limiter = tx;
        }
        Ok(())
    }

    /// The balloon's settings as they stand (its target included).
    fn balloon_config(&self) -> Result<BalloonConfig, VmmError> {
        self.with_balloon(|balloon, _| Ok(balloon.config()))
    }

    /// Sets the balloon's target (at most the guest's memory); the guest hears of it through a
    /// config-change interrupt.
    fn update_balloon(&mut self, amount_mib: u32) -> Result<(), VmmError> {
        self.resources()
            .check_balloon_size(amount_mib)
            .map_err(|e| VmmError::Device(e.to_string()))?;
        self.with_balloon(|balloon, transport| {
            balloon.set_target_mib(amount_mib)?;
            transport.config_changed();
            Ok(())
        })?;
        if let Some(stored) = self.resources_mut().balloon.as_mut() {
            stored.amount_mib = amount_mib;
        }
        Ok(())
    }

    /// The guest's last memory statistics, with the balloon's target and actual sizes.
    fn balloon_stats(&self) -> Result<BalloonStats, VmmError> {
        self.with_balloon(|balloon, _| balloon.stats())
    }

    /// A new statistics polling interval (statistics cannot be switched on or off once the
    /// guest has the device).
    fn update_balloon_stats_interval(&mut self, seconds: u16) -> Result<(), VmmError> {
        self.with_balloon(|balloon, _| balloon.set_stats_interval(seconds))?;
        if let Some(stored) = self.resources_mut().balloon.as_mut() {
            stored.stats_polling_interval_s = seconds;
        }
        Ok(())
    }

    /// Starts a free page hinting run; with `acknowledge_on_stop` the VMM ends it itself when
    /// the guest says it is done.
    fn start_balloon_hinting(&self, acknowledge_on_stop: bool) -> Result<(), VmmError> {
        self.with_balloon(|balloon, transport| {
            balloon.start_hinting(acknowledge_on_stop)?;
            transport.config_changed();
            Ok(())
        })
    }

    /// The hinting run's last host and guest commands.
    fn balloon_hinting_status(&self) -> Result<HintingStatus, VmmError> {
        self.with_balloon(|balloon, _| balloon.hinting_status())
    }

    /// Ends the hinting run.
    fn stop_balloon_hinting(&self) -> Result<(), VmmError> {
        self.with_balloon(|balloon, transport| {
            balloon.stop_hinting()?;
            transport.config_changed();
            Ok(())
        })
    }
}

/// Firecracker's PATCH semantics for rate limiters: a bucket left out keeps its settings.
fn merge_limits(old: RateLimiterConfig, patch: &RateLimiterConfig) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: patch.bandwidth.or(old.bandwidth),
        ops: patch.ops.or(old.ops),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_rate_limits_keep_buckets_left_out() {
        let bucket = |size| api::models::TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let old = RateLimiterConfig {
            bandwidth: Some(bucket(1000)),
            ops: Some(bucket(10)),
        };
        let patch = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(20)),
        };
        let merged = merge_limits(old, &patch);
        assert_eq!(merged.bandwidth, Some(bucket(1000)));
        assert_eq!(merged.ops, Some(bucket(20)));
    }
}
