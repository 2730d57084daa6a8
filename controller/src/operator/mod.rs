//! The Kubernetes front end (`virtwarden operator`): watches cluster-scoped HostPolicy resources
//! and this node's Node object, selects and merges the policies for this node, and drives the
//! same engine as `run`. Each node writes only its own HostPolicyEnactment. When the API server
//! goes away the engine keeps enforcing the last policy it saw.

pub mod enactment;
pub mod kube_io;
pub mod select;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::signal::unix::{signal, SignalKind};
use virtwarden_crd::HostPolicy as HostPolicyResource;

use crate::act::remediation::Registry;
use crate::engine::connect::LibvirtConnector;
use crate::engine::status::DomainStatus;
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::exit;
use enactment::{enactment_status, PolicyView};
use select::{select, Selection};

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
}

/// Status writes are batched: at most one round per this interval.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(opts: OperatorOptions) -> i32 {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration: {e}");
            return exit::RUNTIME;
        }
    };
    // One writer per host, whichever front end it is.
    let _lock = match crate::lock::acquire(&opts.lock_file, "operator") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::RUNTIME;
        }
    };
    if let Err(e) = crate::fsutil::ensure_private_dir(&opts.state_dir) {
        eprintln!("error: cannot create state directory {}: {e}", opts.state_dir.display());
        return exit::RUNTIME;
    }
    let config = EngineConfig {
        resync: opts.resync,
        network: opts.network,
        data_dir: Some(opts.data_dir.clone()),
        ..Default::default()
    };
    let connector = Arc::new(LibvirtConnector { uri: opts.uri.clone() });
    let (engine, mut engine_task) =
        Engine::spawn(connector, Default::default(), config, Registry::with_exec_policy(opts.exec.clone()));
    if let Some(addr) = opts.metrics_addr {
        if let Err(e) = crate::http::serve(addr, engine.clone()).await {
            eprintln!("error: cannot serve metrics on {addr}: {e}");
            return exit::RUNTIME;
        }
    }
    if let Err(e) = crate::host::control::serve(&opts.state_dir, engine.clone()) {
        tracing::warn!(%e, "no control socket; `virtwarden release` cannot reach this operator");
    }
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return exit::RUNTIME,
    };
    let mut op = Operator::new(client, opts.node.clone(), engine.clone());
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
    engine: EngineHandle,
    selection: Selection,
    recorder: Recorder,
    /// Per domain: what the last events were about, so each restart/quarantine is told once.
    told: std::collections::HashMap<String, (u32, bool, Option<String>)>,
}

impl Operator {
    pub fn new(client: Client, node: String, engine: EngineHandle) -> Self {
        let reporter = Reporter { controller: "virtwarden".into(), instance: Some(node.clone()) };
        let recorder = Recorder::new(client.clone(), reporter);
        Operator { client, node, engine, selection: Selection::default(), recorder, told: Default::default() }
    }

    /// Kubernetes Events on the policy for restarts, quarantines and failed repairs.
    async fn publish_events(&mut self, policy: &HostPolicyResource, domains: &[&DomainStatus]) {
        let reference = policy.object_ref(&());
        for d in domains {
            let before = self.told.get(&d.name).cloned().unwrap_or((0, false, None));
            let mut events = Vec::new();
            if self.told.contains_key(&d.name) && d.restarts > before.0 {
                events.push(Event {
                    type_: EventType::Normal,
                    reason: "Restarted".into(),
                    note: Some(format!(
                        "{}: {} on node {} ({} restarts)",
                        d.name,
                        d.last_failure.as_deref().unwrap_or("down"),
                        self.node,
                        d.restarts
                    )),
                    action: "Restart".into(),
                    secondary: None,
                });
            }
            if d.quarantined.is_some() && !before.1 {
                events.push(Event {
                    type_: EventType::Warning,
                    reason: "Quarantined".into(),
                    note: Some(format!(
                        "{} on node {}: {}",
                        d.name,
                        self.node,
                        d.quarantined.as_deref().unwrap_or_default()
                    )),
                    action: "Quarantine".into(),
                    secondary: None,
                });
            }
            if d.last_error.is_some() && d.last_error != before.2 {
                events.push(Event {
                    type_: EventType::Warning,
                    reason: "RemediationFailed".into(),
                    note: Some(format!(
                        "{} on node {}: {}",
                        d.name,
                        self.node,
                        d.last_error.as_deref().unwrap_or_default()
                    )),
                    action: "Remediate".into(),
                    secondary: None,
                });
            }
            for ev in events {
                if let Err(e) = self.recorder.publish(&ev, &reference).await {
                    tracing::debug!(%e, "cannot publish event");
                }
            }
            self.told.insert(d.name.clone(), (d.restarts, d.quarantined.is_some(), d.last_error.clone()));
        }
    }

    /// Watch policies and the node until the process stops. Watch errors back off and retry;
    /// meanwhile local healing goes on with the last selection.
    pub async fn run(&mut self) {
        let (policies, policy_writer) = reflector::store::<HostPolicyResource>();
        let (nodes, node_writer) = reflector::store::<Node>();
        let policy_api: Api<HostPolicyResource> = Api::all(self.client.clone());
        let node_api: Api<Node> = Api::all(self.client.clone());
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let mut policy_events =
            watcher(policy_api, watcher::Config::default()).default_backoff().reflect(policy_writer).boxed();
        let mut node_events = watcher(node_api, node_cfg).default_backoff().reflect(node_writer).boxed();
        let mut changes = self.engine.subscribe();
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        let mut api_down = false;
        let mut status_dirty = true;
        loop {
            let mut reselect = false;
            tokio::select! {
                ev = policy_events.next() => match ev {
                    Some(Ok(_)) => { reselect = true; api_back(&mut api_down); }
                    Some(Err(e)) => api_lost(&mut api_down, &e),
                    None => return,
                },
                ev = node_events.next() => match ev {
                    Some(Ok(_)) => { reselect = true; api_back(&mut api_down); }
                    Some(Err(e)) => api_lost(&mut api_down, &e),
                    None => return,
                },
                _ = changes.changed() => status_dirty = true,
                _ = tick.tick() => {
                    if status_dirty && !api_down {
                        status_dirty = !self.write_statuses(&policies.state()).await;
                    }
                }
            }
            if reselect {
                let labels: BTreeMap<String, String> = nodes
                    .state()
                    .iter()
                    .find(|n| n.name_any() == self.node)
                    .map(|n| n.labels().clone())
                    .unwrap_or_default();
                self.reselect(&policies.state(), &labels).await;
                status_dirty = true;
            }
        }
    }

    /// Recompute this node's selection; put a changed desired state in force; handle
    /// finalizers and deletions.
    pub async fn reselect(&mut self, all: &[Arc<HostPolicyResource>], labels: &BTreeMap<String, String>) {
        let owned: Vec<HostPolicyResource> = all.iter().map(|p| (**p).clone()).collect();
        let selection = select(&owned, labels);
        if selection.desired != self.selection.desired {
            tracing::info!(node = %self.node, policies = ?selection.selected, "policies for this node changed");
            self.engine.reload(selection.desired.clone());
        }
        for p in &owned {
            let result = if p.metadata.deletion_timestamp.is_some() {
                kube_io::finish_deletion(&self.client, p, &self.node).await
            } else if selection.selected.contains(&p.name_any()) {
                kube_io::ensure_finalizer(&self.client, p).await
            } else {
                Ok(())
            };
            if let Err(e) = result {
                tracing::warn!(policy = %p.name_any(), %e, "finalizer handling failed; will retry");
            }
        }
        self.selection = selection;
    }

    /// Write every selected policy's enactment and aggregated status. True when all writes worked.
    pub async fn write_statuses(&mut self, all: &[Arc<HostPolicyResource>]) -> bool {
        let report = self.engine.status();
        let mut ok = true;
        for p in all.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let name = p.name_any();
            if !self.selection.selected.contains(&name) {
                continue;
            }
            let view = PolicyView {
                name: &name,
                generation: p.metadata.generation,
                desired: &self.selection.desired,
                conflicts: self.selection.conflicts.get(&name).map(Vec::as_slice).unwrap_or_default(),
                invalid: self.selection.invalid.get(&name).map(Vec::as_slice).unwrap_or_default(),
            };
            let status = enactment_status(&view, &report, Time(k8s_openapi::jiff::Timestamp::now()));
            if let Err(e) = kube_io::apply_enactment(&self.client, p, &self.node, &status).await {
                tracing::warn!(policy = %name, %e, "cannot write enactment");
                ok = false;
                continue;
            }
            if let Err(e) = kube_io::aggregate_policy_status(&self.client, p).await {
                tracing::warn!(policy = %name, %e, "cannot update the policy status");
                ok = false;
            }
            let domains: Vec<&DomainStatus> = report.domains.iter().filter(|d| d.policy == name).collect();
            self.publish_events(p, &domains).await;
        }
        ok
    }
}

fn api_lost(down: &mut bool, e: &watcher::Error) {
    if !*down {
        tracing::warn!(%e, "Kubernetes API unreachable; enforcing the last policy seen");
    }
    *down = true;
}

fn api_back(down: &mut bool) {
    if *down {
        tracing::info!("Kubernetes API reachable again");
    }
    *down = false;
}
