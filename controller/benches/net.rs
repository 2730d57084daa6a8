//! `make bench-net`: host-network drift → repaired (read back) latency, in a private network
//! namespace (the bench re-runs itself under `unshare --net`; it never touches the host's).
//! Drift is caused through netlink/procfs directly; repair is detected by reading back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{BridgeStpState, InfoBridge, InfoData, LinkAttribute, LinkInfo};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec};
use virtwarden::act::remediation::Registry;
use virtwarden::engine::{Backends, Engine, EngineConfig};
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
}
