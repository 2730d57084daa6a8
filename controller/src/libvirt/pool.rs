//! Several connections to one libvirtd, used round robin, so that parallel calls (`apply
//! --parallel`) are not queued behind libvirtd's per-client limit (`max_client_requests`, 5
//! concurrent calls by default). `make bench-apply` measures the difference.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::LibvirtHost;
use crate::hypervisor::{DomainControl, DomainReader, HypervisorError};
use crate::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

/// libvirtd's default `max_client_requests`: calls one connection may have in flight.
pub const CALLS_PER_CONNECTION: usize = 5;
/// More connections than this bring nothing: libvirtd's default `max_workers` is 20.
pub const MAX_CONNECTIONS: usize = 4;

/// How many connections `parallel` concurrent actions need against `uri`. A node-file test
/// driver (`test:///path`) keeps its state per connection, so it always gets one.
pub fn connections_for(uri: &str, parallel: usize) -> usize {
    if super::is_test_uri(uri) {
        return 1;
    }
    parallel.div_ceil(CALLS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS)
}

/// Open connections to one URI, each call on the next one.
pub struct LibvirtPool {
    hosts: Vec<LibvirtHost>,
    next: AtomicUsize,
}

impl LibvirtPool {
    /// Open `size` connections (at least one) to `uri`.
    pub fn open(uri: &str, size: usize) -> Result<Self, HypervisorError> {
        let hosts = (0..size.max(1)).map(|_| LibvirtHost::open(uri)).collect::<Result<Vec<_>, _>>()?;
        Ok(LibvirtPool { hosts, next: AtomicUsize::new(0) })
    }

    pub fn size(&self) -> usize {
        self.hosts.len()
    }

    fn pick(&self) -> &LibvirtHost {
        &self.hosts[self.next.fetch_add(1, Ordering::Relaxed) % self.hosts.len()]
    }

    /// The first connection (reads that need no parallelism, e.g. diagnosis).
    pub fn first(&self) -> &LibvirtHost {
        &self.hosts[0]
    }
}

impl DomainReader for LibvirtPool {
    fn guest_access(&self) -> Option<&dyn crate::guest::GuestAccess> {
        Some(self.pick())
    }

    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        self.pick().observe_host()
    }
    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        self.pick().observe_domain(name)
    }
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        self.pick().domain_state(name)
    }
    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        self.pick().domain_state_reason(name)
    }
    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        self.pick().list_networks()
    }
    fn is_alive(&self) -> bool {
        self.hosts.iter().all(|h| h.is_alive())
    }
}

impl DomainControl for LibvirtPool {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.pick().start(name)
    }
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.pick().shutdown(name)
    }
    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.pick().destroy(name)
    }
    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.pick().resume(name)
    }
    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.pick().reset(name)
    }
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        self.pick().set_autostart(name, on)
    }
    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.pick().persistent_xml(name)
    }
    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError> {
        self.pick().define_xml(name, xml)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_per_five_parallel_calls_up_to_four_and_one_for_the_test_driver() {
        assert_eq!(connections_for("qemu:///system", 1), 1);
        assert_eq!(connections_for("qemu:///system", 5), 1);
        assert_eq!(connections_for("qemu:///system", 6), 2);
        assert_eq!(connections_for("qemu:///system", 16), 4);
        assert_eq!(connections_for("qemu+ssh://h/system", 1024), 4);
        assert_eq!(connections_for("test:///tmp/node.xml", 16), 1);
    }

    #[test]
    fn calls_go_round_robin_over_working_connections() {
        let pool = LibvirtPool::open("test:///default", 3).unwrap();
        assert_eq!(pool.size(), 3);
        // test:///default is shared by every connection of a process: each sees the domain.
        for _ in 0..6 {
            assert!(pool.domain_state("test").unwrap().is_some());
        }
        assert_eq!(pool.next.load(Ordering::Relaxed), 6);
    }
}
