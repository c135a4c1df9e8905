//! Caller-supplied time.
//!
//! The routing core never reads a clock. The caller passes `now` as a [`Timestamp`]: a
//! duration since an epoch of its choosing (process start in the real node, zero in the
//! simulator). Only differences between timestamps are meaningful.

use std::ops::{Add, AddAssign};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, as the duration since a caller-chosen epoch.
///
/// In the real node use `Timestamp::from_duration(start.elapsed())` with a fixed
/// `start: std::time::Instant`; in the simulator use the virtual clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(Duration);

impl Timestamp {
    /// The epoch.
    pub const ZERO: Timestamp = Timestamp(Duration::ZERO);

    /// The timestamp `since_epoch` after the epoch.
    pub const fn from_duration(since_epoch: Duration) -> Self {
        Timestamp(since_epoch)
    }

    /// The timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(Duration::from_millis(ms))
    }

    /// The timestamp `us` microseconds after the epoch.
    pub const fn from_micros(us: u64) -> Self {
        Timestamp(Duration::from_micros(us))
    }

    /// Time since the epoch.
    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(rhs))
    }
}

impl AddAssign<Duration> for Timestamp {
    fn add_assign(&mut self, rhs: Duration) {
        self.0 = self.0.saturating_add(rhs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let a = Timestamp::from_millis(10);
        let b = a + Duration::from_millis(5);
        assert_eq!(b.saturating_since(a), Duration::from_millis(5));
        assert_eq!(a.saturating_since(b), Duration::ZERO);
        assert_eq!(
            Timestamp::from_micros(1500).since_epoch(),
            Duration::from_micros(1500)
        );
    }
}
