//! What both long-running front ends (`run`, `operator`) share when they start the engine: the
//! real backends wired in — libvirt, the host network of this namespace, diagnosis. The engine
//! itself builds none of them.

use std::sync::Arc;

use crate::act::remediation::Registry;
use crate::engine::connect::Connector;
use crate::engine::Backends;

/// The real backends for a service on libvirt at `uri`: the host-network task when `network`
/// is on, and diagnosis of failed repairs except on libvirt's test driver (whose domains' paths
/// are not on this host and whose network is not real).
pub fn backends(connector: Arc<dyn Connector>, remediations: Registry, uri: &str, network: bool) -> Backends {
    let mut backends = Backends::new(connector, remediations);
    if network {
        backends.network = Some(crate::hostnet::netlink_runner());
    }
    if !crate::libvirt::is_test_uri(uri) {
        backends.explain = Some(Arc::new(crate::diagnose::StartFailureExplainer { network }));
    }
    backends
}
