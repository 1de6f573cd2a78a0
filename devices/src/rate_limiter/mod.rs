//! Token-bucket rate limiting for virtio devices, with Firecracker's semantics.
//!
//! A [`RateLimiter`] holds up to two [`TokenBucket`](token_bucket::TokenBucket)s: one counting
//! bytes ([`TokenType::Bytes`]) and one counting operations ([`TokenType::Ops`]). A device asks
//! [`RateLimiter::consume`] before doing work; when it is refused, the limiter is *blocked* and its
//! timerfd (see [`AsRawFd`]) becomes readable once enough tokens should be there. The device's
//! event loop then calls [`RateLimiter::event_handler`] and retries its queue.
//!
//! Configuration comes in Firecracker's JSON shape ([`RateLimiterConfig`]) or from Cloud
//! Hypervisor-style `bw_size=…,ops_refill_time=…` CLI keys ([`RateLimiterConfig::parse_cli_key`]).

pub(crate) mod token_bucket;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

pub use token_bucket::BucketBudget;
use token_bucket::{Reduction, TokenBucket};

/// Shortest timer the limiter arms. Waiting at least this long batches wake-ups when requests
/// are small next to the refill rate, instead of waking once per token.
const MIN_TIMER_DURATION: Duration = Duration::from_millis(1);

/// Errors from configuring or running a [`RateLimiter`].
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// Creating, arming or reading the timerfd failed.
    #[error("rate limiter timerfd: {0}")]
    TimerFd(#[source] io::Error),
    /// `event_handler` was called but the timer has not expired (or was never armed).
    #[error("spurious rate limiter event: the timer has not expired")]
    SpuriousEvent,
    /// A rate limiter CLI key had a value that is not an unsigned 64-bit integer.
    #[error("invalid value {value:?} for {key}: expected an unsigned integer")]
    InvalidCliValue {
        /// The CLI key, e.g. `ops_size`.
        key: String,
        /// The value given for it.
        value: String,
    },
    /// The configuration's values contradict each other.
    #[error("inconsistent rate limiter configuration: {0}")]
    Inconsistent(String),
}

/// One token bucket, in Firecracker's JSON shape:
/// `{"size": u64, "one_time_burst": u64 (optional), "refill_time": u64 ms}`.
///
/// `size` tokens are refilled every `refill_time` milliseconds, continuously; `one_time_burst` is
/// extra initial credit, spent first and never refilled. `size == 0` (with `refill_time == 0`
/// and no burst) means "no limit".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket capacity in tokens (bytes or operations).
    pub size: u64,
    /// Extra initial tokens, spent before `size` and never refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket to `size`.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    fn validate(&self, name: &str) -> Result<(), RateLimiterError> {
        let burst = self.one_time_burst.unwrap_or(0);
        if self.size > 0 && self.refill_time == 0 {
            return Err(RateLimiterError::Inconsistent(format!(
                "{name}: size {} needs a non-zero refill_time",
                self.size
            )));
        }
        // Stricter than Firecracker, which silently ignores these: a refill time or burst with no
        // size is almost certainly a forgotten `size`, and would otherwise mean "unlimited".
        if self.size == 0 && (self.refill_time > 0 || burst > 0) {
            return Err(RateLimiterError::Inconsistent(format!(
                "{name}: refill_time {} / one_time_burst {burst} given without a size \
                 (a size of 0 disables the bucket)",
                self.refill_time
            )));
        }
        Ok(())
    }
}

/// A rate limiter's configuration, in Firecracker's JSON shape:
/// `{"bandwidth": TokenBucket (optional), "ops": TokenBucket (optional)}`.
/// An absent bucket does not limit anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Limit on bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Limit on operations (requests, packets, …).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Parses one Cloud Hypervisor-style device option.
    ///
    /// Returns `Ok(true)` if `key` is one of `bw_size`, `bw_one_time_burst`, `bw_refill_time`,
    /// `ops_size`, `ops_one_time_burst`, `ops_refill_time` (and stores the value), `Ok(false)` if
    /// the key belongs to someone else, and an error if the value is not a `u64`. A repeated key
    /// overwrites the earlier value. Call [`validate`](Self::validate) once all keys are parsed.
    pub fn parse_cli_key(&mut self, key: &str, value: &str) -> Result<bool, RateLimiterError> {
        let (bucket, field) = match key.split_once('_') {
            Some(("bw", field)) => (&mut self.bandwidth, field),
            Some(("ops", field)) => (&mut self.ops, field),
            _ => return Ok(false),
        };
        if !matches!(field, "size" | "one_time_burst" | "refill_time") {
            return Ok(false);
        }
        let parsed: u64 = value
            .parse()
            .map_err(|_| RateLimiterError::InvalidCliValue {
                key: key.to_string(),
                value: value.to_string(),
            })?;
        let bucket = bucket.get_or_insert_with(TokenBucketConfig::default);
        match field {
            "size" => bucket.size = parsed,
            "one_time_burst" => bucket.one_time_burst = Some(parsed),
            _ => bucket.refill_time = parsed,
        }
        Ok(true)
    }

    /// Checks that each bucket is either disabled (all zero) or complete: a non-zero `size` needs
    /// a non-zero `refill_time`, and `refill_time` / `one_time_burst` need a non-zero `size`.
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.validate("bandwidth")?;
        }
        if let Some(ops) = &self.ops {
            ops.validate("ops")?;
        }
        Ok(())
    }
}

/// What a [`RateLimiter::consume`] call counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes, charged to the `bandwidth` bucket.
    Bytes,
    /// Operations, charged to the `ops` bucket.
    Ops,
}

/// A bandwidth and an operations token bucket plus the timer that tells the event loop when a
/// blocked limiter may be retried.
///
/// Invariant: `blocked` is true exactly while a timer armed by this limiter is pending or has
/// expired without `event_handler` having consumed the expiration. So a blocked limiter always
/// becomes readable eventually, and an unblocked one never is.
///
/// The event loop must only poll the fd (level-triggered is fine) and never read it itself.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer_fd: TimerFd,
    blocked: bool,
}

/// What a snapshot keeps of a rate limiter: each bucket's budget (`None` for a bucket that does
/// not limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterBudgets {
    /// The bandwidth bucket's.
    pub bandwidth: Option<BucketBudget>,
    /// The operations bucket's.
    pub ops: Option<BucketBudget>,
}

impl RateLimiter {
    /// The buckets' budgets now, for a snapshot.
    pub fn budgets(&self) -> RateLimiterBudgets {
        let now = Instant::now();
        RateLimiterBudgets {
            bandwidth: self.bandwidth.as_ref().map(|b| b.budget_at(now)),
            ops: self.ops.as_ref().map(|b| b.budget_at(now)),
        }
    }

    /// Takes back a snapshot's budgets: a restored guest cannot start with full buckets what
    /// it had spent. A bucket this limiter does not have is skipped.
    pub fn restore_budgets(&mut self, saved: &RateLimiterBudgets) {
        let now = Instant::now();
        for (bucket, saved) in [
            (self.bandwidth.as_mut(), saved.bandwidth.as_ref()),
            (self.ops.as_mut(), saved.ops.as_ref()),
        ] {
            if let (Some(bucket), Some(saved)) = (bucket, saved) {
                bucket.restore_budget(saved, now);
            }
        }
    }

    /// Builds a limiter after [`validating`](RateLimiterConfig::validate) `config`. Absent buckets
    /// and buckets of size 0 do not limit. Buckets start full.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        Self::new_at(config, Instant::now())
    }

    /// A limiter that never refuses anything (it still owns a timerfd, which never fires).
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(&RateLimiterConfig::default())
    }

    fn new_at(config: &RateLimiterConfig, now: Instant) -> Result<Self, RateLimiterError> {
        let timer_fd = TimerFd::new().map_err(|e| RateLimiterError::TimerFd(e.into()))?;
        Ok(RateLimiter {
            bandwidth: config
                .bandwidth
                .as_ref()
                .and_then(|c| TokenBucket::new(c, now)),
            ops: config.ops.as_ref().and_then(|c| TokenBucket::new(c, now)),
            timer_fd,
            blocked: false,
        })
    }

    /// Tries to take `tokens` of `token_type`.
    ///
    /// - Enough tokens: they are taken, `true`.
    /// - Not enough: nothing is taken, `false`, and the limiter becomes blocked with its timer
    ///   armed for when the request would fit (at least 1 ms, at most the bucket's
    ///   `refill_time`; when that cap is hit the device simply retries and waits again).
    /// - More than the bucket can ever hold (`tokens > one_time_burst + size`): as in
    ///   Firecracker, granted (`true`) if no earlier such debt is outstanding: everything in the
    ///   bucket is taken, the shortfall becomes a debt repaid by refill before anything else is
    ///   granted, and the limiter blocks until then. The long-run rate stays `size` per
    ///   `refill_time`, and an oversize request can never stall forever.
    ///
    /// Calling this while blocked still consults the bucket (the other bucket may have room);
    /// a refusal then leaves the pending timer as it is.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        self.consume_at(tokens, token_type, Instant::now())
    }

    fn consume_at(&mut self, tokens: u64, token_type: TokenType, now: Instant) -> bool {
        let Some(bucket) = self.bucket_mut(token_type) else {
            return true;
        };
        let cap = bucket.refill_time();
        match bucket.reduce(tokens, now) {
            Reduction::Success => true,
            // If the timer cannot be armed, nothing would ever unblock the device: let the
            // request through rather than stall the guest's queue forever. (timerfd_settime only
            // fails on a bad fd or bad values, neither of which happens here.)
            Reduction::Failure { wait } => !self.block(wait, cap),
            Reduction::OverConsumption { wait } => {
                self.block(wait, cap);
                true
            }
        }
    }

    /// Arms the timer for `wait`, clamped to `[MIN_TIMER_DURATION, cap]`, unless one is already
    /// pending. Returns whether the limiter is now blocked.
    fn block(&mut self, wait: Duration, cap: Duration) -> bool {
        if self.blocked {
            return true;
        }
        // `cap` (a refill_time) is at least 1 ms, so the result is never zero, which would
        // disarm the timer instead of arming it.
        let duration = wait.max(MIN_TIMER_DURATION).min(cap);
        if self.timer_fd.reset(duration, None).is_ok() {
            self.blocked = true;
        }
        self.blocked
    }

    fn bucket_mut(&mut self, token_type: TokenType) -> Option<&mut TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Gives back `tokens` of `token_type`, e.g. the op taken for a request whose bytes were then
    /// refused. Outstanding debt is cancelled first, then the one-time burst (if still being
    /// spent) and the budget are topped up, never beyond their configured values. Does not
    /// unblock the limiter: the pending timer still fires.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        if let Some(bucket) = self.bucket_mut(token_type) {
            bucket.replenish_manually(tokens);
        }
    }

    /// Whether the last refusal's timer has not yet been handled by
    /// [`event_handler`](Self::event_handler). Devices should not process their queues while
    /// blocked.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Handles the timerfd becoming readable: consumes the expiration and unblocks the limiter.
    ///
    /// Returns [`RateLimiterError::SpuriousEvent`] (and changes nothing) when the limiter is not
    /// blocked or its timer has not expired yet.
    ///
    /// Never blocks. vmm-sys-util's `TimerFd` is created without `TFD_NONBLOCK`, and setting it
    /// afterwards needs `unsafe` `fcntl`; instead the fd is only read once the one-shot timer
    /// this limiter armed reports itself disarmed, i.e. has expired, when `read` returns at once.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        if !self.blocked {
            return Err(RateLimiterError::SpuriousEvent);
        }
        let pending = self
            .timer_fd
            .is_armed()
            .map_err(|e| RateLimiterError::TimerFd(e.into()))?;
        if pending {
            return Err(RateLimiterError::SpuriousEvent);
        }
        self.timer_fd
            .wait()
            .map_err(|e| RateLimiterError::TimerFd(e.into()))?;
        self.blocked = false;
        Ok(())
    }

    /// Replaces both buckets (e.g. on a PATCH after boot), keeping the timerfd. New buckets start
    /// full; an absent bucket, or one with size or refill_time 0, stops limiting. Callers should
    /// [`validate`](RateLimiterConfig::validate) `config` first.
    ///
    /// A blocked limiter stays blocked, but its timer is re-armed to fire at once so the device
    /// retries against the new buckets instead of waiting out a delay computed for the old ones.
    pub fn update_buckets(&mut self, config: &RateLimiterConfig) {
        let now = Instant::now();
        self.bandwidth = config
            .bandwidth
            .as_ref()
            .and_then(|c| TokenBucket::new(c, now));
        self.ops = config.ops.as_ref().and_then(|c| TokenBucket::new(c, now));
        if self.blocked {
            // On failure the old timer is left untouched and still fires, so the invariant holds
            // either way.
            let _ = self.timer_fd.reset(Duration::from_nanos(1), None);
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to poll for readability; see [`RateLimiter::event_handler`].
    fn as_raw_fd(&self) -> RawFd {
        self.timer_fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(size: u64, one_time_burst: Option<u64>, refill_time: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst,
            refill_time,
        }
    }

    /// Polls `event_handler` until the timer has fired. Only bounds the wait from above (5 s, far
    /// beyond the ≤ 20 ms timers used here), so it is not sensitive to scheduling delays.
    fn wait_for_unblock(limiter: &mut RateLimiter) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match limiter.event_handler() {
                Ok(()) => return,
                Err(RateLimiterError::SpuriousEvent) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("limiter did not unblock: {e}"),
            }
        }
    }

    #[test]
    fn unlimited_never_blocks() {
        let t0 = Instant::now();
        let configs = [
            RateLimiterConfig::default(),
            RateLimiterConfig {
                bandwidth: Some(tb(0, None, 0)),
                ops: Some(tb(0, None, 0)),
            },
            // Only ops limited: bytes stay unlimited.
            RateLimiterConfig {
                bandwidth: None,
                ops: Some(tb(1, None, 1000)),
            },
        ];
        for config in &configs {
            let mut l = RateLimiter::new_at(config, t0).unwrap();
            for _ in 0..1000 {
                assert!(l.consume_at(u64::MAX, TokenType::Bytes, t0));
            }
            assert!(!l.is_blocked());
        }
        let mut l = RateLimiter::unlimited().unwrap();
        assert!(l.consume(u64::MAX, TokenType::Ops));
        assert!(l.consume(u64::MAX, TokenType::Bytes));
        assert!(!l.is_blocked());
        assert!(matches!(
            l.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
    }

    #[test]
    fn refusal_blocks_and_arms_timer() {
        let t0 = Instant::now();
        // One byte per 10 s: the timer is armed for 10 s and cannot fire during this test.
        let config = RateLimiterConfig {
            bandwidth: Some(tb(1, None, 10_000)),
            ops: Some(tb(10, None, 10_000)),
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(1, TokenType::Bytes, t0));
        assert!(!l.is_blocked());
        assert!(!l.consume_at(1, TokenType::Bytes, t0));
        assert!(l.is_blocked());
        assert!(l.timer_fd.is_armed().unwrap());
        // Not expired yet: spurious, still blocked.
        assert!(matches!(
            l.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(l.is_blocked());
        // The other bucket is independent.
        assert!(l.consume_at(10, TokenType::Ops, t0));
        // Time passing (as seen by the buckets) makes room again.
        assert!(l.consume_at(1, TokenType::Bytes, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn timer_fires_and_event_handler_unblocks() {
        let t0 = Instant::now();
        // 20 ms refill: the timer is armed for at most 20 ms.
        let config = RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(1, None, 20)),
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));
        assert!(l.is_blocked());
        wait_for_unblock(&mut l);
        assert!(!l.is_blocked());
        assert!(!l.timer_fd.is_armed().unwrap());
        // The expiration was consumed: a second call is spurious (and does not block on read).
        assert!(matches!(
            l.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(l.consume_at(1, TokenType::Ops, t0 + Duration::from_millis(20)));
    }

    #[test]
    fn timer_is_capped_to_refill_time() {
        let t0 = Instant::now();
        // Debt of ~1000 refill times, but the timer is capped to one refill time (20 ms).
        let config = RateLimiterConfig {
            bandwidth: Some(tb(10, None, 20)),
            ops: None,
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(10_000, TokenType::Bytes, t0));
        assert!(l.is_blocked());
        wait_for_unblock(&mut l);
        // Still in debt at t0 + 20 ms: refused again and blocked again.
        assert!(!l.consume_at(1, TokenType::Bytes, t0 + Duration::from_millis(20)));
        assert!(l.is_blocked());
    }

    #[test]
    fn oversize_consume_is_granted_then_blocks() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(tb(100, None, 10_000)),
            ops: None,
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(1000, TokenType::Bytes, t0));
        assert!(l.is_blocked());
        // The debt (900 tokens = 90 s) must be repaid before anything else goes through.
        assert!(!l.consume_at(1, TokenType::Bytes, t0 + Duration::from_secs(89)));
        assert!(l.consume_at(1, TokenType::Bytes, t0 + Duration::from_millis(90_100)));
    }

    #[test]
    fn manual_replenish_undoes_consume() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(tb(100, None, 10_000)),
            ops: Some(tb(1, None, 10_000)),
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(60, TokenType::Bytes, t0));
        // A request takes its op, then its bytes are refused: give the op back.
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(60, TokenType::Bytes, t0));
        l.manual_replenish(1, TokenType::Ops);
        assert!(l.is_blocked(), "replenishing does not unblock");
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));
        // Cannot exceed the bucket size.
        l.manual_replenish(u64::MAX, TokenType::Ops);
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(!l.consume_at(1, TokenType::Ops, t0));
        // On an unlimited type it is a no-op.
        let mut u = RateLimiter::unlimited().unwrap();
        u.manual_replenish(5, TokenType::Bytes);
        assert!(u.consume(5, TokenType::Bytes));
    }

    #[test]
    fn update_buckets_replaces_and_wakes_a_blocked_limiter() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(tb(10, None, 10_000)),
            ops: None,
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        let fd = l.as_raw_fd();
        assert!(l.consume_at(10, TokenType::Bytes, t0));
        assert!(!l.consume_at(10, TokenType::Bytes, t0));
        assert!(l.is_blocked());
        // The pending timer is for 10 s, beyond wait_for_unblock's 5 s bound: unblocking below
        // proves the update re-armed it to fire at once.
        l.update_buckets(&RateLimiterConfig::default());
        assert_eq!(l.as_raw_fd(), fd);
        assert!(l.is_blocked());
        wait_for_unblock(&mut l);
        assert!(l.consume(u64::MAX, TokenType::Bytes));

        // New buckets start full and limit.
        l.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(2, None, 10_000)),
        });
        assert!(!l.is_blocked());
        assert!(l.consume(2, TokenType::Ops));
        assert!(!l.consume(1, TokenType::Ops));
        assert!(l.is_blocked());
    }

    #[test]
    fn huge_values_do_not_panic() {
        let t0 = Instant::now();
        let config = RateLimiterConfig {
            bandwidth: Some(tb(u64::MAX, Some(u64::MAX), u64::MAX)),
            ops: Some(tb(1, None, u64::MAX)),
        };
        let mut l = RateLimiter::new_at(&config, t0).unwrap();
        assert!(l.consume_at(u64::MAX, TokenType::Bytes, t0));
        assert!(l.consume_at(u64::MAX, TokenType::Bytes, t0));
        // Refused: the timer is armed for u64::MAX ms, which the kernel accepts.
        assert!(!l.consume_at(u64::MAX, TokenType::Bytes, t0));
        assert!(l.is_blocked());
        assert!(l.timer_fd.is_armed().unwrap());
        assert!(l.consume_at(1, TokenType::Ops, t0));
        assert!(l.consume_at(u64::MAX, TokenType::Ops, t0));
        assert!(!l.consume_at(u64::MAX, TokenType::Ops, t0));
        l.manual_replenish(u64::MAX, TokenType::Ops);
        l.manual_replenish(u64::MAX, TokenType::Bytes);
        assert!(l.consume_at(u64::MAX, TokenType::Bytes, t0));
    }

    #[test]
    fn cli_keys() {
        let mut c = RateLimiterConfig::default();
        for (key, value) in [
            ("bw_size", "1048576"),
            ("bw_one_time_burst", "4096"),
            ("bw_refill_time", "100"),
            ("ops_size", "1000"),
            ("ops_refill_time", "1000"),
        ] {
            assert!(c.parse_cli_key(key, value).unwrap(), "{key}");
        }
        assert_eq!(
            c,
            RateLimiterConfig {
                bandwidth: Some(tb(1_048_576, Some(4096), 100)),
                ops: Some(tb(1000, None, 1000)),
            }
        );
        c.validate().unwrap();

        // Not ours: left alone.
        for key in [
            "path",
            "bw",
            "ops",
            "bw_",
            "bw_sizes",
            "ops_rate",
            "iops_size",
            "size",
        ] {
            assert!(!c.parse_cli_key(key, "1").unwrap(), "{key}");
        }
        // Ours but bad: errors naming key and value.
        for value in ["", "-1", "1.5", "abc", " 5", "18446744073709551616", "1M"] {
            let err = c.parse_cli_key("ops_size", value).unwrap_err();
            match err {
                RateLimiterError::InvalidCliValue { key, value: v } => {
                    assert_eq!((key.as_str(), v.as_str()), ("ops_size", value));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Unchanged by the failed attempts.
        assert_eq!(c.ops, Some(tb(1000, None, 1000)));
        // Boundaries parse.
        assert!(c.parse_cli_key("ops_size", "0").unwrap());
        assert!(c.parse_cli_key("ops_size", "18446744073709551615").unwrap());
        assert_eq!(c.ops.map(|o| o.size), Some(u64::MAX));
    }

    #[test]
    fn validate_errors() {
        let inconsistent = |bandwidth, ops| {
            let c = RateLimiterConfig { bandwidth, ops };
            assert!(
                matches!(c.validate(), Err(RateLimiterError::Inconsistent(_))),
                "{c:?}"
            );
            assert!(matches!(
                RateLimiter::new(&c),
                Err(RateLimiterError::Inconsistent(_))
            ));
        };
        // size without refill_time (as `bw_size=1000` alone on the CLI gives).
        inconsistent(Some(tb(1000, None, 0)), None);
        inconsistent(None, Some(tb(1, Some(5), 0)));
        // refill_time or burst without size.
        inconsistent(Some(tb(0, None, 100)), None);
        inconsistent(None, Some(tb(0, Some(10), 0)));

        let mut cli = RateLimiterConfig::default();
        assert!(cli.parse_cli_key("ops_refill_time", "100").unwrap());
        assert!(cli.validate().is_err());

        for ok in [
            RateLimiterConfig::default(),
            RateLimiterConfig {
                bandwidth: Some(tb(0, None, 0)),
                ops: Some(tb(0, Some(0), 0)),
            },
            RateLimiterConfig {
                bandwidth: Some(tb(1, Some(0), 1)),
                ops: Some(tb(u64::MAX, Some(u64::MAX), u64::MAX)),
            },
        ] {
            ok.validate().unwrap();
        }
    }

    #[test]
    fn json_round_trip_with_firecracker_names() {
        let json = r#"{"bandwidth":{"size":1048576,"one_time_burst":4096,"refill_time":100},"ops":{"size":1000,"refill_time":1000}}"#;
        let c: RateLimiterConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            c,
            RateLimiterConfig {
                bandwidth: Some(tb(1_048_576, Some(4096), 100)),
                ops: Some(tb(1000, None, 1000)),
            }
        );
        // Absent one_time_burst is not serialized; the output is the same JSON.
        assert_eq!(serde_json::to_string(&c).unwrap(), json);

        // Optional buckets.
        let c: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RateLimiterConfig::default());
        let c: RateLimiterConfig = serde_json::from_str(r#"{"ops":null}"#).unwrap();
        assert_eq!(c, RateLimiterConfig::default());

        // Unknown fields are rejected at both levels.
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"iops":{}}"#).is_err());
        assert!(serde_json::from_str::<RateLimiterConfig>(
            r#"{"ops":{"size":1,"refill_time":1,"rate":5}}"#
        )
        .is_err());
        // size and refill_time are required, as in Firecracker.
        assert!(serde_json::from_str::<TokenBucketConfig>(r#"{"size":1}"#).is_err());
        assert!(serde_json::from_str::<TokenBucketConfig>(r#"{"refill_time":1}"#).is_err());
        // Negative or too-large numbers are rejected, not wrapped.
        assert!(
            serde_json::from_str::<TokenBucketConfig>(r#"{"size":-1,"refill_time":1}"#).is_err()
        );
        assert!(serde_json::from_str::<TokenBucketConfig>(
            r#"{"size":18446744073709551616,"refill_time":1}"#
        )
        .is_err());
    }

    /// A snapshot's budgets come back spent: a restored guest does not start with full buckets.
    #[test]
    fn budgets_survive_a_save_and_restore() {
        let config = RateLimiterConfig {
            bandwidth: Some(tb(1_000_000, Some(500), 3_600_000)),
            ops: Some(tb(100, None, 3_600_000)),
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        assert!(limiter.consume(600_000, TokenType::Bytes));
        assert!(limiter.consume(40, TokenType::Ops));
        let saved = limiter.budgets();
        let ops = saved.ops.unwrap();
        assert_eq!((ops.budget, ops.debt), (60, 0));
        let bandwidth = saved.bandwidth.unwrap();
        assert_eq!(bandwidth.one_time_burst, 0, "the burst was spent first");
        assert!(
            (400_500..=400_600).contains(&bandwidth.budget),
            "{bandwidth:?}"
        );

        let json = serde_json::to_string(&saved).unwrap();
        let mut restored = RateLimiter::new(&config).unwrap();
        restored.restore_budgets(&serde_json::from_str(&json).unwrap());
        assert!(
            !restored.consume(61, TokenType::Ops),
            "only 60 ops are left"
        );
        assert!(restored.consume(60, TokenType::Ops));
        // A saved budget larger than this limiter's bucket is capped at its size.
        let mut small = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(10, None, 3_600_000)),
        })
        .unwrap();
        small.restore_budgets(&RateLimiterBudgets {
            bandwidth: None,
            ops: Some(BucketBudget {
                budget: 1_000,
                one_time_burst: 0,
                debt: 0,
            }),
        });
        assert!(small.consume(10, TokenType::Ops));
        assert!(
            !small.consume(1, TokenType::Ops),
            "the bucket held 10, not 1000"
        );
    }
}
