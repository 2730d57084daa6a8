//! Host-network reconciliation against a real kernel, each test in its own network namespace
//! (veth pairs stand in for NICs and taps). Never the host's own namespace: see
//! `in_private_netns`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use virtwarden::act::apply_plan;
use virtwarden::act::network::{apply_net_actions, observe_net};
use virtwarden::act::uplink::observe_uplinks;
use virtwarden::engine::status::StatusReport;
use virtwarden::engine::EngineHandle;
use virtwarden::hostnet::netlink::NetlinkHost;
use virtwarden::hostnet::sysctl::ProcForwarding;
use virtwarden::hostnet::Forwarding;
use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::memory::MemoryStore;
use virtwarden::observe::{BridgeAttrs, ObservedHost};
use virtwarden::plan::flap::FlapSettings;
use virtwarden::plan::network::libvirt_tap_mac;
use virtwarden::plan::{plan, render_text, Plan};
use virtwarden_policies::DesiredState;
use virtwarden_tests::{in_private_netns, sh};

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

struct Net {
    nl: NetlinkHost,
    fwd: ProcForwarding,
    /// Uplink checkpoints and holds (the service keeps them in its durable memory).
    journal: MemoryStore,
    /// The policy last planned, for uplink observation.
    desired: std::sync::Mutex<DesiredState>,
}

impl Net {
    fn new() -> Self {
        Net {
            nl: NetlinkHost::connect().unwrap(),
            fwd: ProcForwarding::default(),
            journal: MemoryStore::in_memory(),
            desired: Default::default(),
        }
    }

    async fn host(&self, domains: Option<&LibvirtHost>) -> ObservedHost {
        let mut host = match domains {
            Some(hv) => hv.observe_host().unwrap(),
            None => ObservedHost::default(),
        };
        let mut n = observe_net(&self.nl, &self.fwd).await.unwrap();
        let desired = self.desired.lock().unwrap().clone();
        observe_uplinks(&self.nl, &mut n, &desired, &self.journal).await;
        host.net = Some(n);
        host
    }

    async fn plan(&self, desired: &DesiredState, domains: Option<&LibvirtHost>) -> Plan {
        *self.desired.lock().unwrap() = desired.clone();
        plan(desired, &self.host(domains).await)
    }

    /// Plan, apply the network part, and return the plan that remains.
    async fn converge(&self, desired: &DesiredState, domains: Option<&LibvirtHost>) -> Plan {
        let p = self.plan(desired, domains).await;
        let outcomes = apply_net_actions(&self.nl, &self.fwd, &self.journal, &p.network).await;
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:#?}");
        self.plan(desired, domains).await
    }

    async fn bridge(&self, name: &str) -> BridgeAttrs {
        let host = self.host(None).await;
        host.net.unwrap().link(name).and_then(|l| l.bridge).unwrap_or_else(|| panic!("{name} is not a bridge"))
    }

    async fn master(&self, port: &str) -> Option<String> {
        self.host(None).await.net.unwrap().link(port).and_then(|l| l.master.clone())
    }
}

const BR0: &str = "  bridges:\n    - name: br0\n      stp: { enabled: true, forwardDelay: 4, helloTime: 2, maxAge: 12, priority: 4096 }\n      ports: [eth1]\n";

#[tokio::test]
async fn creates_bridge_with_stp_timers_and_ports_and_repairs_drift() {
    if !in_private_netns("creates_bridge_with_stp_timers_and_ports_and_repairs_drift") {
        return;
    }
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"]);
    let net = Net::new();
    let desired = policy(BR0);
    let first = net.plan(&desired, None).await;
    assert_eq!(
        render_text(&first),
        "br0: missing, policy wants it → create bridge\n\
         br0: new bridge → set stp on, forward delay 4s, hello 2s, max age 12s, priority 4096\n\
         eth1: not a port of br0, policy lists it → attach to br0\n\
         3 actions planned\n"
    );
    assert!(net.converge(&desired, None).await.is_empty());
    assert_eq!(
        net.bridge("br0").await,
        BridgeAttrs { stp: true, forward_delay: 4, hello_time: 2, max_age: 12, priority: 4096 }
    );
    assert_eq!(net.master("eth1").await.as_deref(), Some("br0"));

    // Someone switches STP off and shortens the forward delay: restored.
    sh(&["ip", "link", "set", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "1500"]);
    let drift = net.plan(&desired, None).await;
    assert_eq!(drift.network.len(), 1, "{}", render_text(&drift));
    assert!(drift.network[0].reason.starts_with("stp off, forward delay 15s"), "{}", drift.network[0].reason);
    assert!(net.converge(&desired, None).await.is_empty());
    assert!(net.bridge("br0").await.stp);

    // The port is detached: re-attached. The bridge is set down: set up.
    sh(&["ip", "link", "set", "eth1", "nomaster"]);
    sh(&["ip", "link", "set", "br0", "down"]);
    assert!(net.converge(&desired, None).await.is_empty());
    assert_eq!(net.master("eth1").await.as_deref(), Some("br0"));
    assert!(net.host(None).await.net.unwrap().link("br0").unwrap().up);
}

#[tokio::test]
async fn unlisted_ports_and_unmanaged_bridges_are_left_alone() {
    if !in_private_netns("unlisted_ports_and_unmanaged_bridges_are_left_alone") {
        return;
    }
    for (a, b) in [("eth1", "eth1-p"), ("eth2", "eth2-p"), ("eth9", "eth9-p")] {
        sh(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
    }
    sh(&["ip", "link", "add", "br9", "type", "bridge", "stp_state", "0"]);
    sh(&["ip", "link", "set", "eth9", "master", "br9"]);
    let net = Net::new();
    let desired = policy(BR0);
    assert!(net.converge(&desired, None).await.is_empty());
    sh(&["ip", "link", "set", "eth2", "master", "br0"]); // someone adds an unlisted port
    let p = net.plan(&desired, None).await;
    assert!(p.is_empty(), "{}", render_text(&p));
    assert!(render_text(&p).contains("note: br0: port eth2 is neither listed nor a managed domain's tap → left alone"));
    assert_eq!(net.master("eth2").await.as_deref(), Some("br0"));
    // br9 is named by no policy: untouched.
    assert!(!net.bridge("br9").await.stp);
    assert_eq!(net.master("eth9").await.as_deref(), Some("br9"));
    // A listed port that sits on another bridge is not taken from it.
    let desired = policy("  bridges:\n    - name: br0\n      ports: [eth1, eth9]\n");
    let p = net.plan(&desired, None).await;
    assert!(p.network.is_empty(), "{}", render_text(&p));
    assert!(render_text(&p).contains("eth9: is a port of br9, policy wants it on br0 → not moved"));
}

#[tokio::test]
async fn forwarding_reset_is_restored() {
    if !in_private_netns("forwarding_reset_is_restored") {
        return;
    }
    let net = Net::new();
    let desired = policy("  forwarding: { ipv4: true }\n");
    assert!(!net.fwd.ipv4().unwrap(), "a fresh namespace starts with forwarding off");
    assert!(net.converge(&desired, None).await.is_empty());
    assert!(net.fwd.ipv4().unwrap());
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n").unwrap();
    let p = net.plan(&desired, None).await;
    assert_eq!(
        render_text(&p),
        "forwarding: ipv4 forwarding off, policy wants on → set ipv4 forwarding on\n1 action planned\n"
    );
    assert!(net.converge(&desired, None).await.is_empty());
    assert!(net.fwd.ipv4().unwrap());
}

#[tokio::test]
async fn uplink_bridge_port_changes_are_held_back_unless_allowed() {
    if !in_private_netns("uplink_bridge_port_changes_are_held_back_unless_allowed") {
        return;
    }
    // br0 carries the default route; its gateway is behind eth1 (in a peer namespace), which the
    // policy lists as br0's port.
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-p"]);
    let gw = virtwarden_tests::peer::PeerNetns::new();
    gw.take_link("eth1-p");
    gw.sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", "eth1-p"]);
    gw.sh(&["ip", "link", "set", "eth1-p", "up"]);
    sh(&["ip", "link", "set", "eth1", "up"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    sh(&["ip", "addr", "add", "10.77.0.2/24", "dev", "br0"]);
    sh(&["ip", "route", "add", "default", "via", "10.77.0.1", "dev", "br0"]);
    let net = Net::new();
    let p = net.plan(&policy("  bridges:\n    - name: br0\n      ports: [eth1]\n"), None).await;
    assert!(p.network.is_empty(), "{}", render_text(&p));
    assert!(render_text(&p).contains("held back: br0 carries a default route (set allowUplinkChange: true to allow)"));
    // Allowed: a guarded change, kept because the gateway answers on br0 once eth1 is its port.
    let allowed = policy(
        "  bridges:\n    - name: br0\n      allowUplinkChange: true\n      verifyTimeout: 2s\n      ports: [eth1]\n",
    );
    let text = render_text(&net.plan(&allowed, None).await);
    assert!(
        text.contains("eth1: not a port of br0, policy lists it → attach to br0; checkpoint that it is in no bridge; verify throughout 2s: gateway 10.77.0.1 answers ARP/NDP on br0; detach if not"),
        "{text}"
    );
    assert!(net.converge(&allowed, None).await.is_empty());
    assert_eq!(net.master("eth1").await.as_deref(), Some("br0"));
}

/// A test-driver host with one running domain plugged into br0.
fn tap_host(dir: &Path) -> LibvirtHost {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>vm1</name>\
         <memory>65536</memory><os><type>hvm</type></os><devices><interface type='bridge'>\
         <source bridge='br0'/><mac address='52:54:00:00:00:01'/></interface></devices>\
         <test:runstate>1</test:runstate></domain></node>",
    )
    .unwrap();
    LibvirtHost::open(&format!("test://{}", node.display())).unwrap()
}

/// The kernel side of vm1's tap: a veth named like it, with the MAC libvirt would give it.
/// Returns the tap's name.
fn vm1_tap(hv: &LibvirtHost) -> String {
    let iface = hv.observe_domain("vm1").unwrap().unwrap().interfaces[0].clone();
    let tap = iface.target.expect("a running domain has a tap");
    let mac = libvirt_tap_mac(iface.mac.as_deref().unwrap()).unwrap();
    assert_eq!(mac, "fe:54:00:00:00:01");
    sh(&["ip", "link", "add", &tap, "address", &mac, "type", "veth", "peer", "name", "tap-peer"]);
    tap
}

#[tokio::test]
async fn vm_taps_are_reattached_also_after_the_bridge_is_recreated() {
    if !in_private_netns("vm_taps_are_reattached_also_after_the_bridge_is_recreated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = tap_host(dir.path());
    let tap = vm1_tap(&hv);
    let net = Net::new();
    let desired = policy(&format!("  domains:\n    - name: vm1\n{BR0}"));
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"]);
    let p = net.plan(&desired, Some(&hv)).await;
    assert!(render_text(&p)
        .contains(&format!("{tap}: tap of vm1 is not on br0 (bridge recreated or port removed) → attach to br0")));
    assert!(net.converge(&desired, Some(&hv)).await.is_empty());
    assert_eq!(net.master(&tap).await.as_deref(), Some("br0"));

    // The bridge is deleted and recreated by someone (ifdown/ifup): every tap comes back.
    sh(&["ip", "link", "del", "br0"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    assert_eq!(net.master(&tap).await, None);
    assert!(net.converge(&desired, Some(&hv)).await.is_empty());
    assert_eq!(net.master(&tap).await.as_deref(), Some("br0"));
    assert_eq!(net.master("eth1").await.as_deref(), Some("br0"));
    assert!(net.bridge("br0").await.stp, "STP restored on the recreated bridge");
}

#[tokio::test]
async fn domain_start_waits_for_its_missing_bridge() {
    if !in_private_netns("domain_start_waits_for_its_missing_bridge") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = tap_host(dir.path());
    virtwarden::hypervisor::DomainControl::destroy(&hv, "vm1").unwrap();
    let net = Net::new();
    // br0 is not managed and does not exist: the start is held.
    let desired = policy("  domains:\n    - name: vm1\n      restart: always\n");
    let p = net.plan(&desired, Some(&hv)).await;
    assert!(p.actions.is_empty(), "{}", render_text(&p));
    assert!(render_text(&p)
        .contains("vm1: shut off (destroyed), policy wants running → start held: bridge br0 does not exist yet"));
    // Managed, it is created first and the domain started after it.
    let desired =
        policy(&format!("  domains:\n    - name: vm1\n      restart: always\n{}", "  bridges:\n    - name: br0\n"));
    let p = net.plan(&desired, Some(&hv)).await;
    assert_eq!(render_text(&p), "br0: missing, policy wants it → create bridge\nvm1: shut off (destroyed), policy wants running → start\n2 actions planned\n");
    let outcomes = apply_net_actions(&net.nl, &net.fwd, &net.journal, &p.network).await;
    assert!(outcomes.iter().all(|o| o.error.is_none()));
    let report = apply_plan(&hv, &desired, &p).unwrap();
    assert_eq!(report.failed(), 0);
}

/// `ip -o link show DEV` says `master BR` when DEV is a port of BR.
fn master_of(dev: &str) -> Option<String> {
    let out = std::process::Command::new("ip").args(["-o", "link", "show", dev]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "master" {
            return words.next().map(str::to_string);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_repairs_network_drift_on_netlink_events() {
    if !in_private_netns("engine_repairs_network_drift_on_netlink_events") {
        return;
    }
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"]);
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(tap_host(dir.path()));
    let tap = vm1_tap(&hv);
    let desired = policy(&format!("  domains:\n    - name: vm1\n{BR0}  forwarding: {{ ipv4: true }}\n"));
    let (engine, task) = spawn_engine(hv, desired, FlapSettings::default(), None);
    let converged = |s: &StatusReport| {
        s.network.as_ref().is_some_and(|n| n.drift.is_empty() && n.last_action_at.is_some())
            && master_of("eth1").as_deref() == Some("br0")
            && master_of(&tap).as_deref() == Some("br0")
    };
    engine.wait_for(Duration::from_secs(10), converged).await.unwrap_or_else(|| panic!("{:#?}", engine.status()));
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1");

    // Drift by someone else: tap detached, STP off, forwarding reset.
    sh(&["ip", "link", "set", &tap, "nomaster"]);
    engine
        .wait_for(Duration::from_secs(10), |_| master_of(&tap).as_deref() == Some("br0"))
        .await
        .expect("tap re-attached");
    sh(&["ip", "link", "set", "br0", "type", "bridge", "stp_state", "0"]);
    let stp_on = || {
        let out = std::process::Command::new("ip").args(["-d", "link", "show", "br0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("stp_state 1")
    };
    engine.wait_for(Duration::from_secs(10), |_| stp_on()).await.expect("STP restored");
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n").unwrap();
    engine
        .wait_for(Duration::from_secs(10), |_| {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim() == "1"
        })
        .await
        .expect("forwarding restored");
    let metrics = engine.metrics_text();
    assert!(metrics.contains("virtwarden_drift_detected_total{kind=\"set-forwarding\"} 2"), "{metrics}");
    engine.shutdown();
    task.await.unwrap();
}

/// veth pairs with both ends up (a carrier, so onlink routes are accepted) and no address, plus
/// loopback up (the kernel checks onlink gateways against the local table).
fn nics(names: &[&str]) {
    sh(&["ip", "link", "set", "lo", "up"]);
    for n in names {
        let peer = format!("{n}-p");
        sh(&["ip", "link", "add", n, "type", "veth", "peer", "name", &peer]);
        sh(&["ip", "link", "set", n, "up"]);
        sh(&["ip", "link", "set", &peer, "up"]);
    }
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

#[tokio::test]
async fn multipath_default_route_nic_is_held_back_not_enslaved() {
    if !in_private_netns("multipath_default_route_nic_is_held_back_not_enslaved") {
        return;
    }
    nics(&["eth1", "eth2"]);
    // Two nexthops, no address on either NIC: only the route makes them uplinks.
    sh(&[
        "ip", "route", "add", "default", "nexthop", "via", "10.1.0.1", "dev", "eth1", "onlink", "nexthop", "via",
        "10.2.0.1", "dev", "eth2", "onlink",
    ]);
    let net = Net::new();
    let observed = net.host(None).await.net.unwrap();
    assert_eq!(sorted(&observed.default_route), ["eth1", "eth2"]);
    assert!(observed.global_address.is_empty(), "{:?}", observed.global_address);

    let desired = policy("  bridges:\n    - name: br0\n      ports: [eth2]\n");
    let p = net.plan(&desired, None).await;
    assert_eq!(
        render_text(&p),
        "br0: missing, policy wants it → create bridge\n\
         warning: eth2: not a port of br0, policy lists it → held back: eth2 carries a default route (set allowUplinkChange: true to allow)\n\
         1 action planned\n"
    );
    // Applying what is planned creates the bridge and leaves the uplink where it is.
    let left = net.converge(&desired, None).await;
    assert!(left.is_empty(), "{}", render_text(&left));
    assert_eq!(net.master("eth2").await, None);
    assert!(std::process::Command::new("ip").args(["route", "show", "default"]).output().unwrap().status.success());
}

#[tokio::test]
async fn default_route_in_another_table_makes_an_uplink() {
    if !in_private_netns("default_route_in_another_table_makes_an_uplink") {
        return;
    }
    nics(&["eth1", "eth2", "eth3"]);
    sh(&["ip", "route", "add", "default", "via", "10.1.0.1", "dev", "eth1", "onlink", "table", "100"]);
    sh(&["ip", "rule", "add", "from", "10.9.0.0/16", "table", "100"]);
    // IPv6: a link-local gateway needs no global address; in a table above 255 (RTA_TABLE).
    sh(&["ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth2", "table", "1000"]);
    let net = Net::new();
    let observed = net.host(None).await.net.unwrap();
    assert_eq!(sorted(&observed.default_route), ["eth1", "eth2"]);
    assert!(observed.global_address.is_empty(), "link-local addresses are not global: {:?}", observed.global_address);
    let desired = policy("  bridges:\n    - name: br0\n      ports: [eth1, eth3]\n");
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    let p = net.plan(&desired, None).await;
    assert!(p.network.iter().all(|a| a.subject != "eth1" && a.subject != "eth3"), "{}", render_text(&p));
    assert!(
        render_text(&p).contains("eth3: not a port of br0, policy lists it → held back: eth1 carries a default route")
    );
}

#[tokio::test]
async fn nexthop_object_default_route_makes_every_member_an_uplink() {
    if !in_private_netns("nexthop_object_default_route_makes_every_member_an_uplink") {
        return;
    }
    nics(&["eth1", "eth2", "eth3"]);
    // Without compat mode the kernel reports such a route only by its nexthop id.
    std::fs::write("/proc/sys/net/ipv4/nexthop_compat_mode", "0\n").unwrap();
    sh(&["ip", "nexthop", "add", "id", "1", "via", "10.1.0.1", "dev", "eth1", "onlink"]);
    sh(&["ip", "nexthop", "add", "id", "2", "via", "10.2.0.1", "dev", "eth2", "onlink"]);
    sh(&["ip", "nexthop", "add", "id", "10", "group", "1/2"]);
    sh(&["ip", "route", "add", "default", "nhid", "10"]);
    let shown = std::process::Command::new("ip").args(["route", "show", "default"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "default nhid 10", "no interface in the route itself");
    let net = Net::new();
    let observed = net.host(None).await.net.unwrap();
    assert_eq!(sorted(&observed.default_route), ["eth1", "eth2"]);
    let p = net.plan(&policy("  bridges:\n    - name: br0\n      ports: [eth2]\n"), None).await;
    assert!(render_text(&p).contains("held back: eth2 carries a default route"), "{}", render_text(&p));
    assert!(p.network.iter().all(|a| a.subject != "eth2"));
}

#[tokio::test]
async fn interface_with_a_global_address_is_an_uplink() {
    if !in_private_netns("interface_with_a_global_address_is_an_uplink") {
        return;
    }
    nics(&["eth1", "eth2"]);
    sh(&["ip", "addr", "add", "192.0.2.5/24", "dev", "eth1"]);
    sh(&["ip", "-6", "addr", "add", "2001:db8::5/64", "dev", "eth2", "nodad"]);
    let net = Net::new();
    let observed = net.host(None).await.net.unwrap();
    assert!(observed.default_route.is_empty(), "{:?}", observed.default_route);
    assert_eq!(sorted(&observed.global_address), ["eth1", "eth2"], "lo's 127.0.0.1 is host scope");
    let desired = policy("  bridges:\n    - name: br0\n      ports: [eth1]\n    - name: br1\n      ports: [eth2]\n");
    let left = net.converge(&desired, None).await;
    assert!(render_text(&left)
        .contains("eth1: not a port of br0, policy lists it → held back: eth1 holds a global address"));
    assert!(render_text(&left)
        .contains("eth2: not a port of br1, policy lists it → held back: eth2 holds a global address"));
    assert_eq!(net.master("eth1").await, None);
    assert_eq!(net.master("eth2").await, None);
}

#[tokio::test]
async fn stp_change_on_an_uplink_bridge_is_held_back_unless_allowed() {
    if !in_private_netns("stp_change_on_an_uplink_bridge_is_held_back_unless_allowed") {
        return;
    }
    nics(&["eth1"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    sh(&["ip", "link", "set", "eth1", "master", "br0"]);
    sh(&["ip", "route", "add", "default", "via", "10.1.0.1", "dev", "br0", "onlink"]);
    // The gateway, known statically: the kernel never asks it, so it cannot verify anything.
    sh(&["ip", "neigh", "add", "10.1.0.1", "lladdr", "02:00:00:00:00:01", "dev", "br0", "nud", "permanent"]);
    let net = Net::new();
    let stp = "      stp: { enabled: true, forwardDelay: 4 }\n      ports: [eth1]\n";
    let held = net.converge(&policy(&format!("  bridges:\n    - name: br0\n{stp}")), None).await;
    assert!(held.network.is_empty(), "{}", render_text(&held));
    assert!(
        render_text(&held).contains("warning: br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768, policy wants stp on, forward delay 4s → held back: br0 carries a default route (set allowUplinkChange: true to allow)"),
        "{}",
        render_text(&held)
    );
    assert!(!net.bridge("br0").await.stp, "STP left off on the uplink bridge");
    // Allowed, with nothing else to decide: not verified, rolled back, told to name probes.
    let allowed = policy(&format!("  bridges:\n    - name: br0\n      allowUplinkChange: true\n{stp}"));
    let p = net.plan(&allowed, None).await;
    let outcomes = apply_net_actions(&net.nl, &net.fwd, &net.journal, &p.network).await;
    let err = outcomes[0].error.clone().unwrap_or_default();
    assert!(
        err.contains("gateway 10.1.0.1 on br0 has a neighbour entry set by an admin")
            && err.contains("name `verify` probes for this bridge"),
        "{outcomes:#?}"
    );
    assert!(!net.bridge("br0").await.stp, "rolled back");
    // A probe decides (a service on the host itself stands in for one across the LAN).
    sh(&["ip", "link", "set", "lo", "up"]);
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let probed = policy(&format!(
        "  bridges:\n    - name: br0\n      allowUplinkChange: true\n      verify: [{{tcp: {{address: 127.0.0.1, port: {port}}}}}]\n{stp}"
    ));
    assert!(net.converge(&probed, None).await.is_empty());
    assert!(net.bridge("br0").await.stp);
}

#[tokio::test]
async fn vm_tap_on_a_bridge_no_policy_names_is_reported_not_moved() {
    if !in_private_netns("vm_tap_on_a_bridge_no_policy_names_is_reported_not_moved") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = tap_host(dir.path());
    let tap = vm1_tap(&hv);
    sh(&["ip", "link", "add", "br9", "type", "bridge"]);
    sh(&["ip", "link", "set", &tap, "master", "br9"]); // an admin moved it
    let net = Net::new();
    let desired = policy("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n");
    let left = net.converge(&desired, Some(&hv)).await;
    assert!(left.network.is_empty(), "{}", render_text(&left));
    assert!(render_text(&left).contains(&format!(
        "warning: {tap}: tap of vm1 is on br9, which no policy names; its domain wants br0 → left there (moved by someone else)"
    )));
    assert_eq!(net.master(&tap).await.as_deref(), Some("br9"));
}

#[tokio::test]
async fn vm_tap_whose_mac_does_not_match_is_not_attached() {
    if !in_private_netns("vm_tap_whose_mac_does_not_match_is_not_attached") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = tap_host(dir.path());
    let tap = hv.observe_domain("vm1").unwrap().unwrap().interfaces[0].target.clone().unwrap();
    // An interface with the tap's name that is not vm1's (another domain's, or an admin's).
    sh(&["ip", "link", "add", &tap, "address", "fe:54:00:00:00:99", "type", "veth", "peer", "name", "tap-peer"]);
    let net = Net::new();
    let desired = policy("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n");
    let left = net.converge(&desired, Some(&hv)).await;
    assert!(left.network.is_empty(), "{}", render_text(&left));
    assert!(render_text(&left).contains(&format!(
        "warning: {tap}: MAC fe:54:00:00:00:99 does not match vm1's interface (52:54:00:00:00:01) → not vm1's tap, not attached"
    )));
    assert_eq!(net.master(&tap).await, None);
    // With vm1's tap MAC it is vm1's and goes on its bridge.
    sh(&["ip", "link", "set", &tap, "address", "FE:54:00:00:00:01"]);
    assert!(net.converge(&desired, Some(&hv)).await.is_empty());
    assert_eq!(net.master(&tap).await.as_deref(), Some("br0"));
}

/// The engine on vm1's test-driver host, reconciling this namespace's network, remembering in
/// `data_dir` if given.
fn spawn_engine(
    hv: Arc<LibvirtHost>,
    desired: DesiredState,
    flap: FlapSettings,
    data_dir: Option<&Path>,
) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    use virtwarden::act::remediation::Registry;
    use virtwarden::engine::{Backends, Engine, EngineConfig};
    use virtwarden::libvirt::connect::SharedConnector;

    virtwarden::libvirt::events::start_event_loop();
    // A long resync: repairs must come from netlink notifications, not from the timer.
    let config = EngineConfig {
        resync: Duration::from_secs(3600),
        network: true,
        flap,
        data_dir: data_dir.map(Path::to_path_buf),
        ..Default::default()
    };
    let mut backends = Backends::new(Arc::new(SharedConnector { host: hv }), Registry::with_builtins());
    backends.network = Some(virtwarden::hostnet::netlink_runner());
    Engine::spawn_with(backends, desired, config)
}

fn network_notes(s: &StatusReport) -> Vec<String> {
    s.network.as_ref().map(|n| n.notes.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_leaves_a_vm_tap_an_admin_moved_to_a_foreign_bridge() {
    if !in_private_netns("engine_leaves_a_vm_tap_an_admin_moved_to_a_foreign_bridge") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(tap_host(dir.path()));
    let tap = vm1_tap(&hv);
    sh(&["ip", "link", "add", "br9", "type", "bridge"]);
    let desired = policy("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n");
    let (engine, task) = spawn_engine(hv, desired, FlapSettings::default(), None);
    engine
        .wait_for(Duration::from_secs(10), |_| master_of(&tap).as_deref() == Some("br0"))
        .await
        .unwrap_or_else(|| panic!("tap never attached: {:#?}", engine.status()));

    // The admin moves the VM to another segment, on a bridge no policy names.
    sh(&["ip", "link", "set", &tap, "master", "br9"]);
    let moved = format!("{tap}: tap of vm1 is on br9, which no policy names; its domain wants br0 → left there");
    engine
        .wait_for(Duration::from_secs(10), |s| network_notes(s).iter().any(|n| n.contains(&moved)))
        .await
        .unwrap_or_else(|| panic!("no report of the moved tap: {:#?}", engine.status()));
    assert_eq!(master_of(&tap).as_deref(), Some("br9"), "the admin's move stands");
    let metrics = engine.metrics_text();
    assert!(metrics.contains("virtwarden_drift_detected_total{kind=\"attach-tap\"} 1"), "{metrics}");
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_backs_off_a_writer_that_keeps_turning_stp_off() {
    if !in_private_netns("engine_backs_off_a_writer_that_keeps_turning_stp_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(tap_host(dir.path()));
    let desired = policy("  bridges:\n    - name: br0\n      stp: { enabled: true, forwardDelay: 4 }\n");
    // The defaults' first wait (10 s) shortened so the test sees the repair after it.
    let flap = FlapSettings { initial_delay: Duration::from_secs(3), ..Default::default() };
    let data = tempfile::tempdir().unwrap();
    let (engine, task) = spawn_engine(hv.clone(), desired.clone(), flap, Some(data.path()));
    let stp_on = || {
        let out = std::process::Command::new("ip").args(["-d", "link", "show", "br0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("stp_state 1")
    };
    let stp_off = || sh(&["ip", "link", "set", "br0", "type", "bridge", "stp_state", "0"]);
    let conflict = |s: &StatusReport, delay: &str| {
        s.network.as_ref().is_some_and(|n| {
            n.flapping.iter().any(|l| {
                l.starts_with(&format!(
                    "another writer keeps changing bridge br0 stp; backing off {delay}, next repair at"
                ))
            })
        })
    };
    engine.wait_for(Duration::from_secs(10), |_| stp_on()).await.expect("STP set on the new bridge");

    // Another writer turns STP off again and again. Setting it on the new bridge was
    // virtwarden's own (never counted, like the creation); the fifth revert within the window
    // starts backing off.
    for _ in 0..5 {
        stp_off();
        engine
            .wait_for(Duration::from_secs(10), |s| stp_on() || conflict(s, "3s"))
            .await
            .unwrap_or_else(|| panic!("STP not repaired: {:#?}", engine.status()));
    }
    // The fifth revert within the window started the backoff (its report follows the repair).
    engine
        .wait_for(Duration::from_secs(10), |s| conflict(s, "3s"))
        .await
        .unwrap_or_else(|| panic!("no backoff after five reverts: {:#?}", engine.status()));
    assert!(stp_on());

    // Off once more: held, and the other writer's change stands for now.
    stp_off();
    let is_held = |s: &StatusReport| {
        network_notes(s).iter().any(|n| n.contains("→ held: another writer keeps changing bridge br0 stp"))
    };
    let held = engine
        .wait_for(Duration::from_secs(10), is_held)
        .await
        .unwrap_or_else(|| panic!("repair not held: {:#?}", engine.status()));
    assert!(!stp_on(), "repaired during the backoff: {held:#?}");
    assert!(virtwarden::engine::status::render_text(&held).contains("network: CONFLICT (another writer; backing off)"));

    // After the wait it is repaired once, and the next wait doubles.
    engine
        .wait_for(Duration::from_secs(15), |s| stp_on() && conflict(s, "6s"))
        .await
        .unwrap_or_else(|| panic!("no repair after the backoff: {:#?}", engine.status()));
    let metrics = engine.metrics_text();
    assert!(metrics.contains("virtwarden_writer_conflicts_total{kind=\"stp\"} 2"), "{metrics}");
    assert!(metrics.contains("virtwarden_backed_off_objects{kind=\"stp\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_backed_off_objects{kind=\"port\"} 0"), "{metrics}");
    engine.shutdown();
    task.await.unwrap();

    // virtwarden restarts within the 6 s wait: the backoff is remembered, not forgotten.
    let (engine, task) = spawn_engine(hv, desired, flap, Some(data.path()));
    engine.wait_for(Duration::from_secs(10), |s| conflict(s, "6s")).await.expect("backoff remembered");
    stp_off();
    engine
        .wait_for(Duration::from_secs(10), is_held)
        .await
        .unwrap_or_else(|| panic!("repair not held after a restart: {:#?}", engine.status()));
    assert!(!stp_on(), "repaired during the remembered backoff");
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_holds_tap_repairs_while_libvirt_is_disconnected() {
    use virtwarden::act::remediation::Registry;
    use virtwarden::engine::{Backends, Engine, EngineConfig};
    use virtwarden_tests::faulty::{Faulty, FaultyConnector};

    if !in_private_netns("engine_holds_tap_repairs_while_libvirt_is_disconnected") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(tap_host(dir.path()));
    let tap = vm1_tap(&hv);
    virtwarden::libvirt::events::start_event_loop();
    let connector = FaultyConnector::new(Faulty::new(hv));
    let desired = policy("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n");
    let config = EngineConfig { resync: Duration::from_secs(3600), network: true, ..Default::default() };
    let mut backends = Backends::new(connector.clone(), Registry::with_builtins());
    backends.network = Some(virtwarden::hostnet::netlink_runner());
    let (engine, task) = Engine::spawn_with(backends, desired, config);
    engine
        .wait_for(Duration::from_secs(10), |_| master_of(&tap).as_deref() == Some("br0"))
        .await
        .unwrap_or_else(|| panic!("tap never attached: {:#?}", engine.status()));

    // libvirtd goes away; meanwhile the tap is detached. What vnet0 is now, nobody can say.
    connector.refuse_connects(true);
    connector.close();
    engine.wait_for(Duration::from_secs(10), |s| !s.connected).await.expect("engine sees the connection gone");
    sh(&["ip", "link", "set", &tap, "nomaster"]);
    let held =
        format!("{tap}: tap of vm1 is not on br0 (bridge recreated or port removed) → held: domain data is stale");
    engine
        .wait_for(Duration::from_secs(10), |s| network_notes(s).iter().any(|n| n.contains(&held)))
        .await
        .unwrap_or_else(|| panic!("tap repair not held: {:#?}", engine.status()));
    assert_eq!(master_of(&tap), None);

    // Back: fresh data, and the tap goes home.
    connector.refuse_connects(false);
    engine
        .wait_for(Duration::from_secs(15), |s| s.connected && master_of(&tap).as_deref() == Some("br0"))
        .await
        .unwrap_or_else(|| panic!("tap not re-attached after reconnecting: {:#?}", engine.status()));
    engine.shutdown();
    task.await.unwrap();
}

/// `ip -6 route show default` in this namespace.
fn ipv6_default_routes() -> String {
    let out = std::process::Command::new("ip").args(["-6", "route", "show", "default"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn ipv6_forwarding_keeps_a_default_route_learned_from_router_advertisements() {
    if !in_private_netns("ipv6_forwarding_keeps_a_default_route_learned_from_router_advertisements") {
        return;
    }
    // up0 here, rt0 in a router namespace that advertises itself as the default router.
    let router = virtwarden_tests::peer::PeerNetns::new();
    sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "rt0"]);
    router.take_link("rt0");
    router.sh(&["ip", "link", "set", "rt0", "up"]);
    router.sh(&["ip", "addr", "add", "fe80::1/64", "dev", "rt0", "nodad"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ipv6_default_routes().contains("proto ra") {
        assert!(std::time::Instant::now() < deadline, "no RA-learned default route: {}", ipv6_default_routes());
        router
            .enter(|| virtwarden_tests::peer::send_router_advertisement("rt0", "fe80::1".parse().unwrap(), 1800))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ipv6_default_routes().contains("via fe80::1 dev up0"), "{}", ipv6_default_routes());
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv6/conf/up0/accept_ra").unwrap().trim(), "1");

    let net = Net::new();
    let desired = policy("  forwarding: { ipv6: true }\n");
    let p = net.plan(&desired, None).await;
    assert_eq!(
        render_text(&p),
        "up0: takes its IPv6 default route from router advertisements (accept_ra 1); ipv6 forwarding on would drop that route → set accept_ra 2\n\
         forwarding: ipv6 forwarding off, policy wants on → set ipv6 forwarding on\n\
         2 actions planned\n"
    );
    assert!(net.converge(&desired, None).await.is_empty());
    assert!(net.fwd.ipv6().unwrap());
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv6/conf/up0/accept_ra").unwrap().trim(), "2");
    // The kernel purges RA default routes synchronously when forwarding goes on: still here.
    let routes = ipv6_default_routes();
    assert!(routes.contains("via fe80::1 dev up0") && routes.contains("proto ra"), "{routes}");
    // And new advertisements are still accepted (the route's lifetime is refreshed).
    router
        .enter(|| virtwarden_tests::peer::send_router_advertisement("rt0", "fe80::1".parse().unwrap(), 1800))
        .unwrap();
    assert!(ipv6_default_routes().contains("via fe80::1 dev up0"));
}
