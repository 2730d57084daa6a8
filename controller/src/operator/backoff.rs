//! How the watches retry while the API server is away: exponential from `FIRST` up to `CAP`, each
//! delay jittered within its upper half so a fleet of nodes does not reconnect in step. kube's
//! default (0.8 s doubling to 30 s, plus up to as much again in jitter) left an edit made right
//! after the server came back unseen for up to a minute; with `CAP` at 3 s a node catches up
//! within a few seconds, and one node's retries cost the server at most one list per 1.5 s.

use std::time::Duration;

use kube::runtime::utils::Backoff;

/// The first retry's upper bound.
pub const FIRST: Duration = Duration::from_millis(250);
/// No retry waits longer than this.
pub const CAP: Duration = Duration::from_secs(3);

/// Capped, jittered exponential backoff for the operator's watches.
#[derive(Debug, Clone)]
pub struct CappedBackoff {
    next: Duration,
}

impl Default for CappedBackoff {
    fn default() -> Self {
        CappedBackoff { next: FIRST }
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let bound = self.next;
        self.next = (bound * 2).min(CAP);
        let half = bound / 2;
        Some(half + half.mul_f64(fastrand::f64()))
    }
}

impl Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_never_beyond_and_are_jittered() {
        let mut b = CappedBackoff::default();
        let delays: Vec<Duration> = b.by_ref().take(50).collect();
        assert!(delays[0] <= FIRST);
        assert!(delays.iter().all(|d| *d <= CAP), "{delays:?}");
        let late = &delays[10..];
        assert!(late.iter().all(|d| *d >= CAP / 2), "capped delays stay in the upper half: {late:?}");
        assert!(late.iter().any(|d| *d != late[0]), "jittered: {late:?}");
        b.reset();
        assert!(b.next().unwrap() <= FIRST, "a success starts over");
    }
}
