//! A fault-injecting wrapper around libvirt's real test driver, for engine tests: every call is
//! recorded and goes to the real driver unless a fault is armed for it — a transient error, a
//! system error (the connection stays alive), a lost connection, a call that hangs until
//! released, a call the guest ignores — or the driver "forgot" why domains are off, as libvirt
//! does after libvirtd restarts (`shut off (unknown)`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use virtwarden::engine::connect::{Connection, Connector};
use virtwarden::hypervisor::{DomainControl, DomainReader, ErrorKind, HypervisorError};
use virtwarden::libvirt::events::{subscribe, HypervisorEvent};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

/// What an armed fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// "cannot acquire state change lock": worth retrying the same call.
    Transient,
    /// A system error that is this domain's own: the connection stays alive.
    SystemError,
    /// The connection is gone (until the next connect).
    ConnectionLost,
    /// The call blocks until [`Faulty::release_hangs`].
    Hang,
    /// The call succeeds without doing anything (a guest ignoring an ACPI shutdown).
    Ignore,
}

struct Armed {
    op: &'static str,
    domain: String,
    fault: Fault,
    times: u32,
}

/// The wrapper. Share it with [`FaultyConnector`].
pub struct Faulty {
    pub inner: Arc<LibvirtHost>,
    armed: Mutex<Vec<Armed>>,
    calls: Mutex<Vec<(String, String)>>,
    alive: AtomicBool,
    amnesia: AtomicBool,
    hangs_released: (Mutex<bool>, Condvar),
}

impl Faulty {
    pub fn new(inner: Arc<LibvirtHost>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            armed: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            alive: AtomicBool::new(true),
            amnesia: AtomicBool::new(false),
            hangs_released: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Arm `fault` for the next `times` calls of `op` on `domain`.
    pub fn arm(&self, op: &'static str, domain: &str, fault: Fault, times: u32) {
        self.armed.lock().unwrap().push(Armed { op, domain: domain.into(), fault, times });
    }

    /// Let every hung call (and every future one) return.
    pub fn release_hangs(&self) {
        *self.hangs_released.0.lock().unwrap() = true;
        self.hangs_released.1.notify_all();
    }

    /// From now on, report every shut-off domain as `shut off (unknown)`.
    pub fn forget_reasons(&self) {
        self.amnesia.store(true, Ordering::SeqCst);
    }

    /// The calls made so far, as `(op, domain)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }

    /// How many times `op` was called on `domain`.
    pub fn count(&self, op: &str, domain: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|(o, d)| o == op && d == domain).count()
    }

    fn take_fault(&self, op: &'static str, domain: &str) -> Option<Fault> {
        let mut armed = self.armed.lock().unwrap();
        let a = armed.iter_mut().find(|a| a.op == op && a.domain == domain && a.times > 0)?;
        a.times -= 1;
        Some(a.fault)
    }

    fn call<T: Default>(
        &self,
        op: &'static str,
        domain: &str,
        real: impl FnOnce() -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        self.calls.lock().unwrap().push((op.to_string(), domain.to_string()));
        let error = |kind, message: &str| HypervisorError::Simulated {
            op,
            domain: domain.to_string(),
            kind,
            message: message.to_string(),
        };
        match self.take_fault(op, domain) {
            None => real(),
            Some(Fault::Transient) => Err(error(ErrorKind::Transient, "cannot acquire state change lock (injected)")),
            Some(Fault::SystemError) => {
                Err(error(ErrorKind::MaybeConnection, "Cannot get interface MTU on 'br9': No such device (injected)"))
            }
            Some(Fault::ConnectionLost) => {
                self.alive.store(false, Ordering::SeqCst);
                Err(error(ErrorKind::MaybeConnection, "internal error: client socket is closed (injected)"))
            }
            Some(Fault::Hang) => {
                let (lock, cv) = &self.hangs_released;
                let mut released = lock.lock().unwrap();
                while !*released {
                    released = cv.wait(released).unwrap();
                }
                drop(released);
                real()
            }
            Some(Fault::Ignore) => Ok(T::default()),
        }
    }

    fn forget(&self, mut d: ObservedDomain) -> ObservedDomain {
        if self.amnesia.load(Ordering::SeqCst) && d.state == DomainState::ShutOff {
            d.reason = StateReason::Unknown;
        }
        d
    }
}

impl DomainReader for Faulty {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        let mut host = self.call("observe_host", "", || self.inner.observe_host())?;
        host.domains = host.domains.into_iter().map(|d| self.forget(d)).collect();
        Ok(host)
    }

    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        self.call("list_networks", "", || self.inner.list_networks())
    }

    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        Ok(self.call("observe", name, || self.inner.observe_domain(name))?.map(|d| self.forget(d)))
    }

    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        let st = self.call("state", name, || self.inner.domain_state_reason(name))?;
        Ok(st.map(|(s, r)| {
            if self.amnesia.load(Ordering::SeqCst) && s == DomainState::ShutOff {
                (s, StateReason::Unknown)
            } else {
                (s, r)
            }
        }))
    }
}

impl DomainControl for Faulty {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.call("start", name, || self.inner.start(name))
    }
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.call("shutdown", name, || self.inner.shutdown(name))
    }
    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.call("destroy", name, || self.inner.destroy(name))
    }
    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.call("resume", name, || self.inner.resume(name))
    }
    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.call("reset", name, || self.inner.reset(name))
    }
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        self.call("set_autostart", name, || self.inner.set_autostart(name, on))
    }
    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.call("persistent_xml", name, || self.inner.persistent_xml(name))
    }
    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError> {
        self.call("define", name, || self.inner.define_xml(name, xml))
    }
}

/// Hands out the faulty wrapper on every connect (the connection comes back alive), with the
/// real driver's events; counts connects and keeps the event sender so a test can announce a
/// closed connection the way libvirt's close callback does.
pub struct FaultyConnector {
    pub faulty: Arc<Faulty>,
    pub connects: AtomicUsize,
    pub events: Mutex<Option<UnboundedSender<HypervisorEvent>>>,
    /// While set, connecting fails (libvirtd is down).
    refuse: AtomicBool,
}

impl FaultyConnector {
    pub fn new(faulty: Arc<Faulty>) -> Arc<Self> {
        Arc::new(FaultyConnector {
            faulty,
            connects: AtomicUsize::new(0),
            events: Mutex::new(None),
            refuse: AtomicBool::new(false),
        })
    }

    /// Make connecting fail (`true`, libvirtd down) or work again (`false`).
    pub fn refuse_connects(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Tell the engine the connection closed (as libvirt's close callback would).
    pub fn close(&self) {
        if let Some(tx) = self.events.lock().unwrap().as_ref() {
            let _ = tx.send(HypervisorEvent::ConnectionClosed { reason: "end of file" });
        }
    }
}

impl Connector for FaultyConnector {
    fn uri(&self) -> String {
        self.faulty.inner.uri().to_string()
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(HypervisorError::Failed {
                op: "connect",
                domain: String::new(),
                message: "Failed to connect socket: Connection refused (injected)".into(),
            });
        }
        self.faulty.alive.store(true, Ordering::SeqCst);
        let sub = subscribe(&self.faulty.inner, events.clone()).map_err(|e| HypervisorError::Failed {
            op: "subscribe",
            domain: String::new(),
            message: e.to_string(),
        })?;
        *self.events.lock().unwrap() = Some(events);
        self.connects.fetch_add(1, Ordering::SeqCst);
        Ok(Connection::new(self.faulty.clone(), Some(sub)))
    }
}
