//! A peer network namespace for tests that need something on the other end of a link: a
//! gateway, a router sending advertisements. Made from inside the test's own private namespace
//! (`unshare --net` of a `sleep`); commands run in it through `nsenter`, sockets are opened in
//! it on a thread that joined it. The sleeper is killed by pid when the peer is dropped.

use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A network namespace held open by a child process.
pub struct PeerNetns {
    child: Child,
}

fn netns_of(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

impl PeerNetns {
    /// A fresh namespace with its loopback up. Panics with the reason when none can be made.
    pub fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run unshare for a peer network namespace ({e}); install util-linux"));
        let peer = PeerNetns { child };
        let own = netns_of("self");
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = peer.child.id().to_string();
        while netns_of(&pid) == own {
            assert!(Instant::now() < deadline, "cannot create a peer network namespace (unshare --net did not take)");
            std::thread::sleep(Duration::from_millis(5));
        }
        peer.sh(&["ip", "link", "set", "lo", "up"]);
        peer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run a command inside the peer, panicking on failure.
    pub fn sh(&self, args: &[&str]) {
        let pid = self.pid().to_string();
        let mut all = vec!["nsenter", "-t", &pid, "-n", "--"];
        all.extend_from_slice(args);
        crate::sh(&all);
    }

    /// Move `link` (of the caller's namespace) into the peer.
    pub fn take_link(&self, link: &str) {
        crate::sh(&["ip", "link", "set", link, "netns", &self.pid().to_string()]);
    }

    /// Run `f` on a thread that joined the peer's namespace: sockets it opens live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/proc/{}/ns/net", self.pid());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into the peer: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("peer thread panicked")
    }
}

impl Default for PeerNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PeerNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send one router advertisement (router lifetime `lifetime` seconds, no prefixes) to all nodes
/// on interface `ifname` from link-local `source`. Call it inside the router's namespace
/// ([`PeerNetns::enter`]); `source` must be a non-tentative address of `ifname` (add it with
/// `nodad`).
pub fn send_router_advertisement(ifname: &str, source: std::net::Ipv6Addr, lifetime: u16) -> std::io::Result<()> {
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain libc socket calls on a socket this function owns; every buffer outlives
    // the call it is passed to.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let hops: libc::c_int = 255;
        for opt in [libc::IPV6_MULTICAST_HOPS, libc::IPV6_UNICAST_HOPS] {
            setsockopt(fd.as_raw_fd(), opt, &hops)?;
        }
        setsockopt(fd.as_raw_fd(), libc::IPV6_MULTICAST_IF, &(ifindex as libc::c_int))?;
        let mut local: libc::sockaddr_in6 = std::mem::zeroed();
        local.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        local.sin6_addr.s6_addr = source.octets();
        local.sin6_scope_id = ifindex;
        let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // type 134, code 0, checksum (the kernel fills it in for ICMPv6), cur hop limit 64,
        // flags 0, router lifetime, reachable time 0, retrans timer 0.
        let mut ra = vec![134u8, 0, 0, 0, 64, 0];
        ra.extend(lifetime.to_be_bytes());
        ra.extend([0u8; 8]);
        let mut to: libc::sockaddr_in6 = std::mem::zeroed();
        to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        to.sin6_addr.s6_addr = "ff02::1".parse::<std::net::Ipv6Addr>().map(|a| a.octets()).unwrap_or_default();
        to.sin6_scope_id = ifindex;
        let sent = libc::sendto(
            fd.as_raw_fd(),
            ra.as_ptr() as *const libc::c_void,
            ra.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            len,
        );
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

unsafe fn setsockopt(fd: libc::c_int, opt: libc::c_int, value: &libc::c_int) -> std::io::Result<()> {
    let rc = libc::setsockopt(
        fd,
        libc::IPPROTO_IPV6,
        opt,
        value as *const libc::c_int as *const libc::c_void,
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    );
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
