//! The engine's clock: time since the Unix epoch, taken once at start and advanced by tokio's
//! monotonic clock, so it never jumps while the engine runs (timers and backoff stay correct)
//! and remembered times keep their meaning across restarts. Tests pause tokio's time to drive it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::plan::restart::Tick;

/// Where the engine's notion of "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> Tick;
}

/// Wall clock at start + tokio's monotonic clock since.
pub struct SystemClock {
    wall_at_start: Duration,
    started: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            wall_at_start: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            started: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Tick {
        self.wall_at_start.saturating_add(self.started.elapsed())
    }
}

/// Sleep until `at`; forever when there is nothing to wake for.
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
