//! Rate limits in Celery's notation and the token bucket that enforces them.
//!
//! `"10/s"`, `"10/m"`, `"10/h"` or a bare number (per second); fractions allowed. As in Celery the
//! limit applies per worker and per task name, and the bucket holds one token (no bursts).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// A rate: tasks per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
}

impl RateLimit {
    /// `n` tasks per second; `None` when `n` is not a positive finite number.
    pub fn per_second(n: f64) -> Option<Self> {
        (n.is_finite() && n > 0.0).then_some(RateLimit { per_second: n })
    }

    /// Tasks per second.
    pub fn rate(&self) -> f64 {
        self.per_second
    }

    /// The time between two tasks.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

impl FromStr for RateLimit {
    type Err = Error;

    /// Parses `"10/s"`, `"0.5/m"`, `"100/h"` or `"5"`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::config(format!(
                "invalid rate limit {s:?}: expected <n>/s, <n>/m, <n>/h or <n>"
            ))
        };
        let (n, unit) = match s.trim().split_once('/') {
            Some((n, u)) => (n.trim(), u.trim()),
            None => (s.trim(), "s"),
        };
        let n: f64 = n.parse().map_err(|_| bad())?;
        let div = match unit {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        RateLimit::per_second(n / div).ok_or_else(bad)
    }
}

impl fmt::Display for RateLimit {
    /// In the unit that gives a whole number when there is one (`10/m`, not `0.1666…/s`), as
    /// Celery's `registered` shows limits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = |x: f64| (x - x.round()).abs() < 1e-9 * x.max(1.0);
        for (per, unit) in [(1.0, "s"), (60.0, "m"), (3600.0, "h")] {
            let n = self.per_second * per;
            if whole(n) {
                return write!(f, "{}/{unit}", n.round());
            }
        }
        write!(f, "{}/s", self.per_second)
    }
}

/// A token bucket of capacity one, refilled at a [`RateLimit`]'s rate.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    interval: Duration,
    /// The earliest time the next token is available.
    next_free: Option<std::time::Instant>,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            interval: limit.interval(),
            next_free: None,
        }
    }

    /// Takes a token at `now` if one is available; otherwise returns how long until one is.
    pub fn try_take(&mut self, now: std::time::Instant) -> Result<(), Duration> {
        match self.next_free {
            Some(t) if t > now => Err(t - now),
            _ => {
                self.next_free = Some(now + self.interval);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn parses_celery_notation() {
        assert_eq!("10/s".parse::<RateLimit>().unwrap().rate(), 10.0);
        assert_eq!("120/m".parse::<RateLimit>().unwrap().rate(), 2.0);
        assert_eq!("3600/h".parse::<RateLimit>().unwrap().rate(), 1.0);
        assert_eq!("0.5".parse::<RateLimit>().unwrap().rate(), 0.5);
        for bad in ["", "x/s", "10/d", "0/s", "-1/s"] {
            let e = bad.parse::<RateLimit>().unwrap_err();
            assert!(e.to_string().contains("invalid rate limit"), "{bad}");
        }
    }

    #[test]
    fn bucket_allows_one_then_waits_the_interval() {
        let mut b = TokenBucket::new("4/s".parse().unwrap());
        let t0 = Instant::now();
        assert!(b.try_take(t0).is_ok());
        assert_eq!(b.try_take(t0), Err(Duration::from_millis(250)));
        assert_eq!(
            b.try_take(t0 + Duration::from_millis(100)),
            Err(Duration::from_millis(150))
        );
        assert!(b.try_take(t0 + Duration::from_millis(250)).is_ok());
        // No burst after a long idle period: one token, then the interval again.
        let later = t0 + Duration::from_secs(10);
        assert!(b.try_take(later).is_ok());
        assert!(b.try_take(later).is_err());
    }
}
