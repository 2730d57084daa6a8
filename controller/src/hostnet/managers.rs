//! Who else manages a link in this network namespace: a DHCP client (dhclient, dhcpcd,
//! udhcpc), NetworkManager or systemd-networkd. Two managers for one link is the classic fight:
//! after a takeover they would put the address back on the port or renew the lease on a link
//! that no longer carries it. Read from `/proc` (process names and arguments; only processes
//! in our own network namespace count) and the managers' state under `/run`.

use std::path::{Path, PathBuf};

/// Where to look (the real roots, or a directory tree in tests).
#[derive(Debug, Clone)]
pub struct ManagerRoots {
    pub proc: PathBuf,
    pub run: PathBuf,
}

impl Default for ManagerRoots {
    fn default() -> Self {
        ManagerRoots { proc: PathBuf::from("/proc"), run: PathBuf::from("/run") }
    }
}

const DHCP_CLIENTS: &[&str] = &["dhclient", "dhcpcd", "udhcpc"];

/// The managers of `link` (index `index`), each as `dhclient (pid 123)`; empty when none.
pub fn managers_of(roots: &ManagerRoots, link: &str, index: u32) -> Vec<String> {
    let own_ns = std::fs::read_link(roots.proc.join("self/ns/net")).ok();
    let Ok(entries) = std::fs::read_dir(&roots.proc) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|p| p.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let dir = e.path();
        if own_ns.is_some() && std::fs::read_link(dir.join("ns/net")).ok() != own_ns {
            continue;
        }
        let args = cmdline(&dir);
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_string();
        if let Some(client) = dhcp_client(&comm, &args) {
            if dhcp_client_serves(&args, link) {
                out.push(format!("DHCP client {client} (pid {pid})"));
            }
        } else if comm == "NetworkManager" {
            if nm_manages(&roots.run, index) {
                out.push(format!("NetworkManager (pid {pid})"));
            }
        } else if comm == "systemd-network" && networkd_manages(&roots.run, index) {
            out.push(format!("systemd-networkd (pid {pid})"));
        }
    }
    out.sort();
    out
}

fn cmdline(dir: &Path) -> Vec<String> {
    let raw = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// `dhclient`, `dhcpcd`, `udhcpc` (also as `busybox udhcpc`), by process name or argv.
fn dhcp_client(comm: &str, args: &[String]) -> Option<String> {
    let argv0 = args.first().map(|a| basename(a)).unwrap_or("");
    let applet = if argv0 == "busybox" { args.get(1).map(|a| basename(a)).unwrap_or("") } else { argv0 };
    [comm, argv0, applet].into_iter().find(|n| DHCP_CLIENTS.contains(n)).map(str::to_string)
}

/// A DHCP client serves `link` when an argument names it (`eth0`, `-i eth0`, `--interface=eth0`)
/// or when no argument names any interface (dhclient and dhcpcd then serve every link).
fn dhcp_client_serves(args: &[String], link: &str) -> bool {
    let named: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| a.strip_prefix("--interface=").or_else(|| a.strip_prefix("-i")).unwrap_or(a))
        .filter(|a| !a.is_empty() && !a.starts_with('-') && !a.contains('/') && !a.contains('.'))
        .collect();
    named.contains(&link) || named.is_empty()
}

/// NetworkManager manages every link unless its device state says `managed=false`.
fn nm_manages(run: &Path, index: u32) -> bool {
    match std::fs::read_to_string(run.join(format!("NetworkManager/devices/{index}"))) {
        Ok(text) => !text.lines().any(|l| l.trim() == "managed=false"),
        Err(_) => true,
    }
}

/// systemd-networkd manages a link whose state file says it is configured (or configuring).
fn networkd_manages(run: &Path, index: u32) -> bool {
    let text = std::fs::read_to_string(run.join(format!("systemd/netif/links/{index}"))).unwrap_or_default();
    text.lines().any(|l| matches!(l.trim(), "ADMIN_STATE=configured" | "ADMIN_STATE=configuring"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn dhcp_clients_are_known_by_name_and_by_argument() {
        assert_eq!(dhcp_client("dhclient", &args("/sbin/dhclient -d eth0")).as_deref(), Some("dhclient"));
        assert_eq!(dhcp_client("busybox", &args("busybox udhcpc -i eth0")).as_deref(), Some("udhcpc"));
        assert_eq!(dhcp_client("sshd", &args("sshd -D")), None);
        assert!(dhcp_client_serves(&args("dhclient -d -sf /bin/true -lf /tmp/x.leases eth0"), "eth0"));
        assert!(!dhcp_client_serves(&args("dhclient -d eth1"), "eth0"));
        assert!(dhcp_client_serves(&args("udhcpc -i eth0"), "eth0"));
        assert!(dhcp_client_serves(&args("udhcpc --interface=eth0"), "eth0"));
        assert!(dhcp_client_serves(&args("dhcpcd"), "eth0"), "no interface named: all of them");
    }

    #[test]
    fn networkd_and_network_manager_state_decide() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("systemd/netif/links")).unwrap();
        std::fs::create_dir_all(dir.path().join("NetworkManager/devices")).unwrap();
        std::fs::write(dir.path().join("systemd/netif/links/3"), "ADMIN_STATE=configured\n").unwrap();
        std::fs::write(dir.path().join("systemd/netif/links/4"), "ADMIN_STATE=unmanaged\n").unwrap();
        assert!(networkd_manages(dir.path(), 3));
        assert!(!networkd_manages(dir.path(), 4));
        std::fs::write(dir.path().join("NetworkManager/devices/4"), "[device]\nmanaged=false\n").unwrap();
        assert!(nm_manages(dir.path(), 3));
        assert!(!nm_manages(dir.path(), 4));
    }
}
