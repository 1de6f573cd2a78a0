//! The PC's CMOS real-time clock (an MC146818 behind ports 0x70/0x71), so the guest reads the
//! host's wall-clock time at boot instead of failing ("Unable to read current time from RTC")
//! and starting in 1970 where no paravirtual clock tells it the time.
//!
//! The guest writes a register index to port 0x70 (bit 7 is the NMI mask, ignored) and reads or
//! writes the register at 0x71. The time registers read the host's UTC clock at that moment, in
//! BCD unless the guest set binary mode in status register B, always in 24-hour mode; writes to
//! them are ignored (a guest cannot set the host's clock, and needs no clock of its own).
//! Status A never shows an update in progress, status D says the battery is good, and the rest
//! of the 128 bytes is plain NVRAM. No interrupts are raised (no alarms, no periodic ticks).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// The index port; the data port follows it.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// Two ports: index and data.
pub const CMOS_PORT_LEN: u64 = 2;

mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const WEEKDAY: u8 = 0x06;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const STATUS_A: u8 = 0x0a;
    pub const STATUS_B: u8 = 0x0b;
    pub const STATUS_C: u8 = 0x0c;
    pub const STATUS_D: u8 = 0x0d;
    /// Where PCs keep the century (what ACPI's FADT names by default).
    pub const CENTURY: u8 = 0x32;
}

/// Status A: the 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B's binary-mode bit (clear: BCD).
const STATUS_B_BINARY: u8 = 0x04;
/// Status B's 24-hour bit.
const STATUS_B_24H: u8 = 0x02;
/// Status D's "valid RAM and time" bit: the battery is good.
const STATUS_D_VRT: u8 = 0x80;

/// A date and time of day, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    /// The year, e.g. 2026.
    pub year: i64,
    /// 1 ..= 12.
    pub month: u8,
    /// 1 ..= 31.
    pub day: u8,
    /// 0 ..= 23.
    pub hour: u8,
    /// 0 ..= 59.
    pub minute: u8,
    /// 0 ..= 59.
    pub second: u8,
    /// 0 (Sunday) ..= 6.
    pub weekday: u8,
}

impl CivilTime {
    /// The UTC date and time `unix_seconds` after 1970-01-01 (days from the epoch to a civil
    /// date by the proleptic Gregorian calendar's 400-year cycle).
    pub fn from_unix(unix_seconds: i64) -> Self {
        let days = unix_seconds.div_euclid(86_400);
        let secs = unix_seconds.rem_euclid(86_400);
        // Shift the epoch to 0000-03-01, so leap days fall at the end of a year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        // Every value is within its field's range by construction.
        Self {
            year,
            month: month as u8,
            day: day as u8,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }
}

/// What the guest did with the clock that it has no effect for, under Firecracker's `rtc`
/// metric names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RtcCounters {
    /// Reads of the write-only index port.
    pub missed_read_count: u64,
    /// Writes to registers the clock keeps itself (the time, status A, C and D), which change
    /// nothing.
    pub missed_write_count: u64,
}

/// The clock and its NVRAM.
pub struct CmosRtc {
    index: u8,
    nvram: [u8; 128],
    counters: RtcCounters,
    /// The wall clock, in seconds since the Unix epoch (the host's, or a test's).
    now: Box<dyn Fn() -> i64 + Send>,
}

impl std::fmt::Debug for CmosRtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmosRtc")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl CmosRtc {
    /// A clock reading the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        }))
    }

    /// A clock reading `now` (seconds since the Unix epoch).
    pub fn with_clock(now: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(reg::STATUS_B)] = STATUS_B_24H;
        Self {
            index: 0,
            nvram,
            counters: RtcCounters::default(),
            now,
        }
    }

    /// The counters under Firecracker's `rtc` metric field names.
    pub fn metric_values(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("missed_read_count", self.counters.missed_read_count),
            ("missed_write_count", self.counters.missed_write_count),
        ]
    }

    /// What a snapshot keeps of the clock: its index register and NVRAM (the time is the
    /// host's, read at each access).
    pub fn save(&self) -> (u8, Vec<u8>) {
        (self.index, self.nvram.to_vec())
    }

    /// Takes back what [`Self::save`] gave; NVRAM of another size is ignored.
    pub fn restore(&mut self, index: u8, nvram: &[u8]) {
        self.index = index & 0x7f;
        if let Ok(nvram) = <[u8; 128]>::try_from(nvram) {
            self.nvram = nvram;
        }
    }

    fn encode(&self, value: u8) -> u8 {
        if self.nvram[usize::from(reg::STATUS_B)] & STATUS_B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// The value of register `index`.
    fn register(&self, index: u8) -> u8 {
        let time = || CivilTime::from_unix((self.now)());
        match index {
            reg::SECONDS => self.encode(time().second),
            reg::MINUTES => self.encode(time().minute),
            reg::HOURS => self.encode(time().hour),
            // 1 (Sunday) ..= 7.
            reg::WEEKDAY => self.encode(time().weekday + 1),
            reg::DAY => self.encode(time().day),
            reg::MONTH => self.encode(time().month),
            reg::YEAR => self.encode(time().year.rem_euclid(100) as u8),
            reg::CENTURY => self.encode(time().year.div_euclid(100).clamp(0, 99) as u8),
            reg::STATUS_A => STATUS_A_VALUE,
            reg::STATUS_C => 0,
            reg::STATUS_D => STATUS_D_VRT,
            other => self.nvram[usize::from(other & 0x7f)],
        }
    }

    fn set_register(&mut self, index: u8, value: u8) {
        match index {
            reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::WEEKDAY
            | reg::DAY
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY
            | reg::STATUS_A
            | reg::STATUS_C
            | reg::STATUS_D => self.counters.missed_write_count += 1,
            // 24-hour mode stays on: the clock has no 12-hour form.
            reg::STATUS_B => self.nvram[usize::from(index)] = value | STATUS_B_24H,
            other => self.nvram[usize::from(other & 0x7f)] = value,
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => self.register(self.index),
            // The index port is write-only on a PC; it reads as the floating bus does.
            _ => {
                self.counters.missed_read_count += 1;
                0xff
            }
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            0 => self.index = value & 0x7f,
            1 => self.set_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(0, &[index | 0x80]);
        let mut value = [0u8];
        rtc.read(1, &mut value);
        value[0]
    }

    #[test]
    fn civil_dates() {
        let t = CivilTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 4));
        // 2026-12-04 19:54:00 UTC, a Friday.
        let t = CivilTime::from_unix(1_796_414_040);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 12, 4, 19, 54, 0, 5)
        );
        // A leap day, and the last second of a century year that is one.
        let t = CivilTime::from_unix(951_782_400);
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
        let t = CivilTime::from_unix(978_307_199);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2000, 12, 31, 23, 59, 59)
        );
        let t = CivilTime::from_unix(-1);
        assert_eq!((t.year, t.month, t.day, t.second), (1969, 12, 31, 59));
    }

    #[test]
    fn the_guest_reads_the_host_time_in_bcd_or_binary() {
        let mut rtc = CmosRtc::with_clock(Box::new(|| 1_796_414_047));
        assert_eq!(read(&mut rtc, reg::SECONDS), 0x07);
        assert_eq!(read(&mut rtc, reg::MINUTES), 0x54);
        assert_eq!(read(&mut rtc, reg::HOURS), 0x19);
        assert_eq!(read(&mut rtc, reg::WEEKDAY), 0x06);
        assert_eq!(read(&mut rtc, reg::DAY), 0x04);
        assert_eq!(read(&mut rtc, reg::MONTH), 0x12);
        assert_eq!(read(&mut rtc, reg::YEAR), 0x26);
        assert_eq!(read(&mut rtc, reg::CENTURY), 0x20);
        assert_eq!(
            read(&mut rtc, reg::STATUS_A) & 0x80,
            0,
            "no update in progress"
        );
        assert_eq!(read(&mut rtc, reg::STATUS_D), STATUS_D_VRT);
        // Binary mode, as a guest may ask; 24-hour mode stays.
        rtc.write(0, &[reg::STATUS_B]);
        rtc.write(1, &[STATUS_B_BINARY]);
        assert_eq!(
            read(&mut rtc, reg::STATUS_B),
            STATUS_B_BINARY | STATUS_B_24H
        );
        assert_eq!(read(&mut rtc, reg::SECONDS), 7);
        assert_eq!(read(&mut rtc, reg::YEAR), 26);
        // The time cannot be set; NVRAM keeps what is written.
        rtc.write(0, &[reg::SECONDS]);
        rtc.write(1, &[0]);
        assert_eq!(read(&mut rtc, reg::SECONDS), 7);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        let mut index = [0u8];
        rtc.read(0, &mut index);
        assert_eq!(index[0], 0xff);
        rtc.write(1, &[]);
    }

    #[test]
    fn accesses_that_do_nothing_are_counted() {
        let mut rtc = CmosRtc::with_clock(Box::new(|| 0));
        let mut value = [0u8];
        rtc.read(0, &mut value);
        rtc.write(0, &[reg::SECONDS]);
        rtc.write(1, &[0x30]);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x30]);
        assert_eq!(
            rtc.metric_values(),
            [("missed_read_count", 1), ("missed_write_count", 1)]
        );
    }
}
