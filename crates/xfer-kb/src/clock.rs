//! Time. The knowledge base uses xfer-mobility's [`Timestamp`] (wall-clock
//! milliseconds, comparable across hosts) and [`Clock`] trait; [`TokioClock`] follows
//! tokio's clock, so a test that pauses tokio's time (`start_paused`) runs the modes'
//! timers and the knowledge base's timestamps on the same fake clock.

use std::time::Duration;

pub use xfer_mobility::clock::{Clock, FakeClock, SystemClock, Timestamp};

/// A clock that reads tokio's (possibly paused) time: `base` plus the tokio time
/// elapsed since the clock was made.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base` now.
    pub fn starting_at(base: Timestamp) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }

    /// Tokio time elapsed since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.saturating_add(self.start.elapsed())
    }
}
