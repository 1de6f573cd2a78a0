//! Firecracker's boot-timer pseudo device: the guest writes the byte 123 at offset 0 of its MMIO
//! window when it has booted (an init script, a test program), and the VMM logs how long that took
//! since the VM started being built, in wall-clock and in process CPU time.
//!
//! Invariants: only a one-byte write of [`BOOT_TIMER_MAGIC`] at offset 0 counts, and only the
//! first one is logged, so a guest cannot fill the VMM's log through this device; reads return
//! zeros. The device never fails: a clock it cannot read reports zero.

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

/// The kernel's `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`, fixed at 100 by the
/// Linux ABI on x86_64 and aarch64.
const USER_HZ: u64 = 100;

/// The CPU time every thread of this process has used so far (user + system, including threads
/// that have ended), from `/proc/self/stat`; `None` if it cannot be read. Its resolution is
/// 1/[`USER_HZ`] s.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_ticks(&stat).map(|ticks| Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from the
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state): utime is its 12th field, stime its 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
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
    fn proc_stat_cpu_fields() {
        let line = "4242 (kiln (vcpu) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(line), Some(12));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
        assert!(process_cpu_time().is_some());
    }
}
