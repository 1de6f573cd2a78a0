//! When the process started, for Firecracker's `api_server.process_startup_time_us` and
//! `process_startup_time_cpu_us`.
//!
//! Kiln counts from its own `main` unless it is told otherwise: Firecracker's jailer passes the
//! VMM `--start-time-us` (its own start, on CLOCK_MONOTONIC), `--start-time-cpu-us` (the VMM
//! process's CPU time when it was exec'd) and `--parent-cpu-time-us` (the CPU time the jailer
//! spent), so that the start-up figures include the jail's set-up. `kiln jail` passes the same.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// Microseconds on `clock`, or `None` if it cannot be read.
fn micros(clock: ClockId) -> Option<u64> {
    let now = clock_gettime(clock).ok()?;
    u64::try_from(now.tv_sec())
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(u64::try_from(now.tv_nsec()).ok()? / 1000)
}

/// CLOCK_MONOTONIC in microseconds: the clock `--start-time-us` is on.
pub fn monotonic_us() -> Option<u64> {
    micros(ClockId::CLOCK_MONOTONIC)
}

/// This process's CPU time in microseconds (all its threads): the clock `--start-time-cpu-us`
/// is on.
pub fn process_cpu_us() -> Option<u64> {
    micros(ClockId::CLOCK_PROCESS_CPUTIME_ID)
}

/// Where the start-up figures count from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupClock {
    /// The start on CLOCK_MONOTONIC, in microseconds.
    wall_us: Option<u64>,
    /// The process's CPU time at the start, in microseconds.
    cpu_us: Option<u64>,
    /// CPU time spent before the start by whoever started the process.
    parent_cpu_us: u64,
}

impl StartupClock {
    /// Counts from now (call it first thing in `main`).
    pub fn now() -> Self {
        Self {
            wall_us: monotonic_us(),
            cpu_us: process_cpu_us(),
            parent_cpu_us: 0,
        }
    }

    /// Counts from the times a launcher passed instead, where it passed them.
    pub fn with_launcher_times(
        self,
        start_us: Option<u64>,
        start_cpu_us: Option<u64>,
        parent_cpu_us: Option<u64>,
    ) -> Self {
        Self {
            wall_us: start_us.or(self.wall_us),
            cpu_us: start_cpu_us.or(self.cpu_us),
            parent_cpu_us: parent_cpu_us.unwrap_or(self.parent_cpu_us),
        }
    }

    /// The wall-clock time since the start (zero for a start in the future) and the CPU time
    /// spent since it, the parent's included; `None` where a clock could not be read.
    pub fn elapsed(&self) -> (Option<Duration>, Option<Duration>) {
        self.elapsed_at(monotonic_us(), process_cpu_us())
    }

    fn elapsed_at(
        &self,
        now_us: Option<u64>,
        now_cpu_us: Option<u64>,
    ) -> (Option<Duration>, Option<Duration>) {
        let wall = now_us
            .zip(self.wall_us)
            .map(|(now, start)| Duration::from_micros(now.saturating_sub(start)));
        let cpu = now_cpu_us.zip(self.cpu_us).map(|(now, start)| {
            Duration::from_micros(now.saturating_sub(start).saturating_add(self.parent_cpu_us))
        });
        (wall, cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_times_replace_the_own_start() {
        let own = StartupClock {
            wall_us: Some(1_000),
            cpu_us: Some(10),
            parent_cpu_us: 0,
        };
        assert_eq!(
            own.elapsed_at(Some(5_000), Some(60)),
            (
                Some(Duration::from_micros(4_000)),
                Some(Duration::from_micros(50))
            )
        );
        let jailed = own.with_launcher_times(Some(500), Some(0), Some(700));
        assert_eq!(
            jailed.elapsed_at(Some(5_000), Some(60)),
            (
                Some(Duration::from_micros(4_500)),
                Some(Duration::from_micros(760))
            )
        );
        // A start in the future (a launcher's clock mix-up) is zero, not a wrap-around.
        let future = own.with_launcher_times(Some(9_000), None, None);
        assert_eq!(future.elapsed_at(Some(5_000), None).0, Some(Duration::ZERO));
        assert_eq!(future.elapsed_at(None, None), (None, None));
    }

    #[test]
    fn the_clocks_read_here() {
        let a = monotonic_us().unwrap();
        let b = monotonic_us().unwrap();
        assert!(b >= a);
        assert!(process_cpu_us().is_some());
    }
}
