//! IP forwarding through `/proc/sys/net`, which shows the caller's network namespace.

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
        std::fs::write(self.root.join(key), if on { "1\n" } else { "0\n" })
            .map_err(|source| NetError::Sysctl { key: key.into(), source })
    }
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
}
