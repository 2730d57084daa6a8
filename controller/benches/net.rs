//! `make bench-net`: host-network drift → repaired (read back) latency, in a private network
//! namespace (the bench re-runs itself under `unshare --net`; it never touches the host's).
//! Drift is caused through netlink/procfs directly; repair is detected by reading back. Then
//! uplink takeover and rollback against a "gateway" in a peer namespace.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{BridgeStpState, InfoBridge, InfoData, LinkAttribute, LinkInfo};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec};
use virtwarden::act::remediation::Registry;
use virtwarden::engine::{Backends, Engine, EngineConfig};
use virtwarden::hostnet::uplink::Neighbour;
use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::plan::flap::FlapSettings;
use virtwarden::plan::network::libvirt_tap_mac;
use virtwarden_policies::load_texts;

const TRIALS: usize = 150;

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn main() {
    if std::env::var_os("VW_BENCH_NETNS").is_none() {
        let exe = std::env::current_exe().expect("bench path");
        match std::process::Command::new("unshare").args(["--net", "--"]).arg(exe).env("VW_BENCH_NETNS", "1").status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("bench-net failed or could not create a private network namespace ({s})"),
            Err(e) => panic!("bench-net: cannot run unshare ({e}); install util-linux"),
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(bench());
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> u32 {
    let msg = h.link().get().match_name(name.to_string()).execute().try_next().await.unwrap().unwrap();
    msg.header.index
}

async fn master_index(h: &rtnetlink::Handle, name: &str) -> Option<u32> {
    let msg = h.link().get().match_name(name.to_string()).execute().try_next().await.ok()??;
    msg.attributes.iter().find_map(|a| if let LinkAttribute::Controller(i) = a { Some(*i) } else { None })
}

async fn stp_on(h: &rtnetlink::Handle, name: &str) -> bool {
    let Ok(Some(msg)) = h.link().get().match_name(name.to_string()).execute().try_next().await else { return false };
    msg.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::Data(InfoData::Bridge(attrs)) => {
                attrs.iter().any(|b| matches!(b, InfoBridge::StpState(s) if !matches!(s, BridgeStpState::Disabled)))
            }
            _ => false,
        }),
        _ => false,
    })
}

async fn wait_until<F, Fut>(mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "not repaired within 10 s");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    t0.elapsed()
}

async fn bench() {
    sh(&["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let node = dir.path().join("node.xml");
    std::fs::write(&node, common::node_xml(1, 0)).expect("node file");
    start_event_loop();
    let hv = Arc::new(LibvirtHost::open(&format!("test://{}", node.display())).expect("test driver"));
    let iface = hv.observe_domain("vm0000").unwrap().unwrap().interfaces[0].clone();
    let tap = iface.target.clone().unwrap();
    // The kernel side of the tap: a veth with the MAC libvirt would give it.
    let mac = libvirt_tap_mac(iface.mac.as_deref().unwrap()).unwrap();
    sh(&["ip", "link", "add", &tap, "address", &mac, "type", "veth", "peer", "name", "tap-peer"]);
    let yaml = "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: b}\nspec:\n  domains:\n    - name: vm0000\n  bridges:\n    - name: br0\n      stp: { enabled: true, forwardDelay: 4 }\n      ports: [eth1]\n  forwarding: { ipv4: true }\n";
    let desired = load_texts([(std::path::Path::new("b.yaml"), yaml)]).expect("policy").desired;
    // The same objects are repaired over and over on purpose: no flap backoff here.
    let config = EngineConfig {
        resync: Duration::from_secs(3600),
        network: true,
        flap: FlapSettings::off(),
        ..Default::default()
    };
    let mut backends = Backends::new(Arc::new(SharedConnector { host: hv.clone() }), Registry::with_builtins());
    backends.network = Some(virtwarden::hostnet::netlink_runner());
    let (engine, task) = Engine::spawn_with(backends, desired, config);

    let (conn, h, _) = rtnetlink::new_connection().expect("netlink");
    tokio::spawn(conn);
    wait_until(|| {
        let h = h.clone();
        async move { stp_on(&h, "br0").await && master_index(&h, "eth1").await.is_some() }
    })
    .await;
    let br = link_index(&h, "br0").await;
    let port = link_index(&h, "eth1").await;
    let tap_idx = link_index(&h, &tap).await;

    let mut detach = Vec::new();
    for i in 0..TRIALS {
        let idx = if i % 2 == 0 { port } else { tap_idx };
        let t0 = Instant::now();
        h.link().set(LinkUnspec::new_with_index(idx).nocontroller().build()).execute().await.expect("nomaster");
        let h2 = h.clone();
        wait_until(move || {
            let h = h2.clone();
            async move {
                let msg = h.link().get().match_index(idx).execute().try_next().await.ok().flatten();
                msg.is_some_and(|m| m.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(c) if *c == br)))
            }
        })
        .await;
        detach.push(t0.elapsed());
    }
    let mut stp = Vec::new();
    for _ in 0..TRIALS {
        let t0 = Instant::now();
        let msg = LinkMessageBuilder::<LinkBridge>::new("br0").index(br).stp_state(BridgeStpState::Disabled).build();
        h.link().change(msg).execute().await.expect("stp off");
        let h2 = h.clone();
        wait_until(move || {
            let h = h2.clone();
            async move { stp_on(&h, "br0").await }
        })
        .await;
        stp.push(t0.elapsed());
    }
    let mut fwd = Vec::new();
    for _ in 0..TRIALS {
        let t0 = Instant::now();
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n").expect("reset forwarding");
        wait_until(|| async {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
        })
        .await;
        fwd.push(t0.elapsed());
    }
    println!("private network namespace, {TRIALS} trials each, drift → repaired (read back, 0.2 ms polling)");
    common::report("port/tap detached → re-attached", detach);
    common::report("STP switched off → on again", stp);
    common::report("ip_forward reset → 1 (netconf event)", fwd);
    engine.shutdown();
    let _ = task.await;
    bench_uplink().await;
}

const UPLINK_TRIALS: usize = 40;

/// A network namespace held open by `sleep`, for the LAN's gateway.
struct Peer(std::process::Child);

impl Peer {
    fn new() -> Self {
        let child = std::process::Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .spawn()
            .expect("unshare for the gateway namespace");
        let own = std::fs::read_link("/proc/self/ns/net").ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/net", child.id())).ok() == own {
            assert!(Instant::now() < deadline, "cannot create the gateway namespace");
            std::thread::sleep(Duration::from_millis(5));
        }
        Peer(child)
    }

    fn sh(&self, args: &[&str]) {
        let pid = self.0.id().to_string();
        let mut all = vec!["nsenter", "-t", pid.as_str(), "-n", "--"];
        all.extend_from_slice(args);
        sh(&all);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Uplink takeover → gateway answers on the bridge (the verification itself), and a takeover
/// whose verification fails → the gateway answers on the port again after the rollback.
async fn bench_uplink() {
    use virtwarden::act::network::{apply_net_actions, observe_net};
    use virtwarden::act::uplink::{observe_uplinks, release};
    use virtwarden::hostnet::netlink::NetlinkHost;
    use virtwarden::hostnet::sysctl::ProcForwarding;
    use virtwarden::hostnet::uplink::UplinkNet;
    use virtwarden::memory::MemoryStore;
    use virtwarden::observe::ObservedHost;

    sh(&["ip", "link", "set", "lo", "up"]);
    let gw = Peer::new();
    sh(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "gw0"]);
    sh(&["ip", "link", "set", "gw0", "netns", &gw.0.id().to_string()]);
    gw.sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "gw0"]);
    gw.sh(&["ip", "link", "set", "gw0", "up"]);
    sh(&["ip", "addr", "add", "198.51.100.2/24", "dev", "up0"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "up0"]);
    sh(&["ip", "link", "add", "brU", "type", "bridge"]);
    sh(&["ip", "link", "set", "brU", "up"]);
    let policy = |verify: &str| {
        let yaml = format!("apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {{name: u}}\nspec:\n  bridges:\n    - name: brU\n      ports: [up0]\n      allowUplinkChange: true\n{verify}");
        load_texts([(std::path::Path::new("u.yaml"), yaml.as_str())]).expect("policy").desired
    };
    let good = policy("");
    let released = {
        let yaml = "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: u}\nspec:\n  bridges:\n    - name: brU\n";
        load_texts([(std::path::Path::new("u.yaml"), yaml)]).expect("policy").desired
    };
    // Nothing answers .99: verification fails after 100 ms.
    let bad = policy("      verify: [{ping: {address: 198.51.100.99}}]\n      verifyTimeout: 100ms\n");
    let net = NetlinkHost::connect().expect("netlink");
    let fwd = ProcForwarding::default();
    let journal = MemoryStore::in_memory();
    let gateway: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    let planned = |desired: virtwarden_policies::DesiredState| {
        let (net, fwd, journal) = (&net, &fwd, &journal);
        async move {
            let mut n = observe_net(net, fwd).await.expect("observe");
            observe_uplinks(net, &mut n, &desired, journal).await;
            virtwarden::plan::plan(&desired, &ObservedHost { net: Some(n), ..Default::default() }).network
        }
    };
    let mut takeover = Vec::new();
    let mut rollback = Vec::new();
    for _ in 0..UPLINK_TRIALS {
        let actions = planned(good.clone()).await;
        assert_eq!(actions.len(), 1, "{actions:?}");
        let t0 = Instant::now();
        let out = apply_net_actions(&net, &fwd, &journal, &actions).await;
        assert!(out[0].error.is_none(), "{out:?}");
        takeover.push(t0.elapsed());
        // The policy lets go of up0: it is given back (verified on up0).
        let actions = planned(released.clone()).await;
        let back = apply_net_actions(&net, &fwd, &journal, &actions).await;
        assert!(back.len() == 1 && back[0].error.is_none(), "{back:?}");

        // Connectivity back must be proven afresh: no neighbour entry left over on up0.
        let _ = std::process::Command::new("ip").args(["neigh", "flush", "dev", "up0"]).status();
        let actions = planned(bad.clone()).await;
        let out = apply_net_actions(&net, &fwd, &journal, &actions).await;
        let v = out[0].verification.clone().expect("verification");
        assert!(!v.verified, "{v:?}");
        // From the verdict: the rollback, then the gateway answering on up0 again.
        let t1 = Instant::now();
        while !net.neighbour_reachable("up0", gateway).await.is_ok_and(|n| n == Neighbour::Reachable) {
            assert!(t1.elapsed() < Duration::from_secs(10), "connectivity not back");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        rollback.push(Duration::from_millis(v.rollback_millis.unwrap_or(0) as u64) + t1.elapsed());
        release(&journal, "brU").expect("release");
        // The next takeover must resolve the gateway afresh on the bridge.
        let _ = std::process::Command::new("ip").args(["neigh", "flush", "dev", "brU"]).status();
    }
    println!(
        "uplink up0 (198.51.100.2/24, default via 198.51.100.1 in a peer namespace) into brU, {UPLINK_TRIALS} trials"
    );
    common::report("takeover → gateway answers ARP on the bridge", takeover);
    common::report("failed verification → gateway answers on up0", rollback);
}
