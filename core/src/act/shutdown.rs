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
    use std::sync::Mutex;

    use super::*;
    use crate::hypervisor::DomainReader;
    use crate::observe::{ObservedDomain, ObservedHost};

    /// A guest that is down at its `down_at`-th look after the request (never: `None`).
    struct Guest {
        down_at: Option<usize>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Guest {
        fn call(&self, op: &'static str) -> Result<(), HypervisorError> {
            self.calls.lock().unwrap().push(op);
            Ok(())
        }
    }

    impl DomainReader for Guest {
        fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
            Ok(ObservedHost::default())
        }
        fn observe_domain(&self, _: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
            Ok(None)
        }
        fn domain_state(&self, _: &str) -> Result<Option<DomainState>, HypervisorError> {
            let mut calls = self.calls.lock().unwrap();
            calls.push("state");
            let looks = calls.iter().filter(|c| **c == "state").count();
            let down = calls.contains(&"destroy") || self.down_at.is_some_and(|n| looks >= n);
            Ok(Some(if down { DomainState::ShutOff } else { DomainState::Running }))
        }
    }

    crate::act::control_by_call!(Guest);

    #[test]
    fn blocking_shutdown_waits_a_poll_between_looks_and_destroys_only_past_the_timeout() {
        let obliging = Guest { down_at: Some(3), calls: Mutex::default() };
        let started = Instant::now();
        graceful_shutdown(&obliging, "vm1", Duration::from_secs(60)).unwrap();
        assert!(started.elapsed() >= 2 * POLL, "two pauses before the third look");
        assert_eq!(*obliging.calls.lock().unwrap(), ["shutdown", "state", "state", "state"]);

        let deaf = Guest { down_at: None, calls: Mutex::default() };
        graceful_shutdown(&deaf, "vm1", Duration::ZERO).unwrap();
        assert_eq!(*deaf.calls.lock().unwrap(), ["shutdown", "state", "destroy"]);
    }

    #[test]
    fn down_is_done_up_waits_until_the_deadline_then_destroys() {
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(next(Some(DomainState::ShutOff), later), Next::Done);
        assert_eq!(next(None, later), Next::Done);
        assert_eq!(next(Some(DomainState::Running), later), Next::Wait);
        assert_eq!(next(Some(DomainState::Paused), Instant::now()), Next::Destroy);
    }
}
