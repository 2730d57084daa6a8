//! `make bench`: how long one reconcile pass takes at scale, on libvirt's test driver.
//! Prints p50/p99; asserts nothing (figures belong in notes, not in timed tests).

mod common;

use std::time::Instant;

use common::{node_xml, report};

use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::plan::plan;
use virtwarden_policies::{DesiredState, DomainPolicy, ManagedDomain};

const DOMAINS: usize = 1000;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = dir.path().join("node.xml");
    std::fs::write(&node, node_xml(DOMAINS, 2)).expect("write node file");
    let host = LibvirtHost::open(&format!("test://{}", node.display())).expect("open test driver");

    let desired = DesiredState {
        domains: (0..DOMAINS)
            .map(|i| ManagedDomain {
                policy: "bench".into(),
                spec: DomainPolicy { autostart: Some(true), ..DomainPolicy::named(format!("vm{i:04}")) },
            })
            .collect(),
        ..Default::default()
    };

    let mut observe = Vec::new();
    let mut observed = host.observe_host().expect("observe");
    for _ in 0..20 {
        let t = Instant::now();
        observed = host.observe_host().expect("observe");
        observe.push(t.elapsed());
    }
    let mut planning = Vec::new();
    let mut actions = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let p = plan(&desired, &observed);
        planning.push(t.elapsed());
        actions = p.actions.len();
    }
    println!("test driver, {DOMAINS} managed domains (half running, half shut off), {actions} actions planned");
    report("resync: observe 1,000 domains (libvirt + XML)", observe);
    report("resync: plan 1,000 domains (pure)", planning);
}
