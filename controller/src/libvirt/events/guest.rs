//! Guest faults and signs of life libvirt reports beside lifecycle changes: guest resets,
//! watchdog firings, disk I/O errors with their reason, lost control of QEMU, and the guest
//! agent connecting or disconnecting — registered with libvirt here and converted into
//! [`GuestEvent`]s (the hypervisor seam's own types).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::time::Instant;

use virt::sys;

use super::{free_sender, Sender, SubscribeError};
use crate::hypervisor::events::{
    AgentReason, GuestEvent, GuestEventKind, HypervisorEvent, IoErrorAction, WatchdogAction,
};

/// libvirt's watchdog action number in our words.
fn watchdog_action(v: c_int) -> WatchdogAction {
    match v as u32 {
        sys::VIR_DOMAIN_EVENT_WATCHDOG_NONE => WatchdogAction::None,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_PAUSE => WatchdogAction::Pause,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_RESET => WatchdogAction::Reset,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_POWEROFF => WatchdogAction::Poweroff,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_SHUTDOWN => WatchdogAction::Shutdown,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_DEBUG => WatchdogAction::Debug,
        sys::VIR_DOMAIN_EVENT_WATCHDOG_INJECTNMI => WatchdogAction::InjectNmi,
        _ => WatchdogAction::Other(v),
    }
}

/// libvirt's I/O error action number in our words.
fn io_error_action(v: c_int) -> IoErrorAction {
    match v as u32 {
        sys::VIR_DOMAIN_EVENT_IO_ERROR_NONE => IoErrorAction::None,
        sys::VIR_DOMAIN_EVENT_IO_ERROR_PAUSE => IoErrorAction::Pause,
        sys::VIR_DOMAIN_EVENT_IO_ERROR_REPORT => IoErrorAction::Report,
        _ => IoErrorAction::Other(v),
    }
}

/// libvirt's agent lifecycle reason number in our words.
fn agent_reason(v: c_int) -> AgentReason {
    match v as u32 {
        sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_DOMAIN_STARTED => AgentReason::DomainStarted,
        sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_CHANNEL => AgentReason::Channel,
        _ => AgentReason::Unknown,
    }
}

/// Copy a C string libvirt owns (null: empty).
///
/// # Safety
/// `p` is null or a valid NUL-terminated string for the duration of the call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the contract above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Send `kind` for `dom` through the sender behind `opaque`, never unwinding into C.
///
/// # Safety
/// `dom` is the callback's valid domain and `opaque` the `Box<Sender>` registered with it.
unsafe fn forward(dom: sys::virDomainPtr, opaque: *mut c_void, kind: impl FnOnce() -> GuestEventKind) {
    let received = Instant::now();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: libvirt passes a valid domain for the duration of the callback.
        let name = unsafe { sys::virDomainGetName(dom) };
        if name.is_null() {
            return;
        }
        // SAFETY: as above; the name is copied.
        let domain = unsafe { owned(name) };
        // SAFETY: opaque is the Box<Sender> we registered; it lives until free_sender runs.
        let tx = unsafe { &*(opaque as *const Sender) };
        let _ = tx.send(HypervisorEvent::Guest(GuestEvent { domain, kind: kind(), received }));
    }));
}

unsafe extern "C" fn reboot_cb(_conn: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: called by libvirt with its callback contract.
    unsafe { forward(dom, opaque, || GuestEventKind::Reboot) }
}

unsafe extern "C" fn control_error_cb(_conn: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: called by libvirt with its callback contract.
    unsafe { forward(dom, opaque, || GuestEventKind::ControlError) }
}

unsafe extern "C" fn watchdog_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    action: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with its callback contract.
    unsafe { forward(dom, opaque, || GuestEventKind::Watchdog { action: watchdog_action(action) }) }
}

unsafe extern "C" fn io_error_reason_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    src_path: *const c_char,
    dev_alias: *const c_char,
    action: c_int,
    reason: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with its callback contract; its strings are valid for the
    // callback's duration and copied.
    unsafe {
        forward(dom, opaque, || GuestEventKind::IoError {
            device: owned(dev_alias),
            path: owned(src_path),
            action: io_error_action(action),
            reason: owned(reason),
        })
    }
}

unsafe extern "C" fn agent_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    reason: c_int,
    opaque: *mut c_void,
) {
    let connected = state as u32 == sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED;
    // SAFETY: called by libvirt with its callback contract.
    unsafe { forward(dom, opaque, || GuestEventKind::Agent { connected, reason: agent_reason(reason) }) }
}

type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// The guest-event callbacks, each cast to the generic type libvirt's register call takes.
fn callbacks() -> [(&'static str, u32, Generic); 5] {
    // SAFETY: each callback has the signature libvirt documents for its event ID; libvirt
    // documents casting them to the generic callback type for virConnectDomainEventRegisterAny.
    unsafe {
        type Watchdog = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *mut c_void);
        type IoReason = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            *const c_char,
            *const c_char,
            c_int,
            *const c_char,
            *mut c_void,
        );
        type Agent = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);
        [
            ("reboot", sys::VIR_DOMAIN_EVENT_ID_REBOOT, reboot_cb as Generic),
            ("watchdog", sys::VIR_DOMAIN_EVENT_ID_WATCHDOG, std::mem::transmute::<Watchdog, Generic>(watchdog_cb)),
            (
                "I/O error",
                sys::VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
                std::mem::transmute::<IoReason, Generic>(io_error_reason_cb),
            ),
            ("control error", sys::VIR_DOMAIN_EVENT_ID_CONTROL_ERROR, control_error_cb as Generic),
            (
                "agent lifecycle",
                sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                std::mem::transmute::<Agent, Generic>(agent_cb),
            ),
        ]
    }
}

/// Register every guest-event callback on `conn`, each with its own copy of `tx`. Returns the
/// callback IDs to deregister; on an error the ones registered so far are deregistered.
pub(super) fn register(conn: sys::virConnectPtr, tx: &Sender) -> Result<Vec<c_int>, SubscribeError> {
    let mut ids = Vec::new();
    for (what, event_id, cb) in callbacks() {
        let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
        // SAFETY: valid connection, callback and opaque; free_sender releases opaque.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn,
                std::ptr::null_mut(),
                event_id as c_int,
                Some(cb),
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            let source = virt::error::Error::last_error();
            // SAFETY: registration failed, so libvirt did not take ownership of opaque.
            unsafe { free_sender(opaque) };
            deregister(conn, &ids);
            return Err(SubscribeError { what, source });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Deregister what [`register`] registered.
pub(super) fn deregister(conn: sys::virConnectPtr, ids: &[c_int]) {
    for id in ids {
        // SAFETY: an ID libvirt gave us on this still-open connection.
        unsafe { sys::virConnectDomainEventDeregisterAny(conn, *id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::events::FaultClass;

    #[test]
    fn words_and_labels() {
        let wd = GuestEventKind::Watchdog { action: watchdog_action(2) };
        assert_eq!(wd.text(), "watchdog fired (action: reset)");
        assert_eq!(wd.label(), "watchdog");
        assert_eq!(wd.class(), FaultClass::Fault);
        assert_eq!(watchdog_action(99).word(), "action-99");
        let agent = GuestEventKind::Agent { connected: true, reason: agent_reason(2) };
        assert_eq!(agent.text(), "guest agent connected (channel)");
        assert_eq!(agent.label(), "agent-connected");
        assert_eq!(agent.class(), FaultClass::Evidence);
        assert_eq!(GuestEventKind::Reboot.class(), FaultClass::Evidence);
        assert_eq!(GuestEventKind::ControlError.label(), "control-error");
    }
}
