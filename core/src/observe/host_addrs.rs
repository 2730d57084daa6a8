//! What only the host controls about addresses: the addresses it holds itself (with their
//! prefixes, per interface), which bridge each port is attached to, and its IPv4 neighbour
//! table. Guest-supplied addresses are checked against this before the host probes them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use super::arp::{read_arp_table, ArpEntry, PROC_NET_ARP};

/// One address the host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    pub ip: IpAddr,
    pub prefix: u8,
    pub dev: String,
}

impl HostAddr {
    /// `ip` lies in this address's network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => same_prefix(&a.octets(), &b.octets(), self.prefix),
            (IpAddr::V6(a), IpAddr::V6(b)) => same_prefix(&a.octets(), &b.octets(), self.prefix),
            _ => false,
        }
    }
}

fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let bits = usize::from(prefix).min(a.len() * 8);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The host's side of addressing, read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    pub addrs: Vec<HostAddr>,
    /// Port (tap) name → the bridge it is attached to.
    pub bridge_of: HashMap<String, String>,
    /// Every interface `/sys/class/net` shows (it shows the namespace sysfs was mounted in,
    /// which may not be ours: then a tap's bridge is not known from it).
    pub links: std::collections::HashSet<String>,
    pub neighbours: Vec<ArpEntry>,
}

impl HostView {
    /// Read the running host (this process's network namespace).
    pub fn read() -> std::io::Result<HostView> {
        Ok(HostView {
            addrs: host_addrs()?,
            bridge_of: bridge_ports(Path::new("/sys/class/net")),
            links: std::fs::read_dir("/sys/class/net")
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default(),
            neighbours: read_neighbours()?,
        })
    }

    pub fn holds(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.ip == ip)
    }

    /// The host's addresses on `dev` (its networks as the host sees them).
    pub fn on<'a>(&'a self, dev: &'a str) -> impl Iterator<Item = &'a HostAddr> + 'a {
        self.addrs.iter().filter(move |a| a.dev == dev)
    }
}

/// The IPv4 neighbour table (IPv6 neighbours are not read: an IPv6 address is only checked
/// against the host's own addresses and networks).
pub fn read_neighbours() -> std::io::Result<Vec<ArpEntry>> {
    read_arp_table(Path::new(PROC_NET_ARP))
}

/// Every address on every interface (getifaddrs(3)).
pub fn host_addrs() -> std::io::Result<Vec<HostAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name from the kernel.
        let dev = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: the address and netmask point at sockaddrs of the family they say.
        let (ip, prefix) = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes());
                    let prefix = if ifa.ifa_netmask.is_null() {
                        32
                    } else {
                        u32::from_be((*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr).count_ones()
                    };
                    (ip, prefix)
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let prefix = if ifa.ifa_netmask.is_null() {
                        128
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                        m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
                    };
                    (IpAddr::from(a.sin6_addr.s6_addr), prefix)
                }
                _ => continue,
            }
        };
        out.push(HostAddr { ip, prefix: u8::try_from(prefix).unwrap_or(128), dev });
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Port → bridge from `/sys/class/net/<port>/master` (links whose master is not a bridge, e.g.
/// a bond, are left out).
pub fn bridge_ports(sys_class_net: &Path) -> HashMap<String, String> {
    let Ok(entries) = std::fs::read_dir(sys_class_net) else { return HashMap::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let master = std::fs::read_link(e.path().join("master")).ok()?;
            let bridge = master.file_name()?.to_string_lossy().into_owned();
            sys_class_net
                .join(&bridge)
                .join("bridge")
                .exists()
                .then(|| (e.file_name().to_string_lossy().into_owned(), bridge))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ip: &str, prefix: u8) -> HostAddr {
        HostAddr { ip: ip.parse().unwrap(), prefix, dev: "br0".into() }
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        assert!(a("10.77.0.1", 24).contains("10.77.0.200".parse().unwrap()));
        assert!(!a("10.77.0.1", 24).contains("10.77.1.2".parse().unwrap()));
        assert!(a("10.77.0.1", 23).contains("10.77.1.2".parse().unwrap()));
        assert!(!a("10.77.0.1", 24).contains("2001:db8::1".parse().unwrap()));
        assert!(a("2001:db8::1", 64).contains("2001:db8::ffff".parse().unwrap()));
        assert!(!a("2001:db8::1", 64).contains("2001:db8:0:1::1".parse().unwrap()));
        assert!(a("0.0.0.0", 0).contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn the_hosts_own_loopback_is_read() {
        let addrs = host_addrs().unwrap();
        assert!(addrs.iter().any(|a| a.ip == "127.0.0.1".parse::<IpAddr>().unwrap() && a.prefix == 8), "{addrs:?}");
    }

    #[test]
    fn bridge_ports_follow_master_links_to_bridges_only() {
        let d = tempfile::tempdir().unwrap();
        for dir in ["br0/bridge", "bond0", "vnet0", "vnet1", "eth0"] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        std::os::unix::fs::symlink("../br0", d.path().join("vnet0/master")).unwrap();
        std::os::unix::fs::symlink("../bond0", d.path().join("eth0/master")).unwrap();
        let got = bridge_ports(d.path());
        assert_eq!(got, HashMap::from([("vnet0".to_string(), "br0".to_string())]));
    }
}
