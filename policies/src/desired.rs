//! The merged desired state of a host: every document's domains, bridges and forwarding
//! switches, each remembering which policy asked for it.

use serde::Serialize;

use crate::types::{BridgePolicy, DomainPolicy};

/// A domain under management and the policy that manages it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagedDomain {
    pub policy: String,
    pub spec: DomainPolicy,
}

/// A bridge under management and the policy that manages it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagedBridge {
    pub policy: String,
    pub spec: BridgePolicy,
    /// `file:line:column` of its `allowUplinkChange` (or of the bridge when absent), for
    /// refusals found later against the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// One forwarding switch and the policy that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardingSetting {
    pub policy: String,
    pub enabled: bool,
}

/// Everything all loaded policies ask for, merged; names are unique across it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DesiredState {
    /// Names of the policies that were merged, in load order.
    pub policies: Vec<String>,
    pub domains: Vec<ManagedDomain>,
    pub bridges: Vec<ManagedBridge>,
    pub ipv4_forwarding: Option<ForwardingSetting>,
    pub ipv6_forwarding: Option<ForwardingSetting>,
}

impl DesiredState {
    pub fn domain(&self, name: &str) -> Option<&ManagedDomain> {
        self.domains.iter().find(|d| d.spec.name == name)
    }

    pub fn bridge(&self, name: &str) -> Option<&ManagedBridge> {
        self.bridges.iter().find(|b| b.spec.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
            && self.bridges.is_empty()
            && self.ipv4_forwarding.is_none()
            && self.ipv6_forwarding.is_none()
    }
}
