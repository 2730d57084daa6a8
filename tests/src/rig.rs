//! The one engine test rig: an engine on any [`Connector`] (the in-memory hypervisor, libvirt's
//! test driver, a fault-injecting wrapper), with a long resync so that what happens comes from
//! events and the engine's own timers, and waits on status changes (never sleep-and-hope).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use virtwarden::act::remediation::Registry;
use virtwarden::engine::connect::Connector;
use virtwarden::engine::status::{DomainStatus, StatusReport};
use virtwarden::engine::{Backends, Engine, EngineConfig, EngineHandle};
use virtwarden_policies::DesiredState;

/// How long a rig waits for something that should happen within milliseconds; generous, for a
/// loaded machine.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running engine.
pub struct EngineRig {
    pub engine: EngineHandle,
    task: JoinHandle<()>,
    /// More to print when a wait times out (the calls a fake recorded, …).
    context: Option<Box<dyn Fn() -> String + Send + Sync>>,
    /// How long [`EngineRig::until`] waits.
    wait: Duration,
}

/// The configuration engine tests start from: resync once an hour (it must not be what makes a
/// test pass), reads that hang are given up after 500 ms.
pub fn test_config() -> EngineConfig {
    EngineConfig { resync: Duration::from_secs(3600), read_deadline: Duration::from_millis(500), ..Default::default() }
}

impl EngineRig {
    /// An engine on `connector` with the built-in remediations and [`test_config`].
    pub fn spawn(connector: Arc<dyn Connector>, desired: DesiredState) -> Self {
        Self::spawn_with(Backends::new(connector, Registry::with_builtins()), desired, test_config())
    }

    /// An engine on the given backends and configuration.
    pub fn spawn_with(backends: Backends, desired: DesiredState, config: EngineConfig) -> Self {
        let (engine, task) = Engine::spawn_with(backends, desired, config);
        EngineRig { engine, task, context: None, wait: WAIT }
    }

    /// Wait this long in [`EngineRig::until`] (probes on a period need more).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Print `context()` too when a wait times out.
    pub fn with_context(mut self, context: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.context = Some(Box::new(context));
        self
    }

    /// Wait until `cond` holds for the status; panic naming `what` with the status otherwise.
    pub async fn until(&self, what: &str, cond: impl Fn(&StatusReport) -> bool) -> StatusReport {
        match self.engine.wait_for(self.wait, cond).await {
            Some(r) => r,
            None => panic!(
                "timed out waiting for: {what}\nstatus: {:#?}\n{}",
                self.engine.status(),
                self.context.as_ref().map(|c| c()).unwrap_or_default()
            ),
        }
    }

    /// Wait until the engine is connected and its first resync is done.
    pub async fn until_ready(&self) {
        let engine = self.engine.clone();
        self.until("the engine ready", move |_| engine.is_ready()).await;
    }

    /// Wait until the engine is idle (every domain worker parked, no order, probe or libvirt
    /// call in flight; see [`EngineHandle::wait_idle`]): what has not happened by then will
    /// not, until a timer or an outside event moves it. Panics with the status otherwise.
    pub async fn until_idle(&self) {
        if !self.engine.wait_idle(self.wait).await {
            panic!(
                "timed out waiting for the engine to be idle\nstatus: {:#?}\n{}",
                self.engine.status(),
                self.context.as_ref().map(|c| c()).unwrap_or_default()
            );
        }
    }

    /// Wait until the engine is idle and no domain worker has a timer armed (see
    /// [`EngineHandle::wait_quiet`]): nothing happens to any domain until something from
    /// outside moves it, however long. Panics with the status otherwise.
    pub async fn until_quiet(&self) {
        if !self.engine.wait_quiet(self.wait).await {
            panic!(
                "timed out waiting for the engine to be quiet\nstatus: {:#?}\n{}",
                self.engine.status(),
                self.context.as_ref().map(|c| c()).unwrap_or_default()
            );
        }
    }

    /// Stop the engine and wait for it.
    pub async fn stop(self) {
        self.engine.shutdown();
        tokio::time::timeout(self.wait, self.task).await.expect("the engine stops").expect("the engine task ends");
    }
}

/// One domain's status.
pub fn find<'a>(report: &'a StatusReport, name: &str) -> Option<&'a DomainStatus> {
    report.domains.iter().find(|d| d.name == name)
}

/// Whether the status shows `name` running.
pub fn running(report: &StatusReport, name: &str) -> bool {
    find(report, name).is_some_and(|d| d.state.starts_with("running"))
}
