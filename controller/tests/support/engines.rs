//! Engines for operator tests: the real engine behind a recorder of what the operator asked of
//! it, and a scripted status source for tests about API traffic alone.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use virtwarden::engine::status::{DomainStatus, StatusReport};
use virtwarden::engine::EngineHandle;
use virtwarden::operator::NodeEngine;
use virtwarden_policies::DesiredState;

/// What the operator did with an engine: every desired state it put in force, and how many
/// status rounds it made (each round reads the status once).
pub struct Record {
    pub reloads: Mutex<Vec<DesiredState>>,
    pub status_reads: AtomicUsize,
    /// What the operator subscribes to: the engine's changes plus the test's pokes.
    version: watch::Sender<u64>,
}

impl Default for Record {
    fn default() -> Self {
        Record { reloads: Mutex::default(), status_reads: AtomicUsize::new(0), version: watch::channel(0).0 }
    }
}

impl Record {
    /// Tell the operator something changed, without changing anything it reports.
    pub fn poke(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Wait until every change made before this call went through a complete status round:
    /// each poke makes one more round, a round's start shows as one status read, and rounds
    /// run one after another at least a status interval apart.
    pub async fn settle(&self) {
        for _ in 0..3 {
            let before = self.rounds();
            self.poke();
            eventually(20, "a status round", || self.rounds() > before).await;
        }
    }

    pub fn reloaded_domains(&self) -> Vec<Vec<String>> {
        self.reloads.lock().unwrap().iter().map(|d| d.domains.iter().map(|m| m.spec.name.clone()).collect()).collect()
    }
    pub fn rounds(&self) -> usize {
        self.status_reads.load(Ordering::SeqCst)
    }
}

/// The real engine, recorded.
pub struct Recorded {
    pub inner: EngineHandle,
    pub record: Arc<Record>,
}

impl Recorded {
    pub fn new(inner: EngineHandle) -> (Self, Arc<Record>) {
        let record = Arc::new(Record::default());
        let mut changes = inner.subscribe();
        let forward = record.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                forward.poke();
            }
        });
        (Recorded { inner, record: record.clone() }, record)
    }
}

impl NodeEngine for Recorded {
    fn reload(&self, desired: DesiredState) {
        self.record.reloads.lock().unwrap().push(desired.clone());
        NodeEngine::reload(&self.inner, desired);
    }
    fn status(&self) -> StatusReport {
        self.record.status_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.status()
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.record.version.subscribe()
    }
}

/// A status source the test scripts: every domain of the desired state is reported with the
/// state the test sets (default `running (booted)`).
pub struct Scripted {
    pub record: Arc<Record>,
    pub domains: Arc<Mutex<Vec<DomainStatus>>>,
}

/// The test's handle on a [`Scripted`] engine.
#[derive(Clone)]
pub struct Script {
    pub record: Arc<Record>,
    domains: Arc<Mutex<Vec<DomainStatus>>>,
}

impl Script {
    /// Change one domain's reported status and tell the operator.
    pub fn set(&self, name: &str, f: impl FnOnce(&mut DomainStatus)) {
        {
            let mut domains = self.domains.lock().unwrap();
            let d = domains.iter_mut().find(|d| d.name == name).expect("a managed domain");
            f(d);
        }
        self.record.poke();
    }
}

pub fn scripted() -> (Scripted, Script) {
    let record = Arc::new(Record::default());
    let domains = Arc::new(Mutex::new(Vec::new()));
    let script = Script { record: record.clone(), domains: domains.clone() };
    (Scripted { record, domains }, script)
}

impl NodeEngine for Scripted {
    fn reload(&self, desired: DesiredState) {
        let mut domains = self.domains.lock().unwrap();
        let old = std::mem::take(&mut *domains);
        for m in &desired.domains {
            let kept = old.iter().find(|d| d.name == m.spec.name).cloned();
            domains.push(kept.unwrap_or_else(|| DomainStatus {
                name: m.spec.name.clone(),
                policy: m.policy.clone(),
                state: "running (booted)".into(),
                ..Default::default()
            }));
        }
        self.record.reloads.lock().unwrap().push(desired);
        self.record.poke();
    }
    fn status(&self) -> StatusReport {
        self.record.status_reads.fetch_add(1, Ordering::SeqCst);
        StatusReport { connected: true, domains: self.domains.lock().unwrap().clone(), ..Default::default() }
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.record.version.subscribe()
    }
}

/// Wait until `cond` holds, polling every 10 ms, up to `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
