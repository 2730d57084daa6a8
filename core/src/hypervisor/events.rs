//! What the engine hears from the hypervisor, in virtwarden's own words: domain lifecycle
//! changes, guest faults and signs of life, and a lost connection. A backend (libvirt) converts
//! its callbacks into these; nothing here knows a backend's constants.

use std::time::Instant;

/// Something the hypervisor told us.
#[derive(Debug, Clone)]
pub enum HypervisorEvent {
    Lifecycle(LifecycleEvent),
    /// A guest fault or sign of life (reset, watchdog, I/O error, control error, agent).
    Guest(GuestEvent),
    /// The connection to the hypervisor closed; `reason` in the backend's words.
    ConnectionClosed {
        reason: &'static str,
    },
}

/// A domain lifecycle event.
#[derive(Debug, Clone)]
pub struct LifecycleEvent {
    pub domain: String,
    pub kind: LifecycleKind,
    /// The backend's word for the detail (`failed`, `panicked`, `booted`, …; a number when it
    /// has none).
    pub detail: String,
    /// When the backend's callback ran (for event-lag metrics).
    pub received: Instant,
}

/// What happened to the domain (libvirt's lifecycle event types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    /// A kind this build does not know, by the backend's number.
    Other(i32),
}

impl LifecycleKind {
    /// The word in status and logs (`stopped` in `stopped/failed`).
    pub fn word(self) -> String {
        match self {
            LifecycleKind::Defined => "defined".into(),
            LifecycleKind::Undefined => "undefined".into(),
            LifecycleKind::Started => "started".into(),
            LifecycleKind::Suspended => "suspended".into(),
            LifecycleKind::Resumed => "resumed".into(),
            LifecycleKind::Stopped => "stopped".into(),
            LifecycleKind::Shutdown => "shutdown".into(),
            LifecycleKind::PmSuspended => "pmsuspended".into(),
            LifecycleKind::Crashed => "crashed".into(),
            LifecycleKind::Other(n) => format!("event-{n}"),
        }
    }
}

impl LifecycleEvent {
    /// `stopped/failed`, `crashed/panicked`, … for status and logs.
    pub fn text(&self) -> String {
        format!("{}/{}", self.kind.word(), self.detail)
    }

    /// The domain went down (stopped or crashed), not a suspend or a definition change.
    pub fn is_down(&self) -> bool {
        matches!(self.kind, LifecycleKind::Stopped | LifecycleKind::Crashed)
    }

    /// The guest crashed (a guest panic reported through a pvpanic device, or QEMU crashed).
    pub fn is_crash(&self) -> bool {
        self.kind == LifecycleKind::Crashed
    }

    /// QEMU started (a new boot), whoever started it.
    pub fn is_started(&self) -> bool {
        self.kind == LifecycleKind::Started
    }
}

/// A guest event for one domain.
#[derive(Debug, Clone)]
pub struct GuestEvent {
    pub domain: String,
    pub kind: GuestEventKind,
    /// When the callback ran.
    pub received: Instant,
}

/// What libvirt reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEventKind {
    /// The guest was reset (REBOOT): its own reboot, a watchdog reset, firmware retrying a boot,
    /// or a reset through libvirt. Not sent for the start itself.
    Reboot,
    /// The guest's watchdog device fired; libvirt/QEMU then took `action`.
    Watchdog { action: WatchdogAction },
    /// A disk I/O error (IO_ERROR_REASON). `reason` is QEMU's word: `enospc`, `eio`, `eperm`, …
    IoError { device: String, path: String, action: IoErrorAction, reason: String },
    /// libvirt lost control of QEMU's monitor (CONTROL_ERROR); the domain's state is unknown.
    ControlError,
    /// The guest agent connected or disconnected (AGENT_LIFECYCLE).
    Agent { connected: bool, reason: AgentReason },
}

/// What a watchdog firing led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogAction {
    None,
    Pause,
    Reset,
    Poweroff,
    Shutdown,
    Debug,
    InjectNmi,
    Other(i32),
}

/// What QEMU did about an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorAction {
    /// Nothing: the error was ignored.
    None,
    /// The guest was paused.
    Pause,
    /// The error was passed to the guest.
    Report,
    Other(i32),
}

/// Why the agent's state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentReason {
    Unknown,
    /// The domain started with the channel already there.
    DomainStarted,
    /// The guest opened or closed the channel.
    Channel,
}

/// What an event means for healing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// A sign of life or a reset: evidence for health checks, no repair by itself.
    Evidence,
    /// The guest is in trouble: look at it now.
    Fault,
    /// A host problem a guest reset cannot fix (a full disk): report it, do not reset.
    HostProblem,
}

impl GuestEventKind {
    /// A bounded name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            GuestEventKind::Reboot => "reboot",
            GuestEventKind::Watchdog { .. } => "watchdog",
            GuestEventKind::IoError { .. } => "io-error",
            GuestEventKind::ControlError => "control-error",
            GuestEventKind::Agent { connected: true, .. } => "agent-connected",
            GuestEventKind::Agent { connected: false, .. } => "agent-disconnected",
        }
    }

    pub fn class(&self) -> FaultClass {
        match self {
            GuestEventKind::Reboot | GuestEventKind::Agent { .. } => FaultClass::Evidence,
            GuestEventKind::Watchdog { .. } | GuestEventKind::ControlError => FaultClass::Fault,
            GuestEventKind::IoError { reason, .. } if reason == "enospc" => FaultClass::HostProblem,
            GuestEventKind::IoError { .. } => FaultClass::Fault,
        }
    }

    /// For status reasons and logs: `watchdog fired (action: reset)`.
    pub fn text(&self) -> String {
        match self {
            GuestEventKind::Reboot => "guest reset".into(),
            GuestEventKind::Watchdog { action } => format!("watchdog fired (action: {})", action.word()),
            GuestEventKind::IoError { device, path, action, reason } => {
                let what = if reason == "enospc" { "no space left on the host for" } else { "I/O error on" };
                let place = if path.is_empty() { device.clone() } else { format!("{device} ({path})") };
                let outcome = match action {
                    IoErrorAction::Pause => "guest paused",
                    IoErrorAction::Report => "reported to the guest",
                    IoErrorAction::None => "ignored",
                    IoErrorAction::Other(_) => "unknown action",
                };
                format!("{what} {place}: {reason}, {outcome}")
            }
            GuestEventKind::ControlError => "libvirt lost control of QEMU (control error)".into(),
            GuestEventKind::Agent { connected, reason } => format!(
                "guest agent {}{}",
                if *connected { "connected" } else { "disconnected" },
                match reason {
                    AgentReason::DomainStarted => " (domain started)",
                    AgentReason::Channel => " (channel)",
                    AgentReason::Unknown => "",
                }
            ),
        }
    }
}

impl WatchdogAction {
    /// libvirt's `<watchdog action=…>` words.
    pub fn word(&self) -> String {
        match self {
            WatchdogAction::None => "none".into(),
            WatchdogAction::Pause => "pause".into(),
            WatchdogAction::Reset => "reset".into(),
            WatchdogAction::Poweroff => "poweroff".into(),
            WatchdogAction::Shutdown => "shutdown".into(),
            WatchdogAction::Debug => "dump".into(),
            WatchdogAction::InjectNmi => "inject-nmi".into(),
            WatchdogAction::Other(v) => format!("action-{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(reason: &str, action: IoErrorAction) -> GuestEventKind {
        GuestEventKind::IoError {
            device: "virtio-disk0".into(),
            path: "/var/lib/x.qcow2".into(),
            action,
            reason: reason.into(),
        }
    }

    #[test]
    fn enospc_is_a_host_problem_not_a_reason_to_reset() {
        assert_eq!(io("enospc", IoErrorAction::Pause).class(), FaultClass::HostProblem);
        assert_eq!(io("eio", IoErrorAction::Pause).class(), FaultClass::Fault);
        assert_eq!(
            io("enospc", IoErrorAction::Pause).text(),
            "no space left on the host for virtio-disk0 (/var/lib/x.qcow2): enospc, guest paused"
        );
        assert_eq!(
            io("eio", IoErrorAction::Report).text(),
            "I/O error on virtio-disk0 (/var/lib/x.qcow2): eio, reported to the guest"
        );
    }

    #[test]
    fn lifecycle_words() {
        let ev = |kind, detail: &str| LifecycleEvent {
            domain: "d".into(),
            kind,
            detail: detail.into(),
            received: Instant::now(),
        };
        assert_eq!(ev(LifecycleKind::Stopped, "failed").text(), "stopped/failed");
        assert_eq!(ev(LifecycleKind::Other(42), "1").text(), "event-42/1");
        assert!(ev(LifecycleKind::Crashed, "panicked").is_down() && ev(LifecycleKind::Crashed, "panicked").is_crash());
        assert!(!ev(LifecycleKind::Suspended, "paused").is_down());
        assert!(ev(LifecycleKind::Started, "booted").is_started());
    }
}
