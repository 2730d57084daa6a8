//! Uplink takeover against a real kernel (issue 22): the host's namespace is private
//! (`in_private_netns`), the LAN's gateway sits in a peer namespace on the other end of `up0`.
//! Never the host's own namespace.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtwarden::act::network::{apply_net_actions, observe_net, NetOutcome};
use virtwarden::act::uplink::{observe_uplinks, release, restore_pending, UplinkJournal};
use virtwarden::engine::status::StatusReport;
use virtwarden::hostnet::netlink::NetlinkHost;
use virtwarden::hostnet::sysctl::ProcForwarding;
use virtwarden::hostnet::uplink::{Neighbour, UplinkNet};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::memory::MemoryStore;
use virtwarden::observe::ObservedHost;
use virtwarden::plan::{plan, render_text, Plan};
use virtwarden_policies::DesiredState;
use virtwarden_tests::peer::PeerNetns;
use virtwarden_tests::{in_private_netns, sh};

fn out(args: &[&str]) -> String {
    let o = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mac_of(dev: &str) -> String {
    let text = out(&["ip", "-o", "link", "show", dev]);
    let mut w = text.split_whitespace();
    while let Some(x) = w.next() {
        if x == "link/ether" {
            return w.next().unwrap_or_default().to_string();
        }
    }
    panic!("{dev} has no MAC: {text}")
}

/// `up0` (198.51.100.2/24, default via 198.51.100.1, a policy rule and a route in table 10
/// through it) and the gateway 198.51.100.1 in a peer namespace.
fn lan() -> PeerNetns {
    sh(&["ip", "link", "set", "lo", "up"]);
    let gw = PeerNetns::new();
    sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "gw0"]);
    gw.take_link("gw0");
    gw.sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "gw0"]);
    gw.sh(&["ip", "link", "set", "gw0", "up"]);
    sh(&["ip", "addr", "add", "198.51.100.2/24", "dev", "up0"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "up0"]);
    sh(&["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "up0", "table", "10"]);
    sh(&["ip", "rule", "add", "oif", "up0", "table", "10", "pref", "100"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    gw
}

fn policy(extra: &str) -> DesiredState {
    virtwarden_tests::inline_policy(&format!(
        "  bridges:\n    - name: br0\n      ports: [up0]\n      allowUplinkChange: true\n{extra}"
    ))
}

struct Net {
    nl: NetlinkHost,
    fwd: ProcForwarding,
    journal: MemoryStore,
}

impl Net {
    fn new(journal: MemoryStore) -> Self {
        Net { nl: NetlinkHost::connect().unwrap(), fwd: ProcForwarding::default(), journal }
    }

    async fn plan(&self, desired: &DesiredState) -> Plan {
        let mut n = observe_net(&self.nl, &self.fwd).await.unwrap();
        observe_uplinks(&self.nl, &mut n, desired, &self.journal).await;
        plan(desired, &ObservedHost { net: Some(n), ..Default::default() })
    }

    async fn apply(&self, desired: &DesiredState) -> Vec<NetOutcome> {
        let p = self.plan(desired).await;
        apply_net_actions(&self.nl, &self.fwd, &self.journal, &p.network).await
    }
}

/// What the takeover put on br0 is there, and up0 is its port.
fn br0_holds_up0() -> bool {
    out(&["ip", "-4", "addr", "show", "dev", "br0"]).contains("198.51.100.2/24")
        && out(&["ip", "route", "show", "default"]).contains("via 198.51.100.1 dev br0")
        && out(&["ip", "route", "show", "table", "10"]).contains("dev br0")
        && out(&["ip", "rule"]).contains("oif br0")
        && out(&["ip", "-o", "link", "show", "up0"]).contains("master br0")
}

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap().trim().to_string()
}

/// br0's STP state and forward delay as the kernel reports them (`stp_state 0`,
/// `forward_delay 1500`).
fn stp_of_br0() -> (String, String) {
    let text = out(&["ip", "-d", "link", "show", "br0"]);
    let field = |name: &str| {
        let mut w = text.split_whitespace();
        w.find(|x| *x == name).and(w.next()).map(|v| format!("{name} {v}")).unwrap_or_default()
    };
    (field("stp_state"), field("forward_delay"))
}

/// The LAN of [`lan`] with up0 already a port of br0 and the address and default route on
/// br0: br0 carries the uplink.
fn lan_on_br0() -> PeerNetns {
    sh(&["ip", "link", "set", "lo", "up"]);
    let gw = PeerNetns::new();
    sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "gw0"]);
    gw.take_link("gw0");
    gw.sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "gw0"]);
    gw.sh(&["ip", "link", "set", "gw0", "up"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0"]);
    sh(&["ip", "link", "set", "up0", "master", "br0"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    sh(&["ip", "addr", "add", "198.51.100.2/24", "dev", "br0"]);
    sh(&["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "br0"]);
    gw
}

/// STP on br0 (which carries the uplink) and IPv4 forwarding, decided by a probe nothing
/// answers within `timeout`.
fn stp_and_forwarding_policy(timeout: &str, stp: bool, forwarding: bool) -> DesiredState {
    let mut spec = "  bridges:\n    - name: br0\n      ports: [up0]\n      allowUplinkChange: true\n".to_string();
    if stp {
        spec.push_str("      stp: { enabled: true, forwardDelay: 4 }\n");
    }
    spec.push_str(&format!("      verify: [{{ping: {{address: 198.51.100.99}}}}]\n      verifyTimeout: {timeout}\n"));
    if forwarding {
        spec.push_str("  forwarding: { ipv4: true }\n");
    }
    virtwarden_tests::inline_policy(&spec)
}

/// `net.apply(desired)` running on its own, to act on the host while it verifies.
fn spawn_apply(net: &Arc<Net>, desired: &DesiredState) -> tokio::task::JoinHandle<Vec<NetOutcome>> {
    let (net, desired) = (net.clone(), desired.clone());
    tokio::spawn(async move { net.apply(&desired).await })
}

/// Wait (5 s at most) until `port` is br0's port and the gateway answered afresh on br0.
async fn until_in_br0_and_the_gateway_answers(port: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(out(&["ip", "-o", "link", "show", port]).contains("master br0")
        && out(&["ip", "neigh", "show", "198.51.100.1", "dev", "br0"]).contains("REACHABLE"))
    {
        assert!(Instant::now() < deadline, "{port} was not put into br0, or the gateway never answered on br0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn up0_is_back() -> bool {
    out(&["ip", "-4", "addr", "show", "dev", "up0"]).contains("198.51.100.2/24")
        && out(&["ip", "route", "show", "default"]).contains("via 198.51.100.1 dev up0")
        && out(&["ip", "route", "show", "table", "10"]).contains("dev up0")
        && out(&["ip", "rule"]).contains("oif up0")
        && !out(&["ip", "-o", "link", "show", "up0"]).contains("master br0")
}

#[tokio::test]
async fn takeover_moves_addresses_routes_and_rules_and_keeps_the_gateway_reachable() {
    if !in_private_netns("takeover_moves_addresses_routes_and_rules_and_keeps_the_gateway_reachable") {
        return;
    }
    let gw = lan();
    // Something listens on the gateway's port 22, for the policy's tcp probe.
    let _ssh = gw.enter(|| std::net::TcpListener::bind("198.51.100.1:22").unwrap());
    let up0_mac = mac_of("up0");
    let net = Net::new(MemoryStore::in_memory());
    let desired = policy("      verify: [{tcp: {address: 198.51.100.1, port: 22}}]\n      verifyTimeout: 10s\n");
    let text = render_text(&net.plan(&desired).await);
    assert_eq!(
        text,
        format!(
            "up0: uplink (carries a default route), policy lists it as a port of br0 with allowUplinkChange → take over into br0: \
             MAC {up0_mac}, MTU 1500 → br0; addresses 198.51.100.2/24 → br0; routes default via 198.51.100.1 table 10, \
             default via 198.51.100.1 table main → br0; rules priority 100 oif up0 table 10 → br0; then attach to br0; \
             verify within 10s: gateway 198.51.100.1 answers ARP/NDP on br0, tcp 198.51.100.1:22; roll back if not\n\
             1 action planned\n"
        )
    );
    let outcomes = net.apply(&desired).await;
    assert_eq!(outcomes.len(), 1);
    let v = outcomes[0].verification.clone().expect("a takeover reports its verification");
    assert!(outcomes[0].error.is_none() && v.verified, "{outcomes:#?}");
    assert!(
        v.detail.contains("gateway 198.51.100.1 answers ARP/NDP on br0") && v.detail.contains("tcp 198.51.100.1:22"),
        "{v:?}"
    );
    assert!(out(&["ip", "-4", "addr", "show", "dev", "br0"]).contains("198.51.100.2/24"));
    assert!(!out(&["ip", "-4", "addr", "show", "dev", "up0"]).contains("198.51.100.2"));
    assert!(out(&["ip", "route", "show", "default"]).contains("via 198.51.100.1 dev br0"));
    assert!(out(&["ip", "route", "show", "table", "10"]).contains("via 198.51.100.1 dev br0"));
    assert!(out(&["ip", "rule"]).contains("oif br0 lookup 10"));
    assert_eq!(mac_of("br0"), up0_mac, "the bridge carries the port's MAC");
    assert!(out(&["ip", "-o", "link", "show", "up0"]).contains("master br0"));
    // The gateway answers through the bridge, from its own namespace's point of view too.
    assert!(out(&["ip", "neigh", "show", "198.51.100.1", "dev", "br0"]).contains("REACHABLE"));
    assert!(net.plan(&desired).await.is_empty(), "converged");

    // The policy lets go of up0: everything moves back.
    let released = virtwarden_tests::inline_policy("  bridges:\n    - name: br0\n");
    let text = render_text(&net.plan(&released).await);
    assert!(
        text.starts_with("up0: taken over into br0 by virtwarden; no policy lists it there any more → give back"),
        "{text}"
    );
    let outcomes = net.apply(&released).await;
    assert!(outcomes[0].error.is_none(), "{outcomes:#?}");
    assert!(up0_is_back(), "addresses, routes and rule back on up0, detached");
    assert!(!out(&["ip", "-4", "addr", "show", "dev", "br0"]).contains("198.51.100.2"));
    assert!(net.plan(&released).await.network.is_empty());
}

#[tokio::test]
async fn failed_verification_is_rolled_back_within_a_second_and_held() {
    if !in_private_netns("failed_verification_is_rolled_back_within_a_second_and_held") {
        return;
    }
    let _gw = lan();
    let net = Net::new(MemoryStore::in_memory());
    // Nothing answers 198.51.100.99.
    let desired = policy("      verify: [{ping: {address: 198.51.100.99}}]\n      verifyTimeout: 2s\n");
    let outcomes = net.apply(&desired).await;
    let v = outcomes[0].verification.clone().unwrap();
    assert!(!v.verified, "{v:?}");
    let err = outcomes[0].error.clone().unwrap();
    assert!(err.contains("ping 198.51.100.99 did not answer within 2s") && err.contains("rolled back in"), "{err}");
    // Back within a second of the verdict (issue 22's bound, the restore's own time; a few ms
    // here, its p50/p99 are `make bench-net`'s): not a timeout that happened to pass.
    assert!(v.rollback_millis.is_some_and(|ms| ms < 1000), "{v:?}");
    assert!(up0_is_back(), "up0 has its address, routes and rule again");
    assert!(!out(&["ip", "-4", "addr", "show", "dev", "br0"]).contains("198.51.100.2"));

    // Held: planned no more, and said so.
    let again = net.plan(&desired).await;
    assert!(again.network.is_empty(), "{}", render_text(&again));
    let text = render_text(&again);
    assert!(text.contains("warning: up0: takeover into br0 → held: verification failed at "), "{text}");
    assert!(text.contains("ping 198.51.100.99 did not answer within 2s; rolled back; retried when the policy changes or after `virtwarden release br0`"), "{text}");
    // A changed policy is tried again; so is the same policy after a release.
    let changed = policy("      verify: [{ping: {address: 198.51.100.1}}]\n");
    assert_eq!(net.plan(&changed).await.network.len(), 1);
    assert_eq!(release(&net.journal, "br0").unwrap().len(), 1);
    assert_eq!(net.plan(&desired).await.network.len(), 1);
}

#[tokio::test]
async fn a_dhcp_client_on_the_uplink_is_refused_with_its_name_unless_forced() {
    if !in_private_netns("a_dhcp_client_on_the_uplink_is_refused_with_its_name_unless_forced") {
        return;
    }
    let _gw = lan();
    let dir = tempfile::tempdir().unwrap();
    let lease = dir.path().join("leases");
    let pidf = dir.path().join("pid");
    // A real DHCP client on up0; its script is /bin/true so it never touches /etc.
    let mut dhclient = std::process::Command::new("dhclient")
        .args(["-d", "-sf", "/bin/true", "-lf", lease.to_str().unwrap(), "-pf", pidf.to_str().unwrap(), "up0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dhclient (isc-dhcp-client, installed by make deps)");
    let net = Net::new(MemoryStore::in_memory());
    let refused = format!(
        "warning: up0: inline.yaml:9:26: error: carries a default route and is managed by DHCP client dhclient (pid {}) → takeover into br0 refused",
        dhclient.id()
    );
    // Waits for dhclient to be up, and past the moments when it forks to run its script (the
    // fork is a second `dhclient` on up0 until it execs /bin/true).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = render_text(&net.plan(&policy("")).await);
        if text.contains(&refused) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains(&refused), "{text}");
    assert!(text.contains("set allowUplinkChange: force"), "{text}");
    let forced = virtwarden_tests::inline_policy(
        "  bridges:\n    - name: br0\n      ports: [up0]\n      allowUplinkChange: force\n",
    );
    let p = render_text(&net.plan(&forced).await);
    assert!(p.contains("take over into br0") && p.contains("(forced past DHCP client dhclient"), "{p}");
    let _ = dhclient.kill();
    let _ = dhclient.wait();
}

/// Runs a takeover that never verifies until the parent kills it (`kill -9`); only when
/// started by `a_crash_between_apply_and_verify_is_restored_at_the_next_start`.
#[tokio::test]
#[ignore = "helper process of a_crash_between_apply_and_verify_is_restored_at_the_next_start"]
async fn helper_takeover_until_killed() {
    let dir = std::env::var("VW_UPLINK_DATA").expect("started by the crash test");
    let (journal, _) = MemoryStore::open(Path::new(&dir)).unwrap();
    let net = Net::new(journal);
    net.apply(&crash_policy()).await;
    panic!("verification must not finish before the kill");
}

fn crash_policy() -> DesiredState {
    policy("      verify: [{ping: {address: 198.51.100.99}}]\n      verifyTimeout: 5m\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_apply_and_verify_is_restored_at_the_next_start() {
    if !in_private_netns("a_crash_between_apply_and_verify_is_restored_at_the_next_start") {
        return;
    }
    let _gw = lan();
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_takeover_until_killed", "--ignored", "--nocapture"])
        .env("VW_UPLINK_DATA", dir.path())
        .spawn()
        .unwrap();
    // Wait until the takeover is applied (the address is on br0) and verification runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out(&["ip", "-4", "addr", "show", "dev", "br0"]).contains("198.51.100.2/24") {
        assert!(Instant::now() < deadline, "the helper never applied the takeover");
        assert!(child.try_wait().unwrap().is_none(), "the helper ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sh(&["kill", "-9", &child.id().to_string()]);
    let _ = child.wait();
    assert!(!up0_is_back(), "killed mid-change: the takeover is half-way or done, not verified");

    // The next start restores the checkpoint before anything else and holds the change.
    let hv = Arc::new(LibvirtHost::open("test:///default").unwrap());
    virtwarden::libvirt::events::start_event_loop();
    let config = virtwarden::engine::EngineConfig {
        resync: Duration::from_secs(3600),
        network: true,
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let mut backends = virtwarden::engine::Backends::new(
        Arc::new(virtwarden::libvirt::connect::SharedConnector { host: hv }),
        virtwarden::act::remediation::Registry::with_builtins(),
    );
    backends.network = Some(virtwarden::hostnet::netlink_runner());
    let (engine, task) = virtwarden::engine::Engine::spawn_with(backends, crash_policy(), config);
    let held = |s: &StatusReport| {
        s.network.as_ref().is_some_and(|n| {
            n.notes.iter().any(|l| {
                l.contains("held: verification failed at") && l.contains("virtwarden stopped during the change")
            })
        })
    };
    engine.wait_for(Duration::from_secs(20), held).await.unwrap_or_else(|| panic!("{:#?}", engine.status()));
    assert!(up0_is_back(), "the checkpoint was restored");
    let metrics = engine.metrics_text();
    assert!(metrics.contains("virtwarden_uplink_changes_held 1"), "{metrics}");
    assert!(engine
        .status()
        .network
        .unwrap()
        .last_actions
        .iter()
        .any(|l| l.contains("restored at start: uplink change up0 → br0")));
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test]
async fn takeover_of_an_ipv6_uplink_keeps_its_ra_learned_default_route() {
    if !in_private_netns("takeover_of_an_ipv6_uplink_keeps_its_ra_learned_default_route") {
        return;
    }
    sh(&["ip", "link", "set", "lo", "up"]);
    let router = PeerNetns::new();
    sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "rt0"]);
    router.take_link("rt0");
    router.sh(&["ip", "link", "set", "rt0", "up"]);
    router.sh(&["ip", "addr", "add", "fe80::1/64", "dev", "rt0", "nodad"]);
    router.sh(&["ip", "addr", "add", "2001:db8:1::1/64", "dev", "rt0", "nodad"]);
    sh(&["ip", "addr", "add", "2001:db8:1::2/64", "dev", "up0", "nodad"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out(&["ip", "-6", "route", "show", "default"]).contains("proto ra") {
        assert!(Instant::now() < deadline, "no RA-learned default route");
        router
            .enter(|| virtwarden_tests::peer::send_router_advertisement("rt0", "fe80::1".parse().unwrap(), 1800))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let net = Net::new(MemoryStore::in_memory());
    let desired = policy("      verify: [{ping: {address: 2001:db8:1::1}}]\n");
    let text = render_text(&net.plan(&desired).await);
    assert!(text.contains("addresses 2001:db8:1::2/64 → br0"), "{text}");
    assert!(text.contains("routes default via fe80::1 metric 1024 proto ra table main → br0"), "{text}");
    assert!(text.contains("verify within 10s: gateway fe80::1 answers ARP/NDP on br0, ping 2001:db8:1::1"), "{text}");
    let outcomes = net.apply(&desired).await;
    assert!(outcomes[0].error.is_none(), "{outcomes:#?}");
    let routes = out(&["ip", "-6", "route", "show", "default"]);
    assert!(routes.contains("via fe80::1 dev br0"), "{routes}");
    assert!(out(&["ip", "-6", "addr", "show", "dev", "br0"]).contains("2001:db8:1::2/64"));
    // The gateway answered NDP on br0 (the neighbour table itself is no witness afterwards:
    // verification drops the entry each second to ask afresh, so it may be gone or aging).
    let verified = outcomes[0].verification.as_ref().map(|v| v.detail.clone()).unwrap_or_default();
    assert!(verified.contains("gateway fe80::1 answers ARP/NDP on br0"), "{verified}");

    // IPv6 forwarding now depends on br0: accept_ra 2 on br0 and forwarding are one guarded
    // change. One that fails verification puts both back.
    assert_eq!(
        (sysctl("net/ipv6/conf/br0/accept_ra"), sysctl("net/ipv6/conf/all/forwarding")),
        ("1".into(), "0".into())
    );
    let forwarding = |probe: &str, timeout: &str| {
        virtwarden_tests::inline_policy(&format!(
            "  bridges:\n    - name: br0\n      ports: [up0]\n      allowUplinkChange: true\n      verify: [{{ping: {{address: {probe}}}}}]\n      verifyTimeout: {timeout}\n  forwarding: {{ ipv6: true }}\n"
        ))
    };
    let bad = forwarding("2001:db8:1::99", "1s");
    let text = render_text(&net.plan(&bad).await);
    assert!(
        text.contains("forwarding: ipv6 forwarding off, policy wants on → set accept_ra 2 on br0 (keeps the RA-learned default route), \
                       then set ipv6 forwarding on; checkpoint net.ipv6.conf.all.forwarding, net.ipv6.conf.br0.accept_ra; \
                       verify within 1s: gateway fe80::1 answers ARP/NDP on br0, ping 2001:db8:1::99; roll back if not\n1 action planned"),
        "{text}"
    );
    let outcomes = net.apply(&bad).await;
    let err = outcomes[0].error.clone().expect("nothing answers 2001:db8:1::99");
    assert!(err.contains("rolled back in"), "{err}");
    assert_eq!(
        (sysctl("net/ipv6/conf/br0/accept_ra"), sysctl("net/ipv6/conf/all/forwarding")),
        ("1".into(), "0".into())
    );
    // Verified: forwarding on, and the RA-learned default route stays on br0.
    let outcomes = net.apply(&forwarding("2001:db8:1::1", "10s")).await;
    assert!(outcomes.len() == 1 && outcomes[0].error.is_none(), "{outcomes:#?}");
    assert_eq!(
        (sysctl("net/ipv6/conf/br0/accept_ra"), sysctl("net/ipv6/conf/all/forwarding")),
        ("2".into(), "1".into())
    );
    assert!(out(&["ip", "-6", "route", "show", "default"]).contains("via fe80::1 dev br0"));
}

#[tokio::test]
async fn a_failed_stp_or_forwarding_change_on_the_uplink_bridge_is_rolled_back_and_held() {
    if !in_private_netns("a_failed_stp_or_forwarding_change_on_the_uplink_bridge_is_rolled_back_and_held") {
        return;
    }
    let _gw = lan_on_br0();
    let net = Net::new(MemoryStore::in_memory());
    let stp_before = stp_of_br0();
    assert_eq!(stp_before, ("stp_state 0".to_string(), "forward_delay 1500".to_string()));
    assert_eq!(sysctl("net/ipv4/ip_forward"), "0");
    let desired = stp_and_forwarding_policy("1s", true, true);
    let text = render_text(&net.plan(&desired).await);
    assert!(
        text.contains("br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768 → set stp on, forward delay 4s; \
                       checkpoint the bridge's STP settings; verify within 1s: gateway 198.51.100.1 answers ARP/NDP on br0, \
                       ping 198.51.100.99; roll back if not"),
        "{text}"
    );
    assert!(
        text.contains("forwarding: ipv4 forwarding off, policy wants on → set ipv4 forwarding on; checkpoint net.ipv4.ip_forward; \
                       verify within 1s: gateway 198.51.100.1 answers ARP/NDP on br0, ping 198.51.100.99; roll back if not"),
        "{text}"
    );
    let outcomes = net.apply(&desired).await;
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    for o in &outcomes {
        let err = o.error.clone().unwrap_or_else(|| panic!("verification cannot pass: {o:#?}"));
        assert!(err.contains("ping 198.51.100.99 did not answer within 1s") && err.contains("rolled back in"), "{err}");
        assert!(o.verification.as_ref().and_then(|v| v.rollback_millis).is_some_and(|ms| ms < 1000), "{o:#?}");
    }
    assert!(outcomes[1].error.as_ref().unwrap().contains("`virtwarden release forwarding`"));
    assert_eq!(stp_of_br0(), stp_before, "STP off and its forward delay back");
    assert_eq!(sysctl("net/ipv4/ip_forward"), "0", "forwarding back off");
    assert!(out(&["ip", "route", "show", "default"]).contains("via 198.51.100.1 dev br0"));
    assert!(net.journal.load().pending.is_empty(), "the checkpoints were restored");

    // Held: planned no more, and said so; a release tries it again.
    let again = net.plan(&desired).await;
    let text = render_text(&again);
    assert!(again.network.is_empty(), "{text}");
    assert!(
        text.contains("warning: br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768, policy wants stp on, forward delay 4s → held: verification failed at "),
        "{text}"
    );
    assert!(
        text.contains("warning: forwarding: ipv4 forwarding off, policy wants on → held: verification failed at "),
        "{text}"
    );
    assert!(text.contains("retried when the policy changes or after `virtwarden release forwarding`"), "{text}");
    assert_eq!(release(&net.journal, "forwarding").unwrap().len(), 1);
    assert_eq!(net.plan(&desired).await.network.len(), 1, "forwarding planned again, STP still held");
}

#[tokio::test]
async fn a_release_whose_gateway_does_not_answer_puts_the_uplink_back_into_the_bridge_and_is_held() {
    if !in_private_netns("a_release_whose_gateway_does_not_answer_puts_the_uplink_back_into_the_bridge_and_is_held") {
        return;
    }
    let gw = lan();
    let up0_mac = mac_of("up0");
    let net = Net::new(MemoryStore::in_memory());
    let outcomes = net.apply(&policy("")).await;
    assert!(outcomes[0].error.is_none(), "{outcomes:#?}");
    assert!(br0_holds_up0());
    // The gateway stops answering ARP: the release cannot be verified on up0.
    gw.sh(&["sysctl", "-qw", "net.ipv4.conf.gw0.arp_ignore=8", "net.ipv4.conf.all.arp_ignore=8"]);
    let released = virtwarden_tests::inline_policy("  bridges:\n    - name: br0\n      verifyTimeout: 2s\n");
    let text = render_text(&net.plan(&released).await);
    assert!(
        text.contains("up0: taken over into br0 by virtwarden; no policy lists it there any more → give back: addresses, routes and rules \
                       from br0 back to it, then detach; checkpoint what br0 holds of it; verify within 2s: gateway 198.51.100.1 \
                       answers ARP/NDP on up0; put it back into br0 if not"),
        "{text}"
    );
    let outcomes = net.apply(&released).await;
    let err = outcomes[0].error.clone().expect("the gateway does not answer on up0");
    assert!(
        err.contains("gateway 198.51.100.1 did not answer ARP/NDP on up0 within 2s")
            && err.contains("put back into br0 in"),
        "{err}"
    );
    assert!(err.contains("held until the policy changes or `virtwarden release br0`"), "{err}");
    assert!(outcomes[0].verification.as_ref().unwrap().rollback_millis.is_some_and(|ms| ms < 1000));
    assert!(br0_holds_up0(), "br0 holds the uplink again");
    assert_eq!(mac_of("br0"), up0_mac);
    let memory = net.journal.load();
    assert!(memory.pending.is_empty() && memory.committed.len() == 1, "{memory:#?}");

    // Held and reported; the gateway answers again through br0.
    let again = net.plan(&released).await;
    let text = render_text(&again);
    assert!(again.network.is_empty(), "{text}");
    assert!(text.contains("give back → held: verification failed at "), "{text}");
    assert!(
        text.contains(
            "rolled back (up0 stays in br0); retried when the policy changes or after `virtwarden release br0`"
        ),
        "{text}"
    );
    gw.sh(&["sysctl", "-qw", "net.ipv4.conf.gw0.arp_ignore=0", "net.ipv4.conf.all.arp_ignore=0"]);
    let gateway = "198.51.100.1".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.nl.neighbour_reachable("br0", gateway).await.unwrap() != Neighbour::Reachable {
        assert!(Instant::now() < deadline, "the gateway does not answer on br0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Released by the admin: given back, verified.
    assert_eq!(release(&net.journal, "br0").unwrap().len(), 1);
    let outcomes = net.apply(&released).await;
    assert!(outcomes[0].error.is_none(), "{outcomes:#?}");
    assert!(up0_is_back());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_cut_during_verification_rolls_the_takeover_back() {
    if !in_private_netns("the_gateway_cut_during_verification_rolls_the_takeover_back") {
        return;
    }
    let gw = lan();
    let net = Arc::new(Net::new(MemoryStore::in_memory()));
    // Nothing listens on the gateway's port 22: verification runs until its timeout, long
    // after the gateway first answered on br0 (at most 5 s in, below; the gateway is asked
    // again every second, so the cut is seen well before the deadline even on a slow machine).
    let desired = policy("      verify: [{tcp: {address: 198.51.100.1, port: 22}}]\n      verifyTimeout: 12s\n");
    let apply = spawn_apply(&net, &desired);
    // Applied, and the gateway answered afresh on br0: now its link goes down.
    until_in_br0_and_the_gateway_answers("up0").await;
    assert!(!apply.is_finished(), "verification still runs when the link is cut");
    gw.sh(&["ip", "link", "set", "gw0", "down"]);
    let outcomes = apply.await.unwrap();
    let err = outcomes[0].error.clone().expect("the gateway went away during verification");
    assert!(err.contains("gateway 198.51.100.1 did not answer ARP/NDP on br0"), "{err}");
    assert!(err.contains("rolled back in") && err.contains("`virtwarden release br0`"), "{err}");
    assert!(up0_is_back(), "up0 has its address, routes and rule again");
    let text = render_text(&net.plan(&desired).await);
    assert!(text.contains("warning: up0: takeover into br0 → held: verification failed at "), "{text}");
    assert!(text.contains("gateway 198.51.100.1 did not answer ARP/NDP on br0"), "{text}");
    // The gateway's link back: the original path works again.
    gw.sh(&["ip", "link", "set", "gw0", "up"]);
    let gateway = "198.51.100.1".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.nl.neighbour_reachable("up0", gateway).await.unwrap() != Neighbour::Reachable {
        assert!(Instant::now() < deadline, "the gateway does not answer on up0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs an STP change (`VW_GUARDED=stp`) or a forwarding change on br0's uplink that never
/// verifies, until the parent kills it; only when started by
/// `interrupted_stp_and_forwarding_changes_are_restored_at_start`.
#[tokio::test]
#[ignore = "helper process of interrupted_stp_and_forwarding_changes_are_restored_at_start"]
async fn helper_guarded_change_until_killed() {
    let dir = std::env::var("VW_UPLINK_DATA").expect("started by the crash test");
    let stp = std::env::var("VW_GUARDED").expect("started by the crash test") == "stp";
    let (journal, _) = MemoryStore::open(Path::new(&dir)).unwrap();
    let net = Net::new(journal);
    net.apply(&stp_and_forwarding_policy("5m", stp, !stp)).await;
    panic!("verification must not finish before the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_stp_and_forwarding_changes_are_restored_at_start() {
    if !in_private_netns("interrupted_stp_and_forwarding_changes_are_restored_at_start") {
        return;
    }
    let _gw = lan_on_br0();
    let stp_before = stp_of_br0();
    for (guarded, applied) in [
        ("stp", Box::new(|| stp_of_br0().0 == "stp_state 1") as Box<dyn Fn() -> bool>),
        ("forwarding", Box::new(|| sysctl("net/ipv4/ip_forward") == "1")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "helper_guarded_change_until_killed", "--ignored", "--nocapture"])
            .env("VW_UPLINK_DATA", dir.path())
            .env("VW_GUARDED", guarded)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !applied() {
            assert!(Instant::now() < deadline, "the helper never applied the {guarded} change");
            assert!(child.try_wait().unwrap().is_none(), "the helper ended early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sh(&["kill", "-9", &child.id().to_string()]);
        let _ = child.wait();

        // The next start: the checkpoint from the durable memory is restored, the change held.
        let (journal, _) = MemoryStore::open(dir.path()).unwrap();
        assert_eq!(journal.load().pending.len(), 1, "{guarded}: the checkpoint was in the durable memory");
        let net = Net::new(journal);
        let restored = restore_pending(&net.nl, &net.fwd, &net.journal).await;
        let what = if guarded == "stp" { "STP of br0" } else { "ipv4 forwarding" };
        assert_eq!(restored, [what]);
        assert_eq!(stp_of_br0(), stp_before, "{guarded}: STP as before");
        assert_eq!(sysctl("net/ipv4/ip_forward"), "0", "{guarded}: forwarding as before");
        let memory = net.journal.load();
        assert!(memory.pending.is_empty(), "{memory:#?}");
        assert!(memory.held[0].reason.contains("virtwarden stopped during the change"), "{memory:#?}");
        assert!(net
            .plan(&stp_and_forwarding_policy("5m", guarded == "stp", guarded != "stp"))
            .await
            .network
            .is_empty());
    }
}

/// br0 carries the uplink: up0 is its port, the address and default route are on br0.
fn port_policy(verify: &str) -> DesiredState {
    virtwarden_tests::inline_policy(&format!(
        "  bridges:\n    - name: br0\n      ports: [up0, eth1]\n      allowUplinkChange: true\n{verify}"
    ))
}

fn eth1_in_br0() -> bool {
    out(&["ip", "-o", "link", "show", "eth1"]).contains("master br0")
}

#[tokio::test]
async fn a_port_attached_to_the_uplink_bridge_is_detached_again_when_the_host_loses_its_lan() {
    if !in_private_netns("a_port_attached_to_the_uplink_bridge_is_detached_again_when_the_host_loses_its_lan") {
        return;
    }
    let _gw = lan_on_br0();
    // A second host interface the policy lists as a port of the bridge that carries the uplink.
    // A MAC lower than br0's (it has up0's): a bridge whose MAC was not set explicitly would
    // take it.
    sh(&["ip", "link", "add", "eth1", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "eth1p"]);
    let br0_mac = mac_of("br0");
    assert_ne!(br0_mac, "02:00:00:00:00:01");
    let net = Net::new(MemoryStore::in_memory());

    // Down, it waits: nothing it carries could verify it.
    let failing = port_policy("      verify: [{ping: {address: 198.51.100.99}}]\n      verifyTimeout: 2s\n");
    let p = net.plan(&failing).await;
    assert!(!p.network.iter().any(|a| a.subject == "eth1"), "{}", render_text(&p));
    assert!(render_text(&p).contains("→ waits: br0 carries an uplink and eth1 is down"), "{}", render_text(&p));
    sh(&["ip", "link", "set", "eth1", "up"]);

    // Nothing answers 198.51.100.99: the attachment is undone and held.
    let text = render_text(&net.plan(&failing).await);
    assert!(
        text.contains(
            "eth1: not a port of br0, policy lists it → attach to br0; checkpoint that it is in no bridge; verify throughout 2s: \
             gateway 198.51.100.1 answers ARP/NDP on br0, ping 198.51.100.99; detach if not"
        ),
        "{text}"
    );
    let outcomes = net.apply(&failing).await;
    let o = outcomes.iter().find(|o| o.action.subject == "eth1").unwrap();
    let err = o.error.clone().expect("the ping cannot pass");
    assert!(err.contains("ping 198.51.100.99 did not answer within 2s") && err.contains("detached again in"), "{err}");
    assert!(err.contains("held until the policy changes or `virtwarden release br0`"), "{err}");
    assert!(o.verification.as_ref().is_some_and(|v| !v.verified && v.rollback_millis.is_some()), "{o:#?}");
    assert!(!eth1_in_br0(), "eth1 detached again");
    assert_eq!(mac_of("br0"), br0_mac, "br0 kept its MAC");
    assert!(out(&["ip", "-o", "link", "show", "br0"]).contains(",UP"), "br0 still up");
    assert!(out(&["ip", "-o", "link", "show", "up0"]).contains("master br0"), "the uplink untouched");
    assert!(out(&["ip", "route", "show", "default"]).contains("via 198.51.100.1 dev br0"));
    assert!(net.journal.load().pending.is_empty(), "no checkpoint left once rolled back");
    let again = net.plan(&failing).await;
    let text = render_text(&again);
    assert!(again.network.is_empty(), "{text}");
    assert!(
        text.contains("warning: eth1: not a port of br0, policy lists it → held: verification failed at ")
            && text.contains("detached again; retried when the policy changes or after `virtwarden release br0`"),
        "{text}"
    );

    // virtwarden killed mid-change (eth1 attached, its checkpoint pending): the next start
    // detaches it and holds the change.
    sh(&["ip", "link", "set", "eth1", "master", "br0"]);
    let interrupted = virtwarden::hostnet::uplink::Checkpoint {
        bridge: "br0".into(),
        port: "eth1".into(),
        change: virtwarden::observe::GuardedChange::Port,
        ..Default::default()
    };
    net.journal.change(&mut |u| u.pending.push(interrupted.clone())).unwrap();
    assert_eq!(restore_pending(&net.nl, &net.fwd, &net.journal).await, ["attach of eth1 to br0"]);
    assert!(!eth1_in_br0(), "detached at start");
    let memory = net.journal.load();
    assert!(memory.pending.is_empty() && memory.held.len() == 1, "{memory:#?}");
    assert!(memory.held[0].reason.starts_with("virtwarden stopped during the change"), "{memory:#?}");

    // Released by the admin, with a policy whose deciders answer (the gateway, still at the end
    // of the verify time): attached, verified, kept.
    assert_eq!(release(&net.journal, "br0").unwrap().len(), 1);
    let passing = port_policy("      verifyTimeout: 2s\n");
    let outcomes = net.apply(&passing).await;
    let o = outcomes.iter().find(|o| o.action.subject == "eth1").unwrap();
    assert!(o.error.is_none(), "{o:#?}");
    let v = o.verification.clone().expect("guarded");
    assert!(v.verified && v.detail.contains("gateway 198.51.100.1 answers ARP/NDP on br0"), "{v:?}");
    assert!(eth1_in_br0());
    assert_eq!(mac_of("br0"), br0_mac, "br0 kept its MAC with a lower-MAC port in it");
    let memory = net.journal.load();
    assert!(memory.pending.is_empty() && memory.held.is_empty(), "{memory:#?}");
    assert!(net.plan(&passing).await.network.is_empty(), "converged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_whose_lan_goes_dark_after_its_first_answers_is_detached_again() {
    if !in_private_netns("a_port_whose_lan_goes_dark_after_its_first_answers_is_detached_again") {
        return;
    }
    let gw = lan_on_br0();
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p"]);
    sh(&["ip", "link", "set", "eth1", "up"]);
    let net = Arc::new(Net::new(MemoryStore::in_memory()));
    // The gateway answers at first; a port's verdict waits for the end of the verify time.
    let desired = port_policy("      verifyTimeout: 6s\n");
    let apply = spawn_apply(&net, &desired);
    until_in_br0_and_the_gateway_answers("eth1").await;
    assert!(!apply.is_finished(), "verification still runs after the first answers");
    gw.sh(&["ip", "link", "set", "gw0", "down"]);
    let outcomes = apply.await.unwrap();
    let o = outcomes.iter().find(|o| o.action.subject == "eth1").unwrap();
    let err = o.error.clone().expect("the gateway went away during verification");
    assert!(err.contains("gateway 198.51.100.1 did not answer ARP/NDP on br0 any more at the end of 6s"), "{err}");
    assert!(err.contains("detached again in"), "{err}");
    assert!(!eth1_in_br0(), "eth1 detached again");
}

#[tokio::test]
async fn a_gateway_entry_set_by_an_admin_decides_nothing_probes_must() {
    if !in_private_netns("a_gateway_entry_set_by_an_admin_decides_nothing_probes_must") {
        return;
    }
    let gw = lan_on_br0();
    let _ssh = gw.enter(|| std::net::TcpListener::bind("198.51.100.1:22").unwrap());
    gw.sh(&["ip", "link", "set", "gw0", "address", "02:00:00:00:00:99"]);
    // A static ARP entry for the gateway (hardened hosts have them): the kernel never asks it.
    sh(&["ip", "neigh", "replace", "198.51.100.1", "lladdr", "02:00:00:00:00:99", "nud", "permanent", "dev", "br0"]);
    // The lowest MAC: br0's is kept explicitly, which flushes its neighbour table; the admin's
    // entry is put back.
    sh(&["ip", "link", "add", "eth1", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "eth1p"]);
    sh(&["ip", "link", "set", "eth1", "up"]);
    let net = Net::new(MemoryStore::in_memory());
    let permanent = || out(&["ip", "neigh", "show", "198.51.100.1", "dev", "br0"]).contains("PERMANENT");

    // Nothing else decides: not verified, detached again, and told what to do.
    let bare = port_policy("      verifyTimeout: 2s\n");
    let outcomes = net.apply(&bare).await;
    let o = outcomes.iter().find(|o| o.action.subject == "eth1").unwrap();
    let err = o
        .error
        .clone()
        .unwrap_or_else(|| panic!("a static entry proves nothing: {o:#?} {}", out(&["ip", "neigh", "show"])));
    assert!(
        err.contains("gateway 198.51.100.1 on br0 has a neighbour entry set by an admin (permanent or NOARP)")
            && err.contains("name `verify` probes for this bridge")
            && err.contains("detached again in"),
        "{err}"
    );
    assert!(!eth1_in_br0());
    assert!(permanent(), "the admin's entry kept");

    // A probe decides; the static entry is named as not asked.
    let probed = port_policy("      verify: [{tcp: {address: 198.51.100.1, port: 22}}]\n      verifyTimeout: 2s\n");
    let outcomes = net.apply(&probed).await;
    let o = outcomes.iter().find(|o| o.action.subject == "eth1").unwrap();
    assert!(o.error.is_none(), "{o:#?}");
    let detail = o.verification.clone().unwrap().detail;
    assert!(
        detail.contains("tcp 198.51.100.1:22")
            && detail.contains("(not asked, its neighbour entry set by an admin: gateway 198.51.100.1 on br0)")
            && !detail.contains("gateway 198.51.100.1 answers"),
        "{detail}"
    );
    assert!(eth1_in_br0());
    assert!(permanent(), "the admin's entry kept");
}
