//! Guest health as a pure state machine: when to probe a guest, and what probe results, guest
//! resets, agent events and pauses mean. Time is passed in ([`Tick`]), so tests assert exact
//! schedules; the engine runs the probes and acts on the verdicts.
//!
//! After every start or reset the guest has `bootTimeout` to pass its probe. Failures before that
//! first pass never make it "unhealthy", and no pass by the deadline is "boot failed" with the
//! evidence gathered (firmware message, repeated guest resets, an agent that never connected).
//! Once healthy, `failureThreshold` consecutive failures make it "unhealthy".

use std::fmt;
use std::mem::discriminant;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use virtwarden_policies::Health;

pub use super::restart::Tick;
use crate::observe::console::{firmware_boot_failure, FirmwareFailure};

/// Probe times are rounded up to this, so that many guests' probes share a wake-up of the host
/// (1,000 guests at a 10 s period: 10 wake-ups a second instead of 100).
pub const WAKE_QUANTUM: Duration = Duration::from_millis(100);

/// When a driver should wake for something due at `at`: the next multiple of [`WAKE_QUANTUM`]
/// (never earlier than `at`, at most one quantum later).
pub fn wake_at(at: Tick) -> Tick {
    let q = WAKE_QUANTUM.as_nanos();
    let rounded = at.as_nanos().div_ceil(q) * q;
    Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

/// A domain's health settings with the policy's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub boot_timeout: Duration,
}

impl HealthSettings {
    pub fn from_policy(h: &Health) -> Self {
        HealthSettings {
            period: h.period().as_std(),
            timeout: h.timeout().as_std(),
            failure_threshold: h.failure_threshold().max(1),
            boot_timeout: h.boot_timeout().as_std(),
        }
    }
}

/// Why a running guest is not probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Suspension {
    /// Paused by libvirt for an operation (migration, snapshot, save, dump) or by an admin;
    /// `reason` in `virsh domstate --reason` words.
    Paused { reason: String },
    /// A shutdown is in progress.
    ShuttingDown,
    /// Automatic repairs stopped; probing would only repeat a verdict nobody acts on.
    Quarantined,
    /// libvirt is not connected: probes that need it would fail for reasons that say nothing
    /// about the guest, and nothing could act on a verdict anyway.
    Disconnected,
}

impl fmt::Display for Suspension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suspension::Paused { reason } => write!(f, "paused ({reason})"),
            Suspension::ShuttingDown => f.write_str("shutting down"),
            Suspension::Quarantined => f.write_str("quarantined"),
            Suspension::Disconnected => f.write_str("libvirt disconnected"),
        }
    }
}

/// Why one probe failed. `kind()` is a bounded label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    /// The guest's address could not be found; the text says where we looked.
    #[error("no address: {0}")]
    NoAddress(String),
    #[error("no answer within {}", virtwarden_policies::Duration(*.0))]
    Timeout(Duration),
    #[error("connection refused")]
    Refused,
    /// Any other network error, in the OS's words.
    #[error("{0}")]
    Network(String),
    /// The HTTP answer's status is neither 2xx nor 3xx.
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    /// The peer did not speak HTTP properly.
    #[error("HTTP: {0}")]
    Http(String),
    /// libvirt's error for the agent command (agent not connected, not configured, …).
    #[error("guest agent: {0}")]
    Agent(String),
    /// Someone else claims the address too (another MAC on the domain's bridge, the host,
    /// another domain): not probed, or the result is void. No evidence either way.
    #[error("address conflict: {0}")]
    Conflict(String),
    /// Only addresses that cannot be the domain's were offered (the guest agent reporting
    /// loopback, an address outside its network, …): not probed. No evidence either way.
    #[error("no trusted address: {0}")]
    Untrusted(String),
    /// This build cannot run the probe (an `http` probe on an engine started without an HTTP
    /// client): not probed. No evidence either way.
    #[error("not probed: {0}")]
    Unsupported(String),
}

impl ProbeFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeFailure::NoAddress(_) => "no-address",
            ProbeFailure::Timeout(_) => "timeout",
            ProbeFailure::Refused => "refused",
            ProbeFailure::Network(_) => "network",
            ProbeFailure::HttpStatus(_) => "http-status",
            ProbeFailure::Http(_) => "http",
            ProbeFailure::Agent(_) => "agent",
            ProbeFailure::Conflict(_) => "address-conflict",
            ProbeFailure::Untrusted(_) => "untrusted-address",
            ProbeFailure::Unsupported(_) => "unsupported",
        }
    }

    /// Whether this says anything about the guest. A probe that could not be aimed at the
    /// domain's own address is no evidence: it neither passes nor counts as a failure.
    pub fn is_evidence(&self) -> bool {
        !matches!(self, ProbeFailure::Conflict(_) | ProbeFailure::Untrusted(_) | ProbeFailure::Unsupported(_))
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// What was probed: `http://10.0.0.2:80/healthz`, `tcp 10.0.0.2:22`, `guest agent`.
    pub target: String,
    /// The address probed, when there was one.
    pub address: Option<IpAddr>,
    pub latency: Duration,
    pub outcome: Result<(), ProbeFailure>,
}

impl ProbeResult {
    /// `http://10.0.0.2:80/healthz: connection refused`, or `… ok`.
    pub fn describe(&self) -> String {
        match &self.outcome {
            Ok(()) => format!("{}: ok", self.target),
            Err(e) => format!("{}: {e}", self.target),
        }
    }
}

/// A probe the machine asked for; hand it back with the result. Results of probes started
/// before a start, reset or suspension are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTicket {
    epoch: u64,
    pub started: Tick,
}

/// What the engine should do next for this domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start a probe now (bounded by the timeout) and report it with [`HealthMonitor::probe_done`].
    Probe(ProbeTicket),
    /// Nothing to do before this time (unless an input arrives).
    WaitUntil(Tick),
    /// Nothing to do until an input arrives: down, suspended, or a probe in flight.
    Idle,
    /// Act on this (reported once, at the transition).
    Verdict(Verdict),
}

/// A judgement the engine acts on through the remediation ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    BootFailed(BootFailure),
    /// Healthy before, then `failureThreshold` consecutive failures; `what` is the last one.
    Unhealthy {
        what: String,
        failures: u32,
    },
}

impl Verdict {
    /// For status, logs and the failure reason: `boot failed: SeaBIOS: No bootable device`,
    /// `unhealthy (probe: tcp 10.0.0.2:22: connection refused)`.
    pub fn text(&self) -> String {
        match self {
            Verdict::BootFailed(b) => b.text(),
            Verdict::Unhealthy { what, .. } => format!("unhealthy (probe: {what})"),
        }
    }

    /// A bounded name for metrics: `boot-failed`, `unhealthy`.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::BootFailed(_) => "boot-failed",
            Verdict::Unhealthy { .. } => "unhealthy",
        }
    }
}

/// What the guest agent did since the last start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentEvidence {
    /// The domain has no agent channel (or libvirt never said anything about one).
    NoChannel,
    NeverConnected,
    Connected,
}

/// Why a guest is judged not to have booted, with everything that points at the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFailure {
    pub boot_timeout: Duration,
    /// What the serial console shows the firmware saying, if it said it has nothing to boot.
    pub firmware: Option<FirmwareFailure>,
    /// Guest resets (libvirt REBOOT events) since the start, not counting our own reset.
    pub guest_resets: u32,
    pub agent: AgentEvidence,
    /// The last probe failure seen while booting.
    pub last_probe: Option<String>,
}

/// This many guest resets without passing a probe is a boot loop.
const REPEATED_RESETS: u32 = 2;

impl BootFailure {
    /// The headline: the most telling piece of evidence.
    pub fn summary(&self) -> String {
        if let Some(f) = &self.firmware {
            return f.summary.clone();
        }
        if self.guest_resets >= REPEATED_RESETS {
            return format!("the guest reset {} times without coming up", self.guest_resets);
        }
        if self.agent == AgentEvidence::NeverConnected {
            return "the guest agent never connected".into();
        }
        format!("no probe passed within {}", virtwarden_policies::Duration(self.boot_timeout))
    }

    /// Every piece of evidence, each a short phrase.
    pub fn evidence(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = &self.firmware {
            out.push(crate::guest_text::console_excerpt(&f.line));
        }
        if self.guest_resets > 0 {
            out.push(format!("{} guest reset(s) since the start", self.guest_resets));
        }
        match self.agent {
            AgentEvidence::NeverConnected => out.push("guest agent never connected".into()),
            AgentEvidence::Connected => out.push("guest agent connected".into()),
            AgentEvidence::NoChannel => {}
        }
        if let Some(p) = &self.last_probe {
            out.push(format!("last probe: {p}"));
        }
        out
    }

    /// `boot failed: SeaBIOS: No bootable device (guest console: "No bootable device."; last probe: …)`.
    pub fn text(&self) -> String {
        let evidence = self.evidence();
        if evidence.is_empty() {
            format!("boot failed: {}", self.summary())
        } else {
            format!("boot failed: {} ({})", self.summary(), evidence.join("; "))
        }
    }
}

/// The last probe, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRecord {
    pub at: Tick,
    pub ok: bool,
    /// [`ProbeResult::describe`].
    pub detail: String,
    pub latency: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
}

/// Where the guest stands, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum HealthState {
    /// Not running: nothing to probe.
    Down,
    Booting {
        since: Tick,
        deadline: Tick,
    },
    Healthy {
        since: Tick,
    },
    Unhealthy {
        since: Tick,
        what: String,
    },
    BootFailed {
        since: Tick,
        text: String,
    },
    /// Probing stopped; `then` is the state it stopped in.
    Suspended {
        since: Tick,
        why: String,
        then: Box<HealthState>,
    },
}

/// A status view of one guest's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthView {
    pub state: HealthState,
    pub consecutive_failures: u32,
    pub last_probe: Option<ProbeRecord>,
    /// When the next probe is due (absent while none is scheduled).
    pub next_probe: Option<Tick>,
    /// The guest agent's last known connection state (absent: never reported).
    pub agent_connected: Option<bool>,
    /// The address conflict the last probe met (absent once a probe reaches the domain again).
    pub address_conflict: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Down,
    Booting { since: Tick, deadline: Tick },
    Healthy { since: Tick },
    Unhealthy { since: Tick, what: String },
    BootFailed { since: Tick, failure: BootFailure },
}

/// What happened since the last start: the boot-failure evidence the machine itself sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BootLog {
    guest_resets: u32,
    /// Our own reset makes libvirt send one REBOOT event, which is not the guest's doing.
    own_reset_pending: bool,
    agent_connected: bool,
    last_failure: Option<String>,
    /// The last probe was no evidence (address conflict or untrusted address): the boot
    /// deadline does not judge on it.
    inconclusive: bool,
}

/// One guest's health, driven by inputs with explicit times.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    settings: HealthSettings,
    phase: Phase,
    /// Active suspensions (at most one of each kind) and since when the guest has been suspended.
    suspensions: Vec<Suspension>,
    suspended_since: Option<Tick>,
    /// Bumped whenever a probe in flight stops meaning anything (start, reset, stop, suspend).
    epoch: u64,
    in_flight: Option<ProbeTicket>,
    next_probe: Tick,
    consecutive_failures: u32,
    last: Option<ProbeRecord>,
    boot: BootLog,
    agent_channel: bool,
    agent_connected: Option<bool>,
    address_conflict: Option<String>,
}

impl HealthMonitor {
    /// A monitor for a domain that is not (known to be) running yet.
    pub fn new(settings: HealthSettings) -> Self {
        HealthMonitor {
            settings,
            phase: Phase::Down,
            suspensions: Vec::new(),
            suspended_since: None,
            epoch: 0,
            in_flight: None,
            next_probe: Tick::ZERO,
            consecutive_failures: 0,
            last: None,
            boot: BootLog::default(),
            agent_channel: false,
            agent_connected: None,
            address_conflict: None,
        }
    }

    pub fn settings(&self) -> HealthSettings {
        self.settings
    }

    /// The policy changed. A boot in progress keeps its start but gets the new `bootTimeout`.
    pub fn set_settings(&mut self, settings: HealthSettings) {
        if let Phase::Booting { since, deadline } = &mut self.phase {
            *deadline = *since + settings.boot_timeout;
        }
        if self.in_flight.is_none() {
            let base = self.next_probe.saturating_sub(self.settings.period);
            self.next_probe = base + settings.period;
        }
        self.settings = settings;
    }

    /// The domain has a guest-agent channel (from its definition): an agent that never
    /// connects is then evidence of a failed boot.
    pub fn set_agent_channel(&mut self, present: bool) {
        self.agent_channel = present;
    }

    /// QEMU started (or was found running when the engine started): a new boot deadline.
    pub fn started(&mut self, now: Tick) {
        self.new_boot(now, false);
        // A fresh QEMU is neither paused nor shutting down; a quarantine outlives a start.
        self.suspensions.retain(|s| *s == Suspension::Quarantined);
        self.suspended_since = if self.suspensions.is_empty() { None } else { Some(now) };
    }

    /// virtwarden reset the guest: a new boot deadline. libvirt reports our reset as a REBOOT
    /// event, which [`guest_rebooted`](Self::guest_rebooted) then does not count.
    pub fn reset(&mut self, now: Tick) {
        self.new_boot(now, true);
        if !self.suspensions.is_empty() {
            self.suspended_since = Some(now);
        }
    }

    fn new_boot(&mut self, now: Tick, own_reset: bool) {
        self.phase = Phase::Booting { since: now, deadline: now + self.settings.boot_timeout };
        self.boot = BootLog { own_reset_pending: own_reset, ..BootLog::default() };
        self.agent_connected = None;
        self.consecutive_failures = 0;
        self.forget_in_flight();
        self.next_probe = now + self.settings.period;
    }

    /// libvirt reported a guest reset (REBOOT event). During a boot it is evidence and does not
    /// move the deadline (a reset loop must not hide a boot failure); afterwards it starts a
    /// new boot. True when it started a new boot (a pending judgement is then void).
    pub fn guest_rebooted(&mut self, now: Tick) -> bool {
        if std::mem::take(&mut self.boot.own_reset_pending) {
            return false;
        }
        match self.phase {
            Phase::Down => false,
            Phase::Booting { .. } => {
                self.boot.guest_resets += 1;
                false
            }
            Phase::Healthy { .. } | Phase::Unhealthy { .. } | Phase::BootFailed { .. } => {
                self.new_boot(now, false);
                self.boot.guest_resets = 1;
                true
            }
        }
    }

    /// libvirt reported the guest agent connecting or disconnecting.
    pub fn agent_changed(&mut self, connected: bool) {
        self.agent_channel = true;
        self.agent_connected = Some(connected);
        if connected {
            self.boot.agent_connected = true;
        }
    }

    /// QEMU is gone (shut off, crashed): nothing to probe until it starts again.
    pub fn stopped(&mut self) {
        self.phase = Phase::Down;
        self.address_conflict = None;
        self.boot = BootLog::default();
        self.agent_connected = None;
        self.consecutive_failures = 0;
        self.forget_in_flight();
        self.suspensions.retain(|s| *s == Suspension::Quarantined);
        self.suspended_since = None;
    }

    /// Stop probing for `why` until it is [`lift`](Self::lift)ed. A probe in flight no longer counts.
    pub fn suspend(&mut self, now: Tick, why: Suspension) {
        self.suspensions.retain(|s| discriminant(s) != discriminant(&why));
        self.suspensions.push(why);
        if self.suspended_since.is_none() && self.phase != Phase::Down {
            self.suspended_since = Some(now);
        }
        self.forget_in_flight();
    }

    /// `why`'s kind no longer holds. When nothing else suspends the guest, probing resumes one
    /// period later; a boot deadline moves by the time spent suspended, and failures seen
    /// before the suspension are forgotten (the guest's clock jumped).
    ///
    /// A guest judged unhealthy or not booted before the suspension is judged afresh: it gets a
    /// new `bootTimeout` window to pass (an operator may have fixed it in place during a
    /// quarantine; libvirt may have been away). True when such a judgement was set aside.
    pub fn lift(&mut self, now: Tick, why: &Suspension) -> bool {
        let before = self.suspensions.len();
        self.suspensions.retain(|s| discriminant(s) != discriminant(why));
        if self.suspensions.is_empty() && before > 0 {
            if let Some(since) = self.suspended_since.take() {
                if let Phase::Booting { deadline, .. } = &mut self.phase {
                    *deadline += now.saturating_sub(since);
                }
            }
            self.consecutive_failures = 0;
            self.next_probe = now + self.settings.period;
            if matches!(self.phase, Phase::Unhealthy { .. } | Phase::BootFailed { .. }) {
                self.phase = Phase::Booting { since: now, deadline: now + self.settings.boot_timeout };
                self.boot.last_failure = None;
                return true;
            }
        }
        false
    }

    /// libvirt reported a fault (a watchdog firing, an I/O error, lost control of QEMU): probe
    /// now rather than at the next period, so the verdict rests on a fresh result.
    pub fn probe_soon(&mut self, now: Tick) {
        if self.in_flight.is_none() && self.next_probe > now {
            self.next_probe = now;
        }
    }

    pub fn is_suspended(&self) -> bool {
        !self.suspensions.is_empty()
    }

    /// The probe in flight, if any.
    pub fn in_flight(&self) -> Option<ProbeTicket> {
        self.in_flight
    }

    /// What is probed changed (another port, kind or address): the probe in flight no longer
    /// counts; the next one is due as scheduled.
    pub fn probe_changed(&mut self) {
        self.forget_in_flight();
    }

    fn forget_in_flight(&mut self) {
        self.epoch += 1;
        self.in_flight = None;
    }

    /// While booting and not waiting on a probe in flight: `Some(true)` when the boot deadline
    /// has passed, `Some(false)` when the console should be looked at early, `None` otherwise.
    fn console_due(&self, now: Tick) -> Option<bool> {
        if self.phase == Phase::Down || !self.suspensions.is_empty() || self.in_flight.is_some() {
            return None;
        }
        let Phase::Booting { deadline, .. } = self.phase else { return None };
        // A probe due by the deadline still runs (and decides) even if we woke late. While the
        // probes are no evidence (an address conflict), the deadline judges nothing: report,
        // do not reset on what cannot be known.
        let deadline_passed = now >= deadline && self.next_probe > deadline && !self.boot.inconclusive;
        // Before the deadline, a guest that already failed a probe has its console looked at
        // once a period: firmware that says it has nothing to boot has halted for good, and
        // waiting out bootTimeout would only delay the repair.
        let look_early = now >= self.next_probe && self.boot.last_failure.is_some();
        (deadline_passed || look_early).then_some(deadline_passed)
    }

    /// Whether [`poll`](Self::poll) at `now` will ask for the console's text (so a driver reads
    /// the file only then, and off its async runtime).
    pub fn may_read_console(&self, now: Tick) -> bool {
        self.console_due(now).is_some()
    }

    /// What to do at `now`. `console_tail` is asked for the serial console's last text only when
    /// a boot deadline passes or a failing boot is looked at early (it may read a file; the
    /// machine itself does no I/O).
    pub fn poll(&mut self, now: Tick, console_tail: impl FnOnce() -> Option<String>) -> Step {
        if self.phase == Phase::Down || !self.suspensions.is_empty() {
            return Step::Idle;
        }
        if self.in_flight.is_some() {
            // A probe in flight at the deadline may still pass: its result decides.
            return Step::Idle;
        }
        if let Some(deadline_passed) = self.console_due(now) {
            let firmware = console_tail().and_then(|t| firmware_boot_failure(&t));
            let halted = firmware.as_ref().is_some_and(FirmwareFailure::is_final);
            if deadline_passed || halted {
                let failure = BootFailure {
                    boot_timeout: self.settings.boot_timeout,
                    firmware,
                    guest_resets: self.boot.guest_resets,
                    agent: match (self.agent_channel, self.boot.agent_connected) {
                        (_, true) => AgentEvidence::Connected,
                        (true, false) => AgentEvidence::NeverConnected,
                        (false, false) => AgentEvidence::NoChannel,
                    },
                    last_probe: self.boot.last_failure.clone(),
                };
                self.phase = Phase::BootFailed { since: now, failure: failure.clone() };
                return Step::Verdict(Verdict::BootFailed(failure));
            }
        }
        if now >= self.next_probe {
            let ticket = ProbeTicket { epoch: self.epoch, started: now };
            self.in_flight = Some(ticket);
            return Step::Probe(ticket);
        }
        match self.phase {
            // A deadline already passed (its probes were no evidence) no longer wakes anyone.
            Phase::Booting { deadline, .. } if deadline > now => Step::WaitUntil(self.next_probe.min(deadline)),
            _ => Step::WaitUntil(self.next_probe),
        }
    }

    /// A probe asked for by `ticket` finished at `now`. Returns the verdict when this result
    /// makes a healthy guest unhealthy (once, at the transition).
    pub fn probe_done(&mut self, now: Tick, ticket: ProbeTicket, result: &ProbeResult) -> Option<Verdict> {
        if self.in_flight != Some(ticket) || ticket.epoch != self.epoch {
            return None;
        }
        self.in_flight = None;
        // Keep the cadence of probe starts; a late result makes the next probe due at once.
        self.next_probe = ticket.started + self.settings.period;
        self.last = Some(ProbeRecord {
            at: now,
            ok: result.outcome.is_ok(),
            detail: result.describe(),
            latency: result.latency,
            address: result.address,
        });
        if let Some(e) = result.outcome.as_ref().err().filter(|e| !e.is_evidence()) {
            // Neither a pass nor a failure: the phase and the failure count stay as they are.
            self.boot.inconclusive = true;
            self.address_conflict = match e {
                ProbeFailure::Conflict(c) => Some(c.clone()),
                _ => None,
            };
            return None;
        }
        self.boot.inconclusive = false;
        self.address_conflict = None;
        match &result.outcome {
            Ok(()) => {
                self.consecutive_failures = 0;
                if !matches!(self.phase, Phase::Healthy { .. }) {
                    self.phase = Phase::Healthy { since: now };
                }
                None
            }
            Err(_) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                match &self.phase {
                    Phase::Booting { .. } => {
                        self.boot.last_failure = Some(result.describe());
                        None
                    }
                    Phase::Healthy { .. } if self.consecutive_failures >= self.settings.failure_threshold => {
                        let what = result.describe();
                        self.phase = Phase::Unhealthy { since: now, what: what.clone() };
                        Some(Verdict::Unhealthy { what, failures: self.consecutive_failures })
                    }
                    _ => None,
                }
            }
        }
    }

    /// The guest passed a probe since its last start (startup ordering waits for this).
    pub fn is_healthy(&self) -> bool {
        matches!(self.phase, Phase::Healthy { .. }) && self.suspensions.is_empty()
    }

    pub fn view(&self) -> HealthView {
        let state = match &self.phase {
            Phase::Down => HealthState::Down,
            Phase::Booting { since, deadline } => HealthState::Booting { since: *since, deadline: *deadline },
            Phase::Healthy { since } => HealthState::Healthy { since: *since },
            Phase::Unhealthy { since, what } => HealthState::Unhealthy { since: *since, what: what.clone() },
            Phase::BootFailed { since, failure } => HealthState::BootFailed { since: *since, text: failure.text() },
        };
        let state = match (self.suspended_since, self.suspensions.last()) {
            (Some(since), Some(_)) if state != HealthState::Down => {
                let why: Vec<String> = self.suspensions.iter().map(ToString::to_string).collect();
                HealthState::Suspended { since, why: why.join(", "), then: Box::new(state) }
            }
            _ => state,
        };
        let scheduled = self.phase != Phase::Down && self.suspensions.is_empty() && self.in_flight.is_none();
        HealthView {
            state,
            consecutive_failures: self.consecutive_failures,
            last_probe: self.last.clone(),
            next_probe: scheduled.then_some(self.next_probe),
            agent_connected: self.agent_connected,
            address_conflict: self.address_conflict.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Tick {
        Duration::from_secs(secs)
    }

    /// period 10s, timeout 2s, threshold 3, bootTimeout 60s.
    fn monitor() -> HealthMonitor {
        HealthMonitor::new(HealthSettings { period: s(10), timeout: s(2), failure_threshold: 3, boot_timeout: s(60) })
    }

    fn ok() -> ProbeResult {
        ProbeResult {
            target: "tcp 10.0.0.2:22".into(),
            address: Some("10.0.0.2".parse().unwrap()),
            latency: Duration::from_millis(3),
            outcome: Ok(()),
        }
    }

    fn refused() -> ProbeResult {
        ProbeResult { outcome: Err(ProbeFailure::Refused), ..ok() }
    }

    fn no_console() -> Option<String> {
        None
    }

    /// Poll at `now`; when a probe is due, finish it at once with `result`. Returns what poll
    /// said (the ticket's step) and any verdict the result produced.
    fn tick(m: &mut HealthMonitor, now: Tick, result: &ProbeResult) -> (Step, Option<Verdict>) {
        let step = m.poll(now, no_console);
        let verdict = match &step {
            Step::Probe(t) => m.probe_done(now, *t, result),
            _ => None,
        };
        (step, verdict)
    }

    fn probes_at(m: &mut HealthMonitor, from: u64, to: u64, result: &ProbeResult) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        let mut now = s(from);
        while now <= s(to) {
            match m.poll(now, no_console) {
                Step::Probe(t) => verdicts.extend(m.probe_done(now, t, result)),
                Step::Verdict(v) => verdicts.push(v),
                Step::WaitUntil(at) => now = at,
                Step::Idle => break,
            }
        }
        verdicts
    }

    #[test]
    fn not_running_is_never_probed() {
        let mut m = monitor();
        assert_eq!(m.poll(s(0), no_console), Step::Idle);
        assert_eq!(m.poll(s(1000), no_console), Step::Idle);
        assert_eq!(m.view().state, HealthState::Down);
        assert_eq!(m.view().next_probe, None);
    }

    #[test]
    fn first_probe_one_period_after_the_start_then_every_period() {
        let mut m = monitor();
        m.started(s(100));
        assert_eq!(m.view().state, HealthState::Booting { since: s(100), deadline: s(160) });
        assert_eq!(m.poll(s(100), no_console), Step::WaitUntil(s(110)));
        assert_eq!(m.poll(s(109), no_console), Step::WaitUntil(s(110)));
        let Step::Probe(t) = m.poll(s(110), no_console) else { panic!("probe due at 110") };
        assert_eq!(m.poll(s(111), no_console), Step::Idle, "one probe in flight at a time");
        assert_eq!(m.probe_done(s(111), t, &ok()), None);
        assert_eq!(m.view().state, HealthState::Healthy { since: s(111) });
        assert_eq!(m.poll(s(111), no_console), Step::WaitUntil(s(120)), "cadence follows probe starts");
    }

    #[test]
    fn no_pass_before_the_boot_deadline_is_boot_failed_with_the_last_probe_as_evidence() {
        let mut m = monitor();
        m.started(s(0));
        let verdicts = probes_at(&mut m, 0, 100, &refused());
        let [Verdict::BootFailed(b)] = verdicts.as_slice() else { panic!("{verdicts:?}") };
        assert_eq!(b.last_probe.as_deref(), Some("tcp 10.0.0.2:22: connection refused"));
        assert_eq!(b.agent, AgentEvidence::NoChannel);
        assert_eq!(b.summary(), "no probe passed within 1m");
        assert_eq!(
            b.text(),
            "boot failed: no probe passed within 1m (last probe: tcp 10.0.0.2:22: connection refused)"
        );
        let HealthState::BootFailed { since, .. } = m.view().state else { panic!("{:?}", m.view()) };
        assert_eq!(since, s(60), "judged exactly at the deadline");
    }

    #[test]
    fn a_reported_fault_brings_the_next_probe_forward_but_not_a_second_one_in_flight() {
        let mut m = monitor();
        m.started(s(0));
        assert!(matches!(tick(&mut m, s(10), &ok()), (Step::Probe(_), None)));
        assert_eq!(m.poll(s(12), no_console), Step::WaitUntil(s(20)));
        m.probe_soon(s(12));
        let Step::Probe(t) = m.poll(s(12), no_console) else { panic!("probe due at once") };
        m.probe_soon(s(13));
        assert_eq!(m.poll(s(13), no_console), Step::Idle, "still one probe in flight");
        assert_eq!(m.probe_done(s(13), t, &refused()), None);
        assert_eq!(m.poll(s(13), no_console), Step::WaitUntil(s(22)), "cadence from the early probe");
    }

    #[test]
    fn firmware_that_halted_is_boot_failed_at_once_without_waiting_for_the_deadline() {
        let mut m = monitor();
        m.started(s(0));
        let halted = || {
            Some(
                "SeaBIOS (version 1.16)\r\nBoot failed: could not read the boot disk\r\n\r\nNo bootable device.\r\n"
                    .to_string(),
            )
        };
        let not_yet = || Some("SeaBIOS (version 1.16)\r\n".to_string());
        // No probe has failed yet: the console is not read.
        let Step::Probe(t) = m.poll(s(10), || panic!("read before any failure")) else { panic!("probe due") };
        assert_eq!(m.probe_done(s(10), t, &refused()), None);
        // Next period: the firmware is still busy, probing goes on.
        assert!(matches!(m.poll(s(20), not_yet), Step::Probe(_)));
        m = {
            let mut m2 = monitor();
            m2.started(s(0));
            let Step::Probe(t) = m2.poll(s(10), no_console) else { panic!() };
            m2.probe_done(s(10), t, &refused());
            m2
        };
        let Step::Verdict(Verdict::BootFailed(b)) = m.poll(s(20), halted) else { panic!("judged at 20, not at 60") };
        assert_eq!(b.summary(), "SeaBIOS: No bootable device");
        assert!(matches!(m.view().state, HealthState::BootFailed { since, .. } if since == s(20)));
        // A firmware that failed one device but may try another is not judged early.
        let mut m = monitor();
        m.started(s(0));
        let Step::Probe(t) = m.poll(s(10), no_console) else { panic!() };
        m.probe_done(s(10), t, &refused());
        let one_device = || Some("Boot failed: could not read the boot disk\r\n".to_string());
        assert!(matches!(m.poll(s(20), one_device), Step::Probe(_)));
    }

    #[test]
    fn the_deadline_wakes_the_engine_even_between_probes() {
        let mut m = HealthMonitor::new(HealthSettings {
            period: s(40),
            timeout: s(2),
            failure_threshold: 3,
            boot_timeout: s(60),
        });
        m.started(s(0));
        assert!(matches!(tick(&mut m, s(40), &refused()), (Step::Probe(_), None)));
        assert_eq!(m.poll(s(40), no_console), Step::WaitUntil(s(60)), "deadline before the next probe at 80");
        assert!(matches!(m.poll(s(60), no_console), Step::Verdict(Verdict::BootFailed(_))));
    }

    #[test]
    fn failures_before_the_first_pass_never_count_as_unhealthy() {
        let mut m = monitor();
        m.started(s(0));
        assert!(probes_at(&mut m, 0, 40, &refused()).is_empty(), "4 failures while booting: no verdict");
        assert_eq!(m.view().consecutive_failures, 4);
        assert!(probes_at(&mut m, 50, 50, &ok()).is_empty());
        assert_eq!(m.view().state, HealthState::Healthy { since: s(50) });
        assert_eq!(m.view().consecutive_failures, 0);
        // Two failures after the pass stay below the threshold of three.
        assert!(probes_at(&mut m, 60, 70, &refused()).is_empty());
        assert!(m.is_healthy());
    }

    #[test]
    fn threshold_consecutive_failures_after_healthy_is_unhealthy_once() {
        let mut m = monitor();
        m.started(s(0));
        assert!(probes_at(&mut m, 0, 10, &ok()).is_empty());
        let verdicts = probes_at(&mut m, 20, 100, &refused());
        assert_eq!(
            verdicts,
            [Verdict::Unhealthy { what: "tcp 10.0.0.2:22: connection refused".into(), failures: 3 }],
            "reported once, at the third failure (20, 30, 40), not again at 50…100"
        );
        assert_eq!(
            m.view().state,
            HealthState::Unhealthy { since: s(40), what: "tcp 10.0.0.2:22: connection refused".into() }
        );
        assert_eq!(verdicts[0].text(), "unhealthy (probe: tcp 10.0.0.2:22: connection refused)");
        // The guest recovers on its own: healthy again, and a new streak is needed.
        assert!(probes_at(&mut m, 110, 110, &ok()).is_empty());
        assert_eq!(m.view().state, HealthState::Healthy { since: s(110) });
    }

    #[test]
    fn a_pass_in_between_restarts_the_count() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        assert!(probes_at(&mut m, 20, 30, &refused()).is_empty());
        assert!(probes_at(&mut m, 40, 40, &ok()).is_empty());
        assert!(probes_at(&mut m, 50, 60, &refused()).is_empty());
        assert_eq!(probes_at(&mut m, 70, 70, &refused()).len(), 1);
    }

    #[test]
    fn our_reset_sets_a_new_boot_deadline_and_its_reboot_event_is_not_the_guests() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        assert_eq!(probes_at(&mut m, 20, 40, &refused()).len(), 1);
        m.reset(s(41));
        m.guest_rebooted(s(41)); // libvirt's REBOOT for our own reset
        assert_eq!(m.view().state, HealthState::Booting { since: s(41), deadline: s(101) });
        assert_eq!(m.view().consecutive_failures, 0);
        let verdicts = probes_at(&mut m, 41, 200, &refused());
        let [Verdict::BootFailed(b)] = verdicts.as_slice() else { panic!("{verdicts:?}") };
        assert_eq!(b.guest_resets, 0, "our reset is not evidence");
    }

    #[test]
    fn guest_resets_while_booting_do_not_move_the_deadline_and_are_evidence() {
        let mut m = monitor();
        m.started(s(0));
        for t in [5, 20, 35] {
            m.guest_rebooted(s(t));
        }
        assert_eq!(m.view().state, HealthState::Booting { since: s(0), deadline: s(60) });
        let verdicts = probes_at(&mut m, 0, 100, &refused());
        let [Verdict::BootFailed(b)] = verdicts.as_slice() else { panic!("{verdicts:?}") };
        assert_eq!(b.guest_resets, 3);
        assert_eq!(b.summary(), "the guest reset 3 times without coming up");
    }

    #[test]
    fn a_guest_reboot_after_it_was_healthy_starts_a_new_boot() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        m.guest_rebooted(s(15));
        assert_eq!(m.view().state, HealthState::Booting { since: s(15), deadline: s(75) });
        assert_eq!(m.poll(s(15), no_console), Step::WaitUntil(s(25)));
    }

    #[test]
    fn firmware_message_on_the_console_is_the_headline() {
        let mut m = monitor();
        m.started(s(0));
        let console =
            || Some("SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\nNo bootable device.\r\n".to_string());
        let mut now = s(0);
        let failure = loop {
            match m.poll(now, console) {
                Step::Probe(t) => {
                    m.probe_done(now, t, &refused());
                }
                Step::WaitUntil(at) => now = at,
                Step::Verdict(Verdict::BootFailed(b)) => break b,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(failure.summary(), "SeaBIOS: No bootable device");
        assert!(failure
            .text()
            .starts_with("boot failed: SeaBIOS: No bootable device (guest console: \"No bootable device.\""));
    }

    #[test]
    fn the_console_is_read_at_most_once_a_period_while_failing_to_boot_and_at_the_deadline() {
        let mut m = monitor();
        m.started(s(0));
        let mut reads = 0;
        for t in [0, 5, 10, 15, 20, 25, 30, 59] {
            if let Step::Probe(ticket) = m.poll(s(t), || {
                reads += 1;
                None
            }) {
                m.probe_done(s(t), ticket, &refused());
            }
        }
        // Probes at 10, 20, 30 and (late) 59; the console is read before each one after a
        // failure (20, 30, 59), never between probes.
        assert_eq!(reads, 3);
        // A guest that passes is never read again.
        let mut m = monitor();
        m.started(s(0));
        let mut reads = 0;
        for t in [10, 20, 30, 40] {
            if let Step::Probe(ticket) = m.poll(s(t), || {
                reads += 1;
                None
            }) {
                m.probe_done(s(t), ticket, &ok());
            }
        }
        assert_eq!(reads, 0);
    }

    #[test]
    fn an_agent_that_never_connected_is_evidence_and_one_that_did_is_noted() {
        let mut m = monitor();
        m.set_agent_channel(true);
        m.started(s(0));
        let v = probes_at(&mut m, 0, 100, &refused());
        let [Verdict::BootFailed(b)] = v.as_slice() else { panic!("{v:?}") };
        assert_eq!(b.agent, AgentEvidence::NeverConnected);
        assert_eq!(b.summary(), "the guest agent never connected");

        let mut m = monitor();
        m.started(s(0));
        m.agent_changed(true);
        m.agent_changed(false);
        let v = probes_at(&mut m, 0, 100, &refused());
        let [Verdict::BootFailed(b)] = v.as_slice() else { panic!("{v:?}") };
        assert_eq!(b.agent, AgentEvidence::Connected);
        assert!(b.evidence().contains(&"guest agent connected".to_string()));
        assert_eq!(m.view().agent_connected, Some(false));
    }

    #[test]
    fn a_probe_in_flight_at_the_deadline_decides() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 0, 50, &refused());
        let Step::Probe(t) = m.poll(s(60), no_console) else { panic!("the probe due at the deadline runs") };
        assert_eq!(m.poll(s(60), no_console), Step::Idle, "no verdict while it runs");
        assert_eq!(m.probe_done(s(61), t, &ok()), None);
        assert_eq!(m.view().state, HealthState::Healthy { since: s(61) });
        assert_eq!(m.poll(s(61), no_console), Step::WaitUntil(s(70)));
    }

    #[test]
    fn a_late_result_makes_the_next_probe_due_at_once() {
        let mut m = monitor();
        m.started(s(0));
        let Step::Probe(t) = m.poll(s(10), no_console) else { panic!() };
        m.probe_done(s(25), t, &ok());
        assert!(matches!(m.poll(s(25), no_console), Step::Probe(_)));
    }

    #[test]
    fn a_pause_suspends_probing_and_moves_the_boot_deadline() {
        let mut m = monitor();
        m.started(s(0));
        let Step::Probe(stale) = m.poll(s(10), no_console) else { panic!() };
        let migrating = Suspension::Paused { reason: "migrating".into() };
        m.suspend(s(11), migrating.clone());
        assert_eq!(m.poll(s(12), no_console), Step::Idle);
        assert_eq!(m.poll(s(500), no_console), Step::Idle, "no verdict while paused, deadline or not");
        assert_eq!(m.probe_done(s(12), stale, &ok()), None);
        assert!(matches!(m.view().state, HealthState::Booting { .. } | HealthState::Suspended { .. }));
        let HealthState::Suspended { why, then, .. } = m.view().state else { panic!() };
        assert_eq!(why, "paused (migrating)");
        assert!(matches!(*then, HealthState::Booting { .. }), "the stale pass did not count");
        m.lift(s(511), &Suspension::Paused { reason: "user".into() });
        // Paused 500 s: the 60 s boot budget had 49 s left.
        assert_eq!(m.view().state, HealthState::Booting { since: s(0), deadline: s(560) });
        assert_eq!(m.poll(s(511), no_console), Step::WaitUntil(s(521)));
    }

    #[test]
    fn failures_before_a_pause_are_forgotten() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        probes_at(&mut m, 20, 30, &refused());
        m.suspend(s(31), Suspension::Paused { reason: "creating snapshot".into() });
        m.lift(s(40), &Suspension::Paused { reason: "creating snapshot".into() });
        assert_eq!(m.view().consecutive_failures, 0);
        assert!(probes_at(&mut m, 50, 60, &refused()).is_empty(), "two new failures are below three");
    }

    #[test]
    fn overlapping_suspensions_all_have_to_lift() {
        let mut m = monitor();
        m.started(s(0));
        m.suspend(s(1), Suspension::Quarantined);
        m.suspend(s(2), Suspension::ShuttingDown);
        m.lift(s(3), &Suspension::ShuttingDown);
        assert_eq!(m.poll(s(100), no_console), Step::Idle, "still quarantined");
        m.lift(s(100), &Suspension::Quarantined);
        assert_eq!(m.poll(s(100), no_console), Step::WaitUntil(s(110)));
    }

    #[test]
    fn a_verdict_is_set_aside_when_probing_resumes_and_judged_afresh() {
        // Unhealthy, then quarantined (or libvirt away): once probing resumes the guest gets a
        // new bootTimeout window instead of being healed on old evidence.
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        let v = probes_at(&mut m, 20, 40, &refused());
        assert!(matches!(v.as_slice(), [Verdict::Unhealthy { .. }]), "{v:?}");
        m.suspend(s(41), Suspension::Disconnected);
        assert_eq!(m.poll(s(50), no_console), Step::Idle, "no probes while libvirt is away");
        assert!(m.lift(s(70), &Suspension::Disconnected), "the verdict is set aside");
        assert_eq!(m.view().state, HealthState::Booting { since: s(70), deadline: s(130) });
        assert!(probes_at(&mut m, 70, 120, &refused()).is_empty(), "failures in the window are no verdict yet");
        let v = probes_at(&mut m, 120, 140, &refused());
        assert!(matches!(v.as_slice(), [Verdict::BootFailed(_)]), "judged again at the new deadline: {v:?}");
        // Lifting with nothing judged sets nothing aside.
        let mut m = monitor();
        m.started(s(0));
        m.suspend(s(5), Suspension::Quarantined);
        assert!(!m.lift(s(9), &Suspension::Quarantined));
    }

    #[test]
    fn a_guest_reset_after_the_boot_starts_a_new_boot_and_says_so() {
        let mut m = monitor();
        m.started(s(0));
        assert!(!m.guest_rebooted(s(5)), "during the boot it is evidence only");
        probes_at(&mut m, 10, 10, &ok());
        assert!(m.guest_rebooted(s(15)), "after it: a new boot");
        assert_eq!(m.view().state, HealthState::Booting { since: s(15), deadline: s(75) });
    }

    #[test]
    fn quarantine_outlives_a_stop_and_a_start() {
        let mut m = monitor();
        m.started(s(0));
        m.suspend(s(5), Suspension::Quarantined);
        m.stopped();
        m.started(s(50));
        assert_eq!(m.poll(s(200), no_console), Step::Idle);
        m.lift(s(200), &Suspension::Quarantined);
        // The boot clock counts from the lift: the 150 s spent quarantined are not held against it.
        assert_eq!(m.view().state, HealthState::Booting { since: s(50), deadline: s(260) });
    }

    #[test]
    fn shutdown_suspends_and_a_stop_ends_it() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        m.suspend(s(12), Suspension::ShuttingDown);
        assert_eq!(m.poll(s(20), no_console), Step::Idle);
        m.stopped();
        assert_eq!(m.view().state, HealthState::Down);
        m.started(s(30));
        assert_eq!(m.poll(s(30), no_console), Step::WaitUntil(s(40)), "a new QEMU is not shutting down");
    }

    #[test]
    fn results_of_probes_started_before_a_stop_or_start_are_ignored() {
        let mut m = monitor();
        m.started(s(0));
        let Step::Probe(t) = m.poll(s(10), no_console) else { panic!() };
        m.stopped();
        assert_eq!(m.probe_done(s(11), t, &ok()), None);
        assert_eq!(m.view().state, HealthState::Down);
        assert_eq!(m.view().last_probe, None);
        m.started(s(20));
        assert_eq!(m.probe_done(s(21), t, &ok()), None);
        assert!(matches!(m.view().state, HealthState::Booting { .. }));
    }

    #[test]
    fn boot_failed_guest_that_comes_up_late_is_healthy() {
        let mut m = monitor();
        m.started(s(0));
        assert_eq!(probes_at(&mut m, 0, 60, &refused()).len(), 1);
        assert!(probes_at(&mut m, 70, 70, &ok()).is_empty());
        assert_eq!(m.view().state, HealthState::Healthy { since: s(70) });
    }

    #[test]
    fn the_view_carries_the_last_probe() {
        let mut m = monitor();
        m.started(s(0));
        probes_at(&mut m, 10, 10, &ok());
        let v = m.view();
        let last = v.last_probe.unwrap();
        assert!(last.ok);
        assert_eq!(last.detail, "tcp 10.0.0.2:22: ok");
        assert_eq!(last.latency, Duration::from_millis(3));
        assert_eq!(v.next_probe, Some(s(20)));
    }

    #[test]
    fn new_settings_apply_to_the_boot_in_progress() {
        let mut m = monitor();
        m.started(s(0));
        m.set_settings(HealthSettings { period: s(5), timeout: s(1), failure_threshold: 1, boot_timeout: s(30) });
        assert_eq!(m.view().state, HealthState::Booting { since: s(0), deadline: s(30) });
        assert_eq!(m.poll(s(0), no_console), Step::WaitUntil(s(5)));
    }

    #[test]
    fn wake_ups_are_rounded_up_to_the_quantum() {
        assert_eq!(wake_at(Duration::ZERO), Duration::ZERO);
        assert_eq!(wake_at(Duration::from_millis(1)), Duration::from_millis(100));
        assert_eq!(wake_at(Duration::from_millis(100)), Duration::from_millis(100));
        assert_eq!(wake_at(Duration::from_millis(10_001)), Duration::from_millis(10_100));
    }

    fn conflict() -> ProbeResult {
        ProbeResult {
            outcome: Err(ProbeFailure::Conflict("10.0.0.2 is answered by 02:00:00:00:00:66 on br0".into())),
            ..ok()
        }
    }

    #[test]
    fn an_address_conflict_is_no_evidence_healthy_stays_healthy_and_is_never_judged_unhealthy() {
        let mut m = monitor();
        m.started(s(0));
        assert_eq!(tick(&mut m, s(10), &ok()).1, None);
        assert!(m.is_healthy());
        // Far more conflicted probes than the threshold: still healthy, no verdict, no failures.
        assert_eq!(probes_at(&mut m, 20, 300, &conflict()), Vec::<Verdict>::new());
        assert!(m.is_healthy());
        let v = m.view();
        assert_eq!(v.consecutive_failures, 0);
        assert_eq!(v.address_conflict.as_deref(), Some("10.0.0.2 is answered by 02:00:00:00:00:66 on br0"));
        assert!(matches!(v.state, HealthState::Healthy { .. }));
        // A real result again clears the conflict; real failures count from there.
        assert_eq!(tick(&mut m, s(310), &refused()).1, None);
        assert_eq!(m.view().address_conflict, None);
        assert_eq!(m.view().consecutive_failures, 1);
    }

    #[test]
    fn a_boot_whose_probes_are_no_evidence_is_not_judged_at_its_deadline() {
        let mut m = monitor();
        m.started(s(0));
        let untrusted = ProbeResult { outcome: Err(ProbeFailure::Untrusted("loopback".into())), ..ok() };
        assert_eq!(probes_at(&mut m, 0, 300, &untrusted), Vec::<Verdict>::new());
        assert!(matches!(m.view().state, HealthState::Booting { .. }));
        // The first real failure after the deadline judges it.
        let v = probes_at(&mut m, 310, 330, &refused());
        assert!(matches!(v.as_slice(), [Verdict::BootFailed(_)]), "{v:?}");
    }

    #[test]
    fn failure_words() {
        assert_eq!(ProbeFailure::Timeout(Duration::from_secs(2)).to_string(), "no answer within 2s");
        assert_eq!(ProbeFailure::HttpStatus(503).to_string(), "HTTP status 503");
        assert_eq!(ProbeFailure::NoAddress("no DHCP lease".into()).kind(), "no-address");
    }
}
