//! Opening the hypervisor connection and subscribing to its events, so the engine can
//! reconnect after libvirtd restarts without knowing which driver it talks to.

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::events::{start_event_loop, subscribe, EventSubscription, HypervisorEvent};
use crate::libvirt::LibvirtHost;

/// An open connection and what keeps its events flowing.
pub struct Connection {
    // Declared first so it is dropped (deregistered) before the hypervisor it belongs to.
    subscription: Option<EventSubscription>,
    pub hypervisor: Arc<dyn Hypervisor>,
}

impl Connection {
    pub fn new(hypervisor: Arc<dyn Hypervisor>, subscription: Option<EventSubscription>) -> Self {
        Connection { subscription, hypervisor }
    }

    pub fn has_events(&self) -> bool {
        self.subscription.is_some()
    }
}

/// Opens connections (again and again, after each loss).
pub trait Connector: Send + Sync + 'static {
    fn uri(&self) -> String;
    /// Open a connection whose events go to `events`. Blocks.
    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError>;
}

/// libvirt at a URI.
pub struct LibvirtConnector {
    pub uri: String,
}

impl Connector for LibvirtConnector {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        start_event_loop();
        let host = Arc::new(LibvirtHost::open(&self.uri)?);
        let subscription = match subscribe(&host, events) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%e, "no libvirt events; relying on the periodic resync");
                None
            }
        };
        Ok(Connection::new(host, subscription))
    }
}

/// An already-open libvirt connection, shared with the caller (tests: the test driver's state
/// lives in the connection, so the test must act on the same one).
pub struct SharedConnector {
    pub host: Arc<LibvirtHost>,
}

impl Connector for SharedConnector {
    fn uri(&self) -> String {
        self.host.uri().to_string()
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        let subscription = subscribe(&self.host, events).map_err(|e| HypervisorError::Failed {
            op: "subscribe",
            domain: String::new(),
            message: e.to_string(),
        })?;
        Ok(Connection::new(self.host.clone(), Some(subscription)))
    }
}
