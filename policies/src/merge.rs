//! Merging validated documents into one [`DesiredState`]. A name claimed twice is a conflict:
//! both places are reported and nothing of the conflicting part is merged.

use std::collections::HashMap;

use crate::desired::{DesiredState, ForwardingSetting, ManagedBridge, ManagedDomain};
use crate::types::HostPolicy;

/// Where a conflicting value sits: which input document and which path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Index into the slice given to [`merge`].
    pub document: usize,
    pub path: String,
}

/// Two documents claim the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// What is claimed twice, e.g. ``domain `web1` ``.
    pub subject: String,
    pub first: Site,
    pub second: Site,
}

/// Merge documents in order. Returns the merged state (without any conflicting part) and the
/// conflicts found; callers decide whether a conflict is fatal (host mode: it is).
pub fn merge(docs: &[HostPolicy]) -> (DesiredState, Vec<Conflict>) {
    let mut state = DesiredState::default();
    let mut conflicts = Vec::new();
    let mut policy_sites: HashMap<&str, Site> = HashMap::new();
    let mut domain_sites: HashMap<&str, Site> = HashMap::new();
    let mut bridge_sites: HashMap<&str, Site> = HashMap::new();
    let mut port_sites: HashMap<&str, (Site, &str)> = HashMap::new();
    let mut fwd_sites: [Option<(Site, bool)>; 2] = [None, None];
    let mut conflicted_domains = Vec::new();
    let mut conflicted_bridges = Vec::new();
    let mut conflicted_fwd = [false, false];

    for (n, doc) in docs.iter().enumerate() {
        let site = |path: String| Site { document: n, path };
        let name = doc.metadata.name.as_str();
        if let Some(first) = policy_sites.get(name) {
            conflicts.push(Conflict {
                subject: format!("policy name `{name}`"),
                first: first.clone(),
                second: site("metadata.name".into()),
            });
        } else {
            policy_sites.insert(name, site("metadata.name".into()));
            state.policies.push(name.to_string());
        }
        for (i, d) in doc.spec.domains.iter().enumerate() {
            let here = site(format!("spec.domains[{i}].name"));
            match domain_sites.get(d.name.as_str()) {
                Some(first) => {
                    conflicts.push(Conflict {
                        subject: format!("domain `{}`", d.name),
                        first: first.clone(),
                        second: here,
                    });
                    conflicted_domains.push(d.name.clone());
                }
                None => {
                    domain_sites.insert(&d.name, here);
                    state.domains.push(ManagedDomain { policy: name.to_string(), spec: d.clone() });
                }
            }
        }
        for (i, b) in doc.spec.bridges.iter().enumerate() {
            let here = site(format!("spec.bridges[{i}].name"));
            match bridge_sites.get(b.name.as_str()) {
                Some(first) => {
                    conflicts.push(Conflict {
                        subject: format!("bridge `{}`", b.name),
                        first: first.clone(),
                        second: here,
                    });
                    conflicted_bridges.push(b.name.clone());
                    continue;
                }
                None => {
                    bridge_sites.insert(&b.name, here);
                    state.bridges.push(ManagedBridge { policy: name.to_string(), spec: b.clone(), location: None });
                }
            }
            for (p, port) in b.ports.iter().enumerate() {
                let here = site(format!("spec.bridges[{i}].ports[{p}]"));
                match port_sites.get(port.as_str()) {
                    Some((first, other)) if *other != b.name => {
                        conflicts.push(Conflict {
                            subject: format!("port `{port}` (claimed by bridges `{other}` and `{}`)", b.name),
                            first: first.clone(),
                            second: here,
                        });
                        conflicted_bridges.push(b.name.clone());
                        conflicted_bridges.push(other.to_string());
                    }
                    Some(_) => {}
                    None => {
                        port_sites.insert(port, (here, &b.name));
                    }
                }
            }
        }
        if let Some(fwd) = &doc.spec.forwarding {
            for (k, (key, value)) in [("ipv4", fwd.ipv4), ("ipv6", fwd.ipv6)].into_iter().enumerate() {
                let Some(value) = value else { continue };
                let here = site(format!("spec.forwarding.{key}"));
                match &fwd_sites[k] {
                    Some((first, v)) if *v != value => {
                        conflicts.push(Conflict {
                            subject: format!("forwarding.{key} (set to both {v} and {value})"),
                            first: first.clone(),
                            second: here,
                        });
                        conflicted_fwd[k] = true;
                    }
                    Some(_) => {}
                    None => {
                        fwd_sites[k] = Some((here, value));
                        let setting = ForwardingSetting { policy: name.to_string(), enabled: value };
                        if k == 0 {
                            state.ipv4_forwarding = Some(setting);
                        } else {
                            state.ipv6_forwarding = Some(setting);
                        }
                    }
                }
            }
        }
    }
    // A bridge port may also be a managed bridge (nesting bridges is never what one wants).
    for (port, (site, owner)) in &port_sites {
        if let Some(first) = bridge_sites.get(port) {
            conflicts.push(Conflict {
                subject: format!("`{port}` is both a managed bridge and a port of bridge `{owner}`"),
                first: first.clone(),
                second: site.clone(),
            });
            conflicted_bridges.push(owner.to_string());
        }
    }
    state.domains.retain(|d| !conflicted_domains.contains(&d.spec.name));
    state.bridges.retain(|b| !conflicted_bridges.contains(&b.spec.name));
    if conflicted_fwd[0] {
        state.ipv4_forwarding = None;
    }
    if conflicted_fwd[1] {
        state.ipv6_forwarding = None;
    }
    conflicts.sort_by(|a, b| (a.second.document, &a.second.path).cmp(&(b.second.document, &b.second.path)));
    (state, conflicts)
}
