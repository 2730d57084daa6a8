//! Start ordering and dependencies (`startup:`, issue 13): which domains may start now and what
//! each held one waits for; stops in reverse. Pure: domain states, start times, health and path
//! existence are inputs, so `apply` and the engine decide the same way.
//!
//! Rules: order groups start lowest first (a group starts once every domain of the earlier
//! groups that is to start runs, and each one's `delay` since its start has passed); domains
//! without an order form the last group; `after` waits for those domains to run and, if they
//! declare a health probe, to pass it; `requires.paths` must exist. Stops go in reverse.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::Serialize;
use virtwarden_policies::{DesiredState, Duration};

use super::restart::Tick;
use super::{Action, ActionKind, Note, Plan, Severity};
use crate::observe::{DomainState, ObservedHost};

/// Something a domain waits for before it may start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Wait {
    /// An earlier order group still has domains to start.
    Group { order: u32, starting: Vec<String> },
    /// An earlier order group's `delay` since one of its domains started has not passed.
    Delay {
        order: u32,
        domain: String,
        delay: Duration,
        #[serde(skip)]
        until: Tick,
    },
    /// `after`: this domain must run (and pass its health probe, if it declares one).
    Domain { domain: String, why: DomainWait },
    /// `requires.paths`: this path must exist.
    Path { path: String },
}

/// Why an `after` dependency is not met yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainWait {
    NotDefined,
    NotRunning,
    NotHealthy,
    /// Not running, and `run` has stopped restarting it (`virtwarden release` lifts it).
    Quarantined,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::Group { order, starting } => {
                let verb = if starting.len() == 1 { "is" } else { "are" };
                write!(f, "order group {order} ({} {verb} not running yet)", starting.join(", "))
            }
            Wait::Delay { order, domain, delay, .. } => {
                write!(f, "order group {order} (+{delay} delay after {domain})")
            }
            Wait::Domain { domain, why } => {
                let why = match why {
                    DomainWait::NotDefined => "not defined on this host",
                    DomainWait::NotRunning => "not running",
                    DomainWait::NotHealthy => "not healthy yet",
                    DomainWait::Quarantined => "quarantined",
                };
                write!(f, "{domain} ({why})")
            }
            Wait::Path { path } => f.write_str(path),
        }
    }
}

/// `waits for a, b` for a list of waits.
pub fn waits_text(waits: &[Wait]) -> String {
    let parts: Vec<String> = waits.iter().map(Wait::to_string).collect();
    format!("waits for {}", parts.join(", "))
}

/// Add `wait` to what a start has waited for so far, keeping one entry per thing waited for:
/// the latest order-group wait (first), each dependency once, each path once.
pub fn remember_wait(waited: &mut Vec<Wait>, wait: &Wait) {
    match wait {
        Wait::Group { .. } | Wait::Delay { .. } => {
            waited.retain(|w| !matches!(w, Wait::Group { .. } | Wait::Delay { .. }));
            waited.insert(0, wait.clone());
        }
        Wait::Domain { domain, .. } => {
            match waited.iter_mut().find(|w| matches!(w, Wait::Domain { domain: d, .. } if d == domain)) {
                Some(w) => *w = wait.clone(),
                None => waited.push(wait.clone()),
            }
        }
        Wait::Path { .. } => {
            if !waited.contains(wait) {
                waited.push(wait.clone());
            }
        }
    }
}

/// What the ordering reads about the host at one moment. Plain values: the caller observes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartupFacts {
    /// State of the managed domains; a domain missing here is not defined on the host.
    pub states: HashMap<String, DomainState>,
    /// When each domain last started (for `delay`); a running domain missing here started long
    /// enough ago.
    pub started_at: HashMap<String, Tick>,
    /// Domains that pass their health probe now. Consulted only for domains that declare
    /// `health`; a front end that does not probe fills in every running domain.
    pub healthy: HashSet<String>,
    /// Required paths (from [`StartupOrder::required_paths`]) that do not exist.
    pub missing_paths: HashSet<String>,
}

impl StartupFacts {
    fn runs(&self, domain: &str) -> Option<bool> {
        self.states.get(domain).map(|s| matches!(s, DomainState::Running | DomainState::Blocked))
    }
}

/// The outcome of [`StartupOrder::decide`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartDecision {
    /// May start now, in start order (order group, then policy order).
    pub ready: Vec<String>,
    /// Held, in start order, each with what it waits for (never empty).
    pub held: Vec<(String, Vec<Wait>)>,
    /// The earliest time a `delay` that holds something ends: decide again then (other waits
    /// end with an event: a domain started, a probe passed, a path appeared).
    pub wake_at: Option<Tick>,
}

/// One managed domain's `startup`, resolved.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// `order`, or `u64::MAX` for the last group.
    rank: u64,
    after: Vec<String>,
    delay: Option<Duration>,
    paths: Vec<String>,
    has_health: bool,
}

/// The start ordering of one desired state. Build once per policy load.
#[derive(Debug, Clone, Default)]
pub struct StartupOrder {
    /// In policy order.
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl StartupOrder {
    pub fn new(desired: &DesiredState) -> Self {
        let mut order = StartupOrder::default();
        for managed in &desired.domains {
            let spec = &managed.spec;
            let s = spec.startup.clone().unwrap_or_default();
            order.index.insert(spec.name.clone(), order.entries.len());
            order.entries.push(Entry {
                name: spec.name.clone(),
                rank: s.order.map_or(u64::MAX, u64::from),
                after: s.after,
                delay: s.delay,
                paths: s.requires.map(|r| r.paths).unwrap_or_default(),
                has_health: spec.health.is_some(),
            });
        }
        order
    }

    /// Whether any domain declares anything about its start (else every start is ready).
    pub fn is_constrained(&self) -> bool {
        self.entries.iter().any(|e| e.rank != u64::MAX || !e.after.is_empty() || !e.paths.is_empty())
    }

    /// Every path some domain requires, for the caller to check.
    pub fn required_paths(&self) -> BTreeSet<String> {
        self.entries.iter().flat_map(|e| e.paths.iter().cloned()).collect()
    }

    /// The domains `domain` waits for through `after`.
    pub fn dependencies(&self, domain: &str) -> &[String] {
        self.entry(domain).map(|e| e.after.as_slice()).unwrap_or_default()
    }

    /// The paths `domain` requires (`requires.paths`).
    pub fn paths(&self, domain: &str) -> &[String] {
        self.entry(domain).map(|e| e.paths.as_slice()).unwrap_or_default()
    }

    /// Whether `domain` declares a health probe that dependents wait for.
    pub fn has_health(&self, domain: &str) -> bool {
        self.entry(domain).is_some_and(|e| e.has_health)
    }

    fn entry(&self, domain: &str) -> Option<&Entry> {
        self.index.get(domain).map(|&i| &self.entries[i])
    }

    /// Sort key of a start: order group, then policy order. Unmanaged names sort last.
    pub fn start_key(&self, domain: &str) -> (u64, usize) {
        self.index.get(domain).map_or((u64::MAX, usize::MAX), |&i| (self.entries[i].rank, i))
    }

    /// Which of `pending` (managed domains that are to start) may start now; what the others
    /// wait for. A domain in `pending` holds back later order groups until it runs, so a front
    /// end keeps a domain there while it is starting or waiting and drops it when it gives up.
    pub fn decide(&self, pending: &BTreeSet<String>, facts: &StartupFacts, now: Tick) -> StartDecision {
        let gates = self.group_gates(pending, facts, now);
        let mut waiting: Vec<&Entry> = pending.iter().filter_map(|n| self.entry(n)).collect();
        waiting.sort_by_key(|e| self.start_key(&e.name));
        let mut decision = StartDecision::default();
        for e in waiting {
            let mut waits = Vec::new();
            if let Some(Some(w)) = gates.get(&e.rank) {
                if let Wait::Delay { until, .. } = w {
                    decision.wake_at = Some(decision.wake_at.map_or(*until, |t: Tick| t.min(*until)));
                }
                waits.push(w.clone());
            }
            for dep in &e.after {
                let why = match facts.runs(dep) {
                    None => Some(DomainWait::NotDefined),
                    Some(false) => Some(DomainWait::NotRunning),
                    Some(true) if self.has_health(dep) && !facts.healthy.contains(dep) => Some(DomainWait::NotHealthy),
                    Some(true) => None,
                };
                if let Some(why) = why {
                    waits.push(Wait::Domain { domain: dep.clone(), why });
                }
            }
            for path in &e.paths {
                if facts.missing_paths.contains(path) {
                    waits.push(Wait::Path { path: path.clone() });
                }
            }
            if waits.is_empty() {
                decision.ready.push(e.name.clone());
            } else {
                decision.held.push((e.name.clone(), waits));
            }
        }
        decision
    }

    /// Per order group (by rank): what holds it back — the lowest earlier group that is not
    /// done — or `None`. One pass over all domains, however many are pending.
    fn group_gates(&self, pending: &BTreeSet<String>, facts: &StartupFacts, now: Tick) -> BTreeMap<u64, Option<Wait>> {
        let mut groups: BTreeMap<u64, Vec<&Entry>> = BTreeMap::new();
        for e in &self.entries {
            groups.entry(e.rank).or_default().push(e);
        }
        let mut gates = BTreeMap::new();
        let mut first_block: Option<Wait> = None;
        for (rank, members) in groups {
            gates.insert(rank, first_block.clone());
            if first_block.is_none() {
                first_block = group_block(rank, &members, pending, facts, now);
            }
        }
        gates
    }

    /// `stopping` grouped into waves, to run one after the other (each wave in parallel): the
    /// reverse of the start order — later order groups first, and within a group a domain
    /// before the domains it starts `after`.
    pub fn stop_waves(&self, stopping: &[String]) -> Vec<Vec<String>> {
        let mut names: Vec<&String> = stopping.iter().collect();
        names.sort_by_key(|n| self.start_key(n));
        names.dedup();
        let mut by_rank: BTreeMap<std::cmp::Reverse<u64>, Vec<&String>> = BTreeMap::new();
        for n in names {
            by_rank.entry(std::cmp::Reverse(self.start_key(n).0)).or_default().push(n);
        }
        let mut waves = Vec::new();
        for (_, mut left) in by_rank {
            // Kahn's algorithm: a domain stops once every domain of its group that waits for it
            // (`after`) has stopped.
            let members: HashSet<&str> = left.iter().map(|n| n.as_str()).collect();
            let mut dependents: HashMap<&str, usize> = HashMap::new();
            for n in &left {
                for dep in self.dependencies(n) {
                    if members.contains(dep.as_str()) {
                        *dependents.entry(dep.as_str()).or_default() += 1;
                    }
                }
            }
            while !left.is_empty() {
                let (wave, rest): (Vec<&String>, Vec<&String>) =
                    left.iter().partition(|n| dependents.get(n.as_str()).copied().unwrap_or(0) == 0);
                if wave.is_empty() {
                    // Only a cycle can do this, and validation rejects cycles: stop the rest together.
                    waves.push(rest.into_iter().cloned().collect());
                    break;
                }
                for n in &wave {
                    for dep in self.dependencies(n) {
                        if let Some(c) = dependents.get_mut(dep.as_str()) {
                            *c = c.saturating_sub(1);
                        }
                    }
                }
                waves.push(wave.into_iter().cloned().collect());
                left = rest;
            }
        }
        waves
    }
}

/// What holds back the groups after this one: a member that is to start and does not run yet,
/// else the latest-ending `delay` of a member that has not passed.
fn group_block(
    rank: u64,
    members: &[&Entry],
    pending: &BTreeSet<String>,
    facts: &StartupFacts,
    now: Tick,
) -> Option<Wait> {
    // Only the last group has no order, and nothing comes after it.
    let order = u32::try_from(rank).ok()?;
    let starting: Vec<String> = members
        .iter()
        .filter(|e| pending.contains(&e.name) && facts.runs(&e.name) != Some(true))
        .map(|e| e.name.clone())
        .collect();
    if !starting.is_empty() {
        return Some(Wait::Group { order, starting });
    }
    let latest = members
        .iter()
        .filter_map(|e| Some((e, facts.started_at.get(&e.name)?.saturating_add(e.delay?.as_std()))))
        .filter(|(_, until)| *until > now)
        .max_by_key(|(_, until)| *until);
    latest.map(|(e, until)| Wait::Delay { order, domain: e.name.clone(), delay: e.delay.unwrap_or_default(), until })
}

/// Whether an action brings a domain up (what start ordering gates).
pub fn is_start(kind: &ActionKind) -> bool {
    matches!(kind, ActionKind::Start | ActionKind::Restart | ActionKind::Resume)
}

/// Whether an action takes a domain down (what runs in reverse start order).
pub fn is_stop(kind: &ActionKind) -> bool {
    matches!(kind, ActionKind::Shutdown { .. } | ActionKind::Destroy)
}

/// A start the plan holds back: what it would do and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldAction {
    #[serde(flatten)]
    pub action: Action,
    pub waits: Vec<Wait>,
}

impl HeldAction {
    /// `web1: shut off (unknown), policy wants running → start (held: waits for /mnt/images)`
    pub fn line(&self) -> String {
        format!("{} (held: {})", self.action.line(), waits_text(&self.waits))
    }
}

/// The facts a one-shot plan has before anything starts: observed states, nothing started yet;
/// `apply` does not probe health, so every running domain counts as healthy.
pub fn facts_from(observed: &ObservedHost, missing_paths: &HashSet<String>) -> StartupFacts {
    let states: HashMap<String, DomainState> = observed.domains.iter().map(|d| (d.name.clone(), d.state)).collect();
    let healthy = states.keys().cloned().collect();
    StartupFacts { states, started_at: HashMap::new(), healthy, missing_paths: missing_paths.clone() }
}

/// Apply start ordering to a whole-host plan (for `plan` and `apply`): stops sorted in reverse
/// start order, starts in start order; a start that cannot happen in this run (a missing path,
/// a dependency that is not running and not started by this plan) is moved to `held`; a start
/// that waits for others in this plan says so in a note.
pub fn order_plan(desired: &DesiredState, observed: &ObservedHost, missing_paths: &HashSet<String>, plan: &mut Plan) {
    let order = StartupOrder::new(desired);
    if !order.is_constrained() {
        return;
    }
    let stopping: Vec<String> = plan.actions.iter().filter(|a| is_stop(&a.kind)).map(|a| a.domain.clone()).collect();
    let wave_of: HashMap<String, usize> = order
        .stop_waves(&stopping)
        .into_iter()
        .enumerate()
        .flat_map(|(i, wave)| wave.into_iter().map(move |d| (d, i)))
        .collect();
    // Run the starts on a virtual clock: what starts, in which sequence, and what waits.
    let mut facts = facts_from(observed, missing_paths);
    let mut pending: BTreeSet<String> =
        plan.actions.iter().filter(|a| is_start(&a.kind)).map(|a| a.domain.clone()).collect();
    let mut sequence: HashMap<String, usize> = HashMap::new();
    let mut waited: BTreeMap<String, Vec<Wait>> = BTreeMap::new();
    let mut now = Tick::ZERO;
    let last = loop {
        let d = order.decide(&pending, &facts, now);
        for (name, waits) in &d.held {
            let seen = waited.entry(name.clone()).or_default();
            for w in waits {
                remember_wait(seen, w);
            }
        }
        if !d.ready.is_empty() {
            for name in d.ready {
                pending.remove(&name);
                sequence.insert(name.clone(), sequence.len());
                facts.states.insert(name.clone(), DomainState::Running);
                facts.healthy.insert(name.clone());
                facts.started_at.insert(name, now);
            }
            continue;
        }
        match d.wake_at {
            Some(t) => now = t,
            None => break d.held,
        }
    };
    let held: HashMap<String, Vec<Wait>> = last.into_iter().collect();
    let mut kept = Vec::with_capacity(plan.actions.len());
    for action in std::mem::take(&mut plan.actions) {
        if is_start(&action.kind) {
            if let Some(waits) = held.get(&action.domain) {
                plan.held.push(HeldAction { action, waits: waits.clone() });
                continue;
            }
            if let Some(waits) = waited.get(&action.domain) {
                plan.notes.push(Note {
                    subject: action.domain.clone(),
                    severity: Severity::Info,
                    message: format!("start {}", waits_text(waits)),
                });
            }
            for dep in order.dependencies(&action.domain) {
                if order.has_health(dep) {
                    plan.notes.push(Note {
                        subject: action.domain.clone(),
                        severity: Severity::Info,
                        message: format!("`after: {dep}` waits only for {dep} to run: `apply` does not probe health"),
                    });
                }
            }
        }
        kept.push(action);
    }
    plan.held.sort_by_key(|h| order.start_key(&h.action.domain));
    // Stable sorts: within a phase, stops by wave and starts by sequence; the rest keeps its place.
    kept.sort_by_key(|a| {
        let within = if is_stop(&a.kind) {
            wave_of.get(&a.domain).copied().unwrap_or(0)
        } else if is_start(&a.kind) {
            sequence.get(&a.domain).copied().unwrap_or(usize::MAX)
        } else {
            0
        };
        (a.kind.phase(), within)
    });
    plan.actions = kept;
}

#[cfg(test)]
mod tests {
    use std::time::Duration as Std;

    use virtwarden_policies::{load_texts, Startup};

    use super::*;

    fn desired(spec: &str) -> DesiredState {
        let text = format!(
            "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  domains:\n{spec}"
        );
        load_texts([(std::path::Path::new("t.yaml"), text.as_str())]).expect("valid policy").desired
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn facts(running: &[&str], off: &[&str]) -> StartupFacts {
        let mut f = StartupFacts::default();
        for n in running {
            f.states.insert(n.to_string(), DomainState::Running);
            f.healthy.insert(n.to_string());
        }
        for n in off {
            f.states.insert(n.to_string(), DomainState::ShutOff);
        }
        f
    }

    fn held_text(d: &StartDecision) -> Vec<String> {
        d.held.iter().map(|(n, w)| format!("{n}: {}", waits_text(w))).collect()
    }

    const GROUPS: &str = "    - name: db1\n      startup: {order: 1, delay: 30s}\n    - name: db2\n      startup: {order: 1}\n    - name: web1\n      startup: {order: 2}\n    - name: batch\n";

    #[test]
    fn order_groups_start_lowest_first_and_the_same_group_together() {
        let o = StartupOrder::new(&desired(GROUPS));
        let all = set(&["batch", "web1", "db2", "db1"]);
        let d = o.decide(&all, &facts(&[], &["db1", "db2", "web1", "batch"]), Tick::ZERO);
        assert_eq!(d.ready, ["db1", "db2"]);
        assert_eq!(
            held_text(&d),
            [
                "web1: waits for order group 1 (db1, db2 are not running yet)",
                "batch: waits for order group 1 (db1, db2 are not running yet)",
            ]
        );
        assert_eq!(d.wake_at, None, "nothing waits for time yet");
    }

    #[test]
    fn delay_holds_the_next_group_until_it_passed() {
        let o = StartupOrder::new(&desired(GROUPS));
        let mut f = facts(&["db1", "db2"], &["web1", "batch"]);
        f.started_at.insert("db1".into(), Std::from_secs(10));
        let pending = set(&["web1", "batch"]);
        let d = o.decide(&pending, &f, Std::from_secs(20));
        assert!(d.ready.is_empty());
        assert_eq!(
            held_text(&d),
            [
                "web1: waits for order group 1 (+30s delay after db1)",
                "batch: waits for order group 1 (+30s delay after db1)"
            ]
        );
        assert_eq!(d.wake_at, Some(Std::from_secs(40)));
        let d = o.decide(&pending, &f, Std::from_secs(40));
        assert_eq!(d.ready, ["web1"], "group 2 runs; the unordered group waits for it");
        assert_eq!(held_text(&d), ["batch: waits for order group 2 (web1 is not running yet)"]);
    }

    #[test]
    fn a_domain_already_running_does_not_hold_its_group_or_delay() {
        let o = StartupOrder::new(&desired(GROUPS));
        // db1 was running before (no start time): its delay is long over.
        let d = o.decide(&set(&["web1"]), &facts(&["db1", "db2"], &["web1"]), Tick::ZERO);
        assert_eq!(d.ready, ["web1"]);
    }

    #[test]
    fn a_domain_not_to_be_started_does_not_hold_later_groups() {
        // db2 is shut off but not pending (e.g. state: stopped, or its start failed).
        let o = StartupOrder::new(&desired(GROUPS));
        let d = o.decide(&set(&["web1"]), &facts(&["db1"], &["db2", "web1"]), Tick::ZERO);
        assert_eq!(d.ready, ["web1"]);
    }

    #[test]
    fn after_waits_for_running_and_healthy_and_for_paths() {
        let o = StartupOrder::new(&desired(
            "    - name: db1\n      health: {probe: {tcp: {port: 5432}}}\n    - name: cache1\n    - name: web1\n      startup:\n        after: [db1, cache1]\n        requires: {paths: [/mnt/images/web1.qcow2]}\n",
        ));
        let mut f = facts(&[], &["web1", "cache1"]);
        f.states.insert("db1".into(), DomainState::Running);
        f.missing_paths.insert("/mnt/images/web1.qcow2".into());
        let d = o.decide(&set(&["web1"]), &f, Tick::ZERO);
        assert_eq!(
            held_text(&d),
            ["web1: waits for db1 (not healthy yet), cache1 (not running), /mnt/images/web1.qcow2"]
        );
        f.states.remove("cache1");
        f.healthy.insert("db1".into());
        f.missing_paths.clear();
        let d = o.decide(&set(&["web1"]), &f, Tick::ZERO);
        assert_eq!(held_text(&d), ["web1: waits for cache1 (not defined on this host)"]);
        f.states.insert("cache1".into(), DomainState::Running);
        assert_eq!(o.decide(&set(&["web1"]), &f, Tick::ZERO).ready, ["web1"]);
    }

    #[test]
    fn a_paused_dependency_is_not_running() {
        let o = StartupOrder::new(&desired("    - name: db1\n    - name: web1\n      startup: {after: [db1]}\n"));
        let mut f = facts(&[], &["web1"]);
        f.states.insert("db1".into(), DomainState::Paused);
        assert_eq!(held_text(&o.decide(&set(&["web1"]), &f, Tick::ZERO)), ["web1: waits for db1 (not running)"]);
    }

    #[test]
    fn without_startup_everything_is_ready() {
        let o = StartupOrder::new(&desired("    - name: a\n    - name: b\n"));
        assert!(!o.is_constrained());
        assert_eq!(o.decide(&set(&["b", "a"]), &facts(&[], &["a", "b"]), Tick::ZERO).ready, ["a", "b"]);
    }

    #[test]
    fn stops_go_in_reverse_order() {
        let o = StartupOrder::new(&desired(
            "    - name: db1\n      startup: {order: 1}\n    - name: app1\n      startup: {order: 2, after: [db1]}\n    - name: web1\n      startup: {order: 2, after: [app1]}\n    - name: web2\n      startup: {order: 2}\n    - name: batch\n",
        ));
        let all: Vec<String> = ["db1", "app1", "web1", "web2", "batch"].iter().map(|s| s.to_string()).collect();
        assert_eq!(o.stop_waves(&all), [vec!["batch"], vec!["web1", "web2"], vec!["app1"], vec!["db1"]]);
        assert_eq!(o.stop_waves(&["db1".to_string(), "web2".to_string()]), [vec!["web2"], vec!["db1"]]);
    }

    #[test]
    fn required_paths_are_listed_once() {
        let mut d = desired("    - name: a\n    - name: b\n");
        for m in &mut d.domains {
            m.spec.startup = Some(Startup {
                requires: Some(virtwarden_policies::Requires { paths: vec!["/mnt/x".into()] }),
                ..Default::default()
            });
        }
        assert_eq!(StartupOrder::new(&d).required_paths(), set(&["/mnt/x"]));
    }
}
