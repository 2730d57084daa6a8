//! Graceful shutdown, one routine for `apply` and the engine: ask the guest to shut down (ACPI),
//! look every [`POLL`], destroy it if it is still up after the timeout. `apply` drives it on its
//! own thread; the engine's workers drive it through their bounded calls, cancellably (the wait
//! ends when the future is dropped).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
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

/// The one routine: `request` the shutdown, then look at the `state` after every `pause` until
/// the guest is down, and `destroy` it once `timeout` has passed since the request.
async fn shut_down<E, S, D, P>(
    name: &str,
    timeout: Duration,
    request: impl Future<Output = Result<(), E>>,
    mut state: impl FnMut() -> S,
    destroy: impl FnOnce() -> D,
    mut pause: impl FnMut() -> P,
) -> Result<(), E>
where
    S: Future<Output = Result<Option<DomainState>, E>>,
    D: Future<Output = Result<(), E>>,
    P: Future<Output = ()>,
{
    request.await?;
    let deadline = Instant::now() + timeout;
    loop {
        match next(state().await?, deadline) {
            Next::Done => return Ok(()),
            Next::Destroy => {
                tracing::warn!(domain = %name, ?timeout, "graceful shutdown timed out; destroying");
                return destroy().await;
            }
            Next::Wait => pause().await,
        }
    }
}

/// Shut `name` down, blocking (`apply`): every step is a direct call and the pause blocks the
/// thread, so the routine never waits on a waker and finishes in its first poll.
pub fn graceful_shutdown(hv: &dyn Hypervisor, name: &str, timeout: Duration) -> Result<(), HypervisorError> {
    let routine = pin!(shut_down(
        name,
        timeout,
        async { hv.shutdown(name) },
        || async { hv.domain_state(name) },
        || async { hv.destroy(name) },
        || async { std::thread::sleep(POLL) },
    ));
    match routine.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => unreachable!("a blocking shutdown never waits on a waker"),
    }
}

/// Shut `name` down through the engine's bounded calls; cancellable.
pub async fn graceful_shutdown_async(calls: Calls, name: String, timeout: Duration) -> Result<(), CallError> {
    let (calls, name) = (&calls, name.as_str());
    shut_down(
        name,
        timeout,
        calls.shutdown(name),
        || async { Ok(calls.state(name).await?.map(|(s, _)| s)) },
        || calls.destroy(name),
        || tokio::time::sleep(POLL),
    )
    .await
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
