//! [`GuestAccess`] through libvirt: `virDomainInterfaceAddresses` and the QEMU guest agent
//! (`virDomainQemuAgentCommand`, from libvirt-qemu: the `virt` crate's `qemu` feature).

use std::net::IpAddr;
use std::time::Duration;

use super::LibvirtHost;
use crate::guest::{AddressSource, GuestAccess, GuestInterface};
use crate::hypervisor::HypervisorError;
use crate::libvirt::backend_error;
use crate::observe::arp::{read_arp_table, PROC_NET_ARP};
use crate::observe::guest_devices::{parse_guest_devices, GuestDevices};

const PING: &str = r#"{"execute":"guest-ping"}"#;

impl GuestAccess for LibvirtHost {
    fn guest_devices(&self, domain: &str) -> Result<GuestDevices, HypervisorError> {
        let dom = self.lookup("dumpxml", domain)?;
        let xml = dom.xml_desc(0).map_err(|source| HypervisorError::Call {
            op: "dumpxml",
            domain: domain.into(),
            source: backend_error(source),
        })?;
        parse_guest_devices(&xml).map_err(|source| HypervisorError::Xml { domain: domain.into(), source })
    }

    fn interface_addresses(&self, domain: &str, source: AddressSource) -> Result<Vec<GuestInterface>, HypervisorError> {
        let op = "domifaddr";
        let dom = self.lookup(op, domain)?;
        let raw = match source {
            AddressSource::Agent => virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            AddressSource::Lease => virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            AddressSource::Arp => virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
        };
        let ifaces = match dom.interface_addresses(raw, 0) {
            Ok(ifaces) => ifaces,
            Err(e) if source == AddressSource::Arp => return arp_fallback(domain, e),
            Err(e) => return Err(HypervisorError::Call { op, domain: domain.into(), source: backend_error(e) }),
        };
        Ok(ifaces
            .into_iter()
            .map(|i| GuestInterface {
                name: i.name,
                mac: i.hwaddr.map(|m| m.to_ascii_lowercase()),
                // libvirt formats addresses itself; one it could not would be skipped, not fatal.
                addrs: i.addrs.iter().filter_map(|a| a.addr.parse::<IpAddr>().ok()).collect(),
            })
            .collect())
    }

    fn agent_ping(&self, domain: &str, timeout: Duration) -> Result<(), HypervisorError> {
        let op = "guest-ping";
        let dom = self.lookup(op, domain)?;
        // libvirt takes whole seconds; round up so a 500ms timeout is not "return at once" (0).
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let secs = i32::try_from(secs.max(1)).unwrap_or(i32::MAX);
        dom.qemu_agent_command(PING, secs, 0).map(|_| ()).map_err(|source| HypervisorError::Call {
            op,
            domain: domain.into(),
            source: backend_error(source),
        })
    }
}

/// libvirt's ARP source failed (libvirt 9.0 cannot parse this kernel's neighbour dump): read the
/// same table from /proc, in this process's network namespace (libvirtd's, on a host).
fn arp_fallback(domain: &str, libvirt_error: virt::error::Error) -> Result<Vec<GuestInterface>, HypervisorError> {
    let entries = read_arp_table(std::path::Path::new(PROC_NET_ARP)).map_err(|e| HypervisorError::Failed {
        op: "domifaddr --source arp",
        domain: domain.into(),
        message: format!("{}; reading {PROC_NET_ARP} instead: {e}", libvirt_error.message()),
    })?;
    tracing::debug!(domain, error = %libvirt_error.message(), "libvirt's ARP source failed; read {PROC_NET_ARP}");
    Ok(entries
        .into_iter()
        .map(|e| GuestInterface { name: e.device, mac: Some(e.mac), addrs: vec![IpAddr::V4(e.ip)] })
        .collect())
}
