//! `make bench`: how long one reconcile pass takes at scale, on libvirt's test driver.
//! Prints p50/p99; asserts nothing (figures belong in notes, not in timed tests).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::plan::plan;
use virtwarden_policies::{DesiredState, DomainPolicy, ManagedDomain};

const DOMAINS: usize = 1000;

fn node_xml(n: usize) -> String {
    let mut xml = String::from("<node>\n");
    for i in 0..n {
        let state = if i % 2 == 0 { 1 } else { 5 };
        let _ = writeln!(
            xml,
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>vm{i:04}</name>\
             <memory>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>\
             <devices><disk type='file' device='disk'><source file='/img/vm{i}.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             <interface type='bridge'><source bridge='br0'/><mac address='52:54:00:00:{:02x}:{:02x}'/></interface></devices>\
             <test:runstate>{state}</test:runstate></domain>",
            i / 256,
            i % 256
        );
    }
    xml.push_str("</node>\n");
    xml
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    let p50 = percentile(&mut samples, 0.50);
    let p99 = percentile(&mut samples, 0.99);
    println!(
        "{name:<44} n={:<5} p50={:>9.3} ms  p99={:>9.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = dir.path().join("node.xml");
    std::fs::write(&node, node_xml(DOMAINS)).expect("write node file");
    let host = LibvirtHost::open(&format!("test://{}", node.display())).expect("open test driver");

    let desired = DesiredState {
        domains: (0..DOMAINS)
            .map(|i| ManagedDomain {
                policy: "bench".into(),
                spec: DomainPolicy {
                    autostart: Some(true),
                    ..DomainPolicy::named(format!("vm{i:04}"))
                },
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
    report("observe all domains (libvirt calls + XML)", observe);
    report("plan (pure)", planning);
}
