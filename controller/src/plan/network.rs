//! Planning the host network: bridges (existence, up, STP and timers, listed ports), VM taps back
//! on their bridge, IP forwarding. Pure: reads observed values only.

use serde::Serialize;
use virtwarden_policies::{DesiredState, ManagedBridge};

use super::{Note, Severity};
use crate::observe::{DomainState, ObservedHost, ObservedNet};

/// Bridge STP settings to apply (timers in seconds; `None` leaves one as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StpWanted {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_delay: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
}

/// A network change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum NetActionKind {
    CreateBridge,
    SetUp,
    SetStp {
        stp: StpWanted,
    },
    /// Make the subject a port of `bridge`.
    Enslave {
        bridge: String,
    },
    SetForwarding {
        family: String,
        on: bool,
    },
}

impl NetActionKind {
    pub fn verb(&self) -> String {
        match self {
            NetActionKind::CreateBridge => "create bridge".into(),
            NetActionKind::SetUp => "set up".into(),
            NetActionKind::SetStp { stp } => {
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
                format!("set {}", parts.join(", "))
            }
            NetActionKind::Enslave { bridge } => format!("attach to {bridge}"),
            NetActionKind::SetForwarding { family, on } => {
                format!("set {family} forwarding {}", if *on { "on" } else { "off" })
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            NetActionKind::CreateBridge => "create-bridge",
            NetActionKind::SetUp => "set-up",
            NetActionKind::SetStp { .. } => "set-stp",
            NetActionKind::Enslave { .. } => "attach-port",
            NetActionKind::SetForwarding { .. } => "set-forwarding",
        }
    }
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
}

fn stp_wanted(b: &ManagedBridge) -> Option<StpWanted> {
    b.spec.stp.as_ref().map(|s| StpWanted {
        enabled: s.enabled,
        forward_delay: s.forward_delay,
        hello_time: s.hello_time,
        max_age: s.max_age,
        priority: s.priority,
    })
}

fn stp_matches(have: &crate::observe::BridgeAttrs, want: &StpWanted) -> bool {
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

/// Taps of managed, running domains and the bridge each belongs on: (tap, bridge, domain, policy).
pub fn wanted_taps(desired: &DesiredState, host: &ObservedHost) -> Vec<(String, String, String, String)> {
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
                out.push((tap, bridge, d.name.clone(), m.policy.clone()));
            }
        }
    }
    out
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
                if let Some(stp) = stp_wanted(b) {
                    actions.push(act(NetActionKind::SetStp { stp }, "new bridge".into()));
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
                        actions.push(act(NetActionKind::SetStp { stp: want }, describe_stp(have)));
                    }
                }
            }
        }
        plan_ports(b, net, &taps, &mut actions, &mut notes);
    }
    plan_taps(desired, net, &taps, &mut actions, &mut notes);
    for (family, want, have) in [
        ("ipv4", desired.ipv4_forwarding.as_ref(), net.forwarding.ipv4),
        ("ipv6", desired.ipv6_forwarding.as_ref(), net.forwarding.ipv6),
    ] {
        let (Some(want), Some(have)) = (want, have) else {
            continue;
        };
        if want.enabled != have {
            actions.push(NetAction {
                subject: "forwarding".into(),
                policy: want.policy.clone(),
                kind: NetActionKind::SetForwarding { family: family.into(), on: want.enabled },
                reason: format!("{family} forwarding {}, policy wants {}", on_off(have), on_off(want.enabled)),
            });
        }
    }
    (actions, notes)
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
    taps: &[(String, String, String, String)],
    actions: &mut Vec<NetAction>,
    notes: &mut Vec<Note>,
) {
    let name = b.spec.name.as_str();
    // Changing the ports of the bridge that carries the default route can cut the host off.
    let risky = net.carries_default_route(name) || b.spec.ports.iter().any(|p| net.uplinks.contains(p));
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
        if risky && !b.spec.allow_uplink_change {
            notes.push(Note {
                subject: port.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{reason} → held back: {name} carries the default route (set allowUplinkChange: true to allow)"
                ),
            });
            continue;
        }
        actions.push(NetAction {
            subject: port.clone(),
            policy: b.policy.clone(),
            kind: NetActionKind::Enslave { bridge: name.into() },
            reason,
        });
    }
    for port in net.ports_of(name) {
        let listed = b.spec.ports.iter().any(|p| p == port);
        let tap = taps.iter().any(|(t, _, _, _)| t == port);
        if !listed && !tap {
            notes.push(Note {
                subject: name.to_string(),
                severity: Severity::Info,
                message: format!("port {port} is neither listed nor a managed domain's tap → left alone"),
            });
        }
    }
}

fn plan_taps(
    desired: &DesiredState,
    net: &ObservedNet,
    taps: &[(String, String, String, String)],
    actions: &mut Vec<NetAction>,
    notes: &mut Vec<Note>,
) {
    for (tap, bridge, domain, policy) in taps {
        let Some(l) = net.link(tap) else { continue };
        if l.master.as_deref() == Some(bridge.as_str()) {
            continue;
        }
        let bridge_present = net.link(bridge).is_some() || desired.bridge(bridge).is_some();
        if !bridge_present {
            notes.push(Note {
                subject: tap.clone(),
                severity: Severity::Warning,
                message: format!("tap of {domain} belongs on {bridge}, which does not exist → waiting for it"),
            });
            continue;
        }
        let reason = match l.master.as_deref() {
            None => {
                format!("tap of {domain} is not on {bridge} (bridge recreated or port removed)")
            }
            Some(other) => format!("tap of {domain} is on {other}, its domain wants {bridge}"),
        };
        actions.push(NetAction {
            subject: tap.clone(),
            policy: policy.clone(),
            kind: NetActionKind::Enslave { bridge: bridge.clone() },
            reason,
        });
    }
}
