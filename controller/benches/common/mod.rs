//! Shared bench helpers: generated test-driver hosts and percentiles.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::Duration;

/// A test-driver node file with `n` domains named vm0000…; every `shut_off_every`-th is shut off
/// (0: all running).
pub fn node_xml(n: usize, shut_off_every: usize) -> String {
    let mut xml = String::from("<node>\n");
    for i in 0..n {
        let state = if shut_off_every > 0 && i % shut_off_every == 1 { 5 } else { 1 };
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

/// A policy managing vm0000…vm{n-1} with `extra` appended to every domain entry.
pub fn policy_yaml(n: usize, extra: &str) -> String {
    let mut y = String::from(
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: bench\nspec:\n  domains:\n",
    );
    for i in 0..n {
        let _ = writeln!(y, "    - name: vm{i:04}{extra}");
    }
    y
}

pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

pub fn report(name: &str, mut samples: Vec<Duration>) {
    let p50 = percentile(&mut samples, 0.50);
    let p99 = percentile(&mut samples, 0.99);
    let max = *samples.iter().max().unwrap_or(&Duration::ZERO);
    println!(
        "{name:<48} n={:<5} p50={:>9.3} ms  p99={:>9.3} ms  max={:>9.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
}
