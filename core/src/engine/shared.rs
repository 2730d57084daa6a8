//! State shared by the engine loop, the domain workers and the network task: the current
//! connection, the status book, metrics, the durable memory, the workers' latest observations
//! and the progress of resync rounds (for readiness and liveness).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio::time::Instant;

use super::clock::Clock;
use super::metrics::Metrics;
use super::status::{DomainStatus, NetworkStatus, StatusBook, StatusReport};
use super::{EngineConfig, Msg};
use crate::act::calls::CallLimits;
use crate::act::remediation::Registry;
use crate::hypervisor::Hypervisor;
use crate::memory::MemoryStore;
use crate::observe::{ObservedDomain, ObservedNet, ObservedNetwork};
use crate::plan::restart::Tick;

/// Domain work under way, for the engine-idle signal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activity {
    /// Workers not parked waiting for an order or a timer, orders sent and not yet taken,
    /// health probes in flight. Zero (with no libvirt call in the pool) is idle.
    pub busy: usize,
    /// Parked workers with a timer armed (a look again, a health probe or deadline).
    pub timers: usize,
}

/// Counts as engine work under way (see `Shared::activity`) while it lives.
pub(crate) struct Busy(Arc<Shared>);

impl Busy {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.busy_add();
        Busy(shared)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy_sub();
    }
}

/// Work that is under way (a [`Busy`]) waits for time meanwhile: not busy. Not counted as a
/// domain worker's timer either: what ends the wait (libvirt back, for a reconnection) comes
/// from outside.
pub(crate) struct Waiting(Arc<Shared>);

impl Waiting {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.park(true, false);
        Waiting(shared)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.park(false, false);
    }
}

/// Which resync round is running and which workers have not looked yet.
#[derive(Default)]
pub(crate) struct ResyncRound {
    pub round: u64,
    pub waiting: HashSet<String>,
    pub last_done: Option<Instant>,
}

pub(crate) struct Shared {
    pub(super) hv: RwLock<Option<Arc<dyn Hypervisor>>>,
    pub(super) book: Mutex<StatusBook>,
    pub(super) meta: Mutex<StatusReport>,
    /// Bumped on every status change; the status writer and waiters watch it.
    pub(super) status_version: watch::Sender<u64>,
    /// Domain work under way and timers armed (the engine-idle signal tests wait for).
    pub(super) activity: watch::Sender<Activity>,
    pub(crate) metrics: Metrics,
    pub(crate) remediations: Registry,
    pub(crate) memory: Arc<MemoryStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) limits: Arc<CallLimits>,
    /// The status writer's own thread: never behind libvirt calls or path checks.
    pub(crate) status_io: crate::blocking::Pool,
    pub(crate) config: EngineConfig,
    pub(super) ready: AtomicBool,
    pub(super) reconnecting: AtomicBool,
    pub(super) connected_since: Mutex<Option<Instant>>,
    pub(super) msg: UnboundedSender<Msg>,
    /// The latest host-network observation, for domain workers' bridge checks.
    pub(super) net_snapshot: RwLock<Option<ObservedNet>>,
    /// Each managed domain as its worker last observed it (the network task's view of taps).
    pub(super) domains: RwLock<BTreeMap<String, ObservedDomain>>,
    /// libvirt networks (bridges of `type='network'` interfaces), refreshed on resync.
    pub(super) networks: RwLock<Vec<ObservedNetwork>>,
    pub(super) resync: Mutex<ResyncRound>,
    /// The network task's inbox, when it runs.
    pub(super) net_kicks: RwLock<Option<UnboundedSender<super::network::NetKick>>>,
    /// Managed domains that declare `health` and pass their probe now (startup ordering's
    /// `after` waits for this). Changes bump `status_version`.
    pub(super) healthy: RwLock<HashSet<String>>,
    /// Runs guest health probes for every worker (bounded concurrency, address cache).
    pub(crate) prober: crate::probe::Prober,
    /// Start ordering and the bound on concurrent starts (issue 13).
    pub(crate) startgate: Arc<super::startgate::StartGate>,
    /// What the connector says its connections can be trusted with.
    pub(super) capabilities: super::connect::Capabilities,
    /// Diagnosis of failed repairs, when the front end gave one.
    pub(super) explain: Option<Arc<dyn super::Explain>>,
}

impl Shared {
    pub(crate) fn hypervisor(&self) -> Option<Arc<dyn Hypervisor>> {
        self.hv.read().ok().and_then(|g| g.clone())
    }

    /// The engine's clock.
    pub(crate) fn tick(&self) -> Tick {
        self.clock.now()
    }

    /// The tokio instant at which the engine's clock reads `t`.
    pub(crate) fn instant_at(&self, t: Tick) -> Instant {
        let now = self.tick();
        let i = Instant::now();
        if t >= now {
            i.checked_add(t - now).unwrap_or(i + std::time::Duration::from_secs(86_400 * 365))
        } else {
            i
        }
    }

    /// A tick as wall-clock time (ticks are time since the epoch).
    pub(crate) fn wall_clock_at(&self, t: Tick) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)).unwrap_or_default()
    }

    /// Change a managed domain's status. A domain that is no longer managed has no entry and
    /// stays absent: a worker finishing its last pass after a reload cannot resurrect it.
    pub(crate) fn update_domain(&self, name: &str, f: impl FnOnce(&mut DomainStatus)) {
        {
            let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = book.get_mut(name) else { return };
            f(entry);
            let label = super::metrics::DomainLabel { domain: name.to_string() };
            self.metrics.domain_quarantined.get_or_create(&label).set(i64::from(entry.quarantined.is_some()));
            self.metrics.domain_stalled.get_or_create(&label).set(i64::from(entry.stalled.is_some()));
            self.metrics.stalled.set(book.values().filter(|d| d.stalled.is_some()).count() as i64);
            let quarantined = book.values().filter(|d| d.quarantined.is_some()).count();
            self.metrics.quarantined.set(quarantined as i64);
            let waiting = book.values().filter(|d| !d.waiting_for.is_empty()).count();
            self.metrics.waiting_starts.set(waiting as i64);
        }
        self.mark_dirty();
    }

    /// Start tracking a newly managed domain.
    pub(super) fn add_domain(&self, status: DomainStatus) {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).insert(status.name.clone(), status);
        self.mark_dirty();
    }

    /// Forget a domain that is no longer managed.
    pub(super) fn remove_domain(&self, name: &str) {
        {
            let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            book.remove(name);
            self.metrics.stalled.set(book.values().filter(|d| d.stalled.is_some()).count() as i64);
        }
        self.metrics.domain_quarantined.remove(&super::metrics::DomainLabel { domain: name.to_string() });
        self.metrics.domain_stalled.remove(&super::metrics::DomainLabel { domain: name.to_string() });
        self.domains.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.healthy.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.metrics.forget_health(name);
        self.prober.forget_address(name);
        self.mark_dirty();
    }

    pub(crate) fn update_network(&self, f: impl FnOnce(&mut NetworkStatus)) {
        {
            let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            f(meta.network.get_or_insert_with(Default::default));
        }
        self.mark_dirty();
    }

    pub(crate) fn net_snapshot(&self) -> Option<ObservedNet> {
        self.net_snapshot.read().ok().and_then(|g| g.clone())
    }

    pub(crate) fn networks(&self) -> Vec<ObservedNetwork> {
        self.networks.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Every managed domain as last observed by its worker.
    pub(crate) fn domain_snapshots(&self) -> Vec<ObservedDomain> {
        self.domains.read().map(|d| d.values().cloned().collect()).unwrap_or_default()
    }

    /// A worker observed its domain; true when what the network cares about changed (state or
    /// interfaces), so the network task should look again.
    pub(crate) fn publish_domain(&self, name: &str, observed: Option<ObservedDomain>) -> bool {
        let mut domains = self.domains.write().unwrap_or_else(|p| p.into_inner());
        let before = domains.get(name);
        let changed = match (&observed, before) {
            (Some(new), Some(old)) => new.state != old.state || new.interfaces != old.interfaces,
            (None, None) => false,
            _ => true,
        };
        match observed {
            Some(d) => {
                domains.insert(name.to_string(), d);
            }
            None => {
                domains.remove(name);
            }
        }
        changed
    }

    /// Record whether `name` passes its health probe now (only domains that declare `health`).
    pub(crate) fn set_healthy(&self, name: &str, healthy: bool) {
        let changed = {
            let mut set = self.healthy.write().unwrap_or_else(|p| p.into_inner());
            if healthy {
                set.insert(name.to_string())
            } else {
                set.remove(name)
            }
        };
        if changed {
            self.mark_dirty();
        }
    }

    /// The managed domains that pass their health probe now.
    pub(crate) fn healthy_domains(&self) -> HashSet<String> {
        self.healthy.read().map(|h| h.clone()).unwrap_or_default()
    }

    /// Ask the network task (if it runs) to look again.
    pub(super) fn kick_network(&self, kick: super::network::NetKick) {
        if let Some(tx) = self.net_kicks.read().ok().and_then(|g| g.clone()) {
            let _ = tx.send(kick);
        }
    }

    /// One more piece of engine work under way (see `activity`).
    pub(super) fn busy_add(&self) {
        self.activity.send_modify(|a| a.busy += 1);
    }

    /// A piece of domain work ended.
    pub(super) fn busy_sub(&self) {
        self.activity.send_modify(|a| a.busy = a.busy.saturating_sub(1));
    }

    /// A worker parks (`true`, with a timer armed or not) or wakes (`false`, the timer it had).
    pub(super) fn park(&self, parked: bool, timer: bool) {
        self.activity.send_modify(|a| {
            let t = usize::from(timer);
            if parked {
                a.busy = a.busy.saturating_sub(1);
                a.timers += t;
            } else {
                a.busy += 1;
                a.timers = a.timers.saturating_sub(t);
            }
        });
    }

    /// Send a worker an order, counted as work until the worker takes it.
    pub(super) fn order(&self, tx: &UnboundedSender<super::worker::Order>, order: super::worker::Order) {
        self.busy_add();
        if tx.send(order).is_err() {
            self.busy_sub();
        }
    }

    pub(crate) fn mark_dirty(&self) {
        self.status_version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A call found the connection gone: reconnect.
    pub(crate) fn connection_lost(&self, why: String) {
        let _ = self.msg.send(Msg::ConnectionLost(why));
    }

    /// Start a resync round over `names`; true when it is already complete (nothing to wait for).
    pub(super) fn begin_round(&self, names: impl IntoIterator<Item = String>) -> u64 {
        let mut r = self.resync.lock().unwrap_or_else(|p| p.into_inner());
        r.round += 1;
        r.waiting = names.into_iter().collect();
        let round = r.round;
        let empty = r.waiting.is_empty();
        drop(r);
        if empty {
            self.round_complete();
        }
        round
    }

    /// A worker looked at its domain for resync round `round`.
    pub(crate) fn ack_round(&self, name: &str, round: u64) {
        let mut r = self.resync.lock().unwrap_or_else(|p| p.into_inner());
        if r.round != round || !r.waiting.remove(name) || !r.waiting.is_empty() {
            return;
        }
        drop(r);
        self.round_complete();
    }

    /// A domain is no longer managed: nobody waits for it.
    pub(super) fn forget_round(&self, name: &str) {
        let mut r = self.resync.lock().unwrap_or_else(|p| p.into_inner());
        if r.waiting.remove(name) && r.waiting.is_empty() && r.round > 0 {
            drop(r);
            self.round_complete();
        }
    }

    fn round_complete(&self) {
        self.resync.lock().unwrap_or_else(|p| p.into_inner()).last_done = Some(Instant::now());
        crate::engine::release_free_memory();
        if self.hypervisor().is_some() {
            self.metrics.ready.set(1);
            if !self.ready.swap(true, Ordering::Relaxed) {
                let managed = self.book.lock().map(|b| b.len()).unwrap_or(0);
                tracing::info!(managed, "first resync done; ready");
            }
        }
        self.mark_dirty();
    }

    /// `name` was seen running: if the memory is lost, what is remembered about it is current
    /// again; once every managed domain was, the memory is rebuilt and the loss forgotten.
    pub(crate) fn rebuilt(&self, name: &str) {
        if self.memory.read(|m| m.lost_for(name).is_none()) {
            return;
        }
        let managed: Vec<String> = self.book.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let done = self
            .memory
            .update(|m| {
                let Some(lost) = m.lost.as_mut() else { return false };
                lost.rebuilt.insert(name.to_string());
                let done = managed.iter().all(|d| lost.rebuilt.contains(d));
                if done {
                    m.lost = None;
                }
                done
            })
            .0;
        if done {
            tracing::info!("memory rebuilt: every managed domain was seen running since it was lost");
        }
        self.mark_dirty();
    }

    /// `virtwarden memory confirm`: an admin vouches that what is remembered now is right (the
    /// domains left down may be started by their policies). The text says what was done.
    pub(crate) fn confirm_memory(&self) -> (String, u64) {
        let (was, version) = self.memory.update(|m| m.lost.take());
        self.mark_dirty();
        match was {
            Some(l) => {
                tracing::info!(loss = %l.describe(), "lost memory confirmed by an admin");
                (format!("confirmed: the memory lost ({}) is no longer waited for; domains left down are looked at again", l.describe()), version)
            }
            None => ("the memory is not lost; nothing to confirm".to_string(), version),
        }
    }

    pub(crate) fn report(&self) -> StatusReport {
        let mut report = self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.domains = self.book.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        report.memory_error = self.memory.problem();
        report.memory_lost = self.memory.read(|m| m.lost.as_ref().map(|l| {
            format!(
                "{}; domains that are down stay down (unless restart: always) until seen running or `virtwarden memory confirm`; {} seen running since",
                l.describe(),
                l.rebuilt.len()
            )
        }));
        self.metrics.memory_lost.set(i64::from(report.memory_lost.is_some()));
        report.connected = self.hypervisor().is_some();
        report.ready = self.ready.load(Ordering::Relaxed);
        report.updated = Some(Utc::now());
        report
    }
}
