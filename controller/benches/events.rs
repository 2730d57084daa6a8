//! `make bench`: libvirt event → corrective call. A domain under `restart: always` is destroyed
//! 300 times on libvirt's test driver; we time from the destroy call to the engine's start call
//! (recorded by a wrapper around the real hypervisor). Prints p50/p99; asserts nothing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use virtwarden::act::remediation::Registry;
use virtwarden::engine::connect::{Connection, Connector};
use virtwarden::engine::{Engine, EngineConfig};
use virtwarden::hypervisor::{DomainControl, DomainReader, HypervisorError};
use virtwarden::libvirt::events::{start_event_loop, subscribe, HypervisorEvent};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::{ObservedDomain, ObservedHost};
use virtwarden_policies::load_texts;

const EVENTS: usize = 300;

/// The real hypervisor, recording when `start` is called.
struct Recording {
    inner: Arc<LibvirtHost>,
    starts: Mutex<Vec<Instant>>,
}

impl DomainReader for Recording {
    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        self.inner.observe_host()
    }
    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        self.inner.observe_domain(name)
    }
}

impl DomainControl for Recording {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.starts.lock().unwrap().push(Instant::now());
        self.inner.start(name)
    }
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.shutdown(name)
    }
    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.destroy(name)
    }
    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.resume(name)
    }
    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.reset(name)
    }
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        self.inner.set_autostart(name, on)
    }
    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.inner.persistent_xml(name)
    }
    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError> {
        self.inner.define_xml(name, xml)
    }
}

struct RecordingConnector(Arc<Recording>);

impl Connector for RecordingConnector {
    fn uri(&self) -> String {
        self.0.inner.uri().to_string()
    }
    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        let sub = subscribe(&self.0.inner, events).map_err(|e| HypervisorError::Failed {
            op: "subscribe",
            domain: String::new(),
            message: e.to_string(),
        })?;
        Ok(Connection::new(self.0.clone(), Some(sub)))
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = dir.path().join("node.xml");
        std::fs::write(&node, common::node_xml(10, 0)).expect("node file");
        start_event_loop();
        let host = Arc::new(LibvirtHost::open(&format!("test://{}", node.display())).expect("test driver"));
        let rec = Arc::new(Recording { inner: host.clone(), starts: Mutex::new(Vec::new()) });
        // Every crash follows "healthy" uptime (resetAfter 1ms), so each restart is immediate.
        let yaml =
            common::policy_yaml(10, "\n      restart: always\n      backoff: { resetAfter: 1ms, maxRestarts: 100000 }");
        let desired = load_texts([(std::path::Path::new("bench.yaml"), yaml.as_str())]).expect("policy").desired;
        let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
        let (engine, task) =
            Engine::spawn(Arc::new(RecordingConnector(rec.clone())), desired, config, Registry::with_builtins());
        engine.wait_for(Duration::from_secs(10), |_| engine.is_ready()).await.expect("engine ready");

        let mut samples = Vec::with_capacity(EVENTS);
        for i in 0..EVENTS {
            let name = format!("vm{:04}", i % 10);
            let before = rec.starts.lock().unwrap().len();
            let t0 = Instant::now();
            host.destroy(&name).expect("destroy");
            let restarted = engine
                .wait_for(Duration::from_secs(10), |s| {
                    rec.starts.lock().unwrap().len() > before
                        && s.domains.iter().any(|d| d.name == name && d.state.starts_with("running"))
                })
                .await;
            restarted.expect("restart");
            let started_at = rec.starts.lock().unwrap()[before];
            samples.push(started_at.saturating_duration_since(t0));
        }
        println!("test driver, {EVENTS} destroy events on 10 domains (restart: always)");
        common::report("event: destroy issued → start issued", samples);
        engine.shutdown();
        let _ = task.await;
    });
}
