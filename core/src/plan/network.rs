//! Planning the host network: bridges (existence, up, STP and timers, listed ports), VM taps back
//! on their bridge, IP forwarding. Pure: reads observed values only.

use serde::Serialize;
use virtwarden_policies::{DesiredState, Duration, ManagedBridge, UplinkChange, VerifyProbe};

use super::flap::{FlapKey, FlapKind};
use super::{Note, Severity};
use crate::observe::{
    DefaultGateway, DomainState, GuardedChange, HeldUplink, ObservedHost, ObservedNet, StpSettings, Sysctl,
};

/// A network change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum NetActionKind {
    CreateBridge,
    SetUp,
    SetStp {
        stp: StpSettings,
        /// Set on a bridge that carries an uplink (`allowUplinkChange`): a guarded change.
        #[serde(skip_serializing_if = "Option::is_none")]
        guard: Option<Box<Guard>>,
    },
    /// Make the subject (a host interface the policy lists) a port of `bridge`.
    Enslave {
        bridge: String,
        /// Set when `bridge` carries an uplink (`allowUplinkChange`): a guarded change,
        /// detached again if the host's gateways or the bridge's probes stop answering.
        #[serde(skip_serializing_if = "Option::is_none")]
        guard: Option<Box<Guard>>,
    },
    /// Put the subject, a managed domain's tap, back on `bridge`.
    AttachTap {
        bridge: String,
        domain: String,
    },
    SetForwarding {
        family: String,
        on: bool,
        /// Set while the default route goes through a managed bridge: a guarded change.
        #[serde(skip_serializing_if = "Option::is_none")]
        guard: Option<Box<Guard>>,
    },
    /// Take the subject, an uplink, over into `bridge`: MAC, MTU, addresses, routes and rules
    /// move to the bridge, then the port is enslaved; verified, rolled back on failure.
    TakeOverUplink {
        bridge: String,
        takeover: Takeover,
    },
    /// Give the subject, an uplink virtwarden took over into `bridge`, back: its addresses,
    /// routes and rules return to it and it leaves the bridge (the policy no longer lists it).
    /// Guarded: a failed verification puts it back into the bridge.
    ReleaseUplink {
        bridge: String,
        guard: Box<Guard>,
    },
    /// Set `net.ipv6.conf.<subject>.accept_ra`: 2 keeps an RA-learned default route when IPv6
    /// forwarding goes on.
    SetAcceptRa {
        value: u8,
    },
}

impl NetActionKind {
    pub fn verb(&self) -> String {
        match self {
            NetActionKind::CreateBridge => "create bridge".into(),
            NetActionKind::SetUp => "set up".into(),
            NetActionKind::SetStp { stp, guard } => {
                let mut parts = vec![format!("stp {}", if stp.enabled { "on" } else { "off" })];
                for (k, v) in
                    [("forward delay", stp.forward_delay), ("hello", stp.hello_time), ("max age", stp.max_age)]
                {
                    if let Some(v) = v {
                        parts.push(format!("{k} {v}s"));
                    }
                }
                if let Some(p) = stp.priority {
                    parts.push(format!("priority {p}"));
                }
                let set = format!("set {}", parts.join(", "));
                match guard {
                    Some(g) => format!("{set}; {}", g.describe(&self.checkpointed(), "roll back if not")),
                    None => set,
                }
            }
            NetActionKind::Enslave { bridge, guard: Some(g) } => {
                format!("attach to {bridge}; {}", g.describe_throughout(&self.checkpointed(), "detach if not"))
            }
            NetActionKind::Enslave { bridge, guard: None } | NetActionKind::AttachTap { bridge, .. } => {
                format!("attach to {bridge}")
            }
            NetActionKind::SetForwarding { family, on, guard } => {
                let set = format!("set {family} forwarding {}", if *on { "on" } else { "off" });
                match guard {
                    Some(g) if !g.keep_ra.is_empty() => format!(
                        "set accept_ra 2 on {} (keeps the RA-learned default route), then {set}; {}",
                        g.keep_ra.join(", "),
                        g.describe(&self.checkpointed(), "roll back if not")
                    ),
                    Some(g) => format!("{set}; {}", g.describe(&self.checkpointed(), "roll back if not")),
                    None => set,
                }
            }
            NetActionKind::SetAcceptRa { value } => format!("set accept_ra {value}"),
            NetActionKind::TakeOverUplink { bridge, takeover } => takeover.describe(bridge),
            NetActionKind::ReleaseUplink { bridge, guard } => format!(
                "give back: addresses, routes and rules from {bridge} back to it, then detach; {}",
                guard.describe(&self.checkpointed(), &format!("put it back into {bridge} if not"))
            ),
        }
    }

    /// What the checkpoint of a guarded change holds, in words.
    fn checkpointed(&self) -> Vec<String> {
        match self {
            NetActionKind::SetStp { .. } => vec!["the bridge's STP settings".into()],
            NetActionKind::SetForwarding { guard: Some(g), .. } => g.sysctls.iter().map(|s| s.to_string()).collect(),
            NetActionKind::ReleaseUplink { bridge, .. } => vec![format!("what {bridge} holds of it")],
            NetActionKind::Enslave { .. } => vec!["that it is in no bridge".into()],
            _ => Vec::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            NetActionKind::CreateBridge => "create-bridge",
            NetActionKind::SetUp => "set-up",
            NetActionKind::SetStp { .. } => "set-stp",
            NetActionKind::Enslave { .. } => "attach-port",
            NetActionKind::AttachTap { .. } => "attach-tap",
            NetActionKind::SetForwarding { .. } => "set-forwarding",
            NetActionKind::SetAcceptRa { .. } => "set-accept-ra",
            NetActionKind::TakeOverUplink { .. } => "take-over-uplink",
            NetActionKind::ReleaseUplink { .. } => "release-uplink",
        }
    }
}

/// What decides a guarded change other than a takeover — STP on a bridge that carries an
/// uplink, a port attached to such a bridge, forwarding while the default route goes through a
/// managed bridge, the release of a taken-over uplink — and the sysctls its checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// Default gateways that must answer ARP/NDP afresh, each on its link.
    pub gateways: Vec<DefaultGateway>,
    /// The policy's own probes.
    pub probes: Vec<VerifyProbe>,
    pub verify_timeout: Duration,
    /// The policy as planned (a held change is retried when it differs).
    pub fingerprint: String,
    /// Sysctls the checkpoint holds, written back on rollback.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sysctls: Vec<Sysctl>,
    /// Interfaces whose `accept_ra` is set to 2 before IPv6 forwarding goes on (their default
    /// route comes from router advertisements).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep_ra: Vec<String>,
}

impl Guard {
    /// The deciders in words.
    pub fn deciders(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.gateways.iter().map(|g| format!("gateway {} answers ARP/NDP on {}", g.address, g.link)).collect();
        out.extend(self.probes.iter().map(|p| p.to_string()));
        out
    }

    /// `checkpoint …; verify within 10s: …; roll back if not`.
    fn describe(&self, checkpoint: &[String], otherwise: &str) -> String {
        self.describe_as(checkpoint, "within", otherwise)
    }

    /// `checkpoint …; verify throughout 10s: …; detach if not`: they must still pass at the end.
    fn describe_throughout(&self, checkpoint: &[String], otherwise: &str) -> String {
        self.describe_as(checkpoint, "throughout", otherwise)
    }

    fn describe_as(&self, checkpoint: &[String], how: &str, otherwise: &str) -> String {
        let deciders = self.deciders();
        format!(
            "checkpoint {}; verify {how} {}: {}; {otherwise}",
            checkpoint.join(", "),
            self.verify_timeout,
            if deciders.is_empty() {
                "nothing to probe (no default gateway, no verify probes)".into()
            } else {
                deciders.join(", ")
            }
        )
    }
}

/// What a takeover moves and what decides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Takeover {
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
    pub rules: Vec<String>,
    /// Default gateways that must answer ARP/NDP on the bridge.
    pub gateways: Vec<std::net::IpAddr>,
    /// The policy's own probes.
    pub probes: Vec<VerifyProbe>,
    pub verify_timeout: Duration,
    /// The bridge policy as planned (a held change is retried when it differs).
    pub fingerprint: String,
    /// Other managers of the link, when `allowUplinkChange: force` overrode them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forced_past: Vec<String>,
}

impl Takeover {
    /// The probes that decide, in words.
    pub fn deciders(&self, bridge: &str) -> Vec<String> {
        let mut out: Vec<String> =
            self.gateways.iter().map(|g| format!("gateway {g} answers ARP/NDP on {bridge}")).collect();
        out.extend(self.probes.iter().map(|p| p.to_string()));
        out
    }

    fn describe(&self, bridge: &str) -> String {
        let moves = |what: &str, v: &[String]| {
            if v.is_empty() {
                format!("no {what}")
            } else {
                format!("{what} {} → {bridge}", v.join(", "))
            }
        };
        let mut link = Vec::new();
        if let Some(m) = &self.mac {
            link.push(format!("MAC {m}"));
        }
        if let Some(m) = self.mtu {
            link.push(format!("MTU {m}"));
        }
        let deciders = self.deciders(bridge);
        format!(
            "take over into {bridge}: {}; {}; {}; {}; then attach to {bridge}; verify within {}: {}; roll back if not{}",
            if link.is_empty() { "MAC and MTU unknown".to_string() } else { format!("{} → {bridge}", link.join(", ")) },
            moves("addresses", &self.addresses),
            moves("routes", &self.routes),
            moves("rules", &self.rules),
            self.verify_timeout,
            if deciders.is_empty() { "nothing to probe (no default gateway, no verify probes)".into() } else { deciders.join(", ") },
            if self.forced_past.is_empty() { String::new() } else { format!(" (forced past {})", self.forced_past.join(", ")) }
        )
    }
}

/// The bridge policy as text: a held takeover is tried again once it changes.
pub fn bridge_fingerprint(b: &ManagedBridge) -> String {
    serde_json::to_string(&b.spec).unwrap_or_default()
}

/// One planned network change; `subject` is a bridge, a port or `forwarding`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetAction {
    pub subject: String,
    pub policy: String,
    #[serde(flatten)]
    pub kind: NetActionKind,
    pub reason: String,
}

impl NetAction {
    pub fn line(&self) -> String {
        format!("{}: {} → {}", self.subject, self.reason, self.kind.verb())
    }

    /// The value this action repairs towards, for the flap detector: a new one (a policy edit)
    /// is no revert.
    pub fn flap_wanted(&self) -> String {
        // What decides a guarded change is not the value it repairs towards.
        match &self.kind {
            NetActionKind::SetStp { stp, .. } => format!("SetStp {{ stp: {stp:?} }}"),
            NetActionKind::SetForwarding { family, on, .. } => {
                format!("SetForwarding {{ family: {family:?}, on: {on:?} }}")
            }
            NetActionKind::ReleaseUplink { bridge, .. } => format!("ReleaseUplink {{ bridge: {bridge:?} }}"),
            NetActionKind::Enslave { bridge, .. } => format!("Enslave {{ bridge: {bridge:?} }}"),
            other => format!("{other:?}"),
        }
    }

    /// The object this action repairs, for the flap detector.
    pub fn flap_key(&self) -> FlapKey {
        let kind = match &self.kind {
            NetActionKind::CreateBridge | NetActionKind::SetUp => FlapKind::Bridge,
            NetActionKind::SetStp { .. } => FlapKind::Stp,
            NetActionKind::Enslave { .. }
            | NetActionKind::TakeOverUplink { .. }
            | NetActionKind::ReleaseUplink { .. } => FlapKind::Port,
            NetActionKind::AttachTap { .. } => FlapKind::Tap,
            NetActionKind::SetForwarding { family, .. } => return FlapKey::new(FlapKind::Forwarding, family),
            NetActionKind::SetAcceptRa { .. } => {
                return FlapKey::new(FlapKind::Forwarding, &format!("ipv6 accept_ra {}", self.subject))
            }
        };
        FlapKey::new(kind, &self.subject)
    }
}

fn stp_wanted(b: &ManagedBridge) -> Option<StpSettings> {
    b.spec.stp.as_ref().map(|s| StpSettings {
        enabled: s.enabled,
        forward_delay: s.forward_delay,
        hello_time: s.hello_time,
        max_age: s.max_age,
        priority: s.priority,
    })
}

fn stp_matches(have: &crate::observe::BridgeAttrs, want: &StpSettings) -> bool {
    have.stp == want.enabled
        && want.forward_delay.is_none_or(|v| v == have.forward_delay)
        && want.hello_time.is_none_or(|v| v == have.hello_time)
        && want.max_age.is_none_or(|v| v == have.max_age)
        && want.priority.is_none_or(|v| v == have.priority)
}

fn describe_stp(a: &crate::observe::BridgeAttrs) -> String {
    format!(
        "stp {}, forward delay {}s, hello {}s, max age {}s, priority {}",
        if a.stp { "on" } else { "off" },
        a.forward_delay,
        a.hello_time,
        a.max_age,
        a.priority
    )
}

/// A managed, running domain's tap and the bridge it belongs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedTap {
    pub tap: String,
    pub bridge: String,
    pub domain: String,
    pub policy: String,
    /// The guest NIC's MAC from the domain's live definition.
    pub guest_mac: Option<String>,
    /// `<virtualport type>`: the port belongs to another kind of switch (Open vSwitch, …).
    pub virtualport: Option<String>,
}

/// Taps of managed, running domains and the bridge each belongs on.
pub fn wanted_taps(desired: &DesiredState, host: &ObservedHost) -> Vec<WantedTap> {
    let mut out = Vec::new();
    for m in &desired.domains {
        let Some(d) = host.domain(&m.spec.name) else {
            continue;
        };
        if !matches!(d.state, DomainState::Running | DomainState::Blocked | DomainState::Paused) {
            continue;
        }
        for iface in &d.interfaces {
            if let (Some(tap), Some(bridge)) = (iface.target.clone(), host.bridge_of(iface)) {
                // A libvirt network's bridge is libvirt's to manage: its taps are ours to put
                // back only where a policy names that bridge.
                if iface.kind == "network" && desired.bridge(&bridge).is_none() {
                    continue;
                }
                out.push(WantedTap {
                    tap,
                    bridge,
                    domain: d.name.clone(),
                    policy: m.policy.clone(),
                    guest_mac: iface.mac.clone(),
                    virtualport: iface.virtualport.clone(),
                });
            }
        }
    }
    out
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The MAC libvirt gives the tap of a guest NIC with `guest_mac`: the same address with the
/// first octet set to 0xFE (0xFA when the guest's already starts with 0xFE), so the bridge never
/// adopts the tap's address (virNetDevTapCreateInBridgePort). Lower-case; `None` if `guest_mac`
/// is not a MAC.
pub fn libvirt_tap_mac(guest_mac: &str) -> Option<String> {
    let mut mac = parse_mac(guest_mac)?;
    mac[0] = if mac[0] == 0xfe { 0xfa } else { 0xfe };
    Some(mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
}

/// Whether `tap_mac` is the MAC libvirt gives the tap of a guest NIC with `guest_mac`
/// (case-insensitive).
pub fn tap_mac_matches(tap_mac: &str, guest_mac: &str) -> bool {
    match (parse_mac(tap_mac), libvirt_tap_mac(guest_mac).as_deref().and_then(parse_mac)) {
        (Some(tap), Some(want)) => tap == want,
        _ => false,
    }
}

/// The uplink that makes port or STP changes on bridge `b` risky — the bridge itself, one of
/// its ports, or a port it lists carries a default route or holds a global address — unless its
/// policy says `allowUplinkChange: true`.
fn uplink_guard(b: &ManagedBridge, net: &ObservedNet) -> Option<String> {
    if b.spec.allow_uplink_change.allowed() {
        return None;
    }
    net.bridge_uplink(&b.spec.name)
        .or_else(|| b.spec.ports.iter().find_map(|p| net.uplink_reason(p).map(|why| format!("{p} {why}"))))
}

fn held_for_uplink(reason: &str, uplink: &str) -> String {
    format!("{reason} → held back: {uplink} (set allowUplinkChange: true to allow)")
}

/// Plan bridges, taps and forwarding. Needs `host.net`; without it there is nothing to plan.
pub fn plan_network(desired: &DesiredState, host: &ObservedHost) -> (Vec<NetAction>, Vec<Note>) {
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let Some(net) = host.net.as_ref() else {
        return (actions, notes);
    };
    let taps = wanted_taps(desired, host);
    let note = |notes: &mut Vec<Note>, subject: &str, severity, message: String| {
        notes.push(Note { subject: subject.to_string(), severity, message })
    };
    for b in &desired.bridges {
        let name = b.spec.name.as_str();
        let act =
            |kind, reason: String| NetAction { subject: name.to_string(), policy: b.policy.clone(), kind, reason };
        let link = net.link(name);
        match link {
            None => {
                actions.push(act(NetActionKind::CreateBridge, "missing, policy wants it".into()));
                // A new bridge has no ports yet: its STP cannot cut anything off.
                if let Some(stp) = stp_wanted(b) {
                    actions.push(act(NetActionKind::SetStp { stp, guard: None }, "new bridge".into()));
                }
            }
            Some(l) if l.kind.as_deref() != Some("bridge") => {
                note(
                    &mut notes,
                    name,
                    Severity::Warning,
                    format!(
                        "exists but is a {} interface, not a bridge → not touched",
                        l.kind.as_deref().unwrap_or("plain")
                    ),
                );
                continue;
            }
            Some(l) => {
                if !l.up {
                    actions.push(act(NetActionKind::SetUp, "down, policy wants it up".into()));
                }
                if let (Some(want), Some(have)) = (stp_wanted(b), l.bridge.as_ref()) {
                    if !stp_matches(have, &want) {
                        let kind = NetActionKind::SetStp { stp: want, guard: None };
                        match uplink_guard(b, net) {
                            // STP on (or new timers) stops forwarding on every port for up to
                            // twice the forward delay: the host's uplink included.
                            Some(uplink) => note(
                                &mut notes,
                                name,
                                Severity::Warning,
                                held_for_uplink(
                                    &format!(
                                        "{}, policy wants {}",
                                        describe_stp(have),
                                        kind.verb().trim_start_matches("set ")
                                    ),
                                    &uplink,
                                ),
                            ),
                            None => match stp_guard(b, net) {
                                None => actions.push(act(kind, describe_stp(have))),
                                Some(guard) => match held(net, GuardedChange::Stp, name, "", &guard.fingerprint) {
                                    Some(h) => note(
                                        &mut notes,
                                        name,
                                        Severity::Warning,
                                        held_after_rollback(
                                            &format!(
                                                "{}, policy wants {}",
                                                describe_stp(have),
                                                kind.verb().trim_start_matches("set ")
                                            ),
                                            h,
                                            "rolled back",
                                            name,
                                        ),
                                    ),
                                    None => actions.push(act(
                                        NetActionKind::SetStp { stp: want, guard: Some(Box::new(guard)) },
                                        describe_stp(have),
                                    )),
                                },
                            },
                        }
                    }
                }
            }
        }
        plan_ports(b, net, &taps, &mut actions, &mut notes);
    }
    plan_releases(desired, net, &mut actions, &mut notes);
    plan_taps(desired, net, &taps, &mut actions, &mut notes);
    for (family, want, have) in [
        ("ipv4", desired.ipv4_forwarding.as_ref(), net.forwarding.ipv4),
        ("ipv6", desired.ipv6_forwarding.as_ref(), net.forwarding.ipv6),
    ] {
        let (Some(want), Some(have)) = (want, have) else {
            continue;
        };
        let reason = format!("{family} forwarding {}, policy wants {}", on_off(have), on_off(want.enabled));
        let guard = (want.enabled != have).then(|| forwarding_guard(desired, net, family, want.enabled)).flatten();
        if let Some(g) = &guard {
            if let Some(h) = held(net, GuardedChange::Forwarding, "forwarding", family, &g.fingerprint) {
                notes.push(Note {
                    subject: "forwarding".into(),
                    severity: Severity::Warning,
                    message: held_after_rollback(&reason, h, "rolled back", "forwarding"),
                });
                continue;
            }
        }
        let mut keep_ra = Vec::new();
        if family == "ipv6" && want.enabled {
            match keep_ra_default_routes(net, &mut notes) {
                None => continue,
                // Guarded: setting them is part of the change (its checkpoint holds them).
                Some(names) if guard.is_some() => keep_ra = names,
                Some(names) => actions.extend(names.into_iter().map(|n| set_accept_ra_2(n, &want.policy))),
            }
        }
        if want.enabled != have {
            let guard = guard.map(|mut g| {
                g.keep_ra = keep_ra;
                Box::new(g)
            });
            actions.push(NetAction {
                subject: "forwarding".into(),
                policy: want.policy.clone(),
                kind: NetActionKind::SetForwarding { family: family.into(), on: want.enabled, guard },
                reason,
            });
        }
    }
    (actions, notes)
}

fn set_accept_ra_2(iface: String, policy: &str) -> NetAction {
    NetAction {
        subject: iface,
        policy: policy.to_string(),
        kind: NetActionKind::SetAcceptRa { value: 2 },
        reason: "takes its IPv6 default route from router advertisements (accept_ra 1); ipv6 forwarding on would drop that route".into(),
    }
}

/// IPv6 forwarding on makes the kernel drop every default route learned from router
/// advertisements on an interface whose `accept_ra` is 1 (and ignore new RAs there), which cuts
/// a host off whose IPv6 default route comes from RAs. `accept_ra = 2` keeps accepting them
/// while forwarding — what an operator turning a host into an IPv6 router does — so it is set on
/// exactly those interfaces first: the names returned. Interfaces without an RA-learned default
/// route keep their setting. Returns None (forwarding held, with a warning) when an interface's
/// `accept_ra` cannot be read: we cannot tell whether forwarding would cut it off.
fn keep_ra_default_routes(net: &ObservedNet, notes: &mut Vec<Note>) -> Option<Vec<String>> {
    let mut ok = true;
    let mut names = Vec::new();
    for ra in &net.ra_default_route {
        match ra.accept_ra {
            Some(1) => names.push(ra.name.clone()),
            Some(_) => {}
            None => {
                ok = false;
                notes.push(Note {
                    subject: "forwarding".into(),
                    severity: Severity::Warning,
                    message: format!(
                        "ipv6 forwarding → held: {} takes its IPv6 default route from router advertisements and its accept_ra cannot be read (forwarding on could drop that route)",
                        ra.name
                    ),
                });
            }
        }
    }
    ok.then_some(names)
}

/// The held change `change` of (`bridge`, `port`) planned from the same policy, if any.
fn held<'a>(
    net: &'a ObservedNet,
    change: GuardedChange,
    bridge: &str,
    port: &str,
    fingerprint: &str,
) -> Option<&'a HeldUplink> {
    net.held_uplinks
        .iter()
        .find(|h| h.change == change && h.bridge == bridge && h.port == port && h.fingerprint == fingerprint)
}

/// `… → held: verification failed at …: …; rolled back; retried when …`.
fn held_after_rollback(reason: &str, h: &HeldUplink, undone: &str, release: &str) -> String {
    format!(
        "{reason} → held: verification failed at {}: {}; {undone}; retried when the policy changes or after `virtwarden release {release}`",
        h.at, h.reason
    )
}

/// The default gateways reached through any of `links`.
fn gateways_through(net: &ObservedNet, links: &[&str]) -> Vec<DefaultGateway> {
    net.default_gateways.iter().filter(|g| links.contains(&g.link.as_str())).cloned().collect()
}

/// The links whose default routes depend on bridge `b`: itself, its ports and the ports it
/// lists.
fn bridge_links<'a>(b: &'a ManagedBridge, net: &'a ObservedNet) -> Vec<&'a str> {
    let mut links = vec![b.spec.name.as_str()];
    links.extend(net.ports_of(&b.spec.name));
    links.extend(b.spec.ports.iter().map(String::as_str));
    links
}

/// An STP or port change on bridge `b` that carries an uplink (itself, a port or a listed port)
/// and says `allowUplinkChange`: checkpoint, verify its gateways and probes.
fn stp_guard(b: &ManagedBridge, net: &ObservedNet) -> Option<Guard> {
    let uplink = net
        .bridge_uplink(&b.spec.name)
        .or_else(|| b.spec.ports.iter().find_map(|p| net.uplink_reason(p).map(|why| format!("{p} {why}"))));
    uplink?;
    Some(Guard {
        gateways: gateways_through(net, &bridge_links(b, net)),
        probes: b.spec.verify.clone(),
        verify_timeout: b.spec.verify_timeout(),
        fingerprint: bridge_fingerprint(b),
        sysctls: Vec::new(),
        keep_ra: Vec::new(),
    })
}

/// A forwarding change while a default route goes through a bridge a policy names (itself, a
/// port, a listed port): checkpoint the forwarding switch (and for IPv6 every `accept_ra` an
/// RA-learned default route depends on), verify the gateways through those bridges and their
/// probes, within the longest of their `verifyTimeout`s.
fn forwarding_guard(desired: &DesiredState, net: &ObservedNet, family: &str, on: bool) -> Option<Guard> {
    let bridges: Vec<&ManagedBridge> = desired
        .bridges
        .iter()
        .filter(|b| bridge_links(b, net).iter().any(|l| net.default_route.iter().any(|d| d == l)))
        .collect();
    if bridges.is_empty() {
        return None;
    }
    let links: Vec<&str> = bridges.iter().flat_map(|b| bridge_links(b, net)).collect();
    let probes: Vec<VerifyProbe> = bridges.iter().flat_map(|b| b.spec.verify.iter().cloned()).collect();
    let verify_timeout = bridges.iter().map(|b| b.spec.verify_timeout()).max().unwrap_or_default();
    let mut sysctls = vec![if family == "ipv6" { Sysctl::Ipv6Forwarding } else { Sysctl::Ipv4Forwarding }];
    if family == "ipv6" {
        sysctls.extend(net.ra_default_route.iter().map(|r| Sysctl::AcceptRa { iface: r.name.clone() }));
    }
    let fingerprint = serde_json::to_string(&(family, on, &probes, verify_timeout)).unwrap_or_default();
    Some(Guard {
        gateways: gateways_through(net, &links),
        probes,
        verify_timeout,
        fingerprint,
        sysctls,
        keep_ra: Vec::new(),
    })
}

/// Domain data is stale (libvirt disconnected): a tap's name may already belong to another
/// domain, so tap changes wait, reported with `why`.
pub fn hold_tap_actions(actions: &mut Vec<NetAction>, notes: &mut Vec<Note>, why: &str) {
    actions.retain(|a| {
        if !matches!(a.kind, NetActionKind::AttachTap { .. }) {
            return true;
        }
        notes.push(Note {
            subject: a.subject.clone(),
            severity: Severity::Warning,
            message: format!("{} → held: {why}", a.reason),
        });
        false
    });
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn plan_ports(
    b: &ManagedBridge,
    net: &ObservedNet,
    taps: &[WantedTap],
    actions: &mut Vec<NetAction>,
    notes: &mut Vec<Note>,
) {
    let name = b.spec.name.as_str();
    // Changing the ports of the bridge that carries an uplink can cut the host off.
    let guard = uplink_guard(b, net);
    for port in &b.spec.ports {
        let Some(l) = net.link(port) else {
            notes.push(Note {
                subject: port.clone(),
                severity: Severity::Warning,
                message: format!("listed as a port of {name} but does not exist"),
            });
            continue;
        };
        match l.master.as_deref() {
            Some(m) if m == name => continue,
            Some(other) => {
                notes.push(Note {
                    subject: port.clone(),
                    severity: Severity::Warning,
                    message: format!("is a port of {other}, policy wants it on {name} → not moved (ports are never taken from another bridge)"),
                });
                continue;
            }
            None => {}
        }
        let reason = format!("not a port of {name}, policy lists it");
        if b.spec.allow_uplink_change.allowed() {
            if let Some(why) = net.uplink_reason(port) {
                if let Some(a) = plan_takeover(b, net, port, why, notes) {
                    actions.push(a);
                }
                continue;
            }
        }
        if let Some(uplink) = &guard {
            notes.push(Note {
                subject: port.clone(),
                severity: Severity::Warning,
                message: held_for_uplink(&reason, uplink),
            });
            continue;
        }
        // Allowed, on a bridge that carries an uplink: a guarded change (a second path to the
        // LAN may loop it; the host's gateways must still answer afterwards). A port that is
        // down carries nothing to verify: attached once it is up (its link event plans it).
        let port_guard = stp_guard(b, net);
        if port_guard.is_some() && !l.up {
            notes.push(Note {
                subject: port.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{reason} → waits: {name} carries an uplink and {port} is down, so attaching it could not be verified; attached once it is up"
                ),
            });
            continue;
        }
        if let Some(g) = &port_guard {
            if let Some(h) = held(net, GuardedChange::Port, name, port, &g.fingerprint) {
                notes.push(Note {
                    subject: port.clone(),
                    severity: Severity::Warning,
                    message: held_after_rollback(&reason, h, "detached again", name),
                });
                continue;
            }
        }
        actions.push(NetAction {
            subject: port.clone(),
            policy: b.policy.clone(),
            kind: NetActionKind::Enslave { bridge: name.into(), guard: port_guard.map(Box::new) },
            reason,
        });
    }
    for port in net.ports_of(name) {
        let listed = b.spec.ports.iter().any(|p| p == port);
        let tap = taps.iter().any(|t| t.tap == port);
        if !listed && !tap {
            notes.push(Note {
                subject: name.to_string(),
                severity: Severity::Info,
                message: format!("port {port} is neither listed nor a managed domain's tap → left alone"),
            });
        }
    }
}

/// Taking uplink `port` over into `b`: refused while another manager runs the link (unless
/// `force`), held after a failed verification until the policy changes or an admin releases
/// it, else one action that says what moves and what decides.
fn plan_takeover(
    b: &ManagedBridge,
    net: &ObservedNet,
    port: &str,
    why: &str,
    notes: &mut Vec<Note>,
) -> Option<NetAction> {
    let bridge = b.spec.name.as_str();
    let mut note = |message: String| {
        notes.push(Note { subject: port.to_string(), severity: Severity::Warning, message });
    };
    let Some(up) = net.uplink_ports.iter().find(|u| u.name == port && u.bridge == bridge) else {
        note(format!("{why}; its addresses and routes could not be read → takeover into {bridge} held"));
        return None;
    };
    let fingerprint = bridge_fingerprint(b);
    if let Some(h) = held(net, GuardedChange::Takeover, bridge, port, &fingerprint) {
        note(format!(
            "takeover into {bridge} → held: verification failed at {}: {}; rolled back; retried when the policy changes or after `virtwarden release {bridge}`",
            h.at, h.reason
        ));
        return None;
    }
    let forced_past = match (&b.spec.allow_uplink_change, up.managers.is_empty()) {
        (_, true) => Vec::new(),
        (UplinkChange::Force, false) => up.managers.clone(),
        (_, false) => {
            note(format!(
                "{}error: {why} and is managed by {} → takeover into {bridge} refused: two managers for one link fight over its addresses (stop that manager for {port}, or set allowUplinkChange: force)",
                b.location.as_deref().map(|l| format!("{l}: ")).unwrap_or_default(),
                up.managers.join(", ")
            ));
            return None;
        }
    };
    Some(NetAction {
        subject: port.to_string(),
        policy: b.policy.clone(),
        kind: NetActionKind::TakeOverUplink {
            bridge: bridge.to_string(),
            takeover: Takeover {
                mac: up.mac.clone(),
                mtu: up.mtu,
                addresses: up.addresses.clone(),
                routes: up.routes.clone(),
                rules: up.rules.clone(),
                gateways: up.gateways.clone(),
                probes: b.spec.verify.clone(),
                verify_timeout: b.spec.verify_timeout(),
                fingerprint,
                forced_past,
            },
        },
        reason: format!("uplink ({why}), policy lists it as a port of {bridge} with allowUplinkChange"),
    })
}

/// Uplinks virtwarden took over that the policy no longer lists (the port dropped from
/// `ports`, `allowUplinkChange` withdrawn, or the bridge gone from the policies) are given back:
/// the gateways the bridge reached must answer on the port (and the bridge's probes, if a
/// policy still names it), else it goes back into the bridge and the release is held.
fn plan_releases(desired: &DesiredState, net: &ObservedNet, actions: &mut Vec<NetAction>, notes: &mut Vec<Note>) {
    for (port, bridge) in &net.taken_over {
        let still_wanted = desired
            .bridge(bridge)
            .is_some_and(|b| b.spec.allow_uplink_change.allowed() && b.spec.ports.iter().any(|p| p == port));
        let on_bridge = net.link(port).is_some_and(|l| l.master.as_deref() == Some(bridge.as_str()));
        if still_wanted || !on_bridge {
            continue;
        }
        let policy = desired.bridge(bridge);
        let reason = format!("taken over into {bridge} by virtwarden; no policy lists it there any more");
        let fingerprint = policy.map(bridge_fingerprint).unwrap_or_default();
        if let Some(h) = held(net, GuardedChange::Release, bridge, port, &fingerprint) {
            notes.push(Note {
                subject: port.clone(),
                severity: Severity::Warning,
                message: held_after_rollback(
                    &format!("{reason}; give back"),
                    h,
                    &format!("rolled back ({port} stays in {bridge})"),
                    bridge,
                ),
            });
            continue;
        }
        let guard = Guard {
            gateways: gateways_through(net, &[bridge.as_str()])
                .into_iter()
                .map(|g| DefaultGateway { link: port.clone(), address: g.address })
                .collect(),
            probes: policy.map(|b| b.spec.verify.clone()).unwrap_or_default(),
            verify_timeout: policy
                .map(|b| b.spec.verify_timeout())
                .unwrap_or(virtwarden_policies::DEFAULT_VERIFY_TIMEOUT),
            fingerprint,
            sysctls: Vec::new(),
            keep_ra: Vec::new(),
        };
        actions.push(NetAction {
            subject: port.clone(),
            policy: policy.map(|b| b.policy.clone()).unwrap_or_default(),
            kind: NetActionKind::ReleaseUplink { bridge: bridge.clone(), guard: Box::new(guard) },
            reason,
        });
    }
}

/// Taps back on their bridge — only when the tap is provably the domain's (its MAC matches the
/// domain's live interface), the bridge is a Linux bridge, and the tap is detached or sits on
/// another bridge a policy names. A tap on a bridge no policy names was put there by someone
/// else and stays there.
fn plan_taps(
    desired: &DesiredState,
    net: &ObservedNet,
    taps: &[WantedTap],
    actions: &mut Vec<NetAction>,
    notes: &mut Vec<Note>,
) {
    for t in taps {
        let Some(l) = net.link(&t.tap) else { continue };
        if l.master.as_deref() == Some(t.bridge.as_str()) {
            continue;
        }
        let mut report = |severity, message: String| {
            notes.push(Note { subject: t.tap.clone(), severity, message });
        };
        if let Some(kind) = &t.virtualport {
            report(Severity::Info, format!("tap of {} has virtualport type {kind} → left to that switch", t.domain));
            continue;
        }
        match net.link(&t.bridge) {
            Some(b) if b.kind.as_deref() != Some("bridge") => {
                report(
                    Severity::Warning,
                    format!(
                        "tap of {} belongs on {}, which is not a Linux bridge (kind {}) → not touched",
                        t.domain,
                        t.bridge,
                        b.kind.as_deref().unwrap_or("plain")
                    ),
                );
                continue;
            }
            None if desired.bridge(&t.bridge).is_none() => {
                report(
                    Severity::Warning,
                    format!("tap of {} belongs on {}, which does not exist → waiting for it", t.domain, t.bridge),
                );
                continue;
            }
            _ => {}
        }
        let ours = match (l.mac.as_deref(), t.guest_mac.as_deref()) {
            (Some(tap), Some(guest)) => tap_mac_matches(tap, guest),
            _ => false,
        };
        if !ours {
            report(
                Severity::Warning,
                format!(
                    "MAC {} does not match {}'s interface ({}) → not {}'s tap, not attached",
                    l.mac.as_deref().unwrap_or("unknown"),
                    t.domain,
                    t.guest_mac.as_deref().unwrap_or("no MAC"),
                    t.domain
                ),
            );
            continue;
        }
        let reason = match l.master.as_deref() {
            None => format!("tap of {} is not on {} (bridge recreated or port removed)", t.domain, t.bridge),
            Some(other) if desired.bridge(other).is_none() => {
                report(
                    Severity::Warning,
                    format!(
                        "tap of {} is on {other}, which no policy names; its domain wants {} → left there (moved by someone else)",
                        t.domain, t.bridge
                    ),
                );
                continue;
            }
            // Both bridges are declared, and the domain's live definition says where its NIC
            // belongs: a VM on the wrong managed segment is drift like any other.
            Some(other) => format!("tap of {} is on {other}, its domain wants {}", t.domain, t.bridge),
        };
        actions.push(NetAction {
            subject: t.tap.clone(),
            policy: t.policy.clone(),
            kind: NetActionKind::AttachTap { bridge: t.bridge.clone(), domain: t.domain.clone() },
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::observe::{BridgeAttrs, HeldUplink, Interface, NetLink, ObservedDomain};

    fn desired(spec: &str) -> DesiredState {
        let text = format!("apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n{spec}");
        virtwarden_policies::load_texts([(Path::new("t.yaml"), text.as_str())]).unwrap().desired
    }

    fn link(name: &str, kind: Option<&str>, master: Option<&str>, mac: Option<&str>) -> NetLink {
        NetLink {
            name: name.into(),
            kind: kind.map(str::to_string),
            up: true,
            master: master.map(str::to_string),
            mac: mac.map(str::to_string),
            bridge: (kind == Some("bridge")).then(BridgeAttrs::default),
            ..Default::default()
        }
    }

    fn vm1(iface: Interface) -> ObservedDomain {
        ObservedDomain {
            name: "vm1".into(),
            uuid: String::new(),
            state: DomainState::Running,
            reason: crate::observe::StateReason::Booted,
            persistent: true,
            autostart: false,
            boot: Default::default(),
            interfaces: vec![iface],
            disks: vec![],
            id: None,
        }
    }

    fn nic(bridge: &str) -> Interface {
        Interface {
            kind: "bridge".into(),
            source: Some(bridge.into()),
            target: Some("vnet0".into()),
            mac: Some("52:54:00:AA:bb:01".into()),
            virtualport: None,
        }
    }

    const TAP_MAC: &str = "fe:54:00:aa:bb:01";

    fn host(iface: Interface, links: Vec<NetLink>) -> ObservedHost {
        ObservedHost {
            domains: vec![vm1(iface)],
            net: Some(ObservedNet { links, ..Default::default() }),
            ..Default::default()
        }
    }

    fn lines(desired: &DesiredState, host: &ObservedHost) -> Vec<String> {
        let (actions, notes) = plan_network(desired, host);
        actions.iter().map(|a| a.line()).chain(notes.iter().map(|n| n.line())).collect()
    }

    const VM_ON_BR0: &str = "  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n";

    #[test]
    fn tap_mac_is_the_guest_mac_with_the_first_octet_fe() {
        assert!(tap_mac_matches("fe:54:00:aa:bb:01", "52:54:00:aa:bb:01"));
        assert!(tap_mac_matches("FE:54:00:AA:BB:01", "52:54:00:aa:bb:01"), "case-insensitive");
        assert!(tap_mac_matches("fa:54:00:aa:bb:01", "fe:54:00:aa:bb:01"), "0xFA when the guest's is 0xFE");
        assert!(!tap_mac_matches("52:54:00:aa:bb:01", "52:54:00:aa:bb:01"), "the guest's own MAC is not a tap's");
        assert!(!tap_mac_matches("fe:54:00:aa:bb:02", "52:54:00:aa:bb:01"));
        assert!(!tap_mac_matches("fe:54:00:aa:bb", "52:54:00:aa:bb:01"));
        assert!(!tap_mac_matches("fe:54:00:aa:bb:01:02", "52:54:00:aa:bb:01"));
        assert!(!tap_mac_matches("fe:54:00:aa:bb:zz", "52:54:00:aa:bb:01"));
        assert!(!tap_mac_matches("fe:54:00:aa:bb:01", "not a mac"));
        assert_eq!(libvirt_tap_mac("52:54:00:AA:BB:01").as_deref(), Some("fe:54:00:aa:bb:01"));
    }

    #[test]
    fn a_detached_tap_with_the_domains_mac_is_reattached() {
        let h = host(
            nic("br0"),
            vec![link("br0", Some("bridge"), None, None), link("vnet0", Some("tun"), None, Some(TAP_MAC))],
        );
        let (actions, _) = plan_network(&desired(VM_ON_BR0), &h);
        assert_eq!(actions.len(), 1);
        assert_eq!(
            actions[0].line(),
            "vnet0: tap of vm1 is not on br0 (bridge recreated or port removed) → attach to br0"
        );
        assert_eq!(actions[0].kind, NetActionKind::AttachTap { bridge: "br0".into(), domain: "vm1".into() });
    }

    #[test]
    fn a_detached_tap_of_a_libvirt_network_is_put_back_only_on_a_bridge_a_policy_names() {
        let on_default = Interface { kind: "network".into(), source: Some("default".into()), ..nic("virbr0") };
        let mut h = host(
            on_default,
            vec![link("virbr0", Some("bridge"), None, None), link("vnet0", Some("tun"), None, Some(TAP_MAC))],
        );
        h.networks = vec![crate::observe::ObservedNetwork {
            name: "default".into(),
            bridge: Some("virbr0".into()),
            active: true,
        }];
        // libvirt's own bridge, named by no policy: libvirt's business, nothing planned.
        assert_eq!(plan_network(&desired("  domains:\n    - name: vm1\n"), &h).0, vec![]);
        // Named by a policy: its domain's tap goes back like any other.
        let (actions, _) = plan_network(&desired("  domains:\n    - name: vm1\n  bridges:\n    - name: virbr0\n"), &h);
        assert_eq!(
            actions.iter().map(NetAction::line).collect::<Vec<_>>(),
            ["vnet0: tap of vm1 is not on virbr0 (bridge recreated or port removed) → attach to virbr0"]
        );
    }

    #[test]
    fn a_tap_whose_mac_does_not_match_is_reported_not_attached() {
        for mac in [Some("fe:54:00:aa:bb:99"), Some("52:54:00:aa:bb:01"), None] {
            let h =
                host(nic("br0"), vec![link("br0", Some("bridge"), None, None), link("vnet0", Some("tun"), None, mac)]);
            assert_eq!(
                lines(&desired(VM_ON_BR0), &h),
                [format!(
                    "warning: vnet0: MAC {} does not match vm1's interface (52:54:00:AA:bb:01) → not vm1's tap, not attached",
                    mac.unwrap_or("unknown")
                )]
            );
        }
    }

    #[test]
    fn a_tap_on_a_bridge_no_policy_names_stays_there() {
        let h = host(
            nic("br0"),
            vec![
                link("br0", Some("bridge"), None, None),
                link("br9", Some("bridge"), None, None),
                link("vnet0", Some("tun"), Some("br9"), Some(TAP_MAC)),
            ],
        );
        assert_eq!(
            lines(&desired(VM_ON_BR0), &h),
            ["warning: vnet0: tap of vm1 is on br9, which no policy names; its domain wants br0 → left there (moved by someone else)"]
        );
    }

    #[test]
    fn a_tap_on_another_managed_bridge_goes_back_where_its_domain_says() {
        let h = host(
            nic("br0"),
            vec![
                link("br0", Some("bridge"), None, None),
                link("br1", Some("bridge"), None, None),
                link("vnet0", Some("tun"), Some("br1"), Some(TAP_MAC)),
            ],
        );
        let d = desired("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n    - name: br1\n");
        assert_eq!(lines(&d, &h), ["vnet0: tap of vm1 is on br1, its domain wants br0 → attach to br0"]);
    }

    #[test]
    fn taps_of_open_vswitch_or_other_switches_are_never_touched() {
        let ovs_iface = Interface { virtualport: Some("openvswitch".into()), ..nic("ovsbr0") };
        let h = host(
            ovs_iface,
            vec![
                link("ovsbr0", Some("openvswitch"), None, None),
                link("ovs-system", Some("openvswitch"), None, None),
                link("vnet0", Some("tun"), Some("ovs-system"), Some(TAP_MAC)),
            ],
        );
        assert_eq!(
            lines(&desired("  domains:\n    - name: vm1\n"), &h),
            ["note: vnet0: tap of vm1 has virtualport type openvswitch → left to that switch"]
        );
        // No <virtualport>, but the target is not a Linux bridge.
        let h = host(
            nic("ovsbr0"),
            vec![link("ovsbr0", Some("openvswitch"), None, None), link("vnet0", Some("tun"), None, Some(TAP_MAC))],
        );
        assert_eq!(
            lines(&desired("  domains:\n    - name: vm1\n"), &h),
            ["warning: vnet0: tap of vm1 belongs on ovsbr0, which is not a Linux bridge (kind openvswitch) → not touched"]
        );
    }

    #[test]
    fn stale_domain_data_holds_tap_actions_only() {
        let h = host(
            nic("br0"),
            vec![link("br0", Some("bridge"), None, None), link("vnet0", Some("tun"), None, Some(TAP_MAC))],
        );
        let d = desired("  domains:\n    - name: vm1\n  bridges:\n    - name: br0\n  forwarding: { ipv4: true }\n");
        let mut h = h;
        h.net.as_mut().unwrap().forwarding.ipv4 = Some(false);
        let (mut actions, mut notes) = plan_network(&d, &h);
        assert_eq!(actions.len(), 2);
        hold_tap_actions(&mut actions, &mut notes, "domain data is stale (libvirt disconnected)");
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].subject, "forwarding");
        assert_eq!(
            notes[0].line(),
            "warning: vnet0: tap of vm1 is not on br0 (bridge recreated or port removed) → held: domain data is stale (libvirt disconnected)"
        );
    }

    fn uplink_host(default_route: &[&str], global_address: &[&str]) -> ObservedHost {
        let mut br0 = link("br0", Some("bridge"), None, None);
        br0.bridge = Some(BridgeAttrs { stp: false, forward_delay: 15, hello_time: 2, max_age: 20, priority: 32768 });
        ObservedHost {
            net: Some(ObservedNet {
                links: vec![br0, link("eth0", None, Some("br0"), None), link("eth1", None, None, None)],
                default_route: default_route.iter().map(|s| s.to_string()).collect(),
                global_address: global_address.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const BR0_STP_ETH1: &str = "  bridges:\n    - name: br0\n      stp: { enabled: true }\n      ports: [eth0, eth1]\n";

    #[test]
    fn stp_and_port_changes_on_an_uplink_bridge_are_held_back() {
        let d = desired(BR0_STP_ETH1);
        for (h, uplink) in [
            (uplink_host(&["eth0"], &[]), "eth0 (a port of br0) carries a default route"),
            (uplink_host(&["br0"], &[]), "br0 carries a default route"),
            (uplink_host(&[], &["br0"]), "br0 holds a global address"),
            (uplink_host(&[], &["eth1"]), "eth1 holds a global address"),
        ] {
            assert_eq!(
                lines(&d, &h),
                [
                    format!("warning: br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768, policy wants stp on → held back: {uplink} (set allowUplinkChange: true to allow)"),
                    format!("warning: eth1: not a port of br0, policy lists it → held back: {uplink} (set allowUplinkChange: true to allow)"),
                ]
            );
        }
        let allowed = desired(&format!("{BR0_STP_ETH1}      allowUplinkChange: true\n"));
        assert_eq!(
            lines(&allowed, &uplink_host(&["eth0"], &["br0"])),
            [
                // Allowed, the STP change and the new port are guarded (checkpoint, verify, roll
                // back if not).
                "br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768 → set stp on; checkpoint the bridge's STP settings; verify within 10s: nothing to probe (no default gateway, no verify probes); roll back if not",
                "eth1: not a port of br0, policy lists it → attach to br0; checkpoint that it is in no bridge; verify throughout 10s: nothing to probe (no default gateway, no verify probes); detach if not"
            ]
        );
        // No uplink anywhere near br0: nothing held.
        assert_eq!(lines(&d, &uplink_host(&["eth9"], &["eth9"])).len(), 2);
        assert!(lines(&d, &uplink_host(&["eth9"], &[])).iter().all(|l| !l.contains("held back")));
    }

    #[test]
    fn taps_are_never_held_for_an_uplink_bridge() {
        let mut h = host(
            nic("br0"),
            vec![link("br0", Some("bridge"), None, None), link("vnet0", Some("tun"), None, Some(TAP_MAC))],
        );
        h.net.as_mut().unwrap().global_address = vec!["br0".into()];
        let (actions, _) = plan_network(&desired(VM_ON_BR0), &h);
        assert_eq!(actions.len(), 1, "a VM's tap on the LAN bridge cannot cut the host off");
    }

    #[test]
    fn flap_keys_name_the_object() {
        let h = uplink_host(&[], &[]);
        let d = desired(&format!("{BR0_STP_ETH1}  forwarding: {{ ipv6: true }}\n"));
        let mut h = h;
        h.net.as_mut().unwrap().forwarding.ipv6 = Some(false);
        let (actions, _) = plan_network(&d, &h);
        let keys: Vec<String> = actions.iter().map(|a| a.flap_key().to_string()).collect();
        assert_eq!(keys, ["bridge br0 stp", "port eth1", "forwarding ipv6"]);
    }

    fn ra_host(accept_ra: Option<u8>, ipv6_forwarding: bool) -> ObservedHost {
        ObservedHost {
            net: Some(ObservedNet {
                links: vec![link("eth0", None, None, None), link("eth1", None, None, None)],
                default_route: vec!["eth0".into()],
                ra_default_route: vec![crate::observe::RaDefaultRoute { name: "eth0".into(), accept_ra }],
                forwarding: crate::observe::ForwardingState { ipv4: Some(false), ipv6: Some(ipv6_forwarding) },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ipv6_forwarding_first_sets_accept_ra_2_where_the_default_route_comes_from_ras() {
        let d = desired("  forwarding: { ipv6: true }\n");
        assert_eq!(
            lines(&d, &ra_host(Some(1), false)),
            [
                "eth0: takes its IPv6 default route from router advertisements (accept_ra 1); ipv6 forwarding on would drop that route → set accept_ra 2",
                "forwarding: ipv6 forwarding off, policy wants on → set ipv6 forwarding on",
            ]
        );
        // Already 2 (or 0: no RA is accepted anyway): forwarding alone.
        for v in [2, 0] {
            assert_eq!(
                lines(&d, &ra_host(Some(v), false)),
                ["forwarding: ipv6 forwarding off, policy wants on → set ipv6 forwarding on"]
            );
        }
        // Forwarding already on and accept_ra put back to 1: the route would expire; set again.
        assert_eq!(lines(&d, &ra_host(Some(1), true)).len(), 1);
        // IPv4 forwarding and IPv6 forwarding off never touch accept_ra.
        for spec in ["  forwarding: { ipv4: true }\n", "  forwarding: { ipv6: false }\n"] {
            assert!(lines(&desired(spec), &ra_host(Some(1), true)).iter().all(|l| !l.contains("accept_ra")));
        }
    }

    #[test]
    fn ipv6_forwarding_is_held_when_accept_ra_of_an_ra_uplink_is_unknown() {
        let d = desired("  forwarding: { ipv6: true }\n");
        assert_eq!(
            lines(&d, &ra_host(None, false)),
            ["warning: forwarding: ipv6 forwarding → held: eth0 takes its IPv6 default route from router advertisements and its accept_ra cannot be read (forwarding on could drop that route)"]
        );
    }

    fn takeover_host(managers: &[&str], held: Option<HeldUplink>) -> ObservedHost {
        ObservedHost {
            net: Some(ObservedNet {
                links: vec![
                    link("br0", Some("bridge"), None, None),
                    link("eth0", None, None, Some("52:54:00:00:00:01")),
                ],
                default_route: vec!["eth0".into()],
                uplink_ports: vec![crate::observe::UplinkPort {
                    name: "eth0".into(),
                    bridge: "br0".into(),
                    mac: Some("52:54:00:00:00:01".into()),
                    mtu: Some(9000),
                    addresses: vec!["192.0.2.2/24 (valid 600s, preferred 600s)".into()],
                    routes: vec!["default via 192.0.2.1 table main".into()],
                    rules: vec![],
                    gateways: vec!["192.0.2.1".parse().unwrap()],
                    managers: managers.iter().map(|m| m.to_string()).collect(),
                }],
                held_uplinks: held.into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const TAKEOVER: &str = "  bridges:\n    - name: br0\n      ports: [eth0]\n      allowUplinkChange: true\n      verify: [{tcp: {address: 192.0.2.1, port: 22}}]\n";

    #[test]
    fn an_allowed_uplink_port_is_taken_over_and_the_plan_says_what_moves_and_what_decides() {
        assert_eq!(
            lines(&desired(TAKEOVER), &takeover_host(&[], None)),
            ["eth0: uplink (carries a default route), policy lists it as a port of br0 with allowUplinkChange → take over into br0: MAC 52:54:00:00:00:01, MTU 9000 → br0; addresses 192.0.2.2/24 (valid 600s, preferred 600s) → br0; routes default via 192.0.2.1 table main → br0; no rules; then attach to br0; verify within 10s: gateway 192.0.2.1 answers ARP/NDP on br0, tcp 192.0.2.1:22; roll back if not"]
        );
    }

    #[test]
    fn another_manager_refuses_the_takeover_unless_forced() {
        let l = lines(&desired(TAKEOVER), &takeover_host(&["NetworkManager (pid 7)"], None));
        assert_eq!(l.len(), 1);
        assert!(l[0].starts_with("warning: eth0: t.yaml:9:26: error: carries a default route and is managed by NetworkManager (pid 7) → takeover into br0 refused"), "{l:?}");
        let forced = desired(&TAKEOVER.replace("allowUplinkChange: true", "allowUplinkChange: force"));
        let l = lines(&forced, &takeover_host(&["NetworkManager (pid 7)"], None));
        assert!(l[0].ends_with("roll back if not (forced past NetworkManager (pid 7))"), "{l:?}");
    }

    #[test]
    fn a_held_takeover_waits_for_a_policy_change() {
        let d = desired(TAKEOVER);
        let held = HeldUplink {
            bridge: "br0".into(),
            port: "eth0".into(),
            reason: "tcp 192.0.2.1:22 did not answer within 10s".into(),
            at: "2026-12-06T04:00:00Z".into(),
            fingerprint: bridge_fingerprint(&d.bridges[0]),
            change: GuardedChange::Takeover,
        };
        assert_eq!(
            lines(&d, &takeover_host(&[], Some(held.clone()))),
            ["warning: eth0: takeover into br0 → held: verification failed at 2026-12-06T04:00:00Z: tcp 192.0.2.1:22 did not answer within 10s; rolled back; retried when the policy changes or after `virtwarden release br0`"]
        );
        let changed = desired(&format!("{TAKEOVER}      verifyTimeout: 30s\n"));
        assert_eq!(plan_network(&changed, &takeover_host(&[], Some(held))).0.len(), 1);
    }

    fn gateway(link: &str, address: &str) -> DefaultGateway {
        DefaultGateway { link: link.into(), address: address.parse().unwrap() }
    }

    fn held_change(change: GuardedChange, bridge: &str, port: &str, fingerprint: &str) -> HeldUplink {
        HeldUplink {
            bridge: bridge.into(),
            port: port.into(),
            reason: "ping 192.0.2.99 did not answer within 10s".into(),
            at: "2026-12-06T04:00:00Z".into(),
            fingerprint: fingerprint.into(),
            change,
        }
    }

    fn guard_of(a: &NetAction) -> Guard {
        match &a.kind {
            NetActionKind::SetStp { guard: Some(g), .. }
            | NetActionKind::SetForwarding { guard: Some(g), .. }
            | NetActionKind::Enslave { guard: Some(g), .. }
            | NetActionKind::ReleaseUplink { guard: g, .. } => (**g).clone(),
            other => panic!("not guarded: {other:?}"),
        }
    }

    #[test]
    fn stp_on_an_allowed_uplink_bridge_is_guarded_and_held_after_a_rollback() {
        let d = desired(&format!(
            "{BR0_STP_ETH1}      allowUplinkChange: true\n      verify: [{{ping: {{address: 192.0.2.99}}}}]\n"
        ));
        let mut h = uplink_host(&["br0"], &[]);
        h.net.as_mut().unwrap().default_gateways = vec![gateway("br0", "192.0.2.1"), gateway("eth9", "203.0.113.1")];
        let (actions, _) = plan_network(&d, &h);
        assert_eq!(
            actions[0].line(),
            "br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768 → set stp on; checkpoint the bridge's STP settings; verify within 10s: gateway 192.0.2.1 answers ARP/NDP on br0, ping 192.0.2.99; roll back if not"
        );
        assert_eq!(actions[0].flap_wanted(), format!("SetStp {{ stp: {:?} }}", stp_wanted(&d.bridges[0]).unwrap()));
        let fingerprint = guard_of(&actions[0]).fingerprint;
        h.net.as_mut().unwrap().held_uplinks = vec![held_change(GuardedChange::Stp, "br0", "", &fingerprint)];
        let l = lines(&d, &h);
        assert_eq!(
            l[0],
            "eth1: not a port of br0, policy lists it → attach to br0; checkpoint that it is in no bridge; verify throughout 10s: gateway 192.0.2.1 answers ARP/NDP on br0, ping 192.0.2.99; detach if not"
        );
        assert_eq!(
            l[1],
            "warning: br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768, policy wants stp on → held: verification failed at 2026-12-06T04:00:00Z: ping 192.0.2.99 did not answer within 10s; rolled back; retried when the policy changes or after `virtwarden release br0`"
        );
        // Another policy is tried again; a bridge without an uplink sets STP plainly.
        let changed = desired(&format!("{BR0_STP_ETH1}      allowUplinkChange: true\n"));
        assert!(lines(&changed, &h)[0]
            .contains("→ set stp on; checkpoint the bridge's STP settings; verify within 10s: gateway 192.0.2.1"));
        assert_eq!(
            lines(&changed, &uplink_host(&[], &[]))[0],
            "br0: stp off, forward delay 15s, hello 2s, max age 20s, priority 32768 → set stp on"
        );
    }

    #[test]
    fn a_port_attached_to_an_allowed_uplink_bridge_is_guarded_and_held_after_a_rollback() {
        let d = desired(&format!(
            "{BR0_STP_ETH1}      allowUplinkChange: true\n      verify: [{{ping: {{address: 192.0.2.99}}}}]\n"
        ));
        let mut h = uplink_host(&["br0"], &[]);
        h.net.as_mut().unwrap().default_gateways = vec![gateway("br0", "192.0.2.1")];
        let (actions, _) = plan_network(&d, &h);
        let attach = actions.iter().find(|a| a.subject == "eth1").unwrap();
        assert_eq!(attach.kind.name(), "attach-port");
        // The flap detector sees the attachment, not what decides it.
        assert_eq!(attach.flap_wanted(), "Enslave { bridge: \"br0\" }");
        let fingerprint = guard_of(attach).fingerprint;
        h.net.as_mut().unwrap().held_uplinks = vec![held_change(GuardedChange::Port, "br0", "eth1", &fingerprint)];
        let l = lines(&d, &h);
        assert!(
            l.contains(&"warning: eth1: not a port of br0, policy lists it → held: verification failed at 2026-12-06T04:00:00Z: ping 192.0.2.99 did not answer within 10s; detached again; retried when the policy changes or after `virtwarden release br0`".to_string()),
            "{l:#?}"
        );
        assert!(!l.iter().any(|l| l.starts_with("eth1: ")), "{l:#?}");
        // A port that is down waits (nothing to verify); up again, it is planned.
        let mut down = h.clone();
        down.net.as_mut().unwrap().held_uplinks.clear();
        down.net.as_mut().unwrap().links.iter_mut().filter(|l| l.name == "eth1").for_each(|l| l.up = false);
        assert!(
            lines(&d, &down).contains(&"warning: eth1: not a port of br0, policy lists it → waits: br0 carries an uplink and eth1 is down, so attaching it could not be verified; attached once it is up".to_string()),
            "{:#?}",
            lines(&d, &down)
        );
        assert!(!plan_network(&d, &down).0.iter().any(|a| a.subject == "eth1"));
        // Another policy tries again; a bridge that carries no uplink attaches plainly.
        let changed = desired(&format!("{BR0_STP_ETH1}      allowUplinkChange: true\n"));
        assert!(lines(&changed, &h)
            .iter()
            .any(|l| l.starts_with("eth1: not a port of br0, policy lists it → attach to br0; checkpoint")));
        assert!(lines(&changed, &uplink_host(&[], &[]))
            .contains(&"eth1: not a port of br0, policy lists it → attach to br0".to_string()));
    }

    #[test]
    fn forwarding_is_guarded_while_the_default_route_goes_through_a_managed_bridge() {
        let d = desired("  bridges:\n    - name: br0\n  forwarding: { ipv4: true, ipv6: true }\n");
        let mut h = uplink_host(&["br0"], &[]);
        {
            let n = h.net.as_mut().unwrap();
            n.default_gateways = vec![gateway("br0", "192.0.2.1"), gateway("br0", "fe80::1")];
            n.forwarding = crate::observe::ForwardingState { ipv4: Some(false), ipv6: Some(false) };
            n.ra_default_route = vec![crate::observe::RaDefaultRoute { name: "br0".into(), accept_ra: Some(1) }];
        }
        assert_eq!(
            lines(&d, &h)[..2],
            [
                "forwarding: ipv4 forwarding off, policy wants on → set ipv4 forwarding on; checkpoint net.ipv4.ip_forward; verify within 10s: gateway 192.0.2.1 answers ARP/NDP on br0, gateway fe80::1 answers ARP/NDP on br0; roll back if not",
                "forwarding: ipv6 forwarding off, policy wants on → set accept_ra 2 on br0 (keeps the RA-learned default route), then set ipv6 forwarding on; checkpoint net.ipv6.conf.all.forwarding, net.ipv6.conf.br0.accept_ra; verify within 10s: gateway 192.0.2.1 answers ARP/NDP on br0, gateway fe80::1 answers ARP/NDP on br0; roll back if not",
            ]
        );
        // Held after a rollback: neither forwarding nor its accept_ra is touched.
        let (actions, _) = plan_network(&d, &h);
        let v6 = guard_of(&actions[1]).fingerprint;
        h.net.as_mut().unwrap().held_uplinks = vec![held_change(GuardedChange::Forwarding, "forwarding", "ipv6", &v6)];
        let (actions, notes) = plan_network(&d, &h);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(actions[0].line().starts_with("forwarding: ipv4 forwarding off"));
        assert_eq!(
            notes[1].line(),
            "warning: forwarding: ipv6 forwarding off, policy wants on → held: verification failed at 2026-12-06T04:00:00Z: ping 192.0.2.99 did not answer within 10s; rolled back; retried when the policy changes or after `virtwarden release forwarding`"
        );
        // No managed bridge carries the default route: plain, as before.
        let plain = desired("  forwarding: { ipv4: true }\n");
        assert_eq!(lines(&plain, &h), ["forwarding: ipv4 forwarding off, policy wants on → set ipv4 forwarding on"]);
    }

    #[test]
    fn a_release_is_guarded_and_held_after_a_failed_verification() {
        let d = desired("  bridges:\n    - name: br0\n      verify: [{tcp: {address: 192.0.2.1, port: 22}}]\n");
        let mut h = uplink_host(&["br0"], &[]);
        {
            let n = h.net.as_mut().unwrap();
            n.taken_over = vec![("eth0".into(), "br0".into())];
            n.default_gateways = vec![gateway("br0", "192.0.2.1")];
        }
        let (actions, _) = plan_network(&d, &h);
        assert_eq!(
            actions[0].line(),
            "eth0: taken over into br0 by virtwarden; no policy lists it there any more → give back: addresses, routes and rules from br0 back to it, then detach; checkpoint what br0 holds of it; verify within 10s: gateway 192.0.2.1 answers ARP/NDP on eth0, tcp 192.0.2.1:22; put it back into br0 if not"
        );
        let fingerprint = guard_of(&actions[0]).fingerprint;
        assert_eq!(fingerprint, bridge_fingerprint(&d.bridges[0]));
        h.net.as_mut().unwrap().held_uplinks = vec![held_change(GuardedChange::Release, "br0", "eth0", &fingerprint)];
        assert_eq!(
            lines(&d, &h)[1..],
            ["warning: eth0: taken over into br0 by virtwarden; no policy lists it there any more; give back → held: verification failed at 2026-12-06T04:00:00Z: ping 192.0.2.99 did not answer within 10s; rolled back (eth0 stays in br0); retried when the policy changes or after `virtwarden release br0`"]
        );
        // The bridge gone from the policies: another policy, tried again.
        assert_eq!(plan_network(&desired("  forwarding: { ipv4: false }\n"), &h).0.len(), 1);
    }
}
