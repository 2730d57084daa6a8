//! The Kubernetes front end (`virtwarden operator`): watches cluster-scoped HostPolicy resources,
//! this node's Node object and the enactments, selects and merges the policies for this node once
//! both the policy and the node caches are complete, and drives the same engine as `run`. Each
//! node writes only its own HostPolicyEnactments, and only when they change. When the API server
//! goes away the engine keeps enforcing the last policy it saw.

pub mod aggregate;
pub mod backoff;
pub mod enactment;
pub mod events;
pub mod kube_io;
pub mod lease;
pub mod probes;
pub mod select;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;
use virtwarden_crd::tolerant::WatchedHostPolicy;
use virtwarden_crd::{HostPolicyEnactment, HostPolicyEnactmentStatus, HostPolicyStatus};
use virtwarden_policies::DesiredState;

use crate::act::remediation::Registry;
use crate::engine::status::{DomainStatus, StatusReport};
use crate::engine::{EngineConfig, EngineHandle};
use crate::exit;
use enactment::{enactment_status, keep_transition_times, PolicyView};
use select::{select, Selection};

/// What the operator needs from the engine: put a desired state in force, read its status, and
/// hear about status changes. `EngineHandle` is the real one.
pub trait NodeEngine: Send + Sync + 'static {
    fn reload(&self, desired: DesiredState);
    fn status(&self) -> StatusReport;
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl NodeEngine for EngineHandle {
    fn reload(&self, desired: DesiredState) {
        EngineHandle::reload(self, desired)
    }
    fn status(&self) -> StatusReport {
        EngineHandle::status(self)
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        EngineHandle::subscribe(self)
    }
}

/// Options of `virtwarden operator`.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    pub uri: String,
    pub node: String,
    pub resync: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub network: bool,
    /// Control socket directory.
    pub state_dir: std::path::PathBuf,
    /// Durable memory.
    pub data_dir: std::path::PathBuf,
    /// The host-wide lock.
    pub lock_file: std::path::PathBuf,
    /// Where `exec` remediation hooks may come from (`--allow-exec-dir`).
    pub exec: crate::act::hook::ExecPolicy,
    /// At most this many starts at once (`--max-concurrent-starts`).
    pub max_concurrent_starts: usize,
}

/// Status writes are batched: at most one round per this interval.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// A change is written this long after it was seen (when the last round is older than
/// `STATUS_INTERVAL`), so the engine's reaction to it (milliseconds) goes in the same write.
/// Rounds used to run on a fixed 2 s tick, so a lone change waited 1 s on average and up to 2 s.
const STATUS_DEBOUNCE: Duration = Duration::from_millis(100);

pub async fn run(opts: OperatorOptions) -> i32 {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration: {e}");
            return exit::RUNTIME;
        }
    };
    // One writer per host, whichever front end it is.
    let _lock = match crate::service::prepare(&opts.lock_file, "operator", &opts.state_dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let config = EngineConfig {
        resync: opts.resync,
        network: opts.network,
        data_dir: Some(opts.data_dir.clone()),
        max_concurrent_starts: opts.max_concurrent_starts,
        ..Default::default()
    };
    let start = crate::service::Start {
        who: "operator",
        uri: &opts.uri,
        network: opts.network,
        config,
        remediations: Registry::with_exec_policy(opts.exec.clone()),
        desired: Default::default(),
        metrics_addr: opts.metrics_addr,
        state_dir: &opts.state_dir,
        reloads: None,
    };
    // The endpoint's health includes the API server's (a node cut off from it is not live).
    let api_health = probes::ApiHealth::default();
    let api = api_health.clone();
    let served = move |engine: &EngineHandle| probes::OperatorProbes { engine: engine.clone(), api };
    let crate::service::Running { engine, task: mut engine_task } = match crate::service::start(start, served).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return exit::RUNTIME,
    };
    let mut op = Operator::new(client, opts.node.clone(), engine.clone());
    op.api_health = api_health;
    tokio::select! {
        _ = op.run() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = &mut engine_task => return exit::RUNTIME,
    }
    engine.shutdown();
    let _ = engine_task.await;
    exit::OK
}

/// The operator's state for one node.
pub struct Operator {
    client: Client,
    node: String,
    /// The operator's own namespace (the client's default: the pod's): its Lease and Events.
    namespace: String,
    engine: Arc<dyn NodeEngine>,
    selection: Selection,
    events: events::EventPublisher,
    /// Per selected policy: the enactment status this node last wrote, for which policy uid.
    written: HashMap<String, (String, HostPolicyEnactmentStatus)>,
    /// Per policy: a wrong aggregate this node waits to repair in its turn, and since when.
    pending: HashMap<String, (HostPolicyStatus, Instant)>,
    /// Per policy: its resource version when this node wrote its aggregate. Until the watch
    /// delivers a newer one, the cached status is older than that write.
    awaiting: HashMap<String, Option<String>>,
    /// Policies (uid, generation) whose ignored fields were already logged.
    warned: HashSet<(String, Option<i64>)>,
    /// What `/readyz` says about the API.
    pub api_health: probes::ApiHealth,
    /// Status writes sent so far (the rate limit counts rounds that wrote).
    writes: u64,
}

impl Operator {
    pub fn new(client: Client, node: String, engine: impl NodeEngine) -> Self {
        let namespace = client.default_namespace().to_string();
        Operator {
            events: events::EventPublisher::new(client.clone(), node.clone(), namespace.clone()),
            client,
            node,
            namespace,
            engine: Arc::new(engine),
            selection: Selection::default(),
            written: HashMap::new(),
            pending: HashMap::new(),
            awaiting: HashMap::new(),
            warned: HashSet::new(),
            api_health: probes::ApiHealth::default(),
            writes: 0,
        }
    }

    /// Watch policies, the node and the enactments until the process stops. Watch errors back
    /// off and retry; meanwhile local healing goes on with the last selection.
    pub async fn run(&mut self) {
        let (policies, policy_writer) = reflector::store::<WatchedHostPolicy>();
        let (nodes, node_writer) = reflector::store::<Node>();
        let (enactments, enactment_writer) = reflector::store::<HostPolicyEnactment>();
        let (leases, lease_writer) = reflector::store::<Lease>();
        let policy_api: Api<WatchedHostPolicy> = Api::all(self.client.clone());
        let node_api: Api<Node> = Api::all(self.client.clone());
        let enactment_api: Api<HostPolicyEnactment> = Api::all(self.client.clone());
        let lease_api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let lease_cfg = watcher::Config::default().labels(kube_io::NODE_LABEL);
        let retry = backoff::CappedBackoff::default;
        let mut policy_events =
            watcher(policy_api, watcher::Config::default()).backoff(retry()).reflect(policy_writer).boxed();
        let mut node_events = watcher(node_api, node_cfg).backoff(retry()).reflect(node_writer).boxed();
        let mut enactment_events =
            watcher(enactment_api, watcher::Config::default()).backoff(retry()).reflect(enactment_writer).boxed();
        let mut lease_events = watcher(lease_api, lease_cfg).backoff(retry()).reflect(lease_writer).boxed();
        // The heartbeat runs on its own: a slow status round never delays it.
        let heartbeat = tokio::spawn(lease::heartbeat(self.client.clone(), self.namespace.clone(), self.node.clone()));
        let _heartbeat = AbortOnDrop(heartbeat);
        // Selecting from half-filled caches would drop and re-add policies, or select with no
        // labels: select only once both the policy and the node lists are complete. Status is
        // compared with the enactments as listed, and counts nodes alive by their Leases, so
        // writing waits for those lists too.
        let (p, n, e, l) = (policies.clone(), nodes.clone(), enactments.clone(), leases.clone());
        let selection_ready = async move { p.wait_until_ready().await.is_ok() && n.wait_until_ready().await.is_ok() };
        let enactments_ready = async move { e.wait_until_ready().await.is_ok() && l.wait_until_ready().await.is_ok() };
        tokio::pin!(selection_ready, enactments_ready);
        let (mut selecting, mut reporting) = (false, false);
        let mut changes = self.engine.subscribe();
        // When the last status round that wrote something ran, and since when something is
        // waiting to be written. Rounds that only compare (most: echoes of this node's own
        // writes, heartbeats) do not hold the next change back.
        let mut last_round: Option<Instant> = None;
        let mut last_check = Instant::now();
        let mut dirty_since: Option<Instant> = None;
        // A node whose Lease expires sends nothing: look at the heartbeats again regularly.
        let mut heartbeats = tokio::time::interval(lease::RENEW_EVERY);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut api_down = false;
        let mut dirty = true;
        let mut urgent = false;
        loop {
            let mut reselect = false;
            let synced = selecting && reporting;
            if dirty && dirty_since.is_none() {
                dirty_since = Some(Instant::now());
            }
            let want_round = synced && !api_down && (dirty || !self.pending.is_empty());
            let due = round_due(dirty_since.filter(|_| dirty), last_round.filter(|_| !urgent), last_check);
            tokio::select! {
                ready = &mut selection_ready, if !selecting => {
                    if !ready { return; }
                    selecting = true;
                    reselect = true;
                    if reporting && !api_down { self.api_health.set(None); }
                }
                ready = &mut enactments_ready, if !reporting => {
                    if !ready { return; }
                    reporting = true;
                    if selecting && !api_down { self.api_health.set(None); }
                }
                ev = policy_events.next() => match ev {
                    Some(Ok(_)) => { reselect = selecting; dirty = true; api_back(&mut api_down, synced, &self.api_health); }
                    Some(Err(e)) => api_lost(&mut api_down, &e, &self.api_health),
                    None => return,
                },
                ev = node_events.next() => match ev {
                    Some(Ok(_)) => { reselect = selecting; api_back(&mut api_down, synced, &self.api_health); }
                    Some(Err(e)) => api_lost(&mut api_down, &e, &self.api_health),
                    None => return,
                },
                ev = enactment_events.next() => match ev {
                    Some(Ok(ev)) => { self.saw_enactment(&ev); dirty = true; api_back(&mut api_down, synced, &self.api_health); }
                    Some(Err(e)) => api_lost(&mut api_down, &e, &self.api_health),
                    None => return,
                },
                ev = lease_events.next() => match ev {
                    Some(Ok(_)) => { dirty = true; api_back(&mut api_down, synced, &self.api_health); }
                    Some(Err(e)) => api_lost(&mut api_down, &e, &self.api_health),
                    None => return,
                },
                _ = heartbeats.tick() => dirty = true,
                changed = changes.changed() => {
                    if changed.is_err() { return; }
                    dirty = true;
                }
                _ = tokio::time::sleep_until(due), if want_round => {
                    let alive = lease::alive_nodes(&leases.state(), k8s_openapi::jiff::Timestamp::now());
                    let (started, writes) = (Instant::now(), self.writes);
                    // What changes while this round runs is seen by the engine's notifications.
                    dirty_since = None;
                    urgent = false;
                    dirty = !self.write_statuses(&policies.state(), &enactments.state(), &alive).await;
                    if self.writes != writes {
                        last_round = Some(started);
                    }
                    last_check = started;
                }
            }
            if reselect {
                let labels: BTreeMap<String, String> = nodes
                    .state()
                    .iter()
                    .find(|n| n.name_any() == self.node)
                    .map(|n| n.labels().clone())
                    .unwrap_or_default();
                // What an admin just changed is reported at once, not after the interval.
                urgent |= self.reselect(&policies.state(), &labels);
                dirty = true;
            }
        }
    }

    /// This node's own enactment changed under it (deleted, or written by someone else): forget
    /// what was written, so the next round compares with the server's copy and writes again.
    fn saw_enactment(&mut self, ev: &watcher::Event<HostPolicyEnactment>) {
        let (e, deleted) = match ev {
            watcher::Event::Apply(e) | watcher::Event::InitApply(e) => (e, false),
            watcher::Event::Delete(e) => (e, true),
            watcher::Event::Init | watcher::Event::InitDone => return,
        };
        if e.spec.node != self.node {
            return;
        }
        if self.written.get(&e.spec.policy).is_some_and(|(_, s)| deleted || e.status.as_ref() != Some(s)) {
            self.written.remove(&e.spec.policy);
        }
    }

    /// Recompute this node's selection and put a changed desired state in force. A deleted
    /// policy is simply no longer selected: its domains stay as they are, no longer managed.
    /// True when the selection changed (an edit or a label change that concerns this node).
    pub fn reselect(&mut self, all: &[Arc<WatchedHostPolicy>], labels: &BTreeMap<String, String>) -> bool {
        for p in all.iter().filter(|p| !p.ignored_fields.is_empty()) {
            if self.warned.insert((p.metadata.uid.clone().unwrap_or_default(), p.metadata.generation)) {
                tracing::warn!(policy = %p.name_any(), fields = ?p.ignored_fields,
                    "fields this virtwarden does not know were ignored (written for a newer CRD?)");
            }
        }
        let selection = select(all, labels);
        if selection.desired != self.selection.desired {
            tracing::info!(node = %self.node, policies = ?selection.selected, "policies for this node changed");
            self.engine.reload(selection.desired.clone());
        }
        self.written.retain(|name, _| selection.selected.contains(name));
        let changed = selection != self.selection;
        self.selection = selection;
        changed
    }

    /// One status round: remove this node's enactments of policies that no longer select it,
    /// write those that changed, publish events, and write the aggregates that are this node's
    /// to write. Nothing equal to what the server has is written. True when all writes worked.
    pub async fn write_statuses(
        &mut self,
        all: &[Arc<WatchedHostPolicy>],
        enactments: &[Arc<HostPolicyEnactment>],
        alive: &HashSet<String>,
    ) -> bool {
        let report = self.engine.status();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let live: Vec<&WatchedHostPolicy> =
            all.iter().map(|p| p.as_ref()).filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        let mut ok = self.remove_unselected(&live, enactments).await;
        let selected: Vec<&WatchedHostPolicy> =
            live.iter().copied().filter(|p| self.selection.selected.contains(&p.name_any())).collect();
        for p in &selected {
            ok &= self.write_enactment(p, &report, enactments, &now).await;
            let name = p.name_any();
            let domains: Vec<&DomainStatus> = report.domains.iter().filter(|d| d.policy == name).collect();
            self.events.publish(p, &domains).await;
        }
        for p in &selected {
            ok &= self.write_aggregate(p, enactments, alive, &now).await;
        }
        ok
    }

    /// A deleted policy's enactments go with it (owner references); only a policy that still
    /// exists but no longer selects this node needs this node to remove its own enactment.
    async fn remove_unselected(
        &mut self,
        live: &[&WatchedHostPolicy],
        enactments: &[Arc<HostPolicyEnactment>],
    ) -> bool {
        let mut ok = true;
        for e in enactments.iter().filter(|e| e.spec.node == self.node) {
            let policy = &e.spec.policy;
            let owner_live = live
                .iter()
                .any(|p| aggregate::belongs_to(e, &p.name_any(), p.metadata.uid.as_deref().unwrap_or_default()));
            if owner_live && !self.selection.selected.contains(policy) {
                self.writes += 1;
                match kube_io::delete_enactment(&self.client, policy, &self.node).await {
                    Ok(()) => tracing::info!(%policy, "the policy no longer selects this node; enactment removed"),
                    Err(e) => {
                        tracing::warn!(%policy, %e, "cannot remove enactment");
                        ok = false;
                    }
                }
            }
        }
        ok
    }

    /// Write this node's enactment of `p` if it differs from what the server has (or what this
    /// node last wrote). True unless a write failed.
    async fn write_enactment(
        &mut self,
        p: &WatchedHostPolicy,
        report: &StatusReport,
        enactments: &[Arc<HostPolicyEnactment>],
        now: &Time,
    ) -> bool {
        let (name, uid) = (p.name_any(), p.metadata.uid.clone().unwrap_or_default());
        let view = PolicyView {
            name: &name,
            generation: p.metadata.generation,
            desired: &self.selection.desired,
            conflicts: self.selection.conflicts.get(&name).map(Vec::as_slice).unwrap_or_default(),
            invalid: self.selection.invalid.get(&name).map(Vec::as_slice).unwrap_or_default(),
        };
        let mut status = enactment_status(&view, report, now.clone());
        let stored = enactments
            .iter()
            .find(|e| e.spec.node == self.node && aggregate::belongs_to(e, &name, &uid))
            .map(|e| e.status.clone().unwrap_or_default());
        let written = self.written.get(&name).filter(|(u, _)| *u == uid).map(|(_, s)| s.clone());
        let exists = written.is_some() || stored.is_some();
        let reference = written.or(stored);
        if let Some(r) = &reference {
            keep_transition_times(&mut status.conditions, &r.conditions);
        }
        if reference.as_ref() == Some(&status) {
            return true;
        }
        self.writes += 1;
        match kube_io::apply_enactment(&self.client, &name, &uid, &self.node, &status, !exists).await {
            Ok(()) => {
                self.written.insert(name, (uid, status));
                true
            }
            Err(e) => {
                tracing::warn!(policy = %name, %e, "cannot write enactment");
                false
            }
        }
    }

    /// Write `p`'s aggregate if it is wrong and it is this node's turn. True unless a write failed.
    async fn write_aggregate(
        &mut self,
        p: &WatchedHostPolicy,
        enactments: &[Arc<HostPolicyEnactment>],
        alive: &HashSet<String>,
        now: &Time,
    ) -> bool {
        let (name, uid) = (p.name_any(), p.metadata.uid.clone().unwrap_or_default());
        if let Some(version) = self.awaiting.get(&name) {
            if *version == p.metadata.resource_version {
                return true;
            }
            self.awaiting.remove(&name);
        }
        let mine = self.written.get(&name).filter(|(u, _)| *u == uid).map(|(_, s)| s);
        let members = aggregate::members(enactments, &name, &uid, &self.node, mine);
        // This node is alive: it is the one writing.
        let is_alive = |n: &str| n == self.node || alive.contains(n);
        let target = aggregate::aggregate(p.metadata.generation, &members, &is_alive, p.status.as_ref(), now);
        if p.status.as_ref() == Some(&target) {
            self.pending.remove(&name);
            return true;
        }
        let rank = aggregate::rank(&members, &self.node) as u32;
        let since = match self.pending.get(&name) {
            Some((t, since)) if aggregate::same_counts(t, &target) => *since,
            _ => {
                let since = Instant::now();
                self.pending.insert(name.clone(), (target.clone(), since));
                since
            }
        };
        if since.elapsed() < aggregate::REPAIR_TURN * rank {
            return true;
        }
        self.writes += 1;
        match kube_io::apply_policy_status(&self.client, &name, &target).await {
            Ok(after) => {
                self.pending.remove(&name);
                if after.metadata.resource_version != p.metadata.resource_version {
                    self.awaiting.insert(name, p.metadata.resource_version.clone());
                }
                true
            }
            Err(e) => {
                tracing::warn!(policy = %name, %e, "cannot update the policy status");
                false
            }
        }
    }
}

/// When the next status round may run: `STATUS_DEBOUNCE` after the change that calls for it, and
/// never sooner than `STATUS_INTERVAL` after the last round that wrote (the caller passes no
/// `last_write` when the selection itself changed: an admin's edit is reported at once). Without a change
/// (`changed_at` None: only an aggregate waiting for its repair turn) the next look is an
/// interval after the last one (`last_check`).
fn round_due(changed_at: Option<Instant>, last_write: Option<Instant>, last_check: Instant) -> Instant {
    match changed_at {
        Some(c) => (c + STATUS_DEBOUNCE).max(last_write.map_or(c, |l| l + STATUS_INTERVAL)),
        None => last_check + STATUS_INTERVAL,
    }
}

/// Stops a spawned task when the owner goes (the operator loop is aborted in tests).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn api_lost(down: &mut bool, e: &watcher::Error, health: &probes::ApiHealth) {
    if !*down {
        tracing::warn!(%e, "Kubernetes API unreachable; enforcing the last policy seen");
        health.set(Some(format!("Kubernetes API unreachable: {e}")));
    }
    *down = true;
}

/// A watch delivered again; readiness returns once the first lists were all in (`synced`).
fn api_back(down: &mut bool, synced: bool, health: &probes::ApiHealth) {
    if *down {
        tracing::info!("Kubernetes API reachable again");
    }
    *down = false;
    if synced {
        health.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_change_is_written_after_the_debounce_and_rounds_stay_an_interval_apart() {
        let t0 = Instant::now();
        let check = t0 - Duration::from_millis(50);
        // Nothing written for a while: a change goes out 100 ms later, not on a 2 s tick, however
        // recently a round only compared.
        assert_eq!(round_due(Some(t0), Some(t0 - Duration::from_secs(10)), check), t0 + STATUS_DEBOUNCE);
        assert_eq!(round_due(Some(t0), None, check), t0 + STATUS_DEBOUNCE);
        // Right after a round that wrote, the next waits for the interval: one write round per 2 s.
        let wrote = t0 - Duration::from_millis(500);
        assert_eq!(round_due(Some(t0), Some(wrote), check), t0 + Duration::from_millis(1500));
        // A repair turn alone: an interval after the last look, not a busy loop.
        assert_eq!(round_due(None, Some(t0 - Duration::from_secs(60)), check), check + STATUS_INTERVAL);
    }
}
