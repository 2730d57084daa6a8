//! IP forwarding and `accept_ra` through `/proc/sys/net`, which shows the caller's network
//! namespace.

use std::path::PathBuf;

use super::{Forwarding, NetError};

pub const IPV4_FORWARD: &str = "net/ipv4/ip_forward";
pub const IPV6_FORWARD: &str = "net/ipv6/conf/all/forwarding";

/// Where `/proc/sys` is: `$VIRTWARDEN_PROC_SYS` in containers, where /proc/sys is read-only and
/// the host's /proc/sys/net is mounted elsewhere; `/proc/sys` otherwise. The one place that reads
/// the variable (forwarding and diagnosis both go through it).
pub fn proc_sys() -> PathBuf {
    std::env::var_os("VIRTWARDEN_PROC_SYS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/proc/sys"))
}

/// `/proc/sys` (or another root, for tests of the parsing).
pub struct ProcForwarding {
    root: PathBuf,
}

impl Default for ProcForwarding {
    /// [`proc_sys`].
    fn default() -> Self {
        ProcForwarding { root: proc_sys() }
    }
}

impl ProcForwarding {
    fn read(&self, key: &str) -> Result<bool, NetError> {
        let text = std::fs::read_to_string(self.root.join(key))
            .map_err(|source| NetError::Sysctl { key: key.into(), source })?;
        Ok(text.trim() != "0")
    }

    fn write(&self, key: &str, on: bool) -> Result<(), NetError> {
        self.write_value(key, if on { 1 } else { 0 })
    }

    fn write_value(&self, key: &str, value: u8) -> Result<(), NetError> {
        std::fs::write(self.root.join(key), format!("{value}\n"))
            .map_err(|source| NetError::Sysctl { key: key.into(), source })
    }
}

/// `net/ipv6/conf/<iface>/accept_ra`, or an error for a name that is not one interface's (the
/// kernel forbids `/` and the names `.` and `..`; a name from outside is checked anyway).
fn accept_ra_key(iface: &str) -> Result<String, NetError> {
    if iface.is_empty() || iface.len() > 15 || iface.contains('/') || iface == "." || iface == ".." {
        return Err(NetError::Sysctl {
            key: format!("net/ipv6/conf/{iface}/accept_ra"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an interface name"),
        });
    }
    Ok(format!("net/ipv6/conf/{iface}/accept_ra"))
}

impl Forwarding for ProcForwarding {
    fn ipv4(&self) -> Result<bool, NetError> {
        self.read(IPV4_FORWARD)
    }
    fn ipv6(&self) -> Result<bool, NetError> {
        self.read(IPV6_FORWARD)
    }
    fn set_ipv4(&self, on: bool) -> Result<(), NetError> {
        self.write(IPV4_FORWARD, on)
    }
    fn set_ipv6(&self, on: bool) -> Result<(), NetError> {
        self.write(IPV6_FORWARD, on)
    }
    fn accept_ra(&self, iface: &str) -> Result<u8, NetError> {
        let key = accept_ra_key(iface)?;
        let text = std::fs::read_to_string(self.root.join(&key))
            .map_err(|source| NetError::Sysctl { key: key.clone(), source })?;
        text.trim().parse::<u8>().map_err(|e| NetError::Sysctl {
            key,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }
    fn set_accept_ra(&self, iface: &str, value: u8) -> Result<(), NetError> {
        self.write_value(&accept_ra_key(iface)?, value)
    }
}
