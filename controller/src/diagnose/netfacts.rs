//! The host network as diagnose needs it, read once: links with kind, admin state, MTU, master
//! and STP port state (the one link reader, [`crate::hostnet::netlink::read_links`]); IP
//! forwarding and bridge netfilter from `/proc/sys`; the firewall rules from `iptables-save` and
//! `nft -j list ruleset`. Read only.

use std::path::Path;

use super::firewall::Firewall;
use crate::observe::NetLink;

/// The host network facts of one diagnosis.
#[derive(Debug, Clone, Default)]
pub struct NetFacts {
    pub links: Vec<NetLink>,
    /// `net.ipv4.ip_forward` (`None`: unreadable).
    pub ip_forward: Option<bool>,
    /// `net.bridge.bridge-nf-call-iptables` (`None`: br_netfilter not loaded).
    pub bridge_nf_iptables: Option<bool>,
    /// Read only when bridge netfilter is on.
    pub firewall: Option<Firewall>,
    /// Parts that could not be read, and why.
    pub unavailable: Vec<String>,
}

impl NetFacts {
    pub fn link(&self, name: &str) -> Option<&NetLink> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Read everything. `proc_sys` is `/proc/sys` (or `$VIRTWARDEN_PROC_SYS`).
    pub fn read(proc_sys: &Path) -> NetFacts {
        let mut facts = NetFacts::default();
        match crate::hostnet::netlink::read_links() {
            Ok(l) => facts.links = l,
            Err(e) => facts.unavailable.push(format!("network links: {e}")),
        }
        let flag = |key: &str| std::fs::read_to_string(proc_sys.join(key)).ok().map(|t| t.trim() != "0");
        facts.ip_forward = flag("net/ipv4/ip_forward");
        facts.bridge_nf_iptables = flag("net/bridge/bridge-nf-call-iptables");
        if facts.bridge_nf_iptables == Some(true) {
            let ipt = command_output("iptables-save", &[], &mut facts.unavailable);
            let nft = command_output("nft", &["-j", "list", "ruleset"], &mut facts.unavailable);
            if ipt.is_some() || nft.is_some() {
                facts.firewall = Some(Firewall::parse(ipt.as_deref(), nft.as_deref()));
            }
        }
        facts
    }
}

fn command_output(program: &str, args: &[&str], unavailable: &mut Vec<String>) -> Option<String> {
    match std::process::Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            unavailable.push(format!("firewall: {program} failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
            None
        }
        Err(e) => {
            unavailable.push(format!("firewall: cannot run {program}: {e}"));
            None
        }
    }
}
