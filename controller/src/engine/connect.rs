//! Opening the hypervisor connection and subscribing to its events, so the engine can
//! reconnect after libvirtd restarts without knowing which driver it talks to.

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::act::retry::RetryIdempotent;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::events::{start_event_loop, subscribe, EventSubscription, HypervisorEvent};
use crate::libvirt::{route_errors_to_tracing, LibvirtHost};

/// An open connection and what keeps its events flowing.
pub struct Connection {
    // Declared first so it is dropped (deregistered) before the hypervisor it belongs to.
    subscription: Option<EventSubscription>,
    pub hypervisor: Arc<dyn Hypervisor>,
}

impl Connection {
    /// A connection whose idempotent calls are retried after transient errors.
    pub fn new(hypervisor: Arc<dyn Hypervisor>, subscription: Option<EventSubscription>) -> Self {
        Connection { subscription, hypervisor: Arc::new(RetryIdempotent(hypervisor)) }
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
        route_errors_to_tracing();
        start_event_loop();
        let host = Arc::new(LibvirtHost::open(&self.uri)?);
        // A libvirtd that stops answering is noticed within ~15 s (the close callback fires).
        host.enable_keepalive(5, 3);
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

/// Connect in the background until it works (100 ms doubling to 5 s between tries), then hand
/// the connection to the engine loop.
pub(super) fn spawn_reconnect(
    connector: Arc<dyn Connector>,
    events: UnboundedSender<HypervisorEvent>,
    engine: UnboundedSender<super::Msg>,
) {
    tokio::spawn(async move {
        let attempt = || {
            let c = connector.clone();
            let ev = events.clone();
            async move {
                match tokio::task::spawn_blocking(move || c.connect(ev)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("connect task failed: {e}")),
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times();
        let connected = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|_| !engine.is_closed())
            .notify(|e, retry_in| tracing::warn!(%e, ?retry_in, "cannot connect to libvirt"))
            .await;
        if let Ok(conn) = connected {
            let _ = engine.send(super::Msg::Connected(conn));
        }
    });
}
