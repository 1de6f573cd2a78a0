//! One token bucket with Firecracker's semantics, driven by an explicit clock.
//!
//! Every method that depends on time takes `now: Instant` instead of reading the clock itself, so
//! unit tests can move time forward deterministically; [`super::RateLimiter`] passes
//! `Instant::now()`.
//!
//! Invariants, true between any two calls:
//! - `0 < size` and `0 < refill_time_ms` (a bucket without them is "unlimited" and not built);
//! - `budget <= size` and `one_time_burst <= initial_one_time_burst`;
//! - `debt > 0` implies `budget == 0 && one_time_burst == 0` (debt is only created by taking
//!   everything there was, and refill pays it back before anything else);
//! - `remainder < processed_refill_ns` (a fraction of one token), and `remainder == 0` while the
//!   bucket is full.

use std::time::{Duration, Instant};

use super::TokenBucketConfig;

/// Nanoseconds per millisecond, for converting `refill_time`.
const NS_PER_MS: u128 = 1_000_000;

/// Outcome of [`TokenBucket::reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken. `wait` is how long until the request fits (uncapped).
    Failure { wait: Duration },
    /// The request was larger than the bucket can ever hold: everything available was taken and
    /// the rest recorded as debt. The request is granted, but nothing else will be until the debt
    /// is repaid, which takes `wait` (uncapped).
    OverConsumption { wait: Duration },
}

/// A bucket's spendable state, as a snapshot keeps it (plain data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketBudget {
    /// Tokens in the bucket.
    pub budget: u64,
    /// Burst credit left.
    pub one_time_burst: u64,
    /// Tokens granted beyond the bucket, still to be repaid.
    pub debt: u64,
}

/// A token bucket: holds up to `size` tokens, refilled continuously at `size` tokens per
/// `refill_time` ms, plus a one-time burst credit that is spent first and never refilled.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    size: u64,
    refill_time_ms: u64,
    initial_one_time_burst: u64,
    one_time_burst: u64,
    budget: u64,
    /// Tokens granted beyond what the bucket held (oversize requests); repaid by refill first.
    debt: u64,
    /// `size / gcd(size, refill_ns)`: the refill rate is `processed_capacity / processed_refill_ns`
    /// tokens per ns. Reduced by the gcd so that products stay small, and held as u128 because
    /// `refill_time_ms * 1_000_000` does not fit u64 for large `refill_time` values.
    processed_capacity: u128,
    /// `refill_ns / gcd(size, refill_ns)`; never 0.
    processed_refill_ns: u128,
    /// Fractional token carried between refills, in units of `1 / processed_refill_ns` tokens,
    /// so frequent refills lose nothing to rounding.
    remainder: u128,
    last_update: Instant,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl TokenBucket {
    /// Builds a full bucket, or `None` when `size` or `refill_time` is 0: such a bucket does not
    /// limit anything (Firecracker's rule). `RateLimiterConfig::validate` rejects the inconsistent
    /// cases before this is reached in normal use.
    pub(crate) fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        // Cannot overflow: u64::MAX * 10^6 < 2^84.
        let refill_ns = u128::from(config.refill_time) * NS_PER_MS;
        let size = u128::from(config.size);
        let common = gcd(size, refill_ns);
        let burst = config.one_time_burst.unwrap_or(0);
        Some(TokenBucket {
            size: config.size,
            refill_time_ms: config.refill_time,
            initial_one_time_burst: burst,
            one_time_burst: burst,
            budget: config.size,
            debt: 0,
            processed_capacity: size / common,
            processed_refill_ns: refill_ns / common,
            remainder: 0,
            last_update: now,
        })
    }

    /// What a snapshot keeps of the bucket: its tokens, burst credit and debt as of `now`.
    pub(crate) fn budget_at(&self, now: Instant) -> BucketBudget {
        let mut now_filled = self.clone();
        now_filled.replenish(now);
        BucketBudget {
            budget: now_filled.budget,
            one_time_burst: now_filled.one_time_burst,
            debt: now_filled.debt,
        }
    }

    /// Takes back what [`Self::budget_at`] gave (each value capped at what this bucket's
    /// configuration allows), refilling from `now` on.
    pub(crate) fn restore_budget(&mut self, saved: &BucketBudget, now: Instant) {
        self.budget = saved.budget.min(self.size);
        self.one_time_burst = saved.one_time_burst.min(self.initial_one_time_burst);
        self.debt = saved.debt;
        self.remainder = 0;
        self.last_update = now;
    }

    /// Time for a full refill (`refill_time`), the cap for any timer armed on this bucket.
    pub(crate) fn refill_time(&self) -> Duration {
        Duration::from_millis(self.refill_time_ms)
    }

    #[cfg(test)]
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    #[cfg(test)]
    pub(crate) fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    #[cfg(test)]
    pub(crate) fn debt(&self) -> u64 {
        self.debt
    }

    fn is_full(&self) -> bool {
        self.budget == self.size && self.debt == 0
    }

    /// Adds the tokens earned between `last_update` and `now`: debt is repaid first, then the
    /// budget grows up to `size`. A `now` earlier than `last_update` earns nothing and does not
    /// move the clock back.
    fn replenish(&mut self, now: Instant) {
        let elapsed_ns = now.saturating_duration_since(self.last_update).as_nanos();
        if now > self.last_update {
            self.last_update = now;
        }
        if self.is_full() {
            // Tokens earned while full are lost, and so is any fraction: a full bucket stores none.
            self.remainder = 0;
            return;
        }
        // elapsed_ns * processed_capacity only overflows u128 after more than 2^64 ns (~584 years)
        // have elapsed, when the bucket is certainly full: saturate then.
        let (mut tokens, remainder) = match elapsed_ns
            .checked_mul(self.processed_capacity)
            .and_then(|credit| credit.checked_add(self.remainder))
        {
            Some(credit) => (
                credit / self.processed_refill_ns,
                credit % self.processed_refill_ns,
            ),
            None => (u128::MAX, 0),
        };
        self.remainder = remainder;

        let repaid = tokens.min(u128::from(self.debt));
        // `repaid <= debt`, so both conversions and the subtraction are exact.
        self.debt -= u64::try_from(repaid).unwrap_or(self.debt);
        tokens -= repaid;

        let budget = u128::from(self.budget).saturating_add(tokens);
        self.budget = u64::try_from(budget.min(u128::from(self.size))).unwrap_or(self.size);
        if self.is_full() {
            self.remainder = 0;
        }
    }

    /// How long after the last refill until `tokens` more tokens have been earned (rounded up, so
    /// that a refill at that instant yields them all). Saturates at `Duration::MAX`.
    fn time_to_earn(&self, tokens: u128) -> Duration {
        let needed = tokens
            .checked_mul(self.processed_refill_ns)
            .map(|credit| credit.saturating_sub(self.remainder));
        let Some(needed) = needed else {
            return Duration::MAX;
        };
        // Ceiling division; `processed_capacity` is never 0.
        let ns = needed.div_ceil(self.processed_capacity);
        let secs = ns / 1_000_000_000;
        let subsec = ns % 1_000_000_000;
        match u64::try_from(secs) {
            // `subsec` < 10^9, so the cast is exact.
            Ok(secs) => Duration::new(secs, subsec as u32),
            Err(_) => Duration::MAX,
        }
    }

    /// Tries to take `tokens` at time `now`, one-time burst first, then the budget.
    ///
    /// All-or-nothing for requests that fit in `one_time_burst + size`: on `Failure` nothing is
    /// taken.
    ///
    /// A request larger than `one_time_burst + size` could never be satisfied by waiting, so,
    /// like Firecracker, it is granted at once provided no earlier debt is outstanding: it takes
    /// everything available and the shortfall becomes debt, which refill repays before any
    /// tokens become available again. The long-run rate is therefore still `size` per
    /// `refill_time`.
    pub(crate) fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        self.replenish(now);
        let available = self.one_time_burst.saturating_add(self.budget);
        if self.debt == 0 && tokens <= available {
            let from_burst = tokens.min(self.one_time_burst);
            self.one_time_burst -= from_burst;
            // `tokens - from_burst <= budget` because `tokens <= one_time_burst + budget`.
            self.budget -= tokens - from_burst;
            return Reduction::Success;
        }

        let oversize = u128::from(tokens) > u128::from(self.one_time_burst) + u128::from(self.size);
        if oversize {
            if self.debt == 0 {
                // `tokens > available` here, so the debt is positive and fits u64.
                self.debt = tokens - available;
                self.one_time_burst = 0;
                self.budget = 0;
                return Reduction::OverConsumption {
                    wait: self.time_to_earn(u128::from(self.debt)),
                };
            }
            // Once the debt is repaid the request can go through (taking whatever is there).
            return Reduction::Failure {
                wait: self.time_to_earn(u128::from(self.debt)),
            };
        }

        // With debt outstanding `available` is 0, so this is `debt + tokens` then.
        let missing = u128::from(self.debt) + u128::from(tokens) - u128::from(available);
        Reduction::Failure {
            wait: self.time_to_earn(missing),
        }
    }

    /// Gives back `tokens` (undoing part of an earlier successful `reduce`): debt is cancelled
    /// first; then, while still in the one-time-burst phase, the burst is topped up to its
    /// initial value; the rest goes to the budget, capped at `size`. Anything beyond is dropped,
    /// so this can never grant more than the bucket was configured with.
    pub(crate) fn replenish_manually(&mut self, tokens: u64) {
        let repaid = tokens.min(self.debt);
        self.debt -= repaid;
        let mut tokens = tokens - repaid;
        if self.one_time_burst > 0 {
            let room = self.initial_one_time_burst - self.one_time_burst;
            let to_burst = tokens.min(room);
            self.one_time_burst += to_burst;
            tokens -= to_burst;
        }
        self.budget = self.budget.saturating_add(tokens).min(self.size);
        if self.is_full() {
            self.remainder = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_time: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time,
            },
            now,
        )
        .expect("valid bucket")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn zero_size_or_refill_is_unlimited() {
        let now = Instant::now();
        let cfg = |size, refill_time| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        };
        assert!(TokenBucket::new(&cfg(0, 100), now).is_none());
        assert!(TokenBucket::new(&cfg(100, 0), now).is_none());
        assert!(TokenBucket::new(&cfg(1, 1), now).is_some());
    }

    #[test]
    fn starts_full_and_drains() {
        let t0 = Instant::now();
        let mut b = bucket(1000, None, 1000, t0);
        assert_eq!(b.budget(), 1000);
        assert_eq!(b.reduce(600, t0), Reduction::Success);
        assert_eq!(b.reduce(400, t0), Reduction::Success);
        assert_eq!(b.budget(), 0);
        assert!(matches!(b.reduce(1, t0), Reduction::Failure { .. }));
        assert_eq!(b.reduce(0, t0), Reduction::Success);
    }

    #[test]
    fn refill_is_proportional_and_capped() {
        let t0 = Instant::now();
        let mut b = bucket(1000, None, 1000, t0);
        assert_eq!(b.reduce(1000, t0), Reduction::Success);
        // Half the refill time gives half the tokens.
        b.replenish(t0 + ms(500));
        assert_eq!(b.budget(), 500);
        // A quarter more.
        b.replenish(t0 + ms(750));
        assert_eq!(b.budget(), 750);
        // Never more than size, however long we wait.
        b.replenish(t0 + ms(10_000));
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn refill_keeps_fractions_across_frequent_updates() {
        let t0 = Instant::now();
        // 3 tokens per 1000 ms: one token every 333.33 ms.
        let mut b = bucket(3, None, 1000, t0);
        assert_eq!(b.reduce(3, t0), Reduction::Success);
        // 1000 refills 1 ms apart must add up to the same 3 tokens as one refill after 1000 ms.
        for i in 1..=1000 {
            b.replenish(t0 + ms(i));
        }
        assert_eq!(b.budget(), 3);

        let mut c = bucket(3, None, 1000, t0);
        assert_eq!(c.reduce(3, t0), Reduction::Success);
        c.replenish(t0 + ms(333));
        assert_eq!(c.budget(), 0);
        c.replenish(t0 + Duration::from_nanos(333_333_334));
        assert_eq!(c.budget(), 1);
    }

    #[test]
    fn clock_going_backwards_earns_nothing() {
        let t0 = Instant::now() + ms(1000);
        let mut b = bucket(100, None, 100, t0);
        assert_eq!(b.reduce(100, t0), Reduction::Success);
        b.replenish(t0 - ms(500));
        assert_eq!(b.budget(), 0);
        b.replenish(t0 + ms(10));
        assert_eq!(b.budget(), 10);
    }

    #[test]
    fn failure_wait_is_exact_time_to_tokens() {
        let t0 = Instant::now();
        let mut b = bucket(1000, None, 1000, t0);
        assert_eq!(b.reduce(900, t0), Reduction::Success);
        // 100 available, 300 requested: 200 missing at 1 token/ms.
        assert_eq!(b.reduce(300, t0), Reduction::Failure { wait: ms(200) });
        // Nothing was taken by the failed attempt.
        assert_eq!(b.budget(), 100);
        assert_eq!(b.reduce(300, t0 + ms(200)), Reduction::Success);
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn failure_wait_rounds_up() {
        let t0 = Instant::now();
        // One token every 333.33 ms.
        let mut b = bucket(3, None, 1000, t0);
        assert_eq!(b.reduce(3, t0), Reduction::Success);
        let Reduction::Failure { wait } = b.reduce(1, t0) else {
            panic!("expected failure");
        };
        assert_eq!(wait, Duration::from_nanos(333_333_334));
        assert_eq!(b.reduce(1, t0 + wait), Reduction::Success);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(50), 100, t0);
        assert_eq!(b.reduce(30, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (20, 100));
        // Straddles burst and budget.
        assert_eq!(b.reduce(70, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        // Refill restores the budget only.
        b.replenish(t0 + ms(10_000));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn failed_request_takes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(50), 100, t0);
        assert_eq!(b.reduce(10, t0), Reduction::Success);
        assert_eq!(b.reduce(100, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 40));
        assert_eq!(b.reduce(41, t0), Reduction::Failure { wait: ms(1) });
        assert_eq!((b.one_time_burst(), b.budget(), b.debt()), (0, 40, 0));
    }

    #[test]
    fn oversize_takes_all_and_records_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, None, 100, t0);
        assert_eq!(b.reduce(40, t0), Reduction::Success);
        // 250 > size: granted, 60 available taken, 190 owed, repaid at 1 token/ms.
        assert_eq!(
            b.reduce(250, t0),
            Reduction::OverConsumption { wait: ms(190) }
        );
        assert_eq!((b.budget(), b.debt()), (0, 190));
        // While in debt, even a small request waits for the debt plus itself.
        assert_eq!(b.reduce(10, t0), Reduction::Failure { wait: ms(200) });
        // And another oversize one waits for the debt only.
        assert_eq!(b.reduce(500, t0), Reduction::Failure { wait: ms(190) });
        b.replenish(t0 + ms(100));
        assert_eq!((b.budget(), b.debt()), (0, 90));
        b.replenish(t0 + ms(200));
        assert_eq!((b.budget(), b.debt()), (10, 0));
        assert_eq!(b.reduce(10, t0 + ms(200)), Reduction::Success);
    }

    #[test]
    fn oversize_counts_burst_and_keeps_long_run_rate() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(100), 100, t0);
        // 200 fits burst + size.
        assert_eq!(b.reduce(200, t0), Reduction::Success);
        let mut c = bucket(100, Some(100), 100, t0);
        assert_eq!(
            c.reduce(201, t0),
            Reduction::OverConsumption { wait: ms(1) }
        );
        assert_eq!((c.one_time_burst(), c.budget(), c.debt()), (0, 0, 1));

        // A stream of 1000-token requests on a 100-per-100 ms bucket runs at 1 token/ms.
        let mut d = bucket(100, None, 100, t0);
        let mut now = t0;
        for _ in 0..10 {
            match d.reduce(1000, now) {
                Reduction::OverConsumption { wait } | Reduction::Failure { wait } => now += wait,
                Reduction::Success => panic!("oversize request cannot fit"),
            }
        }
        // First one took the 100 in the bucket; the other 9900 tokens took 9900 ms.
        assert_eq!(now - t0, ms(900 + 9 * 1000));
    }

    #[test]
    fn manual_replenish_order_and_caps() {
        let t0 = Instant::now();
        let mut b = bucket(100, Some(50), 100, t0);
        assert_eq!(b.reduce(20, t0), Reduction::Success);
        b.replenish_manually(15);
        assert_eq!((b.one_time_burst(), b.budget()), (45, 100));
        // Burst back to its initial value; the rest cannot exceed size and is dropped.
        b.replenish_manually(1000);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));

        let mut c = bucket(100, None, 100, t0);
        assert_eq!(c.reduce(100, t0), Reduction::Success);
        c.replenish_manually(30);
        assert_eq!(c.budget(), 30);
        c.replenish_manually(u64::MAX);
        assert_eq!(c.budget(), 100);

        // Debt is cancelled before anything else.
        let mut d = bucket(100, None, 100, t0);
        assert!(matches!(
            d.reduce(150, t0),
            Reduction::OverConsumption { .. }
        ));
        d.replenish_manually(30);
        assert_eq!((d.budget(), d.debt()), (0, 20));
        d.replenish_manually(30);
        assert_eq!((d.budget(), d.debt()), (10, 0));
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = bucket(u64::MAX, Some(u64::MAX), u64::MAX, t0);
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Success);
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Success);
        let Reduction::Failure { wait } = b.reduce(u64::MAX, t0) else {
            panic!("expected failure");
        };
        // Exactly one full refill time, which is u64::MAX ms.
        assert_eq!(wait, Duration::from_millis(u64::MAX));
        b.replenish(t0 + Duration::from_secs(3600));
        assert!(b.budget() > 0 && b.budget() < u64::MAX);

        // Tiny size, huge refill time: next token is far away, no panic.
        let mut c = bucket(1, None, u64::MAX, t0);
        assert_eq!(c.reduce(1, t0), Reduction::Success);
        assert_eq!(
            c.reduce(1, t0),
            Reduction::Failure {
                wait: Duration::from_millis(u64::MAX)
            }
        );
        // Huge debt on a slow bucket: the wait saturates instead of overflowing.
        assert!(matches!(
            c.reduce(u64::MAX, t0),
            Reduction::OverConsumption { .. }
        ));
        assert_eq!(c.debt(), u64::MAX);
        assert!(matches!(
            c.reduce(u64::MAX, t0),
            Reduction::Failure { wait } if wait == Duration::MAX
        ));
        c.replenish(t0 + Duration::from_secs(1_000_000_000));
        assert_eq!(c.debt(), u64::MAX);

        // Huge size, 1 ms refill: a long idle time must saturate, not overflow.
        let mut d = bucket(u64::MAX, None, 1, t0);
        assert_eq!(d.reduce(u64::MAX, t0), Reduction::Success);
        d.replenish(t0 + Duration::from_secs(1_000_000_000));
        assert_eq!(d.budget(), u64::MAX);
        // So long idle (10,000 years) that elapsed_ns * rate overflows u128: saturates to full.
        assert_eq!(d.reduce(u64::MAX, t0), Reduction::Success);
        d.replenish(t0 + Duration::from_secs(10_000 * 365 * 24 * 3600));
        assert_eq!(d.budget(), u64::MAX);
    }
}
