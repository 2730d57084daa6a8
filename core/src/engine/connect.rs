//! The hypervisor connection as the engine sees it: a [`Connector`] opens it (again after each
//! loss) and reports what it can be trusted with; the engine reconnects without knowing which
//! backend it talks to. The libvirt connectors live in the `virtwarden` crate (`libvirt/connect.rs`).

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc::UnboundedSender;

use crate::act::retry::RetryIdempotent;
use crate::hypervisor::events::HypervisorEvent;
use crate::hypervisor::{Hypervisor, HypervisorError};

/// Whatever keeps a connection's events flowing while it is held (libvirt: the registered
/// callbacks, deregistered on drop).
pub trait EventGuard: Send + Sync {}

impl<T: Send + Sync> EventGuard for T {}

/// An open connection and what keeps its events flowing.
pub struct Connection {
    // Declared first so it is dropped (deregistered) before the hypervisor it belongs to.
    subscription: Option<Box<dyn EventGuard>>,
    pub hypervisor: Arc<dyn Hypervisor>,
}

impl Connection {
    /// A connection whose idempotent calls are retried after transient errors; its events keep
    /// flowing while `subscription` is held.
    pub fn new<S: EventGuard + 'static>(hypervisor: Arc<dyn Hypervisor>, subscription: Option<S>) -> Self {
        let subscription = subscription.map(|s| Box::new(s) as Box<dyn EventGuard>);
        Connection { subscription, hypervisor: Arc::new(RetryIdempotent(hypervisor)) }
    }

    /// A connection without events (the periodic resync still runs).
    pub fn without_events(hypervisor: Arc<dyn Hypervisor>) -> Self {
        Connection { subscription: None, hypervisor: Arc::new(RetryIdempotent(hypervisor)) }
    }

    pub fn has_events(&self) -> bool {
        self.subscription.is_some()
    }
}

/// What a backend's connection can be trusted with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The guest addresses it reports (guest agent, DHCP lease, ARP) are real ones. libvirt's
    /// test driver makes them up, and probing them would reach whatever host has that address;
    /// without this, health probes need `address` in the policy.
    pub real_guest_addresses: bool,
}

/// Opens connections (again and again, after each loss).
pub trait Connector: Send + Sync + 'static {
    fn uri(&self) -> String;
    /// What its connections can be trusted with; by default nothing beyond domain state
    /// (do no harm: a backend says what it can do).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Open a connection whose events go to `events`. Blocks.
    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError>;
}

/// Connect in the background until it works (100 ms doubling to 5 s between tries), then hand
/// the connection to the engine loop. Engine work under way (see `Shared::activity`) until the
/// engine loop took the connection, but for the waits between tries.
pub(super) fn spawn_reconnect(
    connector: Arc<dyn Connector>,
    events: UnboundedSender<HypervisorEvent>,
    shared: Arc<super::shared::Shared>,
) {
    let busy = super::shared::Busy::new(shared.clone());
    let engine = shared.msg.clone();
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
            .sleep(move |d| pause(&shared, d))
            .when(|_| !engine.is_closed())
            .notify(|e, retry_in| tracing::warn!(%e, ?retry_in, "cannot connect to libvirt"))
            .await;
        if let Ok(conn) = connected {
            let _ = engine.send(super::Msg::Connected(conn, busy));
        }
    });
}

/// Wait `d` between tries (not busy meanwhile).
fn pause(shared: &Arc<super::shared::Shared>, d: Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
    let waiting = super::shared::Waiting::new(shared.clone());
    async move {
        tokio::time::sleep(d).await;
        drop(waiting);
    }
}
