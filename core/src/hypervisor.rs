//! The two small traits everything libvirt-facing goes through: reading domains and
//! controlling them. One real implementation (the `virtwarden` crate's `libvirt`), recording fakes in tests.

pub mod events;

use crate::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

/// A failed hypervisor call, naming the operation and the domain.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: BackendError },
    #[error("{op} {domain}: {source}")]
    Call { op: &'static str, domain: String, source: BackendError },
    #[error("{op}: {source}")]
    Host { op: &'static str, source: BackendError },
    #[error("domain {domain}: {source}")]
    Xml { domain: String, source: crate::observe::domain_xml::XmlError },
    #[error("domain {domain} does not exist")]
    NoSuchDomain { domain: String },
    /// Raised by test doubles and by checks that are not libvirt calls.
    #[error("{op} {domain}: {message}")]
    Failed { op: &'static str, domain: String, message: String },
    /// A fault injected by a test double, classified like a real libvirt error of that kind.
    #[error("{op} {domain}: {message}")]
    Simulated { op: &'static str, domain: String, kind: ErrorKind, message: String },
}

/// An error as the backend reported it, already classified by the backend (libvirt: by its
/// error number and, for the few errors libvirt does not number apart, its message).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{full}")]
pub struct BackendError {
    /// What it means for what to do next.
    pub kind: ErrorKind,
    /// The backend's own message (for status and reports).
    pub message: String,
    /// Everything the backend said, codes included (for logs).
    pub full: String,
}

/// What an error means for what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying the same call soon: libvirt could not get the domain's job lock or timed out.
    Transient,
    /// The connection may be gone (libvirtd died or restarted) — or the call merely failed with a
    /// system error: ask the connection ([`DomainReader::is_alive`]) before deciding.
    MaybeConnection,
    /// The domain does not exist.
    NoDomain,
    /// Anything else: the error belongs to this call and this domain.
    Other,
}

impl HypervisorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HypervisorError::Call { source, .. } | HypervisorError::Host { source, .. } => source.kind,
            HypervisorError::Connect { .. } => ErrorKind::MaybeConnection,
            HypervisorError::NoSuchDomain { .. } => ErrorKind::NoDomain,
            HypervisorError::Simulated { kind, .. } => *kind,
            HypervisorError::Xml { .. } | HypervisorError::Failed { .. } => ErrorKind::Other,
        }
    }

    /// Worth retrying soon: libvirt could not get the domain's job lock or timed out.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// The backend's own message, without our prefix (for status and reports).
    pub fn detail(&self) -> String {
        match self {
            HypervisorError::Connect { source, .. }
            | HypervisorError::Call { source, .. }
            | HypervisorError::Host { source, .. } => source.message.clone(),
            HypervisorError::Simulated { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// Reading what the hypervisor has.
pub trait DomainReader {
    /// Whether the connection still works (libvirt's `virConnectIsAlive`: no round trip).
    fn is_alive(&self) -> bool {
        true
    }
    /// What guest health needs (addresses, the guest agent, the console log), when this
    /// connection can give it; test doubles give none.
    fn guest_access(&self) -> Option<&dyn crate::guest::GuestAccess> {
        None
    }
    /// Every domain (and network) in one pass.
    fn observe_host(&self) -> Result<ObservedHost, HypervisorError>;
    /// libvirt's networks and their bridges.
    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        Ok(self.observe_host()?.networks)
    }
    /// One domain; `None` when it does not exist.
    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError>;
    /// The state and its reason of one domain, for decisions that need nothing else (no XML
    /// is read by the real implementation); `None` when it does not exist.
    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        Ok(self.observe_domain(name)?.map(|d| (d.state, d.reason)))
    }
    /// Just the state of one domain; `None` when it does not exist.
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        Ok(self.domain_state_reason(name)?.map(|(s, _)| s))
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
