//! Taking an uplink over into a bridge, and putting it back: a [`Checkpoint`] holds the port's
//! and the bridge's MAC, MTU and master and the port's addresses, routes (every table) and
//! policy rules exactly as the kernel reported them (netlink messages, hex-encoded so the
//! durable memory can keep them), and for the other guarded changes the bridge's STP settings
//! and the sysctls; [`UplinkNet`] takes one, applies the takeover and restores it.
//! The rewriting (port → bridge) is pure and tested without a kernel.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{Emitable, Parseable};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHopFlags, RouteProtocol, RouteType,
    RouteVia,
};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{IpVersion, LinkUnspec, RouteMessageBuilder};
use virtwarden_policies::VerifyProbe;

use super::netlink::NetlinkHost;
use super::NetError;

pub use virtwarden_core::hostnet::uplink::{Checkpoint, Moves, Neighbour, SysctlValue, UplinkNet};

/// A checkpoint's netlink messages in words (only this backend can read them).
pub trait CheckpointText {
    /// The default gateways the moved routes use: they must answer on the bridge.
    fn gateways(&self) -> Vec<IpAddr>;
    /// The moved addresses as text: `198.51.100.2/24 (valid 3600s)`.
    fn address_lines(&self) -> Vec<String>;
    /// The moved routes as text: `default via 198.51.100.1 table 254`.
    fn route_lines(&self) -> Vec<String>;
    /// The moved rules as text: `priority 100 iif eth0 table 10`.
    fn rule_lines(&self) -> Vec<String>;
}

impl CheckpointText for Checkpoint {
    /// The default gateways the moved routes use: they must answer on the bridge.
    fn gateways(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = decode_all::<RouteMessage>(&self.routes)
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .filter_map(route_gateway)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The moved addresses as text: `198.51.100.2/24 (valid 3600s)`.
    fn address_lines(&self) -> Vec<String> {
        decode_all::<AddressMessage>(&self.addresses).iter().map(describe_address).collect()
    }

    /// The moved routes as text: `default via 198.51.100.1 table 254`.
    fn route_lines(&self) -> Vec<String> {
        decode_all::<RouteMessage>(&self.routes).iter().map(describe_route).collect()
    }

    /// The moved rules as text: `priority 100 iif eth0 table 10`.
    fn rule_lines(&self) -> Vec<String> {
        decode_all::<RuleMessage>(&self.rules).iter().map(describe_rule).collect()
    }
}

fn encode<M: Emitable>(msg: &M) -> String {
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode<M: Parseable<[u8]>>(hex: &str) -> Option<M> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    M::parse(bytes?.as_slice()).ok()
}

/// Decoded messages; an entry that does not decode (a damaged memory file) is left out.
fn decode_all<M: Parseable<[u8]>>(hexes: &[String]) -> Vec<M> {
    hexes.iter().filter_map(|h| decode(h)).collect()
}

fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn route_address(a: &RouteAddress) -> String {
    match a {
        RouteAddress::Inet(v4) => v4.to_string(),
        RouteAddress::Inet6(v6) => v6.to_string(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn describe_route(r: &RouteMessage) -> String {
    let mut dst = "default".to_string();
    let (mut via, mut metric) = (None, None);
    let mut table = u32::from(r.header.table);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                dst = format!("{}/{}", route_address(d), r.header.destination_prefix_length)
            }
            RouteAttribute::Gateway(g) => via = Some(format!("via {}", route_address(g))),
            RouteAttribute::Priority(m) => metric = Some(format!("metric {m}")),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let mut parts: Vec<String> = via.into_iter().chain(metric).collect();
    if r.header.protocol == RouteProtocol::Ra {
        parts.push("proto ra".into());
    }
    let table = match table {
        254 => "main".to_string(),
        t => t.to_string(),
    };
    parts.push(format!("table {table}"));
    format!("{dst} {}", parts.join(" "))
}

fn describe_address(a: &AddressMessage) -> String {
    let mut ip = None;
    let mut lifetime = String::new();
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Address(x) => ip = Some(*x),
            AddressAttribute::Local(x) if ip.is_none() => ip = Some(*x),
            AddressAttribute::CacheInfo(c) if c.ifa_valid != u32::MAX => {
                lifetime = format!(" (valid {}s, preferred {}s)", c.ifa_valid, c.ifa_preferred)
            }
            _ => {}
        }
    }
    let ip = ip.map(|i| i.to_string()).unwrap_or_else(|| "?".into());
    format!("{ip}/{}{lifetime}", a.header.prefix_len)
}

fn describe_rule(r: &RuleMessage) -> String {
    let mut parts = Vec::new();
    let mut table = u32::from(r.header.table);
    for a in &r.attributes {
        match a {
            RuleAttribute::Priority(p) => parts.insert(0, format!("priority {p}")),
            RuleAttribute::Iifname(n) => parts.push(format!("iif {n}")),
            RuleAttribute::Oifname(n) => parts.push(format!("oif {n}")),
            RuleAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    parts.push(format!("table {table}"));
    parts.join(" ")
}

/// The address as it goes on `bridge` (index `bridge_index`): same lifetimes, label renamed,
/// and for IPv6 no duplicate address detection (the address is already this host's on this
/// link; DAD would leave it unusable for a second).
pub(crate) fn address_onto(a: &AddressMessage, port: &str, bridge: &str, bridge_index: u32) -> AddressMessage {
    let mut out = a.clone();
    out.header.index = bridge_index;
    let v6 = out.attributes.iter().any(|x| matches!(x, AddressAttribute::Address(IpAddr::V6(_))));
    for attr in &mut out.attributes {
        match attr {
            AddressAttribute::Label(l) => {
                if let Some(rest) = l.strip_prefix(port) {
                    *l = format!("{bridge}{rest}");
                }
            }
            AddressAttribute::Flags(f) if v6 => *f |= AddressFlags::Nodad,
            _ => {}
        }
    }
    // A label longer than an interface name is refused; drop it then (the default is the name).
    out.attributes.retain(|x| !matches!(x, AddressAttribute::Label(l) if l.len() > 15));
    out
}

/// The route as it goes through `to_index` instead of `from_index`: every nexthop moved,
/// the remaining lifetime of an expiring (RA) route kept, dead/linkdown flags dropped (the
/// kernel refuses them on add).
pub(crate) fn route_onto(r: &RouteMessage, from_index: u32, to_index: u32) -> RouteMessage {
    let mut out = r.clone();
    out.header.flags.remove(RouteFlags::Dead | RouteFlags::Linkdown);
    let mut expires = None;
    for attr in &mut out.attributes {
        match attr {
            RouteAttribute::Oif(i) if *i == from_index => *i = to_index,
            RouteAttribute::MultiPath(hops) => {
                for h in hops {
                    if h.interface_index == from_index {
                        h.interface_index = to_index;
                    }
                    h.flags.remove(RouteNextHopFlags::Dead | RouteNextHopFlags::Linkdown);
                }
            }
            // Dumps carry the remaining lifetime in clock ticks (USER_HZ = 100); an add takes
            // seconds in RTA_EXPIRES.
            RouteAttribute::CacheInfo(c) if c.expires > 0 => expires = Some(c.expires.div_ceil(100)),
            _ => {}
        }
    }
    out.attributes.retain(|a| !matches!(a, RouteAttribute::CacheInfo(_) | RouteAttribute::Expires(_)));
    if let Some(secs) = expires {
        out.attributes.push(RouteAttribute::Expires(secs));
    }
    out
}

/// The rule with `iif`/`oif` naming `bridge` instead of `port`.
pub(crate) fn rule_onto(r: &RuleMessage, port: &str, bridge: &str) -> RuleMessage {
    let mut out = r.clone();
    for attr in &mut out.attributes {
        match attr {
            RuleAttribute::Iifname(n) | RuleAttribute::Oifname(n) if n == port => *n = bridge.to_string(),
            _ => {}
        }
    }
    out
}

fn route_uses(r: &RouteMessage, index: u32) -> bool {
    r.attributes.iter().any(|a| match a {
        RouteAttribute::Oif(i) => *i == index,
        RouteAttribute::MultiPath(hops) => hops.iter().any(|h| h.interface_index == index),
        _ => false,
    })
}

fn rule_names(r: &RuleMessage, name: &str) -> bool {
    r.attributes.iter().any(|a| matches!(a, RuleAttribute::Iifname(n) | RuleAttribute::Oifname(n) if n == name))
}

/// An add that finds the object there, or a delete that finds it gone, is success: restore
/// must be idempotent.
fn tolerate(result: Result<(), rtnetlink::Error>, codes: &[i32]) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if codes.contains(&-e.raw_code()) => Ok(()),
        other => other,
    }
}

/// The kernel's `local` table (addresses of this host; the kernel keeps it).
const RT_TABLE_LOCAL: u8 = 255;

const GONE: &[i32] = &[libc::ENOENT, libc::ESRCH, libc::EADDRNOTAVAIL, libc::ENODEV];
const THERE: &[i32] = &[libc::EEXIST];

fn nl<'a>(op: &'static str, object: &'a str) -> impl FnOnce(rtnetlink::Error) -> NetError + 'a {
    move |source| NetError::Netlink { op, object: object.to_string(), source: source.into() }
}

fn parse_mac(text: &str) -> Option<Vec<u8>> {
    let v: Option<Vec<u8>> = text.split(':').map(|p| u8::from_str_radix(p, 16).ok()).collect();
    v.filter(|v| v.len() == 6)
}

impl NetlinkHost {
    async fn link_facts(&self, name: &str) -> Result<(u32, Option<String>, Option<u32>, Option<u32>), NetError> {
        let mut links = self.handle().link().get().match_name(name.to_string()).execute();
        let msg = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(NetError::NoSuchLink { op: "checkpoint", object: name.into() }),
            Err(source) => {
                return Err(NetError::Netlink { op: "checkpoint", object: name.into(), source: source.into() })
            }
        };
        let mut mac = None;
        let mut mtu = None;
        let mut master = None;
        for a in &msg.attributes {
            match a {
                LinkAttribute::Address(b) if b.len() == 6 => {
                    mac = Some(b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":"))
                }
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::Controller(i) => master = Some(*i),
                _ => {}
            }
        }
        Ok((msg.header.index, mac, mtu, master))
    }

    async fn name_of(&self, index: u32) -> Option<String> {
        let mut links = self.handle().link().get().match_index(index).execute();
        let msg = links.try_next().await.ok().flatten()?;
        msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    }

    async fn all_routes(&self) -> Result<Vec<RouteMessage>, NetError> {
        let mut out = Vec::new();
        for mut msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.header.protocol = RouteProtocol::Unspec;
            msg.header.kind = RouteType::Unspec;
            let routes: Vec<RouteMessage> =
                self.handle().route().get(msg).execute().try_collect().await.map_err(nl("list routes", ""))?;
            out.extend(routes);
        }
        Ok(out)
    }

    async fn set_link(&self, index: u32, name: &str, mac: Option<&str>, mtu: Option<u32>) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(mac) = mac.and_then(parse_mac) {
            b = b.address(mac);
        }
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.handle().link().set(b.up().build()).execute().await.map_err(nl("set mac/mtu", name))
    }

    async fn set_master(&self, index: u32, name: &str, master: Option<&str>) -> Result<(), NetError> {
        let b = LinkUnspec::new_with_index(index);
        let b = match master {
            Some(m) => b.controller(self.link_facts(m).await?.0),
            None => b.nocontroller(),
        };
        self.handle().link().set(b.build()).execute().await.map_err(nl("set master", name))
    }

    async fn add_address(&self, a: AddressMessage, object: &str) -> Result<(), NetError> {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = ip else { return Ok(()) };
        let mut req = self.handle().address().add(a.header.index, ip, a.header.prefix_len);
        *req.message_mut() = a;
        tolerate(req.execute().await, THERE).map_err(nl("add address", object))
    }

    async fn del_address(&self, a: AddressMessage, object: &str) -> Result<(), NetError> {
        tolerate(self.handle().address().del(a).execute().await, GONE).map_err(nl("delete address", object))
    }

    async fn add_route(&self, r: RouteMessage, object: &str) -> Result<(), NetError> {
        tolerate(self.handle().route().add(r).execute().await, THERE).map_err(nl("add route", object))
    }

    async fn del_route(&self, r: RouteMessage, object: &str) -> Result<(), NetError> {
        tolerate(self.handle().route().del(r).execute().await, GONE).map_err(nl("delete route", object))
    }

    async fn add_rule(&self, r: RuleMessage, object: &str) -> Result<(), NetError> {
        let mut req = self.handle().rule().add();
        *req.message_mut() = r;
        tolerate(req.execute().await, THERE).map_err(nl("add rule", object))
    }

    async fn del_rule(&self, r: RuleMessage, object: &str) -> Result<(), NetError> {
        tolerate(self.handle().rule().del(r).execute().await, GONE).map_err(nl("delete rule", object))
    }
}

/// Keep the first error of a sequence that goes on after one (logging the others).
fn keep_first(first: &mut Option<NetError>, result: Result<(), NetError>) {
    if let Err(e) = result {
        match first {
            None => *first = Some(e),
            Some(_) => tracing::warn!(error = %e, "restore step failed (after an earlier failure)"),
        }
    }
}

impl UplinkNet for NetlinkHost {
    async fn checkpoint(&self, bridge: &str, port: &str) -> Result<Checkpoint, NetError> {
        let (port_index, port_mac, port_mtu, master) = self.link_facts(port).await?;
        let (_, bridge_mac, bridge_mtu, _) = self.link_facts(bridge).await?;
        let port_master = match master {
            Some(i) => self.name_of(i).await,
            None => None,
        };
        let addrs: Vec<AddressMessage> = self
            .handle()
            .address()
            .get()
            .set_link_index_filter(port_index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses", port))?;
        let addresses = addrs
            .iter()
            .filter(|a| a.header.index == port_index)
            .filter(|a| matches!(a.header.scope, AddressScope::Universe | AddressScope::Site))
            .map(encode)
            .collect();
        let routes = self
            .all_routes()
            .await?
            .iter()
            .filter(|r| route_uses(r, port_index))
            // The kernel's own routes (connected prefixes, local table) follow the addresses.
            .filter(|r| r.header.protocol != RouteProtocol::Kernel && r.header.table != RT_TABLE_LOCAL)
            .filter(|r| r.header.kind == RouteType::Unicast)
            .map(encode)
            .collect();
        let mut rules = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let all: Vec<RuleMessage> =
                self.handle().rule().get(v).execute().try_collect().await.map_err(nl("list rules", port))?;
            rules.extend(all.iter().filter(|r| rule_names(r, port)).map(encode));
        }
        Ok(Checkpoint {
            bridge: bridge.into(),
            port: port.into(),
            port_mac,
            port_mtu,
            port_master,
            bridge_mac,
            bridge_mtu,
            addresses,
            routes,
            rules,
            ..Default::default()
        })
    }

    async fn take_over(&self, cp: &Checkpoint) -> Result<(), NetError> {
        let (bridge_index, ..) = self.link_facts(&cp.bridge).await?;
        let (port_index, ..) = self.link_facts(&cp.port).await?;
        let (port, bridge) = (cp.port.as_str(), cp.bridge.as_str());
        // The port's MAC keeps DHCP leases and switch port security; its MTU the path.
        self.set_link(bridge_index, bridge, cp.port_mac.as_deref(), cp.port_mtu).await?;
        for r in decode_all::<RuleMessage>(&cp.rules) {
            self.del_rule(r.clone(), port).await?;
            self.add_rule(rule_onto(&r, port, bridge), bridge).await?;
        }
        let routes = decode_all::<RouteMessage>(&cp.routes);
        for r in &routes {
            self.del_route(r.clone(), port).await?;
        }
        for a in decode_all::<AddressMessage>(&cp.addresses) {
            self.del_address(a.clone(), port).await?;
            self.add_address(address_onto(&a, port, bridge, bridge_index), bridge).await?;
        }
        for r in &routes {
            self.add_route(route_onto(r, port_index, bridge_index), bridge).await?;
        }
        self.set_master(port_index, port, Some(bridge)).await
    }

    /// Every step is tried even when one fails (a rollback that stopped after taking the port
    /// out of the bridge would leave the host with neither path); the first error is returned.
    async fn restore(&self, cp: &Checkpoint) -> Result<(), NetError> {
        let (bridge_index, ..) = self.link_facts(&cp.bridge).await?;
        let (port_index, ..) = self.link_facts(&cp.port).await?;
        let (port, bridge) = (cp.port.as_str(), cp.bridge.as_str());
        let mut first = None;
        keep_first(&mut first, self.set_master(port_index, port, cp.port_master.as_deref()).await);
        for r in decode_all::<RuleMessage>(&cp.rules) {
            keep_first(&mut first, self.del_rule(rule_onto(&r, port, bridge), bridge).await);
            keep_first(&mut first, self.add_rule(r, port).await);
        }
        let routes = decode_all::<RouteMessage>(&cp.routes);
        for r in &routes {
            keep_first(&mut first, self.del_route(route_onto(r, port_index, bridge_index), bridge).await);
        }
        for a in decode_all::<AddressMessage>(&cp.addresses) {
            keep_first(&mut first, self.del_address(address_onto(&a, port, bridge, bridge_index), bridge).await);
            let mut back = a;
            back.header.index = port_index;
            keep_first(&mut first, self.add_address(back, port).await);
        }
        for r in &routes {
            keep_first(&mut first, self.add_route(route_onto(r, port_index, port_index), port).await);
        }
        keep_first(&mut first, self.set_link(bridge_index, bridge, cp.bridge_mac.as_deref(), cp.bridge_mtu).await);
        first.map_or(Ok(()), Err)
    }

    async fn attach(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        let (bridge_index, bridge_mac, ..) = self.link_facts(bridge).await?;
        let (_, port_mac, ..) = self.link_facts(port).await?;
        // A bridge whose MAC was never set takes the lowest of its ports' MACs: only a port with
        // a lower one can change it. Setting it explicitly flushes the bridge's neighbour table
        // (as the kernel's own change would), entries an admin made permanent included: those
        // are put back.
        let (port_mac, bridge_mac) =
            (port_mac.as_deref().and_then(parse_mac), bridge_mac.as_deref().and_then(parse_mac));
        if let (Some(p), Some(b)) = (port_mac, bridge_mac) {
            if p < b {
                let kept = self.permanent_neighbours(bridge_index, bridge).await?;
                let keep = LinkUnspec::new_with_index(bridge_index).address(b).build();
                self.handle().link().set(keep).execute().await.map_err(nl("keep mac", bridge))?;
                for (ip, lla) in kept {
                    let add = self.handle().neighbours().add(bridge_index, ip).link_layer_address(&lla);
                    add.state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl("keep neighbour", bridge))?;
                }
            }
        }
        crate::hostnet::HostNet::enslave(self, port, bridge).await
    }

    async fn detach(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        let gone = |e: &NetError| matches!(e, NetError::NoSuchLink { .. });
        let (port_index, _, _, master) = match self.link_facts(port).await {
            Err(e) if gone(&e) => return Ok(()),
            other => other?,
        };
        let (bridge_index, ..) = match self.link_facts(bridge).await {
            Err(e) if gone(&e) => return Ok(()),
            other => other?,
        };
        if master != Some(bridge_index) {
            return Ok(());
        }
        self.set_master(port_index, port, None).await
    }

    async fn probe(&self, probe: &VerifyProbe, timeout: std::time::Duration) -> bool {
        match *probe {
            VerifyProbe::Tcp { address, port } => {
                matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect((address, port))).await,
                    Ok(Ok(_))
                )
            }
            VerifyProbe::Ping { address } => {
                tokio::task::spawn_blocking(move || super::icmp::echo(address, timeout)).await.unwrap_or(false)
            }
        }
    }

    async fn default_gateways(&self) -> Result<Vec<(u32, IpAddr)>, NetError> {
        let mut out: Vec<(u32, IpAddr)> = self
            .all_routes()
            .await?
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
            .flat_map(route_exits)
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn forget_neighbour(&self, link: &str, addr: IpAddr) -> Result<(), NetError> {
        let (index, ..) = self.link_facts(link).await?;
        let entries: Vec<_> =
            self.handle().neighbours().get().execute().try_collect().await.map_err(nl("list neighbours", link))?;
        for n in entries {
            let set_by_admin = matches!(n.header.state, NeighbourState::Permanent | NeighbourState::Noarp);
            if n.header.ifindex == index && !set_by_admin && neighbour_is(&n, addr) {
                tolerate(self.handle().neighbours().del(n).execute().await, GONE)
                    .map_err(nl("delete neighbour", link))?;
            }
        }
        Ok(())
    }

    async fn neighbour_reachable(&self, link: &str, addr: IpAddr) -> Result<Neighbour, NetError> {
        let (index, ..) = self.link_facts(link).await?;
        solicit(link, index, addr);
        let entries: Vec<_> =
            self.handle().neighbours().get().execute().try_collect().await.map_err(nl("list neighbours", link))?;
        let mut states =
            entries.iter().filter(|n| n.header.ifindex == index && neighbour_is(n, addr)).map(|n| n.header.state);
        Ok(match states.next() {
            Some(NeighbourState::Permanent | NeighbourState::Noarp) => Neighbour::SetByAdmin,
            Some(NeighbourState::Reachable) => Neighbour::Reachable,
            _ => Neighbour::Unanswered,
        })
    }

    fn describe(&self, cp: &Checkpoint) -> Moves {
        Moves {
            addresses: cp.address_lines(),
            routes: cp.route_lines(),
            rules: cp.rule_lines(),
            gateways: cp.gateways(),
        }
    }

    fn managers(&self, link: &str, index: u32) -> Vec<String> {
        super::managers::managers_of(&Default::default(), link, index)
    }
}

impl NetlinkHost {
    /// The neighbour entries an admin made permanent on link `index`: address and MAC.
    async fn permanent_neighbours(&self, index: u32, link: &str) -> Result<Vec<(IpAddr, Vec<u8>)>, NetError> {
        let entries: Vec<_> =
            self.handle().neighbours().get().execute().try_collect().await.map_err(nl("list neighbours", link))?;
        Ok(entries
            .iter()
            .filter(|n| n.header.ifindex == index && n.header.state == NeighbourState::Permanent)
            .filter_map(|n| {
                let ip = neighbour_address(n)?;
                let lla = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
                    _ => None,
                })?;
                Some((ip, lla))
            })
            .collect())
    }
}

fn neighbour_is(n: &rtnetlink::packet_route::neighbour::NeighbourMessage, addr: IpAddr) -> bool {
    neighbour_address(n) == Some(addr)
}

/// The IP address a neighbour entry is for.
fn neighbour_address(n: &rtnetlink::packet_route::neighbour::NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

/// Where a route's gateways are reached: `(link index, gateway)` of its single path and of
/// every nexthop of a multipath route. Routes without a gateway (on-link) have none.
fn route_exits(r: &RouteMessage) -> Vec<(u32, IpAddr)> {
    let mut out = Vec::new();
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    if let (Some(oif), Some(gw)) = (oif, route_gateway(r)) {
        out.push((oif, gw));
    }
    for a in &r.attributes {
        if let RouteAttribute::MultiPath(hops) = a {
            for h in hops {
                let gw = h.attributes.iter().find_map(|x| match x {
                    RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    RouteAttribute::Via(RouteVia::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Via(RouteVia::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                out.extend(gw.map(|g| (h.interface_index, g)));
            }
        }
    }
    out
}

/// Make the kernel resolve `addr` on `link`: one UDP datagram to the discard port through a
/// socket bound to the link. Best effort: a failure only means the next poll sees no answer.
fn solicit(link: &str, index: u32, addr: IpAddr) {
    let bind: std::net::SocketAddr = match addr {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(sock) = std::net::UdpSocket::bind(bind) else { return };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt with a buffer that outlives the call, on a socket we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            link.as_ptr() as *const libc::c_void,
            link.len() as libc::socklen_t,
        );
    }
    let to: std::net::SocketAddr = match addr {
        IpAddr::V4(v4) => (v4, 9).into(),
        IpAddr::V6(v6) => {
            std::net::SocketAddrV6::new(v6, 9, 0, if v6.is_unicast_link_local() { index } else { 0 }).into()
        }
    };
    let _ = sock.send_to(&[0u8], to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{BridgeAttrs, GuardedChange, Sysctl};
    use rtnetlink::packet_route::address::CacheInfo;

    #[test]
    fn a_route_moves_to_the_bridge() {
        let mut r = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .gateway("fe80::1".parse().unwrap())
            .output_interface(3)
            .protocol(RouteProtocol::Ra)
            .build();
        r.header.flags = RouteFlags::Linkdown;
        let moved = route_onto(&r, 3, 7);
        assert!(moved.attributes.contains(&RouteAttribute::Oif(7)));
        assert!(moved.header.flags.is_empty());
        assert_eq!(describe_route(&moved), "default via fe80::1 proto ra table main");
        let back: RouteMessage = decode(&encode(&moved)).unwrap();
        assert_eq!(back, moved, "survives the durable memory");
    }

    #[test]
    fn an_address_moves_with_its_lifetimes_and_renamed_label() {
        let mut a = AddressMessage::default();
        a.header.index = 3;
        a.header.prefix_len = 24;
        a.attributes = vec![
            AddressAttribute::Address("198.51.100.2".parse().unwrap()),
            AddressAttribute::Label("up0:1".into()),
            AddressAttribute::CacheInfo({
                let mut c = CacheInfo::default();
                c.ifa_preferred = 300;
                c.ifa_valid = 600;
                c
            }),
        ];
        let moved = address_onto(&a, "up0", "br0", 9);
        assert_eq!(moved.header.index, 9);
        assert!(moved.attributes.contains(&AddressAttribute::Label("br0:1".into())));
        assert_eq!(describe_address(&moved), "198.51.100.2/24 (valid 600s, preferred 300s)");
    }

    #[test]
    fn a_rule_naming_the_port_names_the_bridge() {
        let mut r = RuleMessage::default();
        r.attributes =
            vec![RuleAttribute::Priority(100), RuleAttribute::Iifname("up0".into()), RuleAttribute::Table(10)];
        assert_eq!(describe_rule(&rule_onto(&r, "up0", "br0")), "priority 100 iif br0 table 10");
        assert!(decode::<RuleMessage>("zz").is_none(), "a damaged entry is not a panic");
    }

    #[test]
    fn checkpoints_of_every_change_survive_the_durable_memory() {
        // Written before STP and sysctls were checkpointed: a takeover.
        let old: Checkpoint =
            serde_json::from_str(r#"{"bridge":"br0","port":"up0","portMac":null,"portMtu":1500,"portMaster":null,"bridgeMac":null,"bridgeMtu":1500,"addresses":[],"routes":[],"rules":[],"fingerprint":"f"}"#)
                .unwrap();
        assert_eq!(old.change, GuardedChange::Takeover);
        let forwarding = Checkpoint {
            bridge: "forwarding".into(),
            port: "ipv6".into(),
            change: GuardedChange::Forwarding,
            sysctls: vec![
                SysctlValue { sysctl: Sysctl::Ipv6Forwarding, value: 0 },
                SysctlValue { sysctl: Sysctl::AcceptRa { iface: "br0".into() }, value: 1 },
            ],
            ..Default::default()
        };
        let text = serde_json::to_string(&forwarding).unwrap();
        assert!(text.contains(r#"{"sysctl":"acceptRa","iface":"br0","value":1}"#), "{text}");
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).unwrap(), forwarding);
        let stp = Checkpoint {
            bridge: "br0".into(),
            change: GuardedChange::Stp,
            bridge_stp: Some(BridgeAttrs {
                stp: false,
                forward_delay: 15,
                hello_time: 2,
                max_age: 20,
                priority: 32768,
            }),
            ..Default::default()
        };
        assert_eq!(serde_json::from_str::<Checkpoint>(&serde_json::to_string(&stp).unwrap()).unwrap(), stp);
        let port =
            Checkpoint { bridge: "br0".into(), port: "eth1".into(), change: GuardedChange::Port, ..Default::default() };
        let text = serde_json::to_string(&port).unwrap();
        assert!(text.contains(r#""change":"port""#), "{text}");
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).unwrap(), port);
        assert_eq!(Sysctl::AcceptRa { iface: "br0".into() }.to_string(), "net.ipv6.conf.br0.accept_ra");
    }

    #[test]
    fn default_gateways_of_single_and_multipath_routes() {
        let single = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .gateway("192.0.2.1".parse().unwrap())
            .output_interface(3)
            .build();
        assert_eq!(route_exits(&single), [(3, "192.0.2.1".parse().unwrap())]);
        let mut multi = RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
        let hop = |index: u32, gw: &str| {
            let mut h = rtnetlink::packet_route::route::RouteNextHop::default();
            h.interface_index = index;
            h.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gw.parse().unwrap()))];
            h
        };
        multi.attributes.push(RouteAttribute::MultiPath(vec![hop(4, "10.1.0.1"), hop(5, "10.2.0.1")]));
        assert_eq!(route_exits(&multi), [(4, "10.1.0.1".parse().unwrap()), (5, "10.2.0.1".parse().unwrap())]);
        let onlink = RouteMessageBuilder::<std::net::Ipv4Addr>::new().output_interface(3).build();
        assert!(route_exits(&onlink).is_empty(), "no gateway, nothing to ask");
    }
}
