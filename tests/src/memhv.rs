//! An in-memory hypervisor for engine tests: domains are plain values a test sets up and
//! changes; every call is recorded; a test scripts errors (of each [`ErrorKind`]), calls that hang
//! until released, and the events a real backend would send — lifecycle changes and guest faults
//! (watchdog, I/O error, control error, agent) that libvirt's test driver cannot produce.
//! Changes the engine makes behave like libvirt's: a start boots the domain and sends `started`,
//! a destroy sends `stopped/destroyed`, a reset sends a guest reboot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use virtwarden::engine::connect::{Connection, Connector};
use virtwarden::hypervisor::events::{GuestEvent, GuestEventKind, HypervisorEvent, LifecycleEvent, LifecycleKind};
use virtwarden::hypervisor::{DomainControl, DomainReader, ErrorKind, HypervisorError};
use virtwarden::observe::{BootConfig, DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

/// One domain as the in-memory hypervisor keeps it.
#[derive(Debug, Clone)]
pub struct MemDomain {
    pub state: DomainState,
    pub reason: StateReason,
    pub autostart: bool,
    pub boot: BootConfig,
    /// A new one on every start, like libvirt's runtime id.
    pub id: Option<u32>,
}

/// What a scripted call does instead of its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Fail with an error of this kind and message.
    Error(ErrorKind, String),
    /// Block until [`MemHv::release_hangs`], then do the work.
    Hang,
}

struct Scripted {
    op: &'static str,
    domain: String,
    script: Script,
    times: u32,
}

/// The hypervisor. Hand it to the engine through [`MemConnector`].
pub struct MemHv {
    domains: Mutex<BTreeMap<String, MemDomain>>,
    calls: Mutex<Vec<(String, String)>>,
    scripted: Mutex<Vec<Scripted>>,
    hangs_released: (Mutex<bool>, Condvar),
    events: Mutex<Option<UnboundedSender<HypervisorEvent>>>,
    alive: AtomicBool,
    next_id: AtomicU32,
    /// Bumped on every call, so a test waits for a call instead of sleeping.
    version: watch::Sender<u64>,
}

impl Default for MemHv {
    fn default() -> Self {
        MemHv {
            domains: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(Vec::new()),
            scripted: Mutex::new(Vec::new()),
            hangs_released: (Mutex::new(false), Condvar::new()),
            events: Mutex::new(None),
            alive: AtomicBool::new(true),
            next_id: AtomicU32::new(1),
            version: watch::channel(0).0,
        }
    }
}

impl MemHv {
    pub fn new() -> Arc<Self> {
        Arc::new(MemHv::default())
    }

    /// Add (or replace) a domain in `state (reason)`; a running one gets a runtime id.
    pub fn with_domain(self: Arc<Self>, name: &str, state: DomainState, reason: StateReason) -> Arc<Self> {
        let id = (state != DomainState::ShutOff).then(|| self.next_id.fetch_add(1, Ordering::SeqCst));
        let d = MemDomain { state, reason, autostart: false, boot: BootConfig::default(), id };
        self.domains.lock().unwrap().insert(name.to_string(), d);
        self
    }

    /// Change a domain's state behind the engine's back, without an event (a test sends the
    /// event it wants with [`MemHv::send`]).
    pub fn set_state(&self, name: &str, state: DomainState, reason: StateReason) {
        let mut domains = self.domains.lock().unwrap();
        let d = domains.get_mut(name).unwrap_or_else(|| panic!("no domain {name}"));
        d.state = state;
        d.reason = reason;
    }

    pub fn domain(&self, name: &str) -> Option<MemDomain> {
        self.domains.lock().unwrap().get(name).cloned()
    }

    /// Script the next `times` calls of `op` on `domain` (`""` for host-wide calls).
    pub fn script(&self, op: &'static str, domain: &str, script: Script, times: u32) {
        self.scripted.lock().unwrap().push(Scripted { op, domain: domain.into(), script, times });
    }

    /// Let every hung call (and every future one) return.
    pub fn release_hangs(&self) {
        *self.hangs_released.0.lock().unwrap() = true;
        self.hangs_released.1.notify_all();
    }

    /// Whether the connection says it is alive (`virConnectIsAlive`).
    pub fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::SeqCst);
    }

    /// Send an event to the engine, as the backend's callback would.
    pub fn send(&self, event: HypervisorEvent) {
        if let Some(tx) = self.events.lock().unwrap().as_ref() {
            let _ = tx.send(event);
        }
    }

    /// A guest event for `domain` (watchdog, I/O error, control error, agent, reboot).
    pub fn guest_event(&self, domain: &str, kind: GuestEventKind) {
        self.send(HypervisorEvent::Guest(GuestEvent { domain: domain.into(), kind, received: Instant::now() }));
    }

    /// A lifecycle event for `domain`.
    pub fn lifecycle(&self, domain: &str, kind: LifecycleKind, detail: &str) {
        self.send(HypervisorEvent::Lifecycle(LifecycleEvent {
            domain: domain.into(),
            kind,
            detail: detail.into(),
            received: Instant::now(),
        }));
    }

    /// The calls made so far, as `(op, domain)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }

    /// How many times `op` was called on `domain`.
    pub fn count(&self, op: &str, domain: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|(o, d)| o == op && d == domain).count()
    }

    /// Wait until `op` was called on `domain` at least `n` times; false after `timeout`.
    pub async fn wait_calls(&self, op: &str, domain: &str, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |hv| hv.count(op, domain) >= n).await
    }

    /// Wait until `cond` holds, checked after every call; false after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&MemHv) -> bool) -> bool {
        let mut rx = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return cond(self),
            }
        }
    }

    fn call<T>(
        &self,
        op: &'static str,
        domain: &str,
        work: impl FnOnce(&mut BTreeMap<String, MemDomain>) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        self.calls.lock().unwrap().push((op.to_string(), domain.to_string()));
        self.version.send_modify(|v| *v += 1);
        let script = {
            let mut scripted = self.scripted.lock().unwrap();
            scripted.iter_mut().find(|s| s.op == op && s.domain == domain && s.times > 0).map(|s| {
                s.times -= 1;
                s.script.clone()
            })
        };
        match script {
            Some(Script::Error(kind, message)) => {
                return Err(HypervisorError::Simulated { op, domain: domain.into(), kind, message });
            }
            Some(Script::Hang) => {
                let (lock, cv) = &self.hangs_released;
                let mut released = lock.lock().unwrap();
                while !*released {
                    released = cv.wait(released).unwrap();
                }
            }
            None => {}
        }
        work(&mut self.domains.lock().unwrap())
    }

    fn observed(name: &str, d: &MemDomain) -> ObservedDomain {
        ObservedDomain {
            name: name.to_string(),
            uuid: String::new(),
            state: d.state,
            reason: d.reason,
            persistent: true,
            autostart: d.autostart,
            boot: d.boot.clone(),
            interfaces: Vec::new(),
            disks: Vec::new(),
            id: d.id,
        }
    }

    /// Change `name` and say so with a lifecycle event, as libvirt does after a change.
    fn change(
        &self,
        op: &'static str,
        name: &str,
        change: impl FnOnce(&mut MemDomain, &AtomicU32) -> Option<(LifecycleKind, &'static str)>,
    ) -> Result<(), HypervisorError> {
        let event = self.call(op, name, |domains| {
            let d = domains.get_mut(name).ok_or_else(|| HypervisorError::NoSuchDomain { domain: name.into() })?;
            Ok(change(d, &self.next_id))
        })?;
        if let Some((kind, detail)) = event {
            self.lifecycle(name, kind, detail);
        }
        Ok(())
    }
}

impl DomainReader for MemHv {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        self.call("observe_host", "", |domains| {
            Ok(ObservedHost {
                domains: domains.iter().map(|(n, d)| MemHv::observed(n, d)).collect(),
                ..Default::default()
            })
        })
    }

    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        self.call("list_networks", "", |_| Ok(Vec::new()))
    }

    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        self.call("observe", name, |domains| Ok(domains.get(name).map(|d| MemHv::observed(name, d))))
    }

    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        self.call("state", name, |domains| Ok(domains.get(name).map(|d| (d.state, d.reason))))
    }
}

impl DomainControl for MemHv {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.change("start", name, |d, ids| {
            if d.state != DomainState::ShutOff {
                return None;
            }
            (d.state, d.reason, d.id) =
                (DomainState::Running, StateReason::Booted, Some(ids.fetch_add(1, Ordering::SeqCst)));
            Some((LifecycleKind::Started, "booted"))
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.change("shutdown", name, |d, _| {
            (d.state, d.reason, d.id) = (DomainState::ShutOff, StateReason::Shutdown, None);
            Some((LifecycleKind::Stopped, "shutdown"))
        })
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.change("destroy", name, |d, _| {
            (d.state, d.reason, d.id) = (DomainState::ShutOff, StateReason::Destroyed, None);
            Some((LifecycleKind::Stopped, "destroyed"))
        })
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.change("resume", name, |d, _| {
            (d.state, d.reason) = (DomainState::Running, StateReason::Unpaused);
            Some((LifecycleKind::Resumed, "unpaused"))
        })
    }

    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.change("reset", name, |_, _| None)?;
        self.guest_event(name, GuestEventKind::Reboot);
        Ok(())
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        self.change("set_autostart", name, |d, _| {
            d.autostart = on;
            None
        })
    }

    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.call("persistent_xml", name, |domains| match domains.get(name) {
            Some(_) => Ok(format!("<domain type='kvm'><name>{name}</name><os><type>hvm</type></os></domain>")),
            None => Err(HypervisorError::NoSuchDomain { domain: name.into() }),
        })
    }

    fn define_xml(&self, name: &str, _xml: &str) -> Result<(), HypervisorError> {
        self.change("define", name, |_, _| Some((LifecycleKind::Defined, "updated")))
    }
}

/// Connects the engine to a [`MemHv`]; every connect hands out the same hypervisor (alive
/// again) and points its events at the new connection.
pub struct MemConnector {
    pub hv: Arc<MemHv>,
}

impl Connector for MemConnector {
    fn uri(&self) -> String {
        "memory:///".into()
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        self.hv.alive.store(true, Ordering::SeqCst);
        *self.hv.events.lock().unwrap() = Some(events);
        Ok(Connection::new(self.hv.clone(), Some(())))
    }
}
