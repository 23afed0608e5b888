//! Time: a [`Timestamp`] type and the [`Clock`] trait, with a real
//! ([`SystemClock`]) and a fake ([`FakeClock`]) implementation.
//!
//! The binding cache and the binding update list never read a clock
//! themselves: every operation takes `now` as an argument, so they are pure
//! state machines. A driver (the agent) reads a [`Clock`] and passes the
//! value in; tests pass a [`FakeClock`]'s value and advance it at will.

use std::fmt;
use std::ops::Add;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the Unix epoch.
///
/// Wall-clock based so that binding expiry times can be persisted and read
/// by another host (whose clock is assumed to be NTP-synchronised to within
/// well under a binding lifetime). Arithmetic saturates, it never panics.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// `secs` seconds after the Unix epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The timestamp of a `SystemTime` (times before the epoch become the
    /// epoch).
    pub fn from_system_time(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// `self + secs` seconds, saturating.
    pub fn add_secs(self, secs: u32) -> Self {
        Timestamp(self.0.saturating_add(u64::from(secs) * 1000))
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// A source of [`Timestamp`]s.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The real clock: wall-clock time read once at creation, advanced by the
/// monotonic clock afterwards. So it never goes backwards within a process
/// (a retransmission timer cannot misfire when NTP steps the clock), and
/// stays close to wall-clock time for persisted expiry times.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    wall: Timestamp,
    anchor: Instant,
}

impl SystemClock {
    /// A clock anchored at the current wall-clock time.
    pub fn new() -> Self {
        SystemClock {
            wall: Timestamp::from_system_time(SystemTime::now()),
            anchor: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        self.wall.saturating_add(self.anchor.elapsed())
    }
}

/// A clock for tests: it stands still until told to move. Clones share the
/// same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    now: Arc<AtomicU64>,
}

impl FakeClock {
    /// A fake clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        FakeClock {
            now: Arc::new(AtomicU64::new(start.as_millis())),
        }
    }

    /// Move the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ms))
            });
    }

    /// Set the clock to `t` (it may go backwards: tests can check what
    /// happens then).
    pub fn set(&self, t: Timestamp) {
        self.now.store(t.as_millis(), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.now.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = FakeClock::new(Timestamp::from_secs(100));
        let other = clock.clone();
        assert_eq!(clock.now(), Timestamp::from_millis(100_000));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(other.now(), Timestamp::from_millis(101_500));
        other.set(Timestamp::from_secs(5));
        assert_eq!(clock.now(), Timestamp::from_secs(5));
        clock.set(Timestamp::from_millis(u64::MAX - 1));
        clock.advance(Duration::from_secs(10));
        assert_eq!(clock.now(), Timestamp::from_millis(u64::MAX));
    }

    #[test]
    fn system_clock_is_close_to_wall_time_and_monotonic() {
        let clock = SystemClock::new();
        let wall = Timestamp::from_system_time(SystemTime::now());
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        assert!(
            a.as_millis().abs_diff(wall.as_millis()) < 5_000,
            "{a} vs {wall}"
        );
        let shared: Arc<dyn Clock> = Arc::new(clock);
        assert!(shared.now() >= b);
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp::from_secs(10);
        assert_eq!(t.add_secs(5), Timestamp::from_secs(15));
        assert_eq!(t + Duration::from_millis(1), Timestamp::from_millis(10_001));
        assert_eq!(
            Timestamp::from_millis(u64::MAX).add_secs(u32::MAX),
            Timestamp::from_millis(u64::MAX)
        );
        assert_eq!(
            t.saturating_since(Timestamp::from_secs(4)),
            Duration::from_secs(6)
        );
        assert_eq!(Timestamp::from_secs(4).saturating_since(t), Duration::ZERO);
        assert_eq!(Timestamp::from_millis(1_234).to_string(), "1.234s");
    }
}
