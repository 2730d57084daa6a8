//! Network findings of `diagnose` against a real kernel, in a private network namespace:
//! libvirt's test driver supplies the domains (their live XML names the taps), veth pairs stand
//! in for taps, and the bridge, STP, forwarding, bridge netfilter and the FORWARD chain
//! (iptables and nftables) are real. Never the host's namespace: see `in_private_netns`.

use std::path::Path;

use virtwarden::diagnose::{diagnose, Options, Report, Target};
use virtwarden::libvirt::LibvirtHost;
use virtwarden_tests::{in_private_netns, sh};

const NODE: &str = "<node>\
  <cpu><mhz>2400</mhz><model>x86_64</model><active>2</active><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\
  <memory>8388608</memory>\
  <network><name>default</name><uuid>7a3f0f46-0b0e-4d57-9b2f-3d1b52a8e0aa</uuid><bridge name='virbr0'/><forward mode='nat'/>\
    <ip address='192.168.122.1' netmask='255.255.255.0'/></network>\
  <domain type='test'><name>web</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
    <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet0'/></interface>\
  </devices></domain>\
  <domain type='test'><name>natted</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
    <interface type='network'><mac address='52:54:00:00:00:02'/><source network='default'/><target dev='vnet1'/></interface>\
  </devices></domain>\
</node>";

struct Host {
    _dir: tempfile::TempDir,
    hv: LibvirtHost,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        std::fs::write(&node, NODE).unwrap();
        let hv = LibvirtHost::open(&format!("test://{}", node.display())).unwrap();
        Host { _dir: dir, hv }
    }

    /// The tap the test driver gave the domain's first interface (it names them itself).
    fn tap(&self, domain: &str) -> String {
        let xml = self.hv.connection().lookup_domain_by_name(domain).unwrap().xml_desc(0).unwrap();
        virtwarden::observe::domain_xml::parse_domain_xml(&xml).unwrap().interfaces[0]
            .target
            .clone()
            .expect("a live tap name")
    }

    /// The network findings of one domain, as `what: evidence` lines.
    fn network_findings(&self, domain: &str) -> Vec<String> {
        let mut opts = Options::for_uri("test:///", true);
        // Nothing here is about disks or memory; keep the host files out of it.
        opts.paths.qemu_conf = "/nonexistent/qemu.conf".into();
        let report: Report =
            diagnose(&self.hv, &[Target { domain: domain.into(), policy: None }], &opts).expect("diagnose");
        report.domains[0]
            .findings
            .iter()
            .filter(|f| f.check == virtwarden::diagnose::Check::Network)
            .map(|f| format!("{}: {}", f.what, f.evidence))
            .collect()
    }
}

fn sysctl(key: &str, value: &str) {
    std::fs::write(Path::new("/proc/sys").join(key), value).unwrap_or_else(|e| panic!("{key}: {e}"));
}

#[test]
fn bridge_tap_stp_and_forwarding_findings_on_a_real_kernel() {
    if !in_private_netns("bridge_tap_stp_and_forwarding_findings_on_a_real_kernel") {
        return;
    }
    let host = Host::new();
    let tap = host.tap("web");
    let tap = tap.as_str();
    sh(&["ip", "link", "set", "lo", "up"]);
    // Nothing there yet: the bridge is missing.
    let f = host.network_findings("web");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(f[0].starts_with("bridge br0 does not exist: no interface br0 in this network namespace"), "{f:#?}");

    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "link", "add", tap, "type", "veth", "peer", "name", "vnet0p"]);
    let f = host.network_findings("web");
    assert_eq!(f[0], "bridge br0 is down: br0: state DOWN (admin)", "{f:#?}");
    sh(&["ip", "link", "set", "br0", "up"]);
    sh(&["ip", "link", "set", tap, "up"]);
    sh(&["ip", "link", "set", "vnet0p", "up"]);
    assert_eq!(
        host.network_findings("web"),
        vec![format!("tap {tap} of web is not on bridge br0: {tap} is on no bridge; the interface's source is br0")]
    );
    sh(&["ip", "link", "set", tap, "master", "br0"]);
    assert_eq!(host.network_findings("web"), Vec::<String>::new(), "attached, up, STP off: sound");

    // STP with the longest forward delay: a port attached now stays listening for 30 s.
    sh(&["ip", "link", "set", tap, "nomaster"]);
    sh(&["ip", "link", "set", "br0", "type", "bridge", "stp_state", "1", "forward_delay", "3000"]);
    sh(&["ip", "link", "set", tap, "master", "br0"]);
    let f = host.network_findings("web");
    assert_eq!(
        f,
        vec![format!(
            "port {tap} on br0 is still in STP listening state: it forwards nothing yet: br0: stp on, forward delay 30 s; port {tap}: listening"
        )]
    );
    sh(&["ip", "link", "set", "br0", "type", "bridge", "stp_state", "0"]);

    // A libvirt NAT network with forwarding off (a new namespace starts with ip_forward = 0).
    sh(&["ip", "link", "add", "virbr0", "type", "bridge"]);
    sh(&["ip", "link", "set", "virbr0", "up"]);
    // The test driver numbers taps per domain, so web's stand-in goes first.
    sh(&["ip", "link", "del", tap]);
    let tap1 = host.tap("natted");
    sh(&["ip", "link", "add", &tap1, "type", "veth", "peer", "name", "vnet1p"]);
    sh(&["ip", "link", "set", &tap1, "master", "virbr0"]);
    sh(&["ip", "link", "set", &tap1, "up"]);
    sysctl("net/ipv4/ip_forward", "0");
    assert_eq!(
        host.network_findings("natted"),
        vec!["IP forwarding is off, so natted on nat network default cannot reach beyond the host: net.ipv4.ip_forward = 0"]
    );
    sysctl("net/ipv4/ip_forward", "1");
    assert_eq!(host.network_findings("natted"), Vec::<String>::new());
}

#[test]
fn bridge_netfilter_with_a_dropping_forward_chain_iptables_and_nft() {
    if !in_private_netns("bridge_netfilter_with_a_dropping_forward_chain_iptables_and_nft") {
        return;
    }
    let nf = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    assert!(
        nf.exists(),
        "br_netfilter is not loaded on this host (no /proc/sys/net/bridge): bridge netfilter cannot be tested here"
    );
    let host = Host::new();
    let tap = host.tap("web");
    let tap = tap.as_str();
    sh(&["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "link", "add", tap, "type", "veth", "peer", "name", "vnet0p"]);
    sh(&["ip", "link", "set", tap, "master", "br0"]);
    for l in ["br0", tap, "vnet0p"] {
        sh(&["ip", "link", "set", l, "up"]);
    }
    sysctl("net/bridge/bridge-nf-call-iptables", "1");
    assert_eq!(host.network_findings("web"), Vec::<String>::new());

    sh(&["iptables", "-P", "FORWARD", "DROP"]);
    let f = host.network_findings("web");
    assert_eq!(
        f,
        vec!["the host firewall drops web's bridged traffic on br0: net.bridge.bridge-nf-call-iptables = 1, so bridged \
              frames pass the FORWARD chain; iptables: :FORWARD DROP (the chain's policy; no rule accepts bridged traffic on br0)"]
    );
    // The usual fix accepts bridged traffic, and the finding goes away.
    sh(&["iptables", "-I", "FORWARD", "-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"]);
    assert_eq!(host.network_findings("web"), Vec::<String>::new());
    // A rule that drops this tap's frames outright.
    sh(&["iptables", "-I", "FORWARD", "-m", "physdev", "--physdev-in", tap, "-j", "DROP"]);
    let f = host.network_findings("web");
    assert!(f[0].ends_with(&format!("iptables: -A FORWARD -m physdev --physdev-in {tap} -j DROP")), "{f:#?}");
    sh(&["iptables", "-F", "FORWARD"]);
    sh(&["iptables", "-P", "FORWARD", "ACCEPT"]);
    assert_eq!(host.network_findings("web"), Vec::<String>::new());

    // nftables: a base chain on the forward hook with policy drop.
    sh(&["nft", "add", "table", "inet", "fw"]);
    sh(&["nft", "add", "chain", "inet", "fw", "vmfwd", "{ type filter hook forward priority 0 ; policy drop ; }"]);
    let f = host.network_findings("web");
    assert!(
        f[0].ends_with("nft: table inet fw chain vmfwd policy drop (no rule accepts bridged traffic on br0)"),
        "{f:#?}"
    );
    sh(&["nft", "add", "rule", "inet", "fw", "vmfwd", "iifname", "br0", "accept"]);
    assert_eq!(host.network_findings("web"), Vec::<String>::new());
    sh(&["nft", "flush", "chain", "inet", "fw", "vmfwd"]);
    assert_eq!(host.network_findings("web").len(), 1);

    // Without bridge netfilter, bridged frames never reach the FORWARD hook.
    sysctl("net/bridge/bridge-nf-call-iptables", "0");
    assert_eq!(host.network_findings("web"), Vec::<String>::new());
}
