//! Counting and reporting what a guest did wrong without letting it flood the VMM's log.
//!
//! A hostile guest can submit millions of bad requests a second. Each one is counted; the first
//! few are logged in full, then only every [`LOG_EVERY`]th, so the log stays readable and the
//! VMM's output cannot become a denial of service.

/// How many errors are logged in full.
const LOG_FIRST: u64 = 10;
/// After the first few, one error in this many is logged.
const LOG_EVERY: u64 = 10_000;

/// A per-device tally of guest errors.
#[derive(Debug, Default)]
pub struct GuestErrorLog {
    count: u64,
}

impl GuestErrorLog {
    /// Counts an error and logs it when it is one of the first few or a periodic sample.
    pub fn record(&mut self, device: &str, error: &dyn std::fmt::Display) {
        self.count = self.count.saturating_add(1);
        if self.should_log() {
            log::warn!("{device}: guest error #{}: {error}", self.count);
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
