//! libvirt domain lifecycle events and connection-close notices, forwarded into tokio.
//! virt 0.5 has no safe wrapper, so this is the one place with FFI callbacks: libvirt's default
//! event loop runs on its own thread and the callbacks only copy data into a channel.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::Once;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use virt::sys;

use super::LibvirtHost;

mod guest;
pub use crate::hypervisor::events::{
    AgentReason, FaultClass, GuestEvent, GuestEventKind, HypervisorEvent, IoErrorAction, LifecycleEvent, LifecycleKind,
    WatchdogAction,
};

/// libvirt's lifecycle event type in our words.
fn lifecycle_kind(event: i32) -> LifecycleKind {
    match event as u32 {
        sys::VIR_DOMAIN_EVENT_DEFINED => LifecycleKind::Defined,
        sys::VIR_DOMAIN_EVENT_UNDEFINED => LifecycleKind::Undefined,
        sys::VIR_DOMAIN_EVENT_STARTED => LifecycleKind::Started,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => LifecycleKind::Suspended,
        sys::VIR_DOMAIN_EVENT_RESUMED => LifecycleKind::Resumed,
        sys::VIR_DOMAIN_EVENT_STOPPED => LifecycleKind::Stopped,
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => LifecycleKind::Shutdown,
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => LifecycleKind::PmSuspended,
        sys::VIR_DOMAIN_EVENT_CRASHED => LifecycleKind::Crashed,
        _ => LifecycleKind::Other(event),
    }
}

/// A libvirt lifecycle callback's numbers as the engine's event.
pub fn lifecycle_event(domain: String, event: i32, detail: i32, received: Instant) -> LifecycleEvent {
    let text = event_text(event, detail);
    let detail = text.split_once('/').map(|(_, d)| d.to_string()).unwrap_or_default();
    LifecycleEvent { domain, kind: lifecycle_kind(event), detail, received }
}

/// Lifecycle event and detail in words.
pub fn event_text(event: i32, detail: i32) -> String {
    let (name, details): (&str, &[&str]) = match event as u32 {
        sys::VIR_DOMAIN_EVENT_DEFINED => ("defined", &["added", "updated", "renamed", "from-snapshot"]),
        sys::VIR_DOMAIN_EVENT_UNDEFINED => ("undefined", &["removed", "renamed"]),
        sys::VIR_DOMAIN_EVENT_STARTED => {
            ("started", &["booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated"])
        }
        sys::VIR_DOMAIN_EVENT_SUSPENDED => (
            "suspended",
            &[
                "paused",
                "migrated",
                "io-error",
                "watchdog",
                "restored",
                "from-snapshot",
                "api-error",
                "postcopy",
                "postcopy-failed",
            ],
        ),
        sys::VIR_DOMAIN_EVENT_RESUMED => {
            ("resumed", &["unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"])
        }
        sys::VIR_DOMAIN_EVENT_STOPPED => {
            ("stopped", &["shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot"])
        }
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => ("shutdown", &["finished", "guest", "host"]),
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => ("pmsuspended", &["memory", "disk"]),
        sys::VIR_DOMAIN_EVENT_CRASHED => ("crashed", &["panicked", "crashloaded"]),
        _ => return format!("event-{event}/{detail}"),
    };
    match usize::try_from(detail).ok().and_then(|d| details.get(d)) {
        Some(d) => format!("{name}/{d}"),
        None => format!("{name}/{detail}"),
    }
}

static EVENT_LOOP: Once = Once::new();

/// Install libvirt's default event loop and run it on a dedicated thread. Must run before the
/// first connection is opened; later calls do nothing.
pub fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!(%e, "cannot install libvirt's event loop; events will not arrive (resync still runs)");
            return;
        }
        let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| loop {
            if let Err(e) = virt::event::event_run_default_impl() {
                tracing::warn!(%e, "libvirt event loop iteration failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        if let Err(e) = spawned {
            tracing::error!(%e, "cannot start the libvirt event thread");
        }
    });
}

/// Registered callbacks on one connection; deregistered on drop.
pub struct EventSubscription {
    conn: sys::virConnectPtr,
    lifecycle_id: c_int,
    guest_ids: Vec<c_int>,
    close_registered: bool,
}

// SAFETY: libvirt connection pointers may be used from any thread; we only use it to deregister.
unsafe impl Send for EventSubscription {}
unsafe impl Sync for EventSubscription {}

type Sender = UnboundedSender<HypervisorEvent>;

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let received = Instant::now();
    // Never unwind into C.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: libvirt passes a valid domain for the duration of the callback; the name
        // string is owned by it and copied here, so no reference is kept.
        let name = unsafe {
            let ptr = sys::virDomainGetName(dom);
            if ptr.is_null() {
                return;
            }
            CStr::from_ptr(ptr).to_string_lossy().into_owned()
        };
        // SAFETY: opaque is the Box<Sender> we registered; it lives until free_sender runs.
        let tx = unsafe { &*(opaque as *const Sender) };
        let _ = tx.send(HypervisorEvent::Lifecycle(lifecycle_event(name, event, detail, received)));
    });
    0
}

unsafe extern "C" fn close_cb(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        let reason = match reason as u32 {
            sys::VIR_CONNECT_CLOSE_REASON_ERROR => "error",
            sys::VIR_CONNECT_CLOSE_REASON_EOF => "end of file",
            sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "keepalive timeout",
            sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by client",
            _ => "unknown",
        };
        // SAFETY: as in lifecycle_cb.
        let tx = unsafe { &*(opaque as *const Sender) };
        let _ = tx.send(HypervisorEvent::ConnectionClosed { reason });
    });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: created by Box::into_raw in subscribe; libvirt calls this exactly once.
        drop(unsafe { Box::from_raw(opaque as *mut Sender) });
    }
}

/// Why subscribing failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot register libvirt {what} callback: {source}")]
pub struct SubscribeError {
    what: &'static str,
    source: virt::error::Error,
}

/// Forward lifecycle events and connection-close notices of `host` into `tx`.
/// [`start_event_loop`] must have run before `host` was opened.
pub fn subscribe(host: &LibvirtHost, tx: Sender) -> Result<EventSubscription, SubscribeError> {
    // SAFETY: the connection pointer is valid while `host` lives; callers keep the subscription
    // no longer than the host (the engine drops it first).
    let conn = unsafe { host.connection().as_ptr() };
    // SAFETY: a lifecycle callback has this extra-argument signature; libvirt documents casting
    // it to the generic callback type for virConnectDomainEventRegisterAny.
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle_cb))
    };
    let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
    // SAFETY: valid connection, callback and opaque; free_sender releases opaque.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn,
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership of opaque.
        unsafe { free_sender(opaque) };
        return Err(SubscribeError { what: "lifecycle", source: virt::error::Error::last_error() });
    }
    // Guest events are evidence for health checks; restarts work without them.
    let guest_ids = guest::register(conn, &tx).unwrap_or_else(|e| {
        tracing::warn!(%e, "guest events (reboot, watchdog, I/O error, agent) will not arrive");
        Vec::new()
    });
    let close_opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
    // SAFETY: as above. Drivers without a remote connection (test driver) accept it too.
    let rc = unsafe { sys::virConnectRegisterCloseCallback(conn, Some(close_cb), close_opaque, Some(free_sender)) };
    let close_registered = rc >= 0;
    if !close_registered {
        // SAFETY: not registered, so still ours.
        unsafe { free_sender(close_opaque) };
        tracing::debug!("connection close callback not supported by this driver");
    }
    Ok(EventSubscription { conn, lifecycle_id: id, guest_ids, close_registered })
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        // SAFETY: deregistering what subscribe registered on a still-open connection.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn, self.lifecycle_id);
            guest::deregister(self.conn, &self.guest_ids);
            if self.close_registered {
                sys::virConnectUnregisterCloseCallback(self.conn, Some(close_cb));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_words() {
        assert_eq!(event_text(5, 5), "stopped/failed");
        assert_eq!(event_text(5, 1), "stopped/destroyed");
        assert_eq!(event_text(8, 0), "crashed/panicked");
        assert_eq!(event_text(2, 0), "started/booted");
        assert_eq!(event_text(5, 99), "stopped/99");
        assert_eq!(event_text(42, 1), "event-42/1");
        let ev = lifecycle_event("d".into(), 5, 5, Instant::now());
        assert_eq!((ev.kind, ev.text()), (LifecycleKind::Stopped, "stopped/failed".to_string()));
        assert_eq!(lifecycle_event("d".into(), 42, 1, Instant::now()).text(), "event-42/1");
        assert_eq!(lifecycle_event("d".into(), 8, 0, Instant::now()).kind, LifecycleKind::Crashed);
    }
}
