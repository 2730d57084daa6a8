//! Network change notifications: link events (RTNLGRP_LINK) and forwarding changes
//! (RTNLGRP_IPV4_NETCONF / IPV6_NETCONF). The payloads are not parsed: any message means "look
//! at the network again", which is all a level-triggered engine needs.

use rtnetlink::sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tokio::sync::mpsc::UnboundedSender;

use super::NetError;

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_NETCONF: u32 = 24;
const RTNLGRP_IPV6_NETCONF: u32 = 25;

/// What changed, coarsely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    Link,
    Forwarding,
}

fn subscribe(group: u32) -> Result<TokioSocket, NetError> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE).map_err(NetError::Socket)?;
    socket.socket_mut().bind(&SocketAddr::new(0, 0)).map_err(NetError::Socket)?;
    socket.socket_mut().add_membership(group).map_err(NetError::Socket)?;
    Ok(socket)
}

/// Forward link and forwarding notifications of this network namespace into `tx` until the
/// receiver is dropped.
pub fn spawn_listener(tx: UnboundedSender<NetEvent>) -> Result<(), NetError> {
    let link = subscribe(RTNLGRP_LINK)?;
    let mut netconf = subscribe(RTNLGRP_IPV4_NETCONF)?;
    netconf.socket_mut().add_membership(RTNLGRP_IPV6_NETCONF).map_err(NetError::Socket)?;
    for (socket, kind) in [(link, NetEvent::Link), (netconf, NetEvent::Forwarding)] {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match socket.recv_from_full().await {
                    Ok(_) => {
                        if tx.send(kind).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // ENOBUFS after a burst: we lost messages, which only means "look again".
                        tracing::debug!(%e, "netlink notification socket");
                        if tx.send(kind).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}
