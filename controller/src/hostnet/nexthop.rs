//! Nexthop objects (`ip nexthop`, RTM_GETNEXTHOP): a route may name its gateway only by
//! `RTA_NH_ID`, and with `net.ipv4.nexthop_compat_mode = 0` the kernel leaves out the interface.
//! netlink-packet-route 0.33 has no nexthop messages, so this module carries the small part we
//! need (id, output interface, group members) over netlink-proto's generic connection.

use std::collections::HashMap;

use futures_util::StreamExt;
use rtnetlink::packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NlasIterator, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::proto::ConnectionHandle;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, SocketAddr};

use super::NetError;

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_GETNEXTHOP: u16 = 106;
/// `struct nhmsg`: family, scope, protocol, reserved (u8 each), flags (u32).
const NHMSG_LEN: usize = 8;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_OIF: u16 = 5;
/// `struct nexthop_grp`: id (u32), weight (u8), weight_high (u8), reserved (u16).
const NEXTHOP_GRP_LEN: usize = 8;
/// Groups cannot nest in Linux; the bound only guards against a malformed answer.
const MAX_DEPTH: usize = 4;

/// One nexthop object, or the dump request for all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NexthopMessage {
    pub id: u32,
    /// The output interface (absent for groups and blackholes).
    pub oif: Option<u32>,
    /// Member nexthop ids, for a group.
    pub group: Vec<u32>,
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        RTM_GETNEXTHOP
    }

    fn buffer_len(&self) -> usize {
        NHMSG_LEN
    }

    /// Only the dump request is ever sent: an all-zero `nhmsg` (every family, no filter).
    fn serialize(&self, buffer: &mut [u8]) {
        buffer.fill(0);
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if header.message_type != RTM_NEWNEXTHOP {
            return Err(format!("unexpected message type {} in a nexthop dump", header.message_type).into());
        }
        let attrs = payload.get(NHMSG_LEN..).ok_or_else(|| DecodeError::from("nexthop message too short"))?;
        let mut msg = NexthopMessage::default();
        for nla in NlasIterator::new(attrs) {
            let nla = nla?;
            let value = nla.value();
            match nla.kind() {
                NHA_ID => msg.id = u32_at(value, 0)?,
                NHA_OIF => msg.oif = Some(u32_at(value, 0)?),
                NHA_GROUP => {
                    msg.group = value.chunks_exact(NEXTHOP_GRP_LEN).map(|g| u32_at(g, 0)).collect::<Result<_, _>>()?
                }
                _ => {}
            }
        }
        Ok(msg)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, DecodeError> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| DecodeError::from("nexthop attribute too short"))
}

/// A netlink connection that speaks nexthop messages.
#[derive(Clone)]
pub struct NexthopSocket {
    handle: ConnectionHandle<NexthopMessage>,
}

impl NexthopSocket {
    /// Open a connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::proto::new_connection::<NexthopMessage>(NETLINK_ROUTE).map_err(NetError::Socket)?;
        tokio::spawn(conn);
        Ok(NexthopSocket { handle })
    }

    /// Every nexthop object of this network namespace, by id.
    pub async fn dump(&self) -> Result<Nexthops, NetError> {
        let op = "list nexthops";
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(NexthopMessage::default()));
        req.finalize();
        let mut answers = self
            .handle
            .request(req, SocketAddr::new(0, 0))
            .map_err(|e| NetError::Io { op, source: std::io::Error::other(e.to_string()) })?;
        let mut all = Nexthops::default();
        while let Some(msg) = answers.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(nh) => {
                    all.0.insert(nh.id, nh);
                }
                NetlinkPayload::Error(e) if e.raw_code() != 0 => return Err(NetError::Io { op, source: e.to_io() }),
                _ => {}
            }
        }
        Ok(all)
    }
}

/// Nexthop objects by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nexthops(pub HashMap<u32, NexthopMessage>);

impl Nexthops {
    /// The output interfaces a route naming nexthop `id` can use: its own, or every member's of a
    /// group. Empty for an unknown id or a blackhole.
    pub fn interfaces(&self, id: u32) -> Vec<u32> {
        let mut out = Vec::new();
        self.collect(id, 0, &mut out);
        out
    }

    fn collect(&self, id: u32, depth: usize, out: &mut Vec<u32>) {
        let Some(nh) = self.0.get(&id) else { return };
        out.extend(nh.oif);
        if depth < MAX_DEPTH {
            for member in &nh.group {
                self.collect(*member, depth + 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut v = Vec::new();
        v.extend((len as u16).to_ne_bytes());
        v.extend(kind.to_ne_bytes());
        v.extend(value);
        v.resize(len.next_multiple_of(4), 0);
        v
    }

    fn header() -> NetlinkHeader {
        let mut h = NetlinkHeader::default();
        h.message_type = RTM_NEWNEXTHOP;
        h
    }

    #[test]
    fn parses_a_nexthop_and_a_group() {
        let mut single = vec![0u8; NHMSG_LEN];
        single.extend(nla(NHA_ID, &7u32.to_ne_bytes()));
        single.extend(nla(NHA_OIF, &3u32.to_ne_bytes()));
        let nh = NexthopMessage::deserialize(&header(), &single).unwrap();
        assert_eq!(nh, NexthopMessage { id: 7, oif: Some(3), group: vec![] });

        let mut group = vec![0u8; NHMSG_LEN];
        group.extend(nla(NHA_ID, &10u32.to_ne_bytes()));
        let mut members = Vec::new();
        for id in [7u32, 8] {
            members.extend(id.to_ne_bytes());
            members.extend([1, 0, 0, 0]);
        }
        group.extend(nla(NHA_GROUP, &members));
        let g = NexthopMessage::deserialize(&header(), &group).unwrap();
        assert_eq!(g.group, vec![7, 8]);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        assert!(NexthopMessage::deserialize(&header(), &[0, 0]).is_err());
        let mut bad = vec![0u8; NHMSG_LEN];
        bad.extend(nla(NHA_OIF, &[1, 2]));
        assert!(NexthopMessage::deserialize(&header(), &bad).is_err());
    }

    #[test]
    fn a_group_resolves_to_every_member_interface() {
        let mut all = Nexthops::default();
        for nh in [
            NexthopMessage { id: 1, oif: Some(3), group: vec![] },
            NexthopMessage { id: 2, oif: Some(4), group: vec![] },
            NexthopMessage { id: 10, oif: None, group: vec![1, 2, 99] },
            NexthopMessage { id: 11, oif: None, group: vec![11] },
        ] {
            all.0.insert(nh.id, nh);
        }
        assert_eq!(all.interfaces(1), vec![3]);
        assert_eq!(all.interfaces(10), vec![3, 4]);
        assert_eq!(all.interfaces(42), Vec::<u32>::new());
        assert_eq!(all.interfaces(11), Vec::<u32>::new(), "a self-referencing group ends");
    }
}
