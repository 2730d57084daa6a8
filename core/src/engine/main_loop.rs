//! The engine loop: turns triggers into orders for the domain workers, keeps exactly one
//! worker per managed domain across reloads (a replaced policy goes to the same worker), runs
//! resync rounds and hands connections out.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use virtwarden_policies::DesiredState;

use super::connect::{self, Connection, Connector};
use super::network;
use super::shared::Shared;
use super::status::DomainStatus;
use super::worker::{Order, Worker};
use super::{status_writer, EngineConfig, Msg};
use crate::hypervisor::events::HypervisorEvent;
use crate::observe::ObservedNetwork;

struct WorkerEntry {
    tx: UnboundedSender<Order>,
    task: JoinHandle<()>,
}

pub(super) struct Engine {
    shared: Arc<Shared>,
    connector: Arc<dyn Connector>,
    config: EngineConfig,
    desired: DesiredState,
    workers: HashMap<String, WorkerEntry>,
    /// Workers of domains no longer managed, until they have finished their last action.
    retiring: HashMap<String, JoinHandle<()>>,
    msg_rx: UnboundedReceiver<Msg>,
    events_tx: UnboundedSender<HypervisorEvent>,
    events_rx: UnboundedReceiver<HypervisorEvent>,
    connection: Option<Connection>,
    desired_tx: watch::Sender<Arc<DesiredState>>,
    network: Option<super::NetworkRunner>,
}

impl Engine {
    pub(super) fn new(
        shared: Arc<Shared>,
        connector: Arc<dyn Connector>,
        network: Option<super::NetworkRunner>,
        config: EngineConfig,
        msg_rx: UnboundedReceiver<Msg>,
    ) -> Self {
        let (events_tx, events_rx) = unbounded_channel();
        Engine {
            shared,
            connector,
            config,
            desired: DesiredState::default(),
            workers: HashMap::new(),
            retiring: HashMap::new(),
            msg_rx,
            events_tx,
            events_rx,
            connection: None,
            desired_tx: watch::channel(Arc::new(DesiredState::default())).0,
            network,
        }
    }

    pub(super) async fn run(mut self, desired: DesiredState) {
        if let Some(path) = self.config.status_path.clone() {
            tokio::spawn(status_writer::run(self.shared.clone(), path));
        }
        tokio::spawn(self.shared.memory.clone().run_writer());
        tokio::spawn(super::startgate::run(self.shared.clone()));
        self.set_desired(desired);
        if self.config.network {
            let (tx, rx) = unbounded_channel();
            let task =
                network::NetworkTask::new(self.shared.clone(), self.desired_tx.subscribe(), rx, self.config.flap);
            match &self.network {
                Some(runner) => drop(tokio::spawn(runner(task))),
                None => tracing::error!("host-network reconciliation is on but no network backend was given"),
            };
            *self.shared.net_kicks.write().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        }
        self.start_reconnect("starting".into());
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_event(event),
                Some(msg) = self.msg_rx.recv() => {
                    if !self.on_msg(msg) {
                        break;
                    }
                }
                _ = resync.tick() => self.start_resync(),
            }
        }
        self.stop().await;
    }

    fn on_event(&mut self, event: HypervisorEvent) {
        match event {
            HypervisorEvent::Lifecycle(ev) => {
                tracing::debug!(domain = %ev.domain, event = %ev.text(), "libvirt event");
                // Unmanaged domains have no worker: their events are ignored.
                if let Some(w) = self.workers.get(&ev.domain) {
                    self.shared.startgate.domain_event(&ev.domain);
                    self.shared.order(&w.tx, Order::Look { event: Some(ev), round: None });
                }
            }
            // Guest health evidence and faults: the domain's worker records and weighs them.
            HypervisorEvent::Guest(ev) => {
                tracing::debug!(domain = %ev.domain, event = %ev.kind.text(), "libvirt guest event");
                if let Some(w) = self.workers.get(&ev.domain) {
                    self.shared.order(&w.tx, Order::Guest(ev));
                }
            }
            HypervisorEvent::ConnectionClosed { reason } => {
                self.start_reconnect(format!("connection closed ({reason})"))
            }
        }
    }

    /// Returns false when the engine should stop.
    fn on_msg(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Shutdown => return false,
            Msg::Reload(desired) => {
                self.set_desired(desired);
                self.start_resync();
            }
            Msg::PolicyRejected(error) => {
                self.shared.meta.lock().unwrap_or_else(|p| p.into_inner()).policy_error = Some(error);
                self.shared.mark_dirty();
            }
            Msg::Resync => self.start_resync(),
            Msg::Ping(reply) => {
                let _ = reply.send(());
            }
            Msg::KickAll => {
                for w in self.workers.values() {
                    self.shared.order(&w.tx, Order::Look { event: None, round: None });
                }
            }
            Msg::Release { domain, reply } => match self.workers.get(&domain) {
                Some(w) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    self.shared.order(&w.tx, Order::Release(tx));
                    tokio::spawn(async move {
                        let text = rx.await.unwrap_or_else(|_| Err("the domain's worker stopped".to_string()));
                        let _ = reply.send(text);
                    });
                }
                // Not a domain: a bridge (or port) whose uplink takeover is held?
                None => match crate::act::uplink::release(&*self.shared.memory, &domain) {
                    Ok(held) if !held.is_empty() => {
                        let what: Vec<String> =
                            held.iter().map(|h| format!("{} (held: {})", h.what(), h.reason)).collect();
                        let _ = reply.send(Ok(format!("released {}; trying again now", what.join(", "))));
                        self.kick_network(network::NetKick::AllDomains);
                    }
                    Ok(_) => {
                        let _ = reply.send(Err(format!(
                            "`{domain}` is not managed: neither a domain of a policy in force nor a bridge with a held uplink change"
                        )));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("cannot release {domain}: {e}")));
                    }
                },
            },
            Msg::Networks(networks, _busy) => {
                *self.shared.networks.write().unwrap_or_else(|p| p.into_inner()) = networks;
                self.kick_network(network::NetKick::AllDomains);
            }
            Msg::Connected(conn, _busy) => {
                tracing::info!(uri = %self.connector.uri(), events = conn.has_events(), "connected to libvirt");
                if let Ok(mut hv) = self.shared.hv.write() {
                    *hv = Some(conn.hypervisor.clone());
                }
                // Drop the old subscription (if any) only after the new one is in place.
                self.connection = Some(conn);
                self.shared.reconnecting.store(false, Ordering::Relaxed);
                *self.shared.connected_since.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::time::Instant::now());
                self.shared.metrics.connected.set(1);
                self.shared.mark_dirty();
                self.start_resync();
            }
            Msg::ConnectionLost(why) => self.start_reconnect(why),
        }
        true
    }

    /// Put `desired` in force: a worker for each newly managed domain, the new policy to the
    /// existing worker of a domain whose policy changed (one actor per domain, always), a stop
    /// order to workers of domains no longer managed.
    fn set_desired(&mut self, desired: DesiredState) {
        self.shared.startgate.set_desired(&desired);
        let mut keep: HashMap<String, WorkerEntry> = HashMap::new();
        for managed in &desired.domains {
            let name = managed.spec.name.clone();
            match self.workers.remove(&name) {
                Some(entry) => {
                    self.shared.order(&entry.tx, Order::Policy(Box::new(managed.clone())));
                    self.shared.update_domain(&name, |s| s.policy = managed.policy.clone());
                    keep.insert(name, entry);
                }
                None => {
                    let (tx, rx) = unbounded_channel();
                    // A worker of the same domain may still be finishing its last action.
                    let predecessor = self.retiring.remove(&name);
                    self.shared.add_domain(DomainStatus {
                        name: name.clone(),
                        policy: managed.policy.clone(),
                        state: "unknown".into(),
                        ..Default::default()
                    });
                    // Shows what is remembered (a quarantine) from the start.
                    let worker = Worker::new(self.shared.clone(), managed.clone(), tx.clone(), rx);
                    let task = tokio::spawn(supervise(worker, predecessor));
                    keep.insert(name, WorkerEntry { tx, task });
                }
            }
        }
        // Workers left over are unmanaged now: they finish (or cancel) their action and end.
        for (name, entry) in self.workers.drain() {
            self.shared.order(&entry.tx, Order::Stop);
            self.shared.remove_domain(&name);
            self.shared.forget_round(&name);
            self.retiring.insert(name, entry.task);
        }
        self.retiring.retain(|_, t| !t.is_finished());
        self.workers = keep;
        {
            let mut meta = self.shared.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.policies = desired.policies.clone();
            meta.policy_error = None;
        }
        self.shared.mark_dirty();
        self.desired_tx.send_replace(Arc::new(desired.clone()));
        self.desired = desired;
        self.forget_unmanaged();
    }

    /// Drop the memory of domains no policy has named for the grace period (logged).
    fn forget_unmanaged(&self) {
        let (now, grace, desired) = (self.shared.tick(), self.config.memory_grace, &self.desired);
        let managed = |name: &str| desired.domain(name).is_some();
        if !self.shared.memory.read(|m| m.has_unmanaged_work(managed, now, grace)) {
            return;
        }
        let (dropped, _) = self.shared.memory.update(|m| m.forget_unmanaged(managed, now, grace));
        for name in dropped {
            tracing::info!(domain = %name, ?grace, "forgot the memory of a domain no policy names");
        }
    }

    fn kick_network(&self, kick: network::NetKick) {
        self.shared.kick_network(kick);
    }

    /// Every managed worker looks at its domain once (reading only managed domains); READY
    /// and liveness follow the rounds. libvirt's network list is refreshed alongside.
    fn start_resync(&mut self) {
        self.forget_unmanaged();
        let Some(hv) = self.shared.hypervisor() else {
            return;
        };
        let round = self.shared.begin_round(self.workers.keys().cloned());
        for w in self.workers.values() {
            self.shared.order(&w.tx, Order::Look { event: None, round: Some(round) });
        }
        let tx = self.shared.msg.clone();
        let deadline = self.config.read_deadline;
        let busy = super::shared::Busy::new(self.shared.clone());
        let mut list = self.shared.limits.pool().spawn(move || list_networks(hv.as_ref()));
        tokio::spawn(async move {
            match list.within(deadline).await {
                Some(Ok(Ok(networks))) => {
                    let _ = tx.send(Msg::Networks(networks, busy));
                }
                Some(Ok(Err(e))) => tracing::warn!(%e, "cannot list libvirt networks"),
                Some(Err(e)) => tracing::warn!(%e, "network listing failed"),
                None => tracing::warn!(?deadline, "listing libvirt networks hung"),
            }
        });
    }

    fn start_reconnect(&mut self, why: String) {
        if self.shared.reconnecting.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.connection.is_some() || self.shared.ready.load(Ordering::Relaxed) {
            tracing::error!(reason = %why, uri = %self.connector.uri(), "lost libvirt; reconnecting");
        } else {
            tracing::info!(uri = %self.connector.uri(), "connecting to libvirt");
        }
        if let Ok(mut hv) = self.shared.hv.write() {
            *hv = None;
        }
        self.connection = None;
        *self.shared.connected_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.shared.metrics.connected.set(0);
        self.shared.metrics.ready.set(0);
        self.shared.mark_dirty();
        // Tap actions wait while domain data is stale.
        self.kick_network(network::NetKick::AllDomains);
        connect::spawn_reconnect(self.connector.clone(), self.events_tx.clone(), self.shared.clone());
    }

    async fn stop(mut self) {
        tracing::info!("stopping: letting in-flight actions finish");
        for w in self.workers.values() {
            self.shared.order(&w.tx, Order::Stop);
        }
        let tasks: Vec<JoinHandle<()>> =
            self.workers.drain().map(|(_, w)| w.task).chain(self.retiring.drain().map(|(_, t)| t)).collect();
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(self.config.shutdown_grace, all).await.is_err() {
            tracing::warn!(grace = ?self.config.shutdown_grace, "some actions were still running at shutdown");
        }
        let version = self.shared.memory.update(|_| ()).1;
        if !self.shared.memory.flush(version, self.config.memory_flush).await {
            tracing::warn!("the last memory write did not complete before shutdown");
        }
        if let Some(path) = self.config.status_path.clone() {
            let report = self.shared.report();
            // fsync and rename: on the status writer's own thread, bounded.
            let mut write = self.shared.status_io.spawn(move || super::status::write_atomically(&path, &report));
            match write.within(self.config.memory_flush).await {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => tracing::warn!(%e, "final status write failed"),
                Some(Err(e)) => tracing::warn!(%e, "final status write did not finish"),
                None => tracing::warn!("final status write did not finish in time"),
            }
        }
        self.connection = None;
    }
}

fn list_networks(
    hv: &dyn crate::hypervisor::Hypervisor,
) -> Result<Vec<ObservedNetwork>, crate::hypervisor::HypervisorError> {
    hv.list_networks()
}

/// Run a worker; a panic inside it is reported and the worker restarted from what is
/// remembered (with a growing pause), so one bug cannot leave a domain unwatched.
async fn supervise(mut worker: Worker, predecessor: Option<JoinHandle<()>>) {
    if let Some(p) = predecessor {
        let _ = p.await;
    }
    let mut pause = Duration::from_millis(100);
    loop {
        match std::panic::AssertUnwindSafe(worker.run()).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                worker.after_panic(&what);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(60));
            }
        }
    }
}
