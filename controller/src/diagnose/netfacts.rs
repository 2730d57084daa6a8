//! The host network as diagnose needs it, read once: links with kind, admin state, MTU,
//! master and STP port state (one rtnetlink dump); IP forwarding and bridge netfilter from
//! `/proc/sys`; the firewall rules from `iptables-save` and `nft -j list ruleset`. Read only.

use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridge, InfoData, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};

use super::firewall::Firewall;
use crate::hostnet::NetError;

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// `bridge`, `tun`, `veth`, …
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    pub mtu: u32,
    /// The bridge it is a port of.
    pub master: Option<String>,
    /// Its STP state as a bridge port.
    pub port_state: Option<PortState>,
    /// For a bridge: STP on, and its forward delay in seconds.
    pub stp: Option<(bool, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Disabled,
    Listening,
    Learning,
    Forwarding,
    Blocking,
}

impl PortState {
    pub fn as_str(self) -> &'static str {
        match self {
            PortState::Disabled => "disabled",
            PortState::Listening => "listening",
            PortState::Learning => "learning",
            PortState::Forwarding => "forwarding",
            PortState::Blocking => "blocking",
        }
    }
}

/// The host network facts of one diagnosis.
#[derive(Debug, Clone, Default)]
pub struct NetFacts {
    pub links: Vec<Link>,
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
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Read everything. `proc_sys` is `/proc/sys` (or `$VIRTWARDEN_PROC_SYS`).
    pub fn read(proc_sys: &Path) -> NetFacts {
        let mut facts = NetFacts::default();
        match read_links() {
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

/// One link dump over rtnetlink. Runs on its own thread with its own small runtime, so it
/// works from any caller (the CLI, or a blocking thread of the engine's runtime).
pub fn read_links() -> Result<Vec<Link>, NetError> {
    let worker = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NetError::Socket)?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
            tokio::spawn(conn);
            let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(|source| {
                NetError::Netlink { op: "list links", object: String::new(), source: source.into() }
            })?;
            Ok(links_from(&msgs))
        })
    });
    worker.join().unwrap_or_else(|_| Err(NetError::Socket(std::io::Error::other("netlink reader thread panicked"))))
}

fn links_from(msgs: &[LinkMessage]) -> Vec<Link> {
    let mut links: Vec<(Link, Option<u32>)> = msgs.iter().map(parse_link).collect();
    let names: Vec<(u32, String)> = links.iter().map(|(l, _)| (l.index, l.name.clone())).collect();
    for (l, master) in &mut links {
        l.master = master.and_then(|m| names.iter().find(|(i, _)| *i == m).map(|(_, n)| n.clone()));
    }
    let mut out: Vec<Link> = links.into_iter().map(|(l, _)| l).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn parse_link(msg: &LinkMessage) -> (Link, Option<u32>) {
    let mut link = Link { index: msg.header.index, up: msg.header.flags.contains(LinkFlags::Up), ..Default::default() };
    let mut master = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(i) => master = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Bridge(attrs)) => {
                            let mut stp = false;
                            let mut delay = 0;
                            for a in attrs {
                                match a {
                                    InfoBridge::StpState(s) => {
                                        stp = !matches!(s, rtnetlink::packet_route::link::BridgeStpState::Disabled)
                                    }
                                    InfoBridge::ForwardDelay(v) => delay = crate::hostnet::centis_to_secs(*v),
                                    _ => {}
                                }
                            }
                            link.stp = Some((stp, delay));
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            for a in attrs {
                                if let rtnetlink::packet_route::link::InfoBridgePort::State(s) = a {
                                    link.port_state = match s {
                                        BridgePortState::Disabled => Some(PortState::Disabled),
                                        BridgePortState::Listening => Some(PortState::Listening),
                                        BridgePortState::Learning => Some(PortState::Learning),
                                        BridgePortState::Forwarding => Some(PortState::Forwarding),
                                        BridgePortState::Blocking => Some(PortState::Blocking),
                                        _ => None,
                                    };
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (link, master)
}
