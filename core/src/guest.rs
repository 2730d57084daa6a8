//! What guest health needs from the hypervisor beyond domain state: the guest's addresses as
//! libvirt learns them (guest agent, DHCP lease, ARP), the guest agent's ping, and the devices
//! that tell where to look. One real implementation (`virtwarden::libvirt::guest`), fakes in tests.

use std::net::IpAddr;
use std::time::Duration;

use crate::hypervisor::HypervisorError;
use crate::observe::guest_devices::GuestDevices;
use crate::observe::host_addrs::HostView;

/// Where libvirt learns a guest's addresses (`virDomainInterfaceAddresses` sources).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSource {
    /// The guest agent's view of its own interfaces.
    Agent,
    /// libvirt's DHCP leases (guests on a libvirt network).
    Lease,
    /// The host's neighbour (ARP) table, on the bridge the domain's tap is attached to.
    Arp,
}

impl AddressSource {
    /// The order addresses are looked for: the guest's own word first, then the host's.
    pub const ORDER: [AddressSource; 3] = [AddressSource::Agent, AddressSource::Lease, AddressSource::Arp];

    pub fn word(self) -> &'static str {
        match self {
            AddressSource::Agent => "guest agent",
            AddressSource::Lease => "DHCP lease",
            AddressSource::Arp => "ARP",
        }
    }
}

/// One guest interface as a source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    pub name: String,
    /// Lowercase; absent when the source does not know it.
    pub mac: Option<String>,
    pub addrs: Vec<IpAddr>,
}

/// Guest-facing calls. Each blocks; async callers run them on blocking threads.
pub trait GuestAccess: Send + Sync {
    /// The domain's NIC MACs, console log file and agent channel (live definition).
    fn guest_devices(&self, domain: &str) -> Result<GuestDevices, HypervisorError>;
    /// Interface addresses from one source.
    fn interface_addresses(&self, domain: &str, source: AddressSource) -> Result<Vec<GuestInterface>, HypervisorError>;
    /// Send `guest-ping` to the guest agent; `Ok` when it answered within `timeout`.
    fn agent_ping(&self, domain: &str, timeout: Duration) -> Result<(), HypervisorError>;
    /// What only the host controls: its own addresses, its bridges' ports, its neighbour table
    /// (that guests' claims are checked against). The running host unless a test says otherwise.
    fn host_view(&self) -> std::io::Result<HostView> {
        HostView::read()
    }
    /// The host's IPv4 neighbour table alone (checked around every probe).
    fn neighbours(&self) -> std::io::Result<Vec<crate::observe::arp::ArpEntry>> {
        crate::observe::host_addrs::read_neighbours()
    }
}
