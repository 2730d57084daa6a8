//! Network checks per interface: the libvirt network is active; the bridge exists, is a bridge
//! and is up; the live tap exists, is up and sits on it; MTUs match; the port is past STP
//! listening/learning; IP forwarding is on for a NAT network; bridge netfilter with a FORWARD
//! chain that drops the VM's traffic. Pure: it reads [`NetFacts`] and the libvirt networks.

use super::firewall::Flow;
use super::model::{Check, DomainReport, Finding};
use super::netfacts::NetFacts;
use super::source::NetworkFacts;
use crate::observe::domain_xml::{DomainXmlFacts, InterfaceXml};
use crate::observe::PortState;

pub fn check(
    spec: &DomainXmlFacts,
    domain: &str,
    running: bool,
    net: &NetFacts,
    networks: &[NetworkFacts],
    out: &mut DomainReport,
) {
    for iface in &spec.interfaces {
        let bridge = match iface.kind.as_str() {
            "bridge" => iface.source().map(str::to_string),
            "network" => match libvirt_network(iface, net, networks, domain, out) {
                Some(b) => b,
                None => continue,
            },
            _ => continue,
        };
        let Some(bridge) = bridge else { continue };
        if !bridge_ok(&bridge, net, out) {
            continue;
        }
        let tap = if running { iface.target.as_deref() } else { None };
        if let Some(tap) = tap {
            tap_ok(tap, &bridge, iface, net, domain, out);
        }
        firewall(&bridge, tap, domain, net, out);
    }
}

/// The network exists and is active, forwarding is on for NAT/routed ones; its bridge.
fn libvirt_network(
    iface: &InterfaceXml,
    net: &NetFacts,
    networks: &[NetworkFacts],
    domain: &str,
    out: &mut DomainReport,
) -> Option<Option<String>> {
    let name = iface.source()?;
    let Some(n) = networks.iter().find(|n| n.name == name) else {
        out.findings.push(Finding::error(
            Check::Network,
            format!("libvirt network {name} does not exist"),
            format!("virsh net-list --all shows no {name}"),
            format!("define it (virsh net-define) or attach {domain} to an existing network"),
        ));
        return None;
    };
    if !n.active {
        out.findings.push(Finding::error(
            Check::Network,
            format!("libvirt network {name} is not active"),
            format!("network {name}: inactive"),
            format!("virsh net-start {name}; virsh net-autostart {name}"),
        ));
        return None;
    }
    if matches!(n.forward.as_deref(), Some("nat" | "route")) && net.ip_forward == Some(false) {
        out.findings.push(Finding::error(
            Check::Network,
            format!("IP forwarding is off, so {domain} on {} network {name} cannot reach beyond the host", n.forward.as_deref().unwrap_or("")),
            "net.ipv4.ip_forward = 0".to_string(),
            "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d), or `forwarding: {ipv4: true}` in a policy",
        ));
    }
    Some(n.bridge.clone())
}

fn bridge_ok(bridge: &str, net: &NetFacts, out: &mut DomainReport) -> bool {
    let Some(link) = net.link(bridge) else {
        out.findings.push(Finding::error(
            Check::Network,
            format!("bridge {bridge} does not exist"),
            format!("no interface {bridge} in this network namespace (netlink); starting fails with \"Cannot get interface MTU on '{bridge}'\""),
            format!("create it (ip link add {bridge} type bridge; ip link set {bridge} up), or list it under `bridges:` in a policy"),
        ));
        return false;
    };
    if link.kind.as_deref() != Some("bridge") {
        out.findings.push(Finding::error(
            Check::Network,
            format!("{bridge} is not a bridge"),
            format!("{bridge} is a {} interface", link.kind.as_deref().unwrap_or("plain")),
            format!("attach the VM to a bridge, or rename: an interface named {bridge} is in the way"),
        ));
        return false;
    }
    if !link.up {
        out.findings.push(Finding::error(
            Check::Network,
            format!("bridge {bridge} is down"),
            format!("{bridge}: state DOWN (admin)"),
            format!("ip link set {bridge} up"),
        ));
    }
    true
}

fn tap_ok(tap: &str, bridge: &str, iface: &InterfaceXml, net: &NetFacts, domain: &str, out: &mut DomainReport) {
    let Some(link) = net.link(tap) else {
        out.findings.push(Finding::error(
            Check::Network,
            format!("tap {tap} of {domain} does not exist"),
            format!("the live definition names {tap}; netlink has no such interface"),
            format!("re-plug the NIC (virsh detach-interface/attach-interface) or restart {domain}"),
        ));
        return;
    };
    if !link.up {
        out.findings.push(Finding::error(
            Check::Network,
            format!("tap {tap} of {domain} is down"),
            format!("{tap}: state DOWN (admin)"),
            format!("ip link set {tap} up"),
        ));
    }
    if link.master.as_deref() != Some(bridge) {
        let on = match &link.master {
            Some(m) => format!("{tap} is a port of {m}"),
            None => format!("{tap} is on no bridge"),
        };
        out.findings.push(Finding::error(
            Check::Network,
            format!("tap {tap} of {domain} is not on bridge {bridge}"),
            format!("{on}; the interface's source is {bridge}"),
            format!("ip link set {tap} master {bridge} (virtwarden run re-attaches the taps of managed domains)"),
        ));
        return;
    }
    let bridge_mtu = net.link(bridge).map(|b| b.mtu).unwrap_or(0);
    let wanted = iface.mtu.unwrap_or(bridge_mtu);
    if link.mtu != bridge_mtu || link.mtu != wanted {
        let xml = iface.mtu.map(|m| format!("; <mtu size='{m}'/>")).unwrap_or_default();
        out.findings.push(Finding::warning(
            Check::Network,
            format!("MTU of tap {tap} does not match bridge {bridge}: larger frames are dropped"),
            format!("{tap} mtu {}, {bridge} mtu {bridge_mtu}{xml}", link.mtu),
            format!(
                "use one MTU: ip link set {tap} mtu {bridge_mtu}, or set <mtu size='{bridge_mtu}'/> on the interface"
            ),
        ));
    }
    match link.port_state {
        Some(s @ (PortState::Listening | PortState::Learning)) => {
            let delay = net.link(bridge).and_then(|b| b.bridge).map(|b| b.forward_delay).unwrap_or(15);
            out.findings.push(Finding::warning(
                Check::Network,
                format!("port {tap} on {bridge} is still in STP {} state: it forwards nothing yet", s.as_str()),
                format!("{bridge}: stp on, forward delay {delay} s; port {tap}: {}", s.as_str()),
                format!("wait up to {} s; lower `forwardDelay` (2 s minimum) or turn STP off on a bridge without redundant links", 2 * delay),
            ));
        }
        Some(PortState::Blocking) => out.findings.push(Finding::error(
            Check::Network,
            format!("port {tap} on {bridge} is blocked by STP"),
            format!("port {tap}: blocking"),
            "STP found a loop through this port: check the bridge's other links",
        )),
        _ => {}
    }
}

fn firewall(bridge: &str, tap: Option<&str>, domain: &str, net: &NetFacts, out: &mut DomainReport) {
    if net.bridge_nf_iptables != Some(true) {
        return;
    }
    let Some(fw) = &net.firewall else { return };
    if let Some(why) = fw.drops(Flow { bridge, tap }) {
        out.findings.push(Finding::error(
            Check::Network,
            format!("the host firewall drops {domain}'s bridged traffic on {bridge}"),
            format!("net.bridge.bridge-nf-call-iptables = 1, so bridged frames pass the FORWARD chain; {why}"),
            "accept bridged traffic: iptables -I FORWARD -m physdev --physdev-is-bridged -j ACCEPT, or sysctl -w net.bridge.bridge-nf-call-iptables=0",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::firewall::Firewall;
    use crate::observe::{BridgeAttrs, NetLink};

    fn bridge(name: &str) -> NetLink {
        NetLink {
            name: name.into(),
            kind: Some("bridge".into()),
            up: true,
            mtu: 1500,
            bridge: Some(BridgeAttrs { stp: false, forward_delay: 15, ..Default::default() }),
            ..Default::default()
        }
    }

    fn tap(name: &str, master: Option<&str>) -> NetLink {
        NetLink {
            name: name.into(),
            kind: Some("tun".into()),
            up: true,
            mtu: 1500,
            master: master.map(str::to_string),
            port_state: master.map(|_| PortState::Forwarding),
            ..Default::default()
        }
    }

    fn spec(kind: &str, source: &str) -> DomainXmlFacts {
        DomainXmlFacts {
            interfaces: vec![InterfaceXml {
                kind: kind.into(),
                source_bridge: (kind == "bridge").then(|| source.into()),
                source_network: (kind == "network").then(|| source.into()),
                target: Some("vnet0".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn run(spec: &DomainXmlFacts, net: &NetFacts, networks: &[NetworkFacts]) -> Vec<String> {
        let mut out = DomainReport::new("vm1", None, String::new());
        check(spec, "vm1", true, net, networks, &mut out);
        out.findings.iter().map(|f| format!("{}: {}", f.what, f.evidence)).collect()
    }

    #[test]
    fn sound_bridge_and_tap_have_no_findings() {
        let net = NetFacts { links: vec![bridge("br0"), tap("vnet0", Some("br0"))], ..Default::default() };
        assert!(run(&spec("bridge", "br0"), &net, &[]).is_empty());
    }

    #[test]
    fn missing_bridge_wrong_kind_and_down() {
        let net = NetFacts::default();
        assert_eq!(run(&spec("bridge", "br0"), &net, &[])[0].split(':').next(), Some("bridge br0 does not exist"));
        let net = NetFacts {
            links: vec![NetLink { name: "br0".into(), kind: Some("veth".into()), ..Default::default() }],
            ..Default::default()
        };
        assert_eq!(run(&spec("bridge", "br0"), &net, &[]), vec!["br0 is not a bridge: br0 is a veth interface"]);
        let mut b = bridge("br0");
        b.up = false;
        let net = NetFacts { links: vec![b, tap("vnet0", Some("br0"))], ..Default::default() };
        assert_eq!(run(&spec("bridge", "br0"), &net, &[]), vec!["bridge br0 is down: br0: state DOWN (admin)"]);
    }

    #[test]
    fn detached_or_missing_tap_mtu_and_stp_learning() {
        let net = NetFacts { links: vec![bridge("br0"), tap("vnet0", None)], ..Default::default() };
        assert_eq!(
            run(&spec("bridge", "br0"), &net, &[]),
            vec!["tap vnet0 of vm1 is not on bridge br0: vnet0 is on no bridge; the interface's source is br0"]
        );
        let net = NetFacts { links: vec![bridge("br0")], ..Default::default() };
        assert!(run(&spec("bridge", "br0"), &net, &[])[0].starts_with("tap vnet0 of vm1 does not exist"));
        let mut t = tap("vnet0", Some("br0"));
        t.mtu = 9000;
        t.port_state = Some(PortState::Learning);
        let mut b = bridge("br0");
        b.bridge = Some(BridgeAttrs { stp: true, forward_delay: 4, ..Default::default() });
        let net = NetFacts { links: vec![b, t], ..Default::default() };
        assert_eq!(
            run(&spec("bridge", "br0"), &net, &[]),
            vec![
                "MTU of tap vnet0 does not match bridge br0: larger frames are dropped: vnet0 mtu 9000, br0 mtu 1500",
                "port vnet0 on br0 is still in STP learning state: it forwards nothing yet: br0: stp on, forward delay 4 s; port vnet0: learning",
            ]
        );
    }

    #[test]
    fn nat_network_inactive_or_without_forwarding() {
        let nets = [NetworkFacts {
            name: "default".into(),
            active: false,
            bridge: Some("virbr0".into()),
            forward: Some("nat".into()),
        }];
        let net = NetFacts {
            links: vec![bridge("virbr0"), tap("vnet0", Some("virbr0"))],
            ip_forward: Some(false),
            ..Default::default()
        };
        assert_eq!(
            run(&spec("network", "default"), &net, &nets),
            vec!["libvirt network default is not active: network default: inactive"]
        );
        let nets = [NetworkFacts { active: true, ..nets[0].clone() }];
        assert_eq!(
            run(&spec("network", "default"), &net, &nets),
            vec!["IP forwarding is off, so vm1 on nat network default cannot reach beyond the host: net.ipv4.ip_forward = 0"]
        );
        assert_eq!(
            run(&spec("network", "nope"), &net, &nets)[0],
            "libvirt network nope does not exist: virsh net-list --all shows no nope"
        );
        // A running domain's live XML names the network's bridge beside the network: the
        // interface is on network `default`, not on a network called `virbr0`.
        let mut live = spec("network", "default");
        live.interfaces[0].source_bridge = Some("virbr0".into());
        let net = NetFacts { ip_forward: Some(true), ..net };
        assert_eq!(run(&live, &net, &nets), Vec::<String>::new());
    }

    #[test]
    fn bridge_netfilter_with_a_dropping_forward_chain() {
        let fw = Firewall::parse(Some("*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"), None);
        let mut net = NetFacts {
            links: vec![bridge("br0"), tap("vnet0", Some("br0"))],
            bridge_nf_iptables: Some(true),
            firewall: Some(fw),
            ..Default::default()
        };
        let found = run(&spec("bridge", "br0"), &net, &[]);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with(
                "the host firewall drops vm1's bridged traffic on br0: net.bridge.bridge-nf-call-iptables = 1"
            ),
            "{found:?}"
        );
        net.bridge_nf_iptables = Some(false);
        assert!(
            run(&spec("bridge", "br0"), &net, &[]).is_empty(),
            "without bridge netfilter FORWARD never sees bridged frames"
        );
    }
}
