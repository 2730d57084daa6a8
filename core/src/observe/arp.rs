//! The host's IPv4 neighbour (ARP) table from `/proc/net/arp`: where a guest's address is found
//! when libvirt's own ARP source fails (libvirt 9.0 reports "wrong nlmsg len" on this kernel's
//! neighbour dump).

use std::net::Ipv4Addr;
use std::path::Path;

/// One complete entry: an address and the MAC that answered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpEntry {
    pub ip: Ipv4Addr,
    /// Lowercase.
    pub mac: String,
    pub device: String,
}

/// The kernel's table in this network namespace.
pub const PROC_NET_ARP: &str = "/proc/net/arp";

pub fn read_arp_table(path: &Path) -> std::io::Result<Vec<ArpEntry>> {
    Ok(parse_arp_table(&std::fs::read_to_string(path)?))
}

/// Entries of a `/proc/net/arp` text; incomplete ones (flags 0, no MAC yet) are left out.
pub fn parse_arp_table(text: &str) -> Vec<ArpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, mac, _mask, device] = f.as_slice() else { return None };
            let complete = u32::from_str_radix(flags.trim_start_matches("0x"), 16).is_ok_and(|v| v & 0x2 != 0);
            if !complete {
                return None;
            }
            Some(ArpEntry { ip: ip.parse().ok()?, mac: mac.to_ascii_lowercase(), device: device.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.77.0.2        0x1         0x2         52:54:00:53:7A:78     *        br0\n\
                    10.77.0.9        0x1         0x0         00:00:00:00:00:00     *        br0\n\
                    10.77.0.3        0x1         0x6         52:54:00:00:00:03     *        br0\n\
                    garbage\n";
        let got = parse_arp_table(text);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            ArpEntry { ip: "10.77.0.2".parse().unwrap(), mac: "52:54:00:53:7a:78".into(), device: "br0".into() }
        );
        assert_eq!(got[1].ip.to_string(), "10.77.0.3");
    }
}
