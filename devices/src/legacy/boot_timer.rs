//! Firecracker's boot-timer pseudo device: the guest writes the byte 123 at offset 0 of its MMIO
//! window when it has booted (an init script, a test program), and the VMM logs how long that took
//! since the VM started being built, in wall-clock and in process CPU time.
//!
//! Invariants: only a one-byte write of [`BOOT_TIMER_MAGIC`] at offset 0 counts, and only the
//! first one is logged, so a guest cannot fill the VMM's log through this device; reads return
//! zeros. The device never fails: a clock it cannot read reports zero.

use nix::sys::resource::{getrusage, UsageWho};
use std::time::{Duration, Instant};

use crate::BusDevice;

/// The byte the guest writes to say it has booted (Firecracker's value).
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// The size of the device's MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// How long the guest took to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTime {
    /// Wall-clock time since the timer started.
    pub wall: Duration,
    /// Process CPU time (every thread, user and system) spent since the timer started.
    pub cpu: Duration,
}

impl BootTime {
    /// Firecracker's log line for it, without the `kiln: ` prefix the logger adds.
    pub fn log_line(&self) -> String {
        let us = self.wall.as_micros();
        let cpu_us = self.cpu.as_micros();
        format!(
            "Guest-boot-time = {us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
            us / 1000,
            cpu_us / 1000
        )
    }
}

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    start_cpu: Duration,
    reported: Option<BootTime>,
}

impl BootTimer {
    /// A timer counting from now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            start_cpu: process_cpu_time().unwrap_or_default(),
            reported: None,
        }
    }

    /// The boot time the guest reported, once it has.
    pub fn reported(&self) -> Option<BootTime> {
        self.reported
    }
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_TIMER_MAGIC] || self.reported.is_some() {
            return;
        }
        let cpu = process_cpu_time()
            .unwrap_or_default()
            .saturating_sub(self.start_cpu);
        let time = BootTime {
            wall: self.start.elapsed(),
            cpu,
        };
        log::info!("{}", time.log_line());
        self.reported = Some(time);
    }
}

/// The CPU time every thread of this process has used so far (user + system, including threads
/// that have ended), from `getrusage`; `None` if it cannot be read. One system call and no file:
/// the boot timer runs on a vCPU thread, whose seccomp filter opens no files, and a jailed Kiln
/// has no /proc.
pub fn process_cpu_time() -> Option<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let micros = |t: nix::sys::time::TimeVal| {
        u64::try_from(t.tv_sec())
            .ok()?
            .checked_mul(1_000_000)?
            .checked_add(u64::try_from(t.tv_usec()).ok()?)
    };
    let total = micros(usage.user_time())?.checked_add(micros(usage.system_time())?)?;
    Some(Duration::from_micros(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_magic_byte_at_offset_0_counts() {
        let mut timer = BootTimer::new();
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0]);
        timer.write(0, &[122]);
        timer.write(0, &[]);
        assert_eq!(timer.reported(), None);
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = timer.reported().expect("reported");
        assert!(first.wall >= Duration::from_millis(2), "{first:?}");
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(
            timer.reported(),
            Some(first),
            "a second write changes nothing"
        );
        let mut data = [0xffu8; 4];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn firecrackers_log_line() {
        let time = BootTime {
            wall: Duration::from_micros(123_456),
            cpu: Duration::from_micros(1_234),
        };
        assert_eq!(
            time.log_line(),
            "Guest-boot-time = 123456 us 123 ms,   1234 CPU us 1 CPU ms"
        );
    }

    #[test]
    fn process_cpu_time_grows_with_work() {
        let before = process_cpu_time().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu_time().unwrap() > before);
    }
}
