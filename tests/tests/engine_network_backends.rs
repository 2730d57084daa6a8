//! The engine's host-network backends are injected (`Backends::network`): a recording
//! forwarding backend sees exactly the repair the policy asks for, and a failing one leaves the
//! drift reported (and retried) instead of crashing the task. libvirt is the real test driver;
//! links and sysctls are recording fakes (unit-level: no host state is read or written).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtwarden::act::remediation::Registry;
use virtwarden::engine::{Backends, Engine, EngineConfig, NetworkRunner};
use virtwarden::hostnet::uplink::{Checkpoint, UplinkNet};
use virtwarden::hostnet::{Forwarding, HostNet, NetError};
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::NetLink;
use virtwarden::observe::StpSettings;
use virtwarden_policies::load_texts;
use virtwarden_tests::testbed_uri;

const WAIT: Duration = Duration::from_secs(10);

/// No links at all: nothing to bridge, no uplinks.
struct NoLinks;

impl HostNet for NoLinks {
    async fn links(&self) -> Result<Vec<NetLink>, NetError> {
        Ok(Vec::new())
    }
    async fn default_route_links(&self) -> Result<Vec<u32>, NetError> {
        Ok(Vec::new())
    }
    async fn ra_default_route_links(&self) -> Result<Vec<u32>, NetError> {
        Ok(Vec::new())
    }
    async fn global_address_links(&self) -> Result<Vec<u32>, NetError> {
        Ok(Vec::new())
    }
    async fn create_bridge(&self, _: &str) -> Result<(), NetError> {
        unreachable!("the policy names no bridge")
    }
    async fn set_up(&self, _: &str) -> Result<(), NetError> {
        unreachable!("the policy names no bridge")
    }
    async fn set_stp(&self, _: &str, _: StpSettings) -> Result<(), NetError> {
        unreachable!("the policy names no bridge")
    }
    async fn enslave(&self, _: &str, _: &str) -> Result<(), NetError> {
        unreachable!("the policy names no bridge")
    }
}

impl UplinkNet for NoLinks {
    async fn checkpoint(&self, _: &str, _: &str) -> Result<Checkpoint, NetError> {
        unreachable!("no uplink")
    }
    async fn take_over(&self, _: &Checkpoint) -> Result<(), NetError> {
        unreachable!("no uplink")
    }
    async fn restore(&self, _: &Checkpoint) -> Result<(), NetError> {
        unreachable!("no uplink")
    }
    async fn attach(&self, _: &str, _: &str) -> Result<(), NetError> {
        unreachable!("no uplink")
    }
    async fn detach(&self, _: &str, _: &str) -> Result<(), NetError> {
        unreachable!("no uplink")
    }
    async fn default_gateways(&self) -> Result<Vec<(u32, std::net::IpAddr)>, NetError> {
        Ok(Vec::new())
    }
    async fn forget_neighbour(&self, _: &str, _: std::net::IpAddr) -> Result<(), NetError> {
        unreachable!("no uplink")
    }
    async fn neighbour_reachable(
        &self,
        _: &str,
        _: std::net::IpAddr,
    ) -> Result<virtwarden::hostnet::uplink::Neighbour, NetError> {
        unreachable!("no uplink")
    }
    async fn probe(&self, _: &virtwarden_policies::VerifyProbe, _: Duration) -> bool {
        unreachable!("no uplink")
    }
    fn describe(&self, _: &Checkpoint) -> virtwarden::hostnet::uplink::Moves {
        unreachable!("no uplink")
    }
    fn managers(&self, _: &str, _: u32) -> Vec<String> {
        unreachable!("no uplink")
    }
}

/// IPv4 forwarding off until set; records every write; fails writes when told to.
#[derive(Clone, Default)]
struct RecordingForwarding {
    ipv4: Arc<Mutex<bool>>,
    writes: Arc<Mutex<Vec<bool>>>,
    fail: bool,
}

impl Forwarding for RecordingForwarding {
    fn ipv4(&self) -> Result<bool, NetError> {
        Ok(*self.ipv4.lock().unwrap())
    }
    fn ipv6(&self) -> Result<bool, NetError> {
        Ok(false)
    }
    fn set_ipv4(&self, on: bool) -> Result<(), NetError> {
        self.writes.lock().unwrap().push(on);
        if self.fail {
            return Err(NetError::Sysctl {
                key: "net/ipv4/ip_forward".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        *self.ipv4.lock().unwrap() = on;
        Ok(())
    }
    fn set_ipv6(&self, _: bool) -> Result<(), NetError> {
        unreachable!("the policy does not ask for IPv6 forwarding")
    }
    fn accept_ra(&self, _: &str) -> Result<u8, NetError> {
        unreachable!("no interface has an RA-learned default route")
    }
    fn set_accept_ra(&self, _: &str, _: u8) -> Result<(), NetError> {
        unreachable!("no interface has an RA-learned default route")
    }
}

fn runner(fwd: RecordingForwarding) -> NetworkRunner {
    Arc::new(move |task| {
        let fwd = fwd.clone();
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        Box::pin(async move {
            // Keep the sender alive: no notifications, only the engine's kicks.
            let _keep = _tx;
            task.run_with(NoLinks, fwd, rx).await
        })
    })
}

async fn engine_with(fwd: RecordingForwarding) -> (virtwarden::engine::EngineHandle, tokio::task::JoinHandle<()>) {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let text = "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  forwarding: { ipv4: true }\n";
    let desired = load_texts([(std::path::Path::new("inline.yaml"), text)]).expect("valid").desired;
    let mut backends = Backends::new(Arc::new(SharedConnector { host }), Registry::with_builtins());
    backends.network = Some(runner(fwd));
    let config = EngineConfig { resync: Duration::from_secs(3600), network: true, ..Default::default() };
    Engine::spawn_with(backends, desired, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_is_repaired_through_the_injected_backend() {
    let fwd = RecordingForwarding::default();
    let (engine, task) = engine_with(fwd.clone()).await;
    let s = engine
        .wait_for(WAIT, |s| s.network.as_ref().is_some_and(|n| !n.last_actions.is_empty() && n.drift.is_empty()))
        .await
        .unwrap_or_else(|| panic!("no repair: {:#?}", engine.status()));
    assert_eq!(*fwd.writes.lock().unwrap(), [true], "exactly one write: {:#?}", s.network);
    assert!(*fwd.ipv4.lock().unwrap());
    engine.shutdown();
    tokio::time::timeout(WAIT, task).await.expect("engine stops").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_leaves_the_drift_reported_and_the_engine_running() {
    let fwd = RecordingForwarding { fail: true, ..Default::default() };
    let (engine, task) = engine_with(fwd.clone()).await;
    let s = engine
        .wait_for(WAIT, |s| {
            s.network.as_ref().is_some_and(|n| !n.drift.is_empty()) && fwd.writes.lock().unwrap().len() >= 2
        })
        .await
        .unwrap_or_else(|| panic!("no retry: {:#?}", engine.status()));
    let drift = s.network.unwrap().drift.join("; ");
    assert!(drift.contains("forwarding"), "{drift}");
    assert!(fwd.writes.lock().unwrap().iter().all(|on| *on), "only ever switched on");
    assert_eq!(engine.liveness().await, Ok(()), "the engine still answers");
    engine.shutdown();
    tokio::time::timeout(WAIT, task).await.expect("engine stops").unwrap();
}
