//! The real [`Hypervisor`](crate::hypervisor::Hypervisor): libvirt through the `virt` crate.
//! Calls block; async callers run them on blocking threads.

use std::mem::ManuallyDrop;

use virt::connect::Connect;
use virt::domain::{
    Domain, DomainCrashedReason, DomainPausedReason, DomainRunningReason, DomainShutdownReason, DomainShutoffReason,
    DomainState as VState, DomainStateReason,
};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

pub mod connect;
pub mod events;
pub mod guest;
pub mod pool;

use crate::hypervisor::{BackendError, DomainControl, DomainReader, ErrorKind, HypervisorError};
use crate::observe::domain_xml::parse_domain_xml;
use crate::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

const XML_SECURE: u32 = virt::sys::VIR_DOMAIN_XML_SECURE;
const XML_INACTIVE: u32 = virt::sys::VIR_DOMAIN_XML_INACTIVE;

/// The connect URI to use: the flag, else `$LIBVIRT_DEFAULT_URI`, else `qemu:///system`.
/// libvirt's in-process test driver (`test:///default`, `test:///path/node.xml`): no real
/// guests, no taps, made-up addresses, state kept per connection.
pub fn is_test_uri(uri: &str) -> bool {
    uri.starts_with("test:")
}

pub fn resolve_uri(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| std::env::var("LIBVIRT_DEFAULT_URI").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "qemu:///system".to_string())
}

/// Send libvirt's error reports to our log instead of its default printer on stderr: the
/// errors that matter are returned by the calls and reported with their domain and operation.
pub fn route_errors_to_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        unsafe extern "C" fn log_error(_data: *mut std::os::raw::c_void, err: virt::sys::virErrorPtr) {
            let _ = std::panic::catch_unwind(|| {
                if err.is_null() {
                    return;
                }
                // SAFETY: libvirt passes a valid error for the duration of the callback.
                let message = unsafe {
                    let m = (*err).message;
                    if m.is_null() {
                        return;
                    }
                    std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned()
                };
                tracing::debug!(target: "libvirt", %message, "libvirt error");
            });
        }
        // SAFETY: installs a process-wide callback that only copies the message.
        unsafe { virt::sys::virSetErrorFunc(std::ptr::null_mut(), Some(log_error)) };
    });
}

/// An open libvirt connection.
pub struct LibvirtHost {
    // virt's Drop for Connect panics when virConnectClose fails; we close it ourselves.
    conn: ManuallyDrop<Connect>,
    uri: String,
}

impl LibvirtHost {
    pub fn open(uri: &str) -> Result<Self, HypervisorError> {
        let conn = Connect::open(Some(uri))
            .map_err(|source| HypervisorError::Connect { uri: uri.to_string(), source: backend_error(source) })?;
        Ok(LibvirtHost { conn: ManuallyDrop::new(conn), uri: uri.to_string() })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Ask libvirt to probe the connection every `interval` seconds and close it after `count`
    /// unanswered probes, so a hung libvirtd is noticed (the close callback fires). Needs the
    /// event loop; local drivers (the test driver) have no keepalive and say so.
    pub fn enable_keepalive(&self, interval: i32, count: u32) {
        if let Err(e) = self.conn.set_keep_alive(interval, count) {
            tracing::debug!(uri = %self.uri, e = %e.message(), "no libvirt keepalive on this connection");
        }
    }

    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    fn lookup(&self, op: &'static str, name: &str) -> Result<Domain, HypervisorError> {
        self.conn.lookup_domain_by_name(name).map_err(|source| {
            if is_no_domain(&source) {
                HypervisorError::NoSuchDomain { domain: name.to_string() }
            } else {
                HypervisorError::Call { op, domain: name.to_string(), source: backend_error(source) }
            }
        })
    }

    fn observe_one(&self, dom: &Domain) -> Result<ObservedDomain, HypervisorError> {
        let name = dom.name().map_err(|source| HypervisorError::Host { op: "name", source: backend_error(source) })?;
        let call = |op: &'static str| {
            let name = name.clone();
            move |source| HypervisorError::Call { op, domain: name, source: backend_error(source) }
        };
        let uuid = dom.uuid_string().map_err(call("uuid"))?;
        let (state, reason) = map_state(dom.state().map_err(call("state"))?);
        let persistent = dom.is_persistent().map_err(call("is_persistent"))?;
        let autostart = if persistent { dom.autostart().map_err(call("autostart"))? } else { false };
        // Live XML has the taps; the persistent one has the boot order the next start uses.
        let live_xml = dom.xml_desc(0).map_err(call("dumpxml"))?;
        let live =
            parse_domain_xml(&live_xml).map_err(|source| HypervisorError::Xml { domain: name.clone(), source })?;
        let boot = if persistent && state.is_active() {
            let xml = dom.xml_desc(XML_INACTIVE).map_err(call("dumpxml --inactive"))?;
            parse_domain_xml(&xml).map_err(|source| HypervisorError::Xml { domain: name.clone(), source })?.boot
        } else {
            live.boot
        };
        Ok(ObservedDomain {
            name,
            uuid,
            state,
            reason,
            persistent,
            autostart,
            boot,
            interfaces: live.interfaces.iter().map(Into::into).collect(),
            disks: live.disks.iter().map(Into::into).collect(),
            id: dom.id(),
        })
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        // SAFETY: the pointer comes from a Connect we own and never use again; taking it out of
        // ManuallyDrop without running virt's Drop avoids its panic on a failed close.
        let rc = unsafe { virt::sys::virConnectClose(self.conn.as_ptr()) };
        if rc < 0 {
            tracing::warn!(uri = %self.uri, "closing the libvirt connection failed");
        }
    }
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

/// A libvirt error as the hypervisor seam's [`BackendError`], classified by what it means.
pub fn backend_error(source: virt::error::Error) -> BackendError {
    BackendError { kind: error_kind(&source), message: source.message().to_string(), full: source.to_string() }
}

fn error_kind(source: &virt::error::Error) -> ErrorKind {
    use ErrorNumber as N;
    match source.code() {
        Enum::Known(N::OperationTimeout) => ErrorKind::Transient,
        Enum::Known(N::NoDomain) => ErrorKind::NoDomain,
        Enum::Known(N::SystemError | N::Rpc | N::NoConnect | N::InvalidConn) => ErrorKind::MaybeConnection,
        _ if source.message().contains("cannot acquire state change lock") => ErrorKind::Transient,
        _ if source.message().contains("client socket is closed") => ErrorKind::MaybeConnection,
        _ => ErrorKind::Other,
    }
}

fn map_state(
    (state, reason): (virt::domain::DomainStateEnum, virt::domain::DomainStateReasonEnum),
) -> (DomainState, StateReason) {
    let state = match state {
        Enum::Known(VState::Running) => DomainState::Running,
        Enum::Known(VState::Blocked) => DomainState::Blocked,
        Enum::Known(VState::Paused) => DomainState::Paused,
        Enum::Known(VState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(VState::Shutoff) => DomainState::ShutOff,
        Enum::Known(VState::Crashed) => DomainState::Crashed,
        Enum::Known(VState::PMSuspended) => DomainState::PmSuspended,
        Enum::Known(VState::NoState) | Enum::Unknown(_) => DomainState::NoState,
    };
    let reason = match reason {
        Enum::Known(r) => state_reason(r),
        Enum::Unknown(_) => StateReason::Unknown,
    };
    (state, reason)
}

/// libvirt's per-state reason enums as one [`StateReason`].
fn state_reason(r: DomainStateReason) -> StateReason {
    use DomainStateReason as R;
    use StateReason as S;
    match r {
        R::Running(Enum::Known(x)) => match x {
            DomainRunningReason::Booted => S::Booted,
            DomainRunningReason::Migrated => S::Migrated,
            DomainRunningReason::Restored => S::Restored,
            DomainRunningReason::FromSnapshot => S::FromSnapshot,
            DomainRunningReason::Unpaused => S::Unpaused,
            DomainRunningReason::MigrationCancelled => S::MigrationCanceled,
            DomainRunningReason::SaveCancelled => S::SaveCanceled,
            DomainRunningReason::Wakeup => S::Wakeup,
            DomainRunningReason::Crashed => S::Crashed,
            DomainRunningReason::PostCopy => S::PostCopy,
            DomainRunningReason::PostCopyFailed => S::PostCopyFailed,
            DomainRunningReason::Unknown => S::Unknown,
        },
        R::Paused(Enum::Known(x)) => match x {
            DomainPausedReason::User => S::User,
            DomainPausedReason::Migration => S::Migrating,
            DomainPausedReason::Save => S::Saving,
            DomainPausedReason::Dump => S::Dumping,
            DomainPausedReason::IOError => S::IoError,
            DomainPausedReason::Watchdog => S::Watchdog,
            DomainPausedReason::FromSnapshot => S::FromSnapshot,
            DomainPausedReason::ShuttingDown => S::ShuttingDown,
            DomainPausedReason::Snapshot => S::CreatingSnapshot,
            DomainPausedReason::Crashed => S::Crashed,
            DomainPausedReason::StartingUp => S::StartingUp,
            DomainPausedReason::PostCopy => S::PostCopy,
            DomainPausedReason::PostCopyFailed => S::PostCopyFailed,
            DomainPausedReason::APIError => S::ApiError,
            DomainPausedReason::Unknown => S::Unknown,
        },
        R::Shutdown(Enum::Known(DomainShutdownReason::User)) => S::User,
        R::Shutoff(Enum::Known(x)) => match x {
            DomainShutoffReason::Shutdown => S::Shutdown,
            DomainShutoffReason::Destroyed => S::Destroyed,
            DomainShutoffReason::Crashed => S::Crashed,
            DomainShutoffReason::Migrated => S::Migrated,
            DomainShutoffReason::Saved => S::Saved,
            DomainShutoffReason::Failed => S::Failed,
            DomainShutoffReason::FromSnapshot => S::FromSnapshot,
            DomainShutoffReason::Daemon => S::Daemon,
            DomainShutoffReason::Unknown => S::Unknown,
        },
        R::Crashed(Enum::Known(DomainCrashedReason::Panicked)) => S::Panicked,
        _ => S::Unknown,
    }
}

impl DomainReader for LibvirtHost {
    fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    fn guest_access(&self) -> Option<&dyn crate::guest::GuestAccess> {
        Some(self)
    }

    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|source| HypervisorError::Host { op: "list domains", source: backend_error(source) })?;
        let mut host = ObservedHost::default();
        for dom in &domains {
            match self.observe_one(dom) {
                Ok(d) => host.domains.push(d),
                // Undefined between listing and reading: it is simply gone.
                Err(HypervisorError::Call { source, .. }) if source.kind == ErrorKind::NoDomain => {}
                Err(e) => return Err(e),
            }
        }
        host.domains.sort_by(|a, b| a.name.cmp(&b.name));
        host.networks = self.list_networks()?;
        Ok(host)
    }

    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        let networks = self
            .conn
            .list_all_networks(0)
            .map_err(|source| HypervisorError::Host { op: "list networks", source: backend_error(source) })?;
        let mut out = Vec::with_capacity(networks.len());
        for net in &networks {
            let name = net
                .name()
                .map_err(|source| HypervisorError::Host { op: "network name", source: backend_error(source) })?;
            out.push(ObservedNetwork {
                bridge: net.bridge_name().ok(),
                active: net.is_active().unwrap_or(false),
                name,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        match self.lookup("lookup", name) {
            Ok(dom) => match self.observe_one(&dom) {
                Ok(d) => Ok(Some(d)),
                Err(HypervisorError::Call { source, .. }) if source.kind == ErrorKind::NoDomain => Ok(None),
                Err(e) => Err(e),
            },
            Err(HypervisorError::NoSuchDomain { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        let dom = match self.lookup("state", name) {
            Ok(d) => d,
            Err(HypervisorError::NoSuchDomain { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        match dom.state() {
            Ok(st) => Ok(Some(map_state(st))),
            Err(source) if is_no_domain(&source) => Ok(None),
            Err(source) => {
                Err(HypervisorError::Call { op: "state", domain: name.into(), source: backend_error(source) })
            }
        }
    }
}

impl DomainControl for LibvirtHost {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup("start", name)?;
        dom.create().map_err(|source| HypervisorError::Call {
            op: "start",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup("shutdown", name)?;
        dom.shutdown().map_err(|source| HypervisorError::Call {
            op: "shutdown",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup("destroy", name)?;
        dom.destroy().map_err(|source| HypervisorError::Call {
            op: "destroy",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup("resume", name)?;
        dom.resume().map_err(|source| HypervisorError::Call {
            op: "resume",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup("reset", name)?;
        dom.reset().map_err(|source| HypervisorError::Call {
            op: "reset",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        let dom = self.lookup("set autostart", name)?;
        dom.set_autostart(on).map_err(|source| HypervisorError::Call {
            op: "set autostart",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        let dom = self.lookup("dumpxml", name)?;
        // SECURE keeps passwords (e.g. VNC) in the XML, so redefining does not drop them.
        dom.xml_desc(XML_INACTIVE | XML_SECURE).map_err(|source| HypervisorError::Call {
            op: "dumpxml --inactive --security-info",
            domain: name.into(),
            source: backend_error(source),
        })
    }

    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError> {
        self.conn.define_domain_xml(xml).map(drop).map_err(|source| HypervisorError::Call {
            op: "define",
            domain: name.into(),
            source: backend_error(source),
        })
    }
}
