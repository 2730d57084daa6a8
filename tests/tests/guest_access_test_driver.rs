//! `GuestAccess` and the prober through libvirt's own test driver (in-process): the domain's
//! NICs are read from its real definition, addresses come from libvirt's interface-address
//! call, and an agent the driver cannot reach is a reported probe failure, not an error.

use std::sync::Arc;
use std::time::Duration;

use virtwarden::guest::{AddressSource, GuestAccess};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::plan::health::ProbeFailure;
use virtwarden::probe::address::{discover, AddressError};
use virtwarden::probe::{ProbeSpec, Prober};
use virtwarden_policies::{GuestAgentPing, Probe, TcpProbe};
use virtwarden_tests::testbed_uri;

#[test]
fn devices_and_addresses_come_from_libvirt() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let web2 = host.guest_devices("web2").unwrap();
    assert_eq!(web2.macs, ["52:54:00:00:01:02"]);
    assert!(!web2.agent_channel);
    assert!(host.guest_devices("no-such-domain").is_err());
    // The test driver makes up one address per NIC of a running domain.
    let lease = host.interface_addresses("web2", AddressSource::Lease).unwrap();
    assert_eq!(lease.len(), 1, "{lease:?}");
    assert_eq!(lease[0].mac.as_deref(), Some("52:54:00:00:01:02"));
    assert_eq!(lease[0].addrs, ["192.168.122.2".parse::<std::net::IpAddr>().unwrap()]);
    // Discovery matches it to the domain's NIC, but the NIC's tap is on no bridge of this
    // host's: nothing vouches for the address, so it is not used.
    let Err(AddressError::Untrusted(why)) = discover(&host, "web2", &[]) else { panic!("an unbound address was used") };
    assert!(why.contains("guest agent reports 192.168.122.2 on "), "{why}");
    assert!(why.contains("its NIC's tap is on no bridge of this host's"), "{why}");
}

#[tokio::test]
async fn probes_through_the_test_driver_report_instead_of_failing() {
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let prober = Prober::new(host, 4);
    let agent = ProbeSpec {
        domain: "web2".into(),
        probe: Probe::GuestAgentPing(GuestAgentPing {}),
        address: None,
        timeout: Duration::from_secs(2),
    };
    let r = prober.probe(&agent).await;
    assert!(matches!(r.outcome, Err(ProbeFailure::Agent(_))), "the test driver has no agent: {r:?}");
    let tcp = ProbeSpec { probe: Probe::Tcp(TcpProbe { port: 1 }), domain: "batch1".into(), ..agent };
    let r = prober.probe(&tcp).await;
    let Err(ProbeFailure::NoAddress(why)) = &r.outcome else { panic!("batch1 has no NIC: {r:?}") };
    assert_eq!(why, "the domain has no network interface");
}
