//! libvirt calls with a deadline, for the engine. Calls block, so each runs on the engine's own
//! libvirt pool ([`crate::blocking::Pool`]: `concurrency` threads at work, plus at most
//! [`MAX_HUNG_CALLS`] hung ones), never on tokio's shared blocking pool. A call that does not
//! return within its deadline (storage hung, a stuck job) costs only its domain: its thread is
//! replaced, the domain waits for that call to come back before it is asked anything else
//! (at most one hung call per domain), everyone else goes on. An error that may mean the
//! connection is gone is checked with `virConnectIsAlive`; a domain's own error stays with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::blocking::{Pool, Task};
use crate::hypervisor::{ErrorKind, Hypervisor, HypervisorError};
use crate::observe::{DomainState, ObservedDomain, StateReason};

/// Threads of hung libvirt calls (past their deadline) that are replaced; beyond this the pool
/// shrinks and calls queue (which `/healthz` reports once a call waits too long for a thread).
pub const MAX_HUNG_CALLS: usize = 64;

/// Shared bounds of all calls.
pub struct CallLimits {
    pool: Pool,
    /// Reads (state, XML).
    pub read_deadline: Duration,
    /// Changes (start, destroy, define, …): QEMU start-up can take a while.
    pub action_deadline: Duration,
}

impl CallLimits {
    pub fn new(concurrency: usize, read_deadline: Duration, action_deadline: Duration) -> Self {
        CallLimits { pool: Pool::new("libvirt", concurrency, MAX_HUNG_CALLS), read_deadline, action_deadline }
    }

    /// The libvirt pool (its queue and hung threads count for liveness).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// Why a call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("not connected to libvirt")]
    Disconnected,
    #[error("libvirt call `{op}` did not return within {after:?}; this domain waits for it")]
    Hung { op: &'static str, after: Duration },
    #[error("an earlier libvirt call `{op}` on this domain has not returned for {waited:?}")]
    StillHung { op: &'static str, waited: Duration },
    #[error("the connection to libvirt was lost during `{op}`: {source}")]
    ConnectionLost { op: &'static str, source: HypervisorError },
    #[error(transparent)]
    Failed(#[from] HypervisorError),
}

impl CallError {
    /// Nothing is known about the outcome (not a failure of the domain): the connection went
    /// away or the call never came back.
    pub fn is_interruption(&self) -> bool {
        !matches!(self, CallError::Failed(_))
    }

    /// libvirt's own words when there are any.
    pub fn detail(&self) -> String {
        match self {
            CallError::Failed(e) => e.detail(),
            other => other.to_string(),
        }
    }
}

/// A call still in flight after its caller stopped waiting for it.
trait Pending: Send {
    fn is_finished(&self) -> bool;
}

impl<T: Send> Pending for Task<T> {
    fn is_finished(&self) -> bool {
        Task::is_finished(self)
    }
}

struct HungCall {
    op: &'static str,
    since: Instant,
    task: Box<dyn Pending>,
}

/// Records a call still in flight when its caller stopped waiting (deadline passed, or the
/// caller was cancelled), so the domain is not asked again until it returns.
struct InFlight<'a, T: Send + 'static> {
    op: &'static str,
    since: Instant,
    task: Option<Task<T>>,
    hung: &'a Mutex<Option<HungCall>>,
}

impl<T: Send + 'static> Drop for InFlight<'_, T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Nobody waits for it any more: a queued call never runs, a running one gives its
            // thread up (the pool replaces it).
            task.abandon();
            if !task.is_finished() {
                *self.hung.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(HungCall { op: self.op, since: self.since, task: Box::new(task) });
            }
        }
    }
}

/// Reports a lost connection to whoever reconnects.
pub type LostConnection = Arc<dyn Fn(String) + Send + Sync>;

/// Deadline-bounded calls about one domain.
#[derive(Clone)]
pub struct Calls {
    hv: Option<Arc<dyn Hypervisor>>,
    limits: Arc<CallLimits>,
    hung: Arc<Mutex<Option<HungCall>>>,
    lost: LostConnection,
}

impl Calls {
    pub fn new(limits: Arc<CallLimits>, lost: LostConnection) -> Self {
        Calls { hv: None, limits, hung: Arc::new(Mutex::new(None)), lost }
    }

    /// The same domain's calls over the current connection (`None`: disconnected).
    pub fn with_connection(&self, hv: Option<Arc<dyn Hypervisor>>) -> Self {
        Calls { hv, ..self.clone() }
    }

    pub fn connected(&self) -> bool {
        self.hv.is_some()
    }

    /// A read (state, XML), bounded by the read deadline.
    pub async fn read<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, CallError> {
        self.run(op, self.limits.read_deadline, f).await
    }

    /// A change, bounded by the action deadline.
    pub async fn act<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, CallError> {
        self.run(op, self.limits.action_deadline, f).await
    }

    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        deadline: Duration,
        f: impl FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, CallError> {
        {
            let mut hung = self.hung.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = hung.as_ref() {
                if !h.task.is_finished() {
                    return Err(CallError::StillHung { op: h.op, waited: h.since.elapsed() });
                }
                tracing::info!(op = h.op, waited = ?h.since.elapsed(), "a hung libvirt call returned");
                *hung = None;
            }
        }
        let hv = self.hv.clone().ok_or(CallError::Disconnected)?;
        let worker = hv.clone();
        let task = self.limits.pool.spawn(move || f(worker.as_ref()));
        let mut in_flight = InFlight { op, since: Instant::now(), task: Some(task), hung: &self.hung };
        let result = match in_flight.task.as_mut() {
            Some(t) => t.within(deadline).await,
            None => None,
        };
        match result {
            Some(Ok(Ok(v))) => {
                in_flight.task = None;
                Ok(v)
            }
            Some(Ok(Err(e))) => {
                in_flight.task = None;
                Err(self.classify(op, hv, e).await)
            }
            Some(Err(_)) => {
                in_flight.task = None;
                Err(CallError::Failed(HypervisorError::Failed {
                    op,
                    domain: String::new(),
                    message: "the libvirt call panicked".into(),
                }))
            }
            // Dropping `in_flight` records the call as hung.
            None => Err(CallError::Hung { op, after: deadline }),
        }
    }

    /// A system or RPC error may mean the connection is gone, or only that this call failed:
    /// libvirt's own liveness check decides.
    async fn classify(&self, op: &'static str, hv: Arc<dyn Hypervisor>, e: HypervisorError) -> CallError {
        if e.kind() != ErrorKind::MaybeConnection {
            return CallError::Failed(e);
        }
        let alive = self
            .limits
            .pool
            .spawn(move || hv.is_alive())
            .within(Duration::from_secs(5))
            .await
            .is_some_and(|r| r.unwrap_or(false));
        if alive {
            CallError::Failed(e)
        } else {
            (self.lost)(e.to_string());
            CallError::ConnectionLost { op, source: e }
        }
    }

    pub async fn observe(&self, name: &str) -> Result<Option<ObservedDomain>, CallError> {
        let n = name.to_string();
        self.read("observe", move |hv| hv.observe_domain(&n)).await
    }

    pub async fn state(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, CallError> {
        let n = name.to_string();
        self.read("state", move |hv| hv.domain_state_reason(&n)).await
    }

    pub async fn start(&self, name: &str) -> Result<(), CallError> {
        let n = name.to_string();
        self.act("start", move |hv| hv.start(&n)).await
    }

    pub async fn destroy(&self, name: &str) -> Result<(), CallError> {
        let n = name.to_string();
        self.act("destroy", move |hv| hv.destroy(&n)).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), CallError> {
        let n = name.to_string();
        self.act("resume", move |hv| hv.resume(&n)).await
    }

    pub async fn reset(&self, name: &str) -> Result<(), CallError> {
        let n = name.to_string();
        self.act("reset", move |hv| hv.reset(&n)).await
    }

    pub async fn shutdown(&self, name: &str) -> Result<(), CallError> {
        let n = name.to_string();
        self.act("shutdown", move |hv| hv.shutdown(&n)).await
    }
}
