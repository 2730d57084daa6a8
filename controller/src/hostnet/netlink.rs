//! [`HostNet`] over rtnetlink. STP and timers go through `link().change()` (RTM_NEWLINK):
//! `link().set()` sends RTM_SETLINK, which silently ignores IFLA_LINKINFO. Uplinks are read from
//! every routing table, multipath routes and nexthop objects included, and from the addresses.
//! [`dump_links`] is the one link reader: the host-network task and diagnose both use it.

use std::collections::HashMap;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{
    BridgePortState, BridgeStpState, InfoBridge, InfoBridgePort, InfoData, InfoPortData, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::nexthop::NexthopSocket;
use super::{centis_to_secs, HostNet, NetError};
use crate::observe::StpSettings;
use crate::observe::{BridgeAttrs, NetLink, PortState};

/// A netlink connection in the caller's network namespace.
#[derive(Clone)]
pub struct NetlinkHost {
    handle: Handle,
    nexthops: NexthopSocket,
}

impl NetlinkHost {
    /// Every route the dump request `msg` selects (all tables).
    async fn dump_routes(&self, msg: RouteMessage) -> Result<Vec<RouteMessage>, NetError> {
        self.handle.route().get(msg).execute().try_collect().await.map_err(|source| NetError::Netlink {
            op: "list routes",
            object: String::new(),
            source: source.into(),
        })
    }

    /// Open a connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        tokio::spawn(conn);
        Ok(NetlinkHost { handle, nexthops: NexthopSocket::connect()? })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    async fn index_of(&self, op: &'static str, name: &str) -> Result<u32, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(msg.header.index),
            Ok(None) => Err(NetError::NoSuchLink { op, object: name.into() }),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(NetError::NoSuchLink { op, object: name.into() })
            }
            Err(source) => Err(NetError::Netlink { op, object: name.into(), source: source.into() }),
        }
    }
}

/// Every link of the caller's namespace, sorted by name, with its master's name, bridge
/// attributes, MTU and port state: one RTM_GETLINK dump.
pub async fn dump_links(handle: &Handle) -> Result<Vec<NetLink>, NetError> {
    let msgs: Vec<LinkMessage> =
        handle.link().get().execute().try_collect().await.map_err(|source| NetError::Netlink {
            op: "list links",
            object: String::new(),
            source: source.into(),
        })?;
    let parsed: Vec<(NetLink, Option<u32>)> = msgs.iter().map(parse_link).collect();
    let names: HashMap<u32, String> = parsed.iter().map(|(l, _)| (l.index, l.name.clone())).collect();
    let mut links: Vec<NetLink> = parsed
        .into_iter()
        .map(|(mut l, master)| {
            l.master = master.and_then(|i| names.get(&i).cloned());
            l
        })
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(links)
}

/// [`dump_links`] for blocking callers (the CLI, or a blocking thread of the engine's runtime):
/// on its own thread with its own small runtime and connection.
pub fn read_links() -> Result<Vec<NetLink>, NetError> {
    let worker = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NetError::Socket)?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
            tokio::spawn(conn);
            dump_links(&handle).await
        })
    });
    worker.join().unwrap_or_else(|_| Err(NetError::Socket(std::io::Error::other("netlink reader thread panicked"))))
}

fn parse_link(msg: &LinkMessage) -> (NetLink, Option<u32>) {
    let mut link =
        NetLink { index: msg.header.index, up: msg.header.flags.contains(LinkFlags::Up), ..Default::default() };
    let mut master = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) if a.len() == 6 => link.mac = Some(format_mac(a)),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(i) => master = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Bridge(attrs)) => {
                            let mut b = BridgeAttrs::default();
                            for a in attrs {
                                match a {
                                    InfoBridge::StpState(s) => b.stp = !matches!(s, BridgeStpState::Disabled),
                                    InfoBridge::ForwardDelay(v) => b.forward_delay = centis_to_secs(*v),
                                    InfoBridge::HelloTime(v) => b.hello_time = centis_to_secs(*v),
                                    InfoBridge::MaxAge(v) => b.max_age = centis_to_secs(*v),
                                    InfoBridge::Priority(v) => b.priority = *v,
                                    _ => {}
                                }
                            }
                            link.bridge = Some(b);
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            for a in attrs {
                                if let InfoBridgePort::State(s) = a {
                                    link.port_state = port_state(*s);
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

fn port_state(s: BridgePortState) -> Option<PortState> {
    match s {
        BridgePortState::Disabled => Some(PortState::Disabled),
        BridgePortState::Listening => Some(PortState::Listening),
        BridgePortState::Learning => Some(PortState::Learning),
        BridgePortState::Forwarding => Some(PortState::Forwarding),
        BridgePortState::Blocking => Some(PortState::Blocking),
        _ => None,
    }
}

fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Where a default route leaves the host: its interfaces (single path and every nexthop of a
/// multipath route) and the nexthop object it names, if any. `None` for other routes.
fn default_route_exits(route: &RouteMessage) -> Option<(Vec<u32>, Option<u32>)> {
    if route.header.destination_prefix_length != 0 {
        return None;
    }
    let mut oifs = Vec::new();
    let mut nh_id = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oifs.push(*i),
            RouteAttribute::MultiPath(hops) => oifs.extend(hops.iter().map(|h| h.interface_index)),
            RouteAttribute::NhId(id) => nh_id = Some(*id),
            _ => {}
        }
    }
    Some((oifs, nh_id))
}

/// A dump request for every table: table, protocol and type "unspecified". (Without
/// NETLINK_GET_STRICT_CHK the kernel ignores them anyway and dumps all tables.)
fn all_routes(mut msg: RouteMessage) -> RouteMessage {
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.protocol = RouteProtocol::Unspec;
    msg.header.kind = RouteType::Unspec;
    msg
}

impl HostNet for NetlinkHost {
    async fn links(&self) -> Result<Vec<NetLink>, NetError> {
        dump_links(&self.handle).await
    }

    async fn default_route_links(&self) -> Result<Vec<u32>, NetError> {
        let mut indexes = Vec::new();
        let mut nh_ids = Vec::new();
        for msg in [
            all_routes(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()),
            all_routes(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()),
        ] {
            let routes = self.dump_routes(msg).await?;
            for (oifs, nh_id) in routes.iter().filter_map(default_route_exits) {
                indexes.extend(oifs);
                nh_ids.extend(nh_id);
            }
        }
        // Routes first, then nexthops: a nexthop deleted in between takes its routes with it.
        if !nh_ids.is_empty() {
            let nexthops = self.nexthops.dump().await?;
            for id in nh_ids {
                indexes.extend(nexthops.interfaces(id));
            }
        }
        indexes.sort();
        indexes.dedup();
        Ok(indexes)
    }

    async fn ra_default_route_links(&self) -> Result<Vec<u32>, NetError> {
        let msg = all_routes(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build());
        let routes = self.dump_routes(msg).await?;
        let mut indexes: Vec<u32> = routes
            .iter()
            .filter(|r| r.header.protocol == RouteProtocol::Ra)
            .filter_map(default_route_exits)
            .flat_map(|(oifs, _)| oifs)
            .collect();
        indexes.sort();
        indexes.dedup();
        Ok(indexes)
    }

    async fn global_address_links(&self) -> Result<Vec<u32>, NetError> {
        let addrs: Vec<AddressMessage> =
            self.handle.address().get().execute().try_collect().await.map_err(|source| NetError::Netlink {
                op: "list addresses",
                object: String::new(),
                source: source.into(),
            })?;
        let mut indexes: Vec<u32> =
            addrs.iter().filter(|a| a.header.scope == AddressScope::Universe).map(|a| a.header.index).collect();
        indexes.sort();
        indexes.dedup();
        Ok(indexes)
    }

    async fn create_bridge(&self, name: &str) -> Result<(), NetError> {
        self.handle.link().add(LinkBridge::new(name).build()).execute().await.map_err(|source| NetError::Netlink {
            op: "create bridge",
            object: name.into(),
            source: source.into(),
        })
    }

    async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = self.index_of("set up", name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink { op: "set up", object: name.into(), source: source.into() })
    }

    async fn set_stp(&self, bridge: &str, stp: StpSettings) -> Result<(), NetError> {
        let index = self.index_of("set stp", bridge).await?;
        // Enable STP first: the kernel validates timer ranges only while STP is on.
        let mut b = LinkMessageBuilder::<LinkBridge>::new(bridge).index(index).stp_state(if stp.enabled {
            BridgeStpState::KernelStp
        } else {
            BridgeStpState::Disabled
        });
        if let Some(v) = stp.forward_delay {
            b = b.forward_delay(v * 100);
        }
        if let Some(v) = stp.hello_time {
            b = b.hello_time(v * 100);
        }
        if let Some(v) = stp.max_age {
            b = b.max_age(v * 100);
        }
        if let Some(v) = stp.priority {
            b = b.priority(v);
        }
        self.handle.link().change(b.build()).execute().await.map_err(|source| NetError::Netlink {
            op: "set stp",
            object: bridge.into(),
            source: source.into(),
        })
    }

    async fn enslave(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        let bridge_index = self.index_of("enslave", bridge).await?;
        let port_index = self.index_of("enslave", port).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(port_index).controller(bridge_index).build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                op: "enslave",
                object: format!("{port} → {bridge}"),
                source: source.into(),
            })
    }
}
