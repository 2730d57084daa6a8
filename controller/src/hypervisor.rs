//! The two small traits everything libvirt-facing goes through: reading domains and
//! controlling them. One real implementation ([`crate::libvirt`]), recording fakes in tests.

use crate::observe::{DomainState, ObservedDomain, ObservedHost};

/// A failed hypervisor call, naming the operation and the domain.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: virt::error::Error },
    #[error("{op} {domain}: {source}")]
    Call { op: &'static str, domain: String, source: virt::error::Error },
    #[error("{op}: {source}")]
    Host { op: &'static str, source: virt::error::Error },
    #[error("domain {domain}: {source}")]
    Xml { domain: String, source: crate::observe::domain_xml::XmlError },
    #[error("domain {domain} does not exist")]
    NoSuchDomain { domain: String },
    /// Raised by test doubles and by checks that are not libvirt calls.
    #[error("{op} {domain}: {message}")]
    Failed { op: &'static str, domain: String, message: String },
}

impl HypervisorError {
    /// Worth retrying soon: libvirt could not get the domain's job lock or timed out.
    pub fn is_transient(&self) -> bool {
        match self {
            HypervisorError::Call { source, .. } => {
                matches!(source.code(), virt::enumutil::Enum::Known(virt::error::ErrorNumber::OperationTimeout))
                    || source.message().contains("cannot acquire state change lock")
            }
            _ => false,
        }
    }

    /// The connection itself is gone (libvirtd died or restarted).
    pub fn is_connection_lost(&self) -> bool {
        use virt::error::ErrorNumber as N;
        let source = match self {
            HypervisorError::Call { source, .. } | HypervisorError::Host { source, .. } => source,
            _ => return false,
        };
        matches!(source.code(), virt::enumutil::Enum::Known(N::SystemError | N::Rpc | N::NoConnect | N::InvalidConn))
            || source.message().contains("client socket is closed")
    }

    /// libvirt's own message, without our prefix (for status and reports).
    pub fn detail(&self) -> String {
        match self {
            HypervisorError::Connect { source, .. }
            | HypervisorError::Call { source, .. }
            | HypervisorError::Host { source, .. } => source.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// Reading what the hypervisor has.
pub trait DomainReader {
    /// Every domain (and network) in one pass.
    fn observe_host(&self) -> Result<ObservedHost, HypervisorError>;
    /// One domain; `None` when it does not exist.
    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError>;
    /// Just the state of one domain, for decisions that need nothing else (no XML is read by
    /// the real implementation); `None` when it does not exist.
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        Ok(self.observe_domain(name)?.map(|d| d.state))
    }
}

/// Changing domains. Each call is one libvirt operation on one named domain.
pub trait DomainControl {
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Ask the guest to shut down (ACPI); returns before it has.
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Power off at once.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    fn resume(&self, name: &str) -> Result<(), HypervisorError>;
    /// Hard reset, like pressing the reset button.
    fn reset(&self, name: &str) -> Result<(), HypervisorError>;
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError>;
    /// The persistent definition including secrets, suitable for redefining.
    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError>;
    /// Replace the persistent definition of the domain the XML names.
    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError>;
}

/// Both halves together, what the executor and the engine need.
pub trait Hypervisor: DomainReader + DomainControl + Send + Sync {}

impl<T: DomainReader + DomainControl + Send + Sync> Hypervisor for T {}
