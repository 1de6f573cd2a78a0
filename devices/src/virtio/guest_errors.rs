//! Counting and reporting what a guest did wrong without letting it flood the VMM's log.
//!
//! A hostile guest can submit millions of bad requests a second. Each one is counted; the first
//! few are logged in full, then only every [`LOG_EVERY`]th, so the log stays readable and the
//! VMM's output cannot become a denial of service.

/// How many errors are logged in full.
const LOG_FIRST: u64 = 10;
/// After the first few, one error in this many is logged.
const LOG_EVERY: u64 = 10_000;

/// A per-device tally of guest errors, or (made by [`GuestErrorLog::host`]) of the host-side
/// failures the guest's requests met (a full disk, EIO, a deleted TAP), which are as many as the
/// guest asks for and so are sampled the same way.
#[derive(Debug, Default)]
pub struct GuestErrorLog {
    count: u64,
    host: bool,
}

impl GuestErrorLog {
    /// A tally of host-side I/O failures: logged as such, so that a full disk does not read as
    /// something the guest did wrong.
    pub fn host() -> Self {
        GuestErrorLog {
            count: 0,
            host: true,
        }
    }

    /// Counts an error and logs it when it is one of the first few or a periodic sample.
    pub fn record(&mut self, device: &str, error: &dyn std::fmt::Display) {
        self.count = self.count.saturating_add(1);
        if self.should_log() {
            let what = if self.host {
                "host I/O error"
            } else {
                "guest error"
            };
            log::warn!("{device}: {what} #{}: {error}", self.count);
        }
    }

    /// How many errors were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn should_log(&self) -> bool {
        self.count <= LOG_FIRST || self.count.is_multiple_of(LOG_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_few_then_samples() {
        let mut log = GuestErrorLog::default();
        let mut logged = 0;
        for _ in 0..30_000 {
            log.count += 1;
            if log.should_log() {
                logged += 1;
            }
        }
        assert_eq!(logged, LOG_FIRST + 3);
        log.record("test", &"boom");
        assert_eq!(log.count(), 30_001);
    }
}
