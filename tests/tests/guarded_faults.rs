//! Guarded network changes when the host refuses to go back: a rollback that fails leaves the
//! host's network in no known state, so no further guarded change of the same pass is tried; a
//! checkpoint that cannot be restored at start is held, so no pass plans the change again on top
//! of a half-restored host. Links are a recording fake (engine level: no host state is touched;
//! the real rollbacks are exercised in `uplink_netns.rs`).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use virtwarden::act::network::apply_net_actions;
use virtwarden::act::uplink::{restore_pending, UplinkJournal, UplinkMemory};
use virtwarden::hostnet::uplink::{Checkpoint, Moves, Neighbour, UplinkNet};
use virtwarden::hostnet::{Forwarding, HostNet, NetError};
use virtwarden::observe::{GuardedChange, NetLink, StpSettings};
use virtwarden::plan::network::{NetAction, NetActionKind, Takeover};
use virtwarden_policies::VerifyProbe;

const GATEWAY: &str = "198.51.100.1";

/// A host whose gateway never answers and whose restores fail; it records what is asked of it.
#[derive(Default)]
struct RefusingHost {
    calls: Mutex<Vec<String>>,
}

impl RefusingHost {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

fn refused(op: &'static str, object: &str) -> NetError {
    NetError::Netlink { op, object: object.into(), source: "Operation not permitted (os error 1)".into() }
}

impl HostNet for RefusingHost {
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
    async fn create_bridge(&self, name: &str) -> Result<(), NetError> {
        Err(refused("create bridge", name))
    }
    async fn set_up(&self, name: &str) -> Result<(), NetError> {
        Err(refused("set up", name))
    }
    async fn set_stp(&self, name: &str, _: StpSettings) -> Result<(), NetError> {
        Err(refused("set stp", name))
    }
    async fn enslave(&self, port: &str, _: &str) -> Result<(), NetError> {
        Err(refused("enslave", port))
    }
}

impl UplinkNet for RefusingHost {
    async fn checkpoint(&self, bridge: &str, port: &str) -> Result<Checkpoint, NetError> {
        self.record(format!("checkpoint {port} → {bridge}"));
        Ok(Checkpoint { bridge: bridge.into(), port: port.into(), ..Default::default() })
    }
    async fn take_over(&self, cp: &Checkpoint) -> Result<(), NetError> {
        self.record(format!("take over {} → {}", cp.port, cp.bridge));
        Ok(())
    }
    async fn restore(&self, cp: &Checkpoint) -> Result<(), NetError> {
        self.record(format!("restore {} → {}", cp.port, cp.bridge));
        Err(refused("restore", &cp.port))
    }
    async fn attach(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        self.record(format!("attach {port} → {bridge}"));
        Ok(())
    }
    async fn detach(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        self.record(format!("detach {port} from {bridge}"));
        Err(refused("detach", port))
    }
    async fn default_gateways(&self) -> Result<Vec<(u32, IpAddr)>, NetError> {
        Ok(Vec::new())
    }
    async fn forget_neighbour(&self, _: &str, _: IpAddr) -> Result<(), NetError> {
        Ok(())
    }
    async fn neighbour_reachable(&self, _: &str, _: IpAddr) -> Result<Neighbour, NetError> {
        Ok(Neighbour::Unanswered)
    }
    async fn probe(&self, _: &VerifyProbe, _: Duration) -> bool {
        false
    }
    fn describe(&self, _: &Checkpoint) -> Moves {
        Moves { gateways: vec![GATEWAY.parse().unwrap()], ..Default::default() }
    }
    fn managers(&self, _: &str, _: u32) -> Vec<String> {
        Vec::new()
    }
}

/// Forwarding is never asked of this host.
struct NoForwarding;

impl Forwarding for NoForwarding {
    fn ipv4(&self) -> Result<bool, NetError> {
        unreachable!("no forwarding change")
    }
    fn ipv6(&self) -> Result<bool, NetError> {
        unreachable!("no forwarding change")
    }
    fn set_ipv4(&self, _: bool) -> Result<(), NetError> {
        unreachable!("no forwarding change")
    }
    fn set_ipv6(&self, _: bool) -> Result<(), NetError> {
        unreachable!("no forwarding change")
    }
    fn accept_ra(&self, _: &str) -> Result<u8, NetError> {
        unreachable!("no forwarding change")
    }
    fn set_accept_ra(&self, _: &str, _: u8) -> Result<(), NetError> {
        unreachable!("no forwarding change")
    }
}

/// The durable memory's uplink part, in memory.
#[derive(Default)]
struct Journal(Mutex<UplinkMemory>);

impl UplinkJournal for Journal {
    fn load(&self) -> UplinkMemory {
        self.0.lock().unwrap().clone()
    }
    fn change(&self, f: &mut dyn FnMut(&mut UplinkMemory)) -> Result<(), String> {
        f(&mut self.0.lock().unwrap());
        Ok(())
    }
}

fn takeover(port: &str, bridge: &str) -> NetAction {
    NetAction {
        subject: port.into(),
        policy: "p".into(),
        kind: NetActionKind::TakeOverUplink {
            bridge: bridge.into(),
            takeover: Takeover {
                mac: None,
                mtu: None,
                addresses: Vec::new(),
                routes: Vec::new(),
                rules: Vec::new(),
                gateways: vec![GATEWAY.parse().unwrap()],
                probes: Vec::new(),
                verify_timeout: virtwarden_policies::Duration(Duration::from_millis(300)),
                fingerprint: "f".into(),
                forced_past: Vec::new(),
            },
        },
        reason: "policy takes the uplink over".into(),
    }
}

#[tokio::test]
async fn after_a_failed_rollback_no_further_guarded_change_is_tried() {
    let (host, journal) = (RefusingHost::default(), Journal::default());
    let out =
        apply_net_actions(&host, &NoForwarding, &journal, &[takeover("up0", "br0"), takeover("up1", "br1")]).await;
    let first = out[0].verification.as_ref().expect("the first takeover ran as a transaction");
    assert!(first.rollback_failed && first.detail.contains("ROLLBACK FAILED"), "{first:?}");
    assert_eq!(
        out[1].error.as_deref(),
        Some("not tried: an earlier rollback failed, the host's network is in no known state")
    );
    // Nothing was checkpointed, changed or verified for the second one.
    assert_eq!(host.calls(), ["checkpoint up0 → br0", "take over up0 → br0", "restore up0 → br0"]);
    // The first one's checkpoint stays for the next start.
    assert_eq!(journal.load().pending.len(), 1);
}

#[tokio::test]
async fn a_checkpoint_that_cannot_be_restored_at_start_is_held_and_kept() {
    let (host, journal) = (RefusingHost::default(), Journal::default());
    let cp = Checkpoint { bridge: "br0".into(), port: "up0".into(), fingerprint: "f".into(), ..Default::default() };
    journal.change(&mut |u| u.pending.push(cp.clone())).unwrap();
    assert!(restore_pending(&host, &NoForwarding, &journal).await.is_empty(), "nothing was restored");
    let memory = journal.load();
    assert_eq!(memory.pending, [cp], "kept for the next start");
    assert_eq!(memory.held.len(), 1);
    let held = &memory.held[0];
    assert_eq!((held.port.as_str(), held.bridge.as_str(), held.change), ("up0", "br0", GuardedChange::Takeover));
    assert!(held.reason.contains("restoring its checkpoint at start failed"), "{}", held.reason);
}
