//! Graceful shutdown, one routine for `apply` and the engine: ask the guest to shut down (ACPI),
//! look every [`POLL`], destroy it if it is still up after the timeout. `apply` drives it on its
//! own thread; the engine's workers drive it through their bounded calls, cancellably (the wait
//! ends when the future is dropped).

use std::time::{Duration, Instant};

use super::calls::{CallError, Calls};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::observe::DomainState;

/// How often a graceful shutdown looks whether the guest is down.
pub const POLL: Duration = Duration::from_millis(100);

/// What to do next, given the domain's state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Done,
    Destroy,
    Wait,
}

fn next(state: Option<DomainState>, deadline: Instant) -> Next {
    match state {
        None | Some(DomainState::ShutOff) => Next::Done,
        Some(_) if Instant::now() >= deadline => Next::Destroy,
        Some(_) => Next::Wait,
    }
}

fn timed_out(name: &str, timeout: Duration) {
    tracing::warn!(domain = %name, ?timeout, "graceful shutdown timed out; destroying");
}

/// Shut `name` down, blocking (`apply`).
pub fn graceful_shutdown(hv: &dyn Hypervisor, name: &str, timeout: Duration) -> Result<(), HypervisorError> {
    hv.shutdown(name)?;
    let deadline = Instant::now() + timeout;
    loop {
        match next(hv.domain_state(name)?, deadline) {
            Next::Done => return Ok(()),
            Next::Destroy => {
                timed_out(name, timeout);
                return hv.destroy(name);
            }
            Next::Wait => std::thread::sleep(POLL),
        }
    }
}

/// Shut `name` down through the engine's bounded calls; cancellable.
pub async fn graceful_shutdown_async(calls: Calls, name: String, timeout: Duration) -> Result<(), CallError> {
    calls.shutdown(&name).await?;
    let deadline = Instant::now() + timeout;
    loop {
        match next(calls.state(&name).await?.map(|(s, _)| s), deadline) {
            Next::Done => return Ok(()),
            Next::Destroy => {
                timed_out(&name, timeout);
                return calls.destroy(&name).await;
            }
            Next::Wait => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_is_done_up_waits_until_the_deadline_then_destroys() {
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(next(Some(DomainState::ShutOff), later), Next::Done);
        assert_eq!(next(None, later), Next::Done);
        assert_eq!(next(Some(DomainState::Running), later), Next::Wait);
        assert_eq!(next(Some(DomainState::Paused), Instant::now()), Next::Destroy);
    }
}
