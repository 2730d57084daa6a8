//! The engine's [`Connector`]s for libvirt: one that opens a URI (again after each loss), with
//! keepalive and event subscriptions, and one that shares a connection the caller already has
//! (libvirt's test driver keeps its state in the connection, so tests act on the same one).

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::events::{start_event_loop, subscribe};
use super::{is_test_uri, route_errors_to_tracing, LibvirtHost};
use crate::engine::connect::{Capabilities, Connection, Connector};
use crate::hypervisor::events::HypervisorEvent;
use crate::hypervisor::HypervisorError;

/// What a libvirt connection at `uri` can be trusted with.
fn capabilities_for(uri: &str) -> Capabilities {
    // libvirt's test driver makes guest addresses up from its network's range: probing them
    // would send requests to whatever host really has that address.
    Capabilities { real_guest_addresses: !is_test_uri(uri) }
}

/// libvirt at a URI.
pub struct LibvirtConnector {
    pub uri: String,
}

impl Connector for LibvirtConnector {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities_for(&self.uri)
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        route_errors_to_tracing();
        start_event_loop();
        let host = Arc::new(LibvirtHost::open(&self.uri)?);
        // A libvirtd that stops answering is noticed within ~15 s (the close callback fires).
        host.enable_keepalive(5, 3);
        match subscribe(&host, events) {
            Ok(s) => Ok(Connection::new(host, Some(s))),
            Err(e) => {
                tracing::warn!(%e, "no libvirt events; relying on the periodic resync");
                Ok(Connection::without_events(host))
            }
        }
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

    fn capabilities(&self) -> Capabilities {
        capabilities_for(self.host.uri())
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
