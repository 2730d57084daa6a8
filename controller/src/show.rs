//! `virtwarden show`: the host as it is now, written as a HostPolicy document that `plan` finds
//! in sync — how an operator adopts an existing host (show → edit → apply). Pure: reads observed
//! values only; the YAML is read back before it is printed, so a document the loader would
//! reject is an error here, never output.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_saphyr::Commented;
use virtwarden_policies::{
    BootDevice, BridgePolicy, DesiredDomainState, DomainPolicy, Forwarding, HostPolicy, HostPolicySpec, Metadata,
    RestartPolicy, Stp, API_VERSION, FORWARD_DELAY_RANGE, HELLO_TIME_RANGE, KIND, MAX_AGE_RANGE,
};

use crate::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNet, StateReason};

/// Why a document cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    #[error("domain `{name}` is not defined on this host")]
    UnknownDomain { name: String },
    #[error("cannot write the document as YAML: {source}")]
    Yaml {
        #[source]
        source: serde_saphyr::ser::Error,
    },
    #[error("cannot write the document as JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    /// The written document does not read back as itself, or would not load: a bug here.
    #[error("the document written for this host does not read back as a valid policy: {detail}")]
    RoundTrip { detail: String },
}

/// A host written down as a policy, with the comments that explain its choices.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub policy: HostPolicy,
    /// Why a domain is `state: ignored`, by domain name (a YAML comment beside its state).
    pub ignored_because: BTreeMap<String, String>,
    /// What was left out and why (YAML comments at the top).
    pub notes: Vec<String>,
}

/// A `metadata.name` made from a host name: lowercase letters, digits, `-` and `.`, starting
/// and ending with a letter or digit, at most 253 characters; `host` when nothing is left.
pub fn policy_name(hostname: &str) -> String {
    let mapped: String = hostname
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '-' })
        .take(253)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "host".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The host as a policy: the `only` domains (every domain when empty), the bridges of their
/// `type='bridge'` interfaces with STP and host-NIC ports, and — for the whole host — forwarding.
pub fn host_policy(host: &ObservedHost, only: &[String], name: &str) -> Result<Shown, ShowError> {
    for wanted in only {
        if host.domain(wanted).is_none() {
            return Err(ShowError::UnknownDomain { name: wanted.clone() });
        }
    }
    let selected: Vec<&ObservedDomain> =
        host.domains.iter().filter(|d| only.is_empty() || only.contains(&d.name)).collect();
    let mut shown = Shown {
        policy: HostPolicy {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: Metadata { name: policy_name(name), ..Default::default() },
            spec: HostPolicySpec::default(),
        },
        ignored_because: BTreeMap::new(),
        notes: Vec::new(),
    };
    for d in &selected {
        let (policy, why) = domain_policy(d, &mut shown.notes);
        if let Some(why) = why {
            shown.ignored_because.insert(d.name.clone(), why);
        }
        shown.policy.spec.domains.push(policy);
    }
    if let Some(net) = &host.net {
        shown.policy.spec.bridges = bridges(host, net, &selected, &mut shown.notes);
        if only.is_empty() {
            let f = Forwarding { ipv4: net.forwarding.ipv4, ipv6: net.forwarding.ipv6 };
            if f != Forwarding::default() {
                shown.policy.spec.forwarding = Some(f);
            }
        }
    } else {
        shown
            .notes
            .push("host network not read (--network off, or libvirt's test driver): no bridges, no forwarding".into());
    }
    Ok(shown)
}

/// One domain as it is; the reason when its state is not a steady one (written `ignored`).
fn domain_policy(d: &ObservedDomain, notes: &mut Vec<String>) -> (DomainPolicy, Option<String>) {
    let mut p = DomainPolicy::named(&d.name);
    p.restart = RestartPolicy::OnFailure;
    let seen = d.state_text();
    let failed = matches!(d.reason, StateReason::Crashed | StateReason::Failed | StateReason::Panicked);
    let why = match d.state {
        DomainState::Running | DomainState::Blocked => {
            p.state = DesiredDomainState::Running;
            None
        }
        DomainState::ShutOff if !failed => {
            p.state = DesiredDomainState::Stopped;
            None
        }
        DomainState::ShutOff => {
            Some(format!("{seen}: it failed; decide whether it should run (running) or not (stopped)"))
        }
        DomainState::Paused | DomainState::PmSuspended | DomainState::ShuttingDown => {
            Some(format!("{seen}: not a steady state; write running or stopped to manage it"))
        }
        DomainState::Crashed | DomainState::NoState => {
            Some(format!("{seen}: not a steady state; write running or stopped to manage it"))
        }
    };
    if why.is_some() {
        p.state = DesiredDomainState::Ignored;
    }
    // A transient domain has no stored definition: neither autostart nor a boot order apply.
    if d.persistent {
        p.autostart = Some(d.autostart);
        let order = &d.boot.order;
        let distinct: BTreeSet<&BootDevice> = order.iter().collect();
        if order.is_empty() {
            // libvirt's default: absent leaves it as it is.
        } else if distinct.len() != order.len() {
            notes.push(format!(
                "{}: boot order {} names a device class twice; left out (boot as it is)",
                d.name,
                order.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ")
            ));
        } else {
            p.boot = Some(order.clone());
        }
    }
    (p, why)
}

/// The Linux bridges the selected domains' `type='bridge'` interfaces use. Bridges of libvirt
/// networks are libvirt's own (it creates and removes them with the network) and are left out.
fn bridges(
    host: &ObservedHost,
    net: &ObservedNet,
    selected: &[&ObservedDomain],
    notes: &mut Vec<String>,
) -> Vec<BridgePolicy> {
    // Every domain's taps, not only the selected ones': a tap follows from its domain.
    let taps: BTreeSet<&str> =
        host.domains.iter().flat_map(|d| d.interfaces.iter()).filter_map(|i| i.target.as_deref()).collect();
    let mut used: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for d in selected {
        for iface in d.interfaces.iter().filter(|i| i.kind == "bridge" && i.virtualport.is_none()) {
            if let Some(b) = &iface.source {
                let users = used.entry(b.clone()).or_default();
                if !users.contains(&d.name.as_str()) {
                    users.push(&d.name);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (name, users) in used {
        let by = users.join(", ");
        let Some(link) = net.link(&name) else {
            notes.push(format!("bridge {name} (used by {by}) does not exist; left out"));
            continue;
        };
        if link.kind.as_deref() != Some("bridge") {
            notes.push(format!(
                "{name} (used by {by}) is a {} interface, not a Linux bridge; left out",
                link.kind.as_deref().unwrap_or("plain")
            ));
            continue;
        }
        let stp = link.bridge.map(|a| {
            let mut timer = |field: &str, v: u32, range: std::ops::RangeInclusive<u32>| {
                if range.contains(&v) {
                    Some(v)
                } else {
                    notes.push(format!(
                        "{name}: {field} {v} s is outside {}–{} s; left out (kept as it is)",
                        range.start(),
                        range.end()
                    ));
                    None
                }
            };
            Stp {
                enabled: a.stp,
                forward_delay: timer("forwardDelay", a.forward_delay, FORWARD_DELAY_RANGE),
                hello_time: timer("helloTime", a.hello_time, HELLO_TIME_RANGE),
                max_age: timer("maxAge", a.max_age, MAX_AGE_RANGE),
                priority: Some(a.priority),
            }
        });
        let ports = net
            .ports_of(&name)
            .into_iter()
            .filter(|p| !taps.contains(p))
            .filter(|p| net.link(p).is_none_or(|l| !matches!(l.kind.as_deref(), Some("tun" | "tap"))))
            .map(str::to_string)
            .collect();
        out.push(BridgePolicy { name, stp, ports, allow_uplink_change: false });
    }
    out
}

/// The document as YAML: a header, then the policy with a comment beside each ignored state.
/// Read back before it is returned: it must load as exactly `shown.policy`, without findings.
pub fn to_yaml(shown: &Shown, header: &[String]) -> Result<String, ShowError> {
    let doc = YamlDoc {
        api_version: &shown.policy.api_version,
        kind: &shown.policy.kind,
        metadata: &shown.policy.metadata,
        spec: YamlSpec {
            domains: shown
                .policy
                .spec
                .domains
                .iter()
                .map(|d| YamlDomain {
                    name: &d.name,
                    state: match shown.ignored_because.get(&d.name) {
                        Some(why) => StateField::Commented(Commented(d.state, why.clone())),
                        None => StateField::Plain(d.state),
                    },
                    restart: d.restart,
                    autostart: d.autostart,
                    boot: d.boot.as_deref(),
                })
                .collect(),
            bridges: &shown.policy.spec.bridges,
            forwarding: shown.policy.spec.forwarding.as_ref(),
        },
    };
    let body = serde_saphyr::to_string(&doc).map_err(|source| ShowError::Yaml { source })?;
    let mut out = String::new();
    for line in header.iter().chain(&shown.notes) {
        out.push_str("# ");
        out.push_str(&comment_safe(line));
        out.push('\n');
    }
    out.push_str(&body);
    let back: HostPolicy = serde_saphyr::from_str(&out).map_err(|e| ShowError::RoundTrip { detail: e.to_string() })?;
    check_round_trip(&back, &shown.policy)?;
    Ok(out)
}

/// The document as JSON (no comments: the reasons of ignored domains are only in the YAML).
pub fn to_json(shown: &Shown) -> Result<String, ShowError> {
    let out = serde_json::to_string_pretty(&shown.policy).map_err(|source| ShowError::Json { source })?;
    let back: HostPolicy = serde_json::from_str(&out).map_err(|source| ShowError::Json { source })?;
    check_round_trip(&back, &shown.policy)?;
    Ok(out)
}

fn check_round_trip(back: &HostPolicy, policy: &HostPolicy) -> Result<(), ShowError> {
    if back != policy {
        return Err(ShowError::RoundTrip { detail: "it reads back as a different document".into() });
    }
    let issues = virtwarden_policies::validate::validate_document(back);
    if let Some(i) = issues.first() {
        return Err(ShowError::RoundTrip { detail: format!("{}: {}", i.path, i.message) });
    }
    Ok(())
}

/// A comment line cannot be escaped: control characters (a newline would end it) become spaces.
fn comment_safe(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// [`HostPolicy`]'s shape with a comment slot on each domain's state.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct YamlDoc<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: &'a Metadata,
    spec: YamlSpec<'a>,
}

#[derive(Serialize)]
struct YamlSpec<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    domains: Vec<YamlDomain<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    bridges: &'a [BridgePolicy],
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarding: Option<&'a Forwarding>,
}

#[derive(Serialize)]
struct YamlDomain<'a> {
    name: &'a str,
    state: StateField,
    restart: RestartPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    autostart: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<&'a [BootDevice]>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum StateField {
    Plain(DesiredDomainState),
    Commented(Commented<DesiredDomainState>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{BootConfig, BootStyle, BridgeAttrs, ForwardingState, Interface, NetLink};

    fn domain(name: &str, state: DomainState, reason: StateReason) -> ObservedDomain {
        ObservedDomain {
            name: name.into(),
            uuid: String::new(),
            state,
            reason,
            persistent: true,
            autostart: true,
            boot: BootConfig { style: BootStyle::Os, order: vec![BootDevice::Hd, BootDevice::Network] },
            interfaces: vec![],
            disks: vec![],
            id: None,
        }
    }

    fn link(name: &str, kind: Option<&str>, master: Option<&str>) -> NetLink {
        NetLink {
            name: name.into(),
            kind: kind.map(str::to_string),
            master: master.map(str::to_string),
            up: true,
            ..Default::default()
        }
    }

    #[test]
    fn names_are_sanitised_to_the_policy_name_rules() {
        assert_eq!(policy_name("Web_01.Example.COM\n"), "web-01.example.com");
        assert_eq!(policy_name("-_-"), "host");
        assert_eq!(policy_name(""), "host");
        assert_eq!(policy_name(&"a".repeat(300)).len(), 253);
    }

    #[test]
    fn steady_states_are_kept_and_the_others_are_ignored_with_a_reason() {
        let host = ObservedHost {
            domains: vec![
                domain("a", DomainState::Running, StateReason::Booted),
                domain("b", DomainState::ShutOff, StateReason::Shutdown),
                domain("c", DomainState::Paused, StateReason::User),
                domain("d", DomainState::ShutOff, StateReason::Crashed),
            ],
            ..Default::default()
        };
        let shown = host_policy(&host, &[], "h").unwrap();
        let states: Vec<_> = shown.policy.spec.domains.iter().map(|d| d.state).collect();
        use DesiredDomainState::*;
        assert_eq!(states, [Running, Stopped, Ignored, Ignored]);
        assert_eq!(shown.ignored_because.keys().collect::<Vec<_>>(), ["c", "d"]);
        let yaml = to_yaml(&shown, &[]).unwrap();
        assert!(yaml.contains("state: ignored # paused (user): not a steady state"), "{yaml}");
        assert!(yaml.contains("state: ignored # shut off (crashed): it failed"), "{yaml}");
        let json = to_json(&shown).unwrap();
        assert_eq!(serde_json::from_str::<HostPolicy>(&json).unwrap(), shown.policy);
    }

    #[test]
    fn bridges_list_host_nics_not_taps_and_forwarding_only_for_the_whole_host() {
        let mut d = domain("a", DomainState::Running, StateReason::Booted);
        d.interfaces = vec![
            Interface {
                kind: "bridge".into(),
                source: Some("br0".into()),
                target: Some("vnet0".into()),
                ..Default::default()
            },
            Interface {
                kind: "network".into(),
                source: Some("default".into()),
                target: Some("vnet1".into()),
                ..Default::default()
            },
        ];
        let mut br0 = link("br0", Some("bridge"), None);
        br0.bridge = Some(BridgeAttrs { stp: true, forward_delay: 4, hello_time: 2, max_age: 12, priority: 4096 });
        let host = ObservedHost {
            domains: vec![d],
            net: Some(ObservedNet {
                links: vec![
                    br0,
                    link("eth1", Some("veth"), Some("br0")),
                    link("vnet0", Some("tun"), Some("br0")),
                    link("vnet9", Some("tun"), Some("br0")),
                ],
                forwarding: ForwardingState { ipv4: Some(true), ipv6: Some(false) },
                ..Default::default()
            }),
            ..Default::default()
        };
        let shown = host_policy(&host, &[], "h").unwrap();
        let b = &shown.policy.spec.bridges;
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].ports, ["eth1"]);
        assert_eq!(b[0].stp.as_ref().unwrap().forward_delay, Some(4));
        assert_eq!(shown.policy.spec.forwarding, Some(Forwarding { ipv4: Some(true), ipv6: Some(false) }));
        to_yaml(&shown, &[]).unwrap();

        let only_a = host_policy(&host, &["a".to_string()], "h").unwrap();
        assert_eq!(only_a.policy.spec.forwarding, None);
        assert!(matches!(host_policy(&host, &["zz".to_string()], "h"), Err(ShowError::UnknownDomain { .. })));
    }

    #[test]
    fn timers_outside_the_kernel_ranges_are_left_out_with_a_note() {
        let mut d = domain("a", DomainState::Running, StateReason::Booted);
        d.interfaces = vec![Interface { kind: "bridge".into(), source: Some("br0".into()), ..Default::default() }];
        let mut br0 = link("br0", Some("bridge"), None);
        br0.bridge = Some(BridgeAttrs { stp: false, forward_delay: 0, hello_time: 2, max_age: 20, priority: 32768 });
        let host = ObservedHost {
            domains: vec![d],
            net: Some(ObservedNet { links: vec![br0], ..Default::default() }),
            ..Default::default()
        };
        let shown = host_policy(&host, &[], "h").unwrap();
        assert_eq!(shown.policy.spec.bridges[0].stp.as_ref().unwrap().forward_delay, None);
        assert!(shown.notes.iter().any(|n| n.contains("forwardDelay 0 s")), "{:?}", shown.notes);
        let yaml = to_yaml(&shown, &["first\nsecond".into()]).unwrap();
        assert!(yaml.starts_with("# first second\n"), "{yaml}");
    }
}
