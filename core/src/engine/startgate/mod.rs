//! The start gate: start ordering in `run` (issue 13). A start of a stopped or crashed domain
//! waits for its turn — order groups, `after`, `delay`, `requires.paths` (decided by
//! `plan::startup`, as in `apply`) and a free start slot (`--max-concurrent-starts`, lower order
//! first) — and a stop for `state: stopped` waits for the domains that stop before it. One task
//! decides for every waiter whenever the status changes; a waiter's status says what it waits for.

mod paths;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use virtwarden_policies::{DesiredDomainState, DesiredState, ManagedDomain};

use super::clock::{sleep_until, Clock};
use super::shared::Shared;
use crate::observe::{DomainState, ObservedDomain};
use crate::plan::restart::Tick;
use crate::plan::startup::{DomainWait, StartupFacts, StartupOrder, Wait};
use crate::plan::ActionKind;
use paths::{Found, PathWatch};

/// Default `--max-concurrent-starts`. `make bench-apply`, kill -9 of 16 real QEMU guests under
/// `run`, p50 time until all run again vs the parallel floor, two interleaved runs (docs/benchmarks.md):
/// 1 slot 4.55×, 2 4.23×, 4 1.81×/1.80×, 8 1.47×/1.37×, 16 1.39×/1.51×, 32 1.40×/1.50×. From 8
/// on the differences are noise; 8 is the smallest value there (the bound that protects most)
/// and matches the engine's own bound on concurrent libvirt calls.
pub const DEFAULT_MAX_CONCURRENT_STARTS: usize = 8;

/// What a start shows while a resync round is in progress: it waits until every managed
/// domain has been looked at, so it knows all the domains that are to start with it (at host
/// boot and after a reconnect, every domain is looked at in one round).
const ROUND: &str = "every domain to be looked at (resync in progress)";

/// Whether the gate orders and bounds this recovery: a stopped or crashed domain brought up
/// (not a resume of a paused one).
pub(crate) fn gates_start(kind: &ActionKind) -> bool {
    matches!(kind, ActionKind::Start | ActionKind::Restart)
}

/// Whether the gate orders this action: a stop for `state: stopped`, in reverse start order.
pub(crate) fn gates_stop(kind: &ActionKind) -> bool {
    crate::plan::startup::is_stop(kind)
}

/// Whether a look that found `observed` may go on to start the domain (its policy wants it
/// running and it is down). Such a look holds later order groups back until it has decided.
pub(crate) fn may_start(managed: &ManagedDomain, observed: Option<&ObservedDomain>) -> bool {
    managed.spec.state == DesiredDomainState::Running
        && observed.is_some_and(|d| matches!(d.state, DomainState::ShutOff | DomainState::Crashed))
}

/// How a wait for a start's turn ended.
pub(crate) enum Turn {
    /// Start now; the permit is a start slot, held until the start step finished.
    Go(Permit),
    /// Something happened to the domain meanwhile (a libvirt event): look at it again.
    LookAgain,
}

/// A start slot. Dropped without [`Permit::finish`]: the start did not bring the domain up.
pub(crate) struct Permit {
    gate: Arc<StartGate>,
    domain: String,
    up: bool,
}

impl Permit {
    /// The start step finished; `up`: the domain runs (its `delay` counts from now).
    pub(crate) fn finish(mut self, up: bool) {
        self.up = up;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.finished(&self.domain, self.up);
    }
}

/// A look that may start its domain, until it has decided (see [`may_start`]).
pub(crate) struct Announced {
    gate: Arc<StartGate>,
    domain: String,
}

impl Drop for Announced {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if let Some(n) = st.announced.get_mut(&self.domain) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.announced.remove(&self.domain);
            }
        }
        drop(st);
        self.gate.kick();
    }
}

/// Where a waiter is answered.
enum Reply {
    Start(oneshot::Sender<Turn>),
    /// `true`: stop now; `false`: look again.
    Stop(oneshot::Sender<bool>),
}

struct Waiter {
    id: u64,
    since: Instant,
    reply: Reply,
}

/// Removes a waiter whose wait was cancelled (a stop, a new policy).
struct Registration {
    gate: Arc<StartGate>,
    domain: String,
    id: u64,
    stop: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        let map = if self.stop { &mut st.stops } else { &mut st.starts };
        if map.get(&self.domain).is_some_and(|w| w.id == self.id) {
            map.remove(&self.domain);
            drop(st);
            self.gate.kick();
        }
    }
}

#[derive(Default)]
struct GateState {
    order: Arc<StartupOrder>,
    /// Managed domains whose policy says `state: stopped`.
    stopped_by_policy: BTreeSet<String>,
    /// Looks in progress that may start their domain (per domain, how many).
    announced: HashMap<String, usize>,
    /// Starts waiting for their turn.
    starts: BTreeMap<String, Waiter>,
    /// Stops waiting for their turn.
    stops: BTreeMap<String, Waiter>,
    /// Starts holding a slot.
    starting: BTreeSet<String>,
    /// When each domain last came up through the gate (for `delay`).
    started_at: HashMap<String, Tick>,
    next_id: u64,
}

/// Shared by the workers (who wait) and the task that decides (see [`run`]).
pub(crate) struct StartGate {
    state: Mutex<GateState>,
    /// Bumped when a waiter, a slot or the policy changed: the deciding task looks again.
    kick: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    max_starts: usize,
}

impl StartGate {
    pub(crate) fn new(max_starts: usize, clock: Arc<dyn Clock>) -> Self {
        StartGate { state: Mutex::default(), kick: watch::channel(0).0, clock, max_starts: max_starts.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self) {
        self.kick.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Put a new desired state's ordering in force (before its workers get their policies).
    pub(crate) fn set_desired(&self, desired: &DesiredState) {
        let mut st = self.lock();
        st.order = Arc::new(StartupOrder::new(desired));
        st.stopped_by_policy = desired
            .domains
            .iter()
            .filter(|m| m.spec.state == DesiredDomainState::Stopped)
            .map(|m| m.spec.name.clone())
            .collect();
        let managed: HashSet<&str> = desired.domains.iter().map(|m| m.spec.name.as_str()).collect();
        st.started_at.retain(|d, _| managed.contains(d.as_str()));
        drop(st);
        self.kick();
    }

    /// A look at `domain` that may start it (see [`may_start`]) holds later order groups back
    /// until the returned guard is dropped. Call it before the look's resync round is
    /// acknowledged: a start waits for the round to complete, then knows every such look.
    pub(crate) fn announce(self: &Arc<Self>, domain: &str, may_start: bool) -> Option<Announced> {
        if !may_start {
            return None;
        }
        *self.lock().announced.entry(domain.to_string()).or_default() += 1;
        Some(Announced { gate: self.clone(), domain: domain.to_string() })
    }

    /// Wait until `domain` may start (ordering, `after`, paths, `delay`, a free slot). Cancel by
    /// dropping the future; the status says meanwhile what it waits for.
    pub(crate) async fn wait_turn(self: &Arc<Self>, domain: &str) -> Turn {
        let (tx, rx) = oneshot::channel();
        let _registered = self.register(domain, Reply::Start(tx));
        rx.await.unwrap_or(Turn::LookAgain)
    }

    /// Wait until the domains that stop before `domain` (later order groups, its dependents)
    /// are down. `false`: look again first.
    pub(crate) async fn wait_stop_turn(self: &Arc<Self>, domain: &str) -> bool {
        let (tx, rx) = oneshot::channel();
        let _registered = self.register(domain, Reply::Stop(tx));
        rx.await.unwrap_or(false)
    }

    fn register(self: &Arc<Self>, domain: &str, reply: Reply) -> Registration {
        let stop = matches!(reply, Reply::Stop(_));
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        let map = if stop { &mut st.stops } else { &mut st.starts };
        map.insert(domain.to_string(), Waiter { id, since: Instant::now(), reply });
        drop(st);
        self.kick();
        Registration { gate: self.clone(), domain: domain.to_string(), id, stop }
    }

    /// libvirt reported an event for `domain`: a wait of its own ends, its worker looks again
    /// (someone may have started it meanwhile).
    pub(crate) fn domain_event(&self, domain: &str) {
        let mut st = self.lock();
        let start = st.starts.remove(domain);
        let stop = st.stops.remove(domain);
        drop(st);
        if let Some(Waiter { reply: Reply::Start(tx), .. }) = start {
            let _ = tx.send(Turn::LookAgain);
        }
        if let Some(Waiter { reply: Reply::Stop(tx), .. }) = stop {
            let _ = tx.send(false);
        }
        self.kick();
    }

    fn finished(&self, domain: &str, up: bool) {
        let mut st = self.lock();
        st.starting.remove(domain);
        if up {
            st.started_at.insert(domain.to_string(), self.clock.now());
        }
        drop(st);
        self.kick();
    }
}

/// What the deciding task reads about the engine at one moment.
#[derive(Debug, Default)]
struct View {
    facts: StartupFacts,
    quarantined: HashSet<String>,
    /// Managed domains that are up in any way (what a stop waits for to go down).
    up: HashSet<String>,
    /// A resync round is in progress.
    round: bool,
}

fn view_of(shared: &Shared) -> View {
    let published: HashMap<String, DomainState> =
        shared.domains.read().map(|d| d.iter().map(|(n, o)| (n.clone(), o.state)).collect()).unwrap_or_default();
    let mut view = View::default();
    {
        let book = shared.book.lock().unwrap_or_else(|p| p.into_inner());
        for (name, s) in book.iter() {
            // Not looked at yet (`unknown`) is not "not defined".
            let state = published.get(name).copied().or((s.state == "unknown").then_some(DomainState::NoState));
            if let Some(state) = state {
                view.facts.states.insert(name.clone(), state);
            }
            if s.quarantined.is_some() {
                view.quarantined.insert(name.clone());
            }
        }
    }
    view.up = view
        .facts
        .states
        .iter()
        .filter(|(_, s)| !matches!(s, DomainState::ShutOff | DomainState::Crashed | DomainState::NoState))
        .map(|(n, _)| n.clone())
        .collect();
    view.facts.healthy = shared.healthy_domains();
    view.round = !shared.resync.lock().unwrap_or_else(|p| p.into_inner()).waiting.is_empty();
    view
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Start,
    Stop,
}

/// What one decision says.
#[derive(Debug, Default, PartialEq)]
struct Verdicts {
    /// Starts that go now, in start order.
    starts: Vec<String>,
    stops: Vec<String>,
    /// What each waiter that is held waits for, in words.
    held: BTreeMap<String, (Kind, Vec<String>)>,
    /// Decide again then (a `delay` ends).
    wake_at: Option<Tick>,
}

/// Decide for every waiter. Pure: the gate's state, the view, what the path checks found.
fn decide(st: &GateState, view: &View, found: &dyn Fn(&str) -> Option<Found>, max: usize, now: Tick) -> Verdicts {
    let mut v = Verdicts::default();
    let order = &st.order;
    if !st.starts.is_empty() {
        // During a resync round, wait until every domain has been looked at when it matters
        // who else is to start: ordering is declared, or there are fewer slots than starts.
        let scarce = st.starts.len() > max.saturating_sub(st.starting.len());
        if view.round && (order.is_constrained() || scarce) {
            for name in st.starts.keys() {
                v.held.insert(name.clone(), (Kind::Start, vec![ROUND.to_string()]));
            }
        } else {
            let pending: BTreeSet<String> =
                st.starts.keys().chain(&st.starting).chain(st.announced.keys()).cloned().collect();
            let d = order.decide(&pending, &view.facts, now);
            v.wake_at = d.wake_at;
            for (name, waits) in d.held {
                if st.starts.contains_key(&name) {
                    let words = waits.iter().map(|w| words(w, view, found)).collect();
                    v.held.insert(name, (Kind::Start, words));
                }
            }
            let free = max.saturating_sub(st.starting.len());
            for name in d.ready.into_iter().filter(|n| st.starts.contains_key(n)) {
                if v.starts.len() < free {
                    v.starts.push(name);
                } else {
                    let slot = format!("a start slot ({max} at a time, --max-concurrent-starts)");
                    v.held.insert(name, (Kind::Start, vec![slot]));
                }
            }
        }
    }
    if !st.stops.is_empty() {
        let mut to_stop: Vec<String> = st.stopped_by_policy.iter().filter(|d| view.up.contains(*d)).cloned().collect();
        to_stop.extend(st.stops.keys().cloned());
        let waves = order.stop_waves(&to_stop);
        for name in st.stops.keys() {
            let wave = waves.iter().position(|w| w.contains(name)).unwrap_or(0);
            let first: Vec<String> = waves[..wave].iter().flatten().map(|d| format!("{d} (stops first)")).collect();
            if first.is_empty() {
                v.stops.push(name.clone());
            } else {
                v.held.insert(name.clone(), (Kind::Stop, first));
            }
        }
    }
    v
}

/// A wait in words, with what only the engine knows: a quarantined dependency, a path whose
/// check does not return.
fn words(w: &Wait, view: &View, found: &dyn Fn(&str) -> Option<Found>) -> String {
    match w {
        Wait::Domain { domain, why: DomainWait::NotRunning } if view.quarantined.contains(domain) => {
            Wait::Domain { domain: domain.clone(), why: DomainWait::Quarantined }.to_string()
        }
        Wait::Path { path } if found(path) == Some(Found::NotAnswering) => format!("{path} (not answering)"),
        other => other.to_string(),
    }
}

/// The paths to check for the waiting starts' required paths (each domain's in its order): a
/// domain's paths after one whose check does not return are not checked meanwhile — it waits
/// for that one anyway — so a domain holds at most one hung check, and a path at most one.
fn watch_list<'a>(
    required: impl Iterator<Item = &'a [String]>,
    found: &dyn Fn(&str) -> Option<Found>,
) -> BTreeSet<String> {
    required
        .flat_map(|paths| {
            let cut = paths.iter().position(|p| found(p) == Some(Found::NotAnswering)).map_or(paths.len(), |i| i + 1);
            paths[..cut].iter().cloned()
        })
        .collect()
}

/// The deciding task's own state.
struct Coordinator {
    /// What each waiter's status says it waits for.
    shown: HashMap<String, Vec<String>>,
    paths: PathWatch,
}

impl Coordinator {
    /// Decide once: let go what may go, tell what waits. Returns when to decide again on its own.
    fn step(&mut self, shared: &Shared, gate: &Arc<StartGate>) -> Option<Instant> {
        let idle = {
            let st = gate.lock();
            st.starts.is_empty() && st.stops.is_empty()
        };
        if idle {
            self.paths.set(BTreeSet::new());
            shared.metrics.paths_not_answering.set(0);
            self.clear_all(shared);
            return None;
        }
        let mut view = view_of(shared);
        let now = gate.clock.now();
        let mut went: Vec<(String, Waiter)> = Vec::new();
        let (verdicts, waiting) = {
            let mut st = gate.lock();
            let paths = &self.paths;
            let watched = watch_list(st.starts.keys().map(|d| st.order.paths(d)), &|p| paths.found(p));
            self.paths.set(watched);
            view.facts.missing_paths = self.paths.missing();
            shared.metrics.paths_not_answering.set(self.paths.not_answering() as i64);
            view.facts.started_at = st.started_at.clone();
            let paths = &self.paths;
            let v = decide(&st, &view, &|p| paths.found(p), gate.max_starts, now);
            for name in &v.starts {
                if let Some(w) = st.starts.remove(name) {
                    st.starting.insert(name.clone());
                    went.push((name.clone(), w));
                }
            }
            for name in &v.stops {
                if let Some(w) = st.stops.remove(name) {
                    went.push((name.clone(), w));
                }
            }
            let waiting: HashSet<String> = st.starts.keys().chain(st.stops.keys()).cloned().collect();
            (v, waiting)
        };
        // Status first, so it never shows a domain that started as still waiting.
        self.report(shared, &verdicts, &went, &waiting);
        for (name, w) in went {
            match w.reply {
                Reply::Start(tx) => {
                    // Not delivered (the wait was cancelled meanwhile): the permit is dropped
                    // here, outside the lock, and frees its slot.
                    let _ = tx.send(Turn::Go(Permit { gate: gate.clone(), domain: name, up: false }));
                }
                Reply::Stop(tx) => {
                    let _ = tx.send(true);
                }
            }
        }
        verdicts.wake_at.map(|t| shared.instant_at(t))
    }

    /// Status and log: what each waiter waits for, once per change; how long a wait lasted.
    fn report(&mut self, shared: &Shared, v: &Verdicts, went: &[(String, Waiter)], waiting: &HashSet<String>) {
        for (name, w) in went {
            if self.shown.remove(name).is_some() {
                let waited_ms = w.since.elapsed().as_millis() as u64;
                match w.reply {
                    Reply::Start(_) => tracing::info!(domain = %name, waited_ms, "start may go"),
                    Reply::Stop(_) => tracing::info!(domain = %name, waited_ms, "stop may go"),
                }
                shared.update_domain(name, |s| s.waiting_for.clear());
            }
        }
        for (name, (kind, waits)) in &v.held {
            if self.shown.get(name) == Some(waits) {
                continue;
            }
            // A resync round passes in moments: keep showing what the domain waited for before.
            if waits.len() == 1 && waits[0] == ROUND && self.shown.contains_key(name) {
                continue;
            }
            let text = waits.join(", ");
            match kind {
                Kind::Start => tracing::info!(domain = %name, waits = %text, "start waits"),
                Kind::Stop => tracing::info!(domain = %name, waits = %text, "stop waits"),
            }
            shared.update_domain(name, |s| s.waiting_for = waits.clone());
            self.shown.insert(name.clone(), waits.clone());
        }
        let gone: Vec<String> = self.shown.keys().filter(|n| !waiting.contains(*n)).cloned().collect();
        for name in gone {
            self.shown.remove(&name);
            shared.update_domain(&name, |s| s.waiting_for.clear());
        }
    }

    fn clear_all(&mut self, shared: &Shared) {
        for (name, _) in self.shown.drain() {
            shared.update_domain(&name, |s| s.waiting_for.clear());
        }
    }
}

/// The deciding task, for as long as the engine runs: decides whenever the status changes (a
/// domain observed, a probe passed), a waiter or a slot changes, a required path may have
/// appeared, or a `delay` ends. Restarted if it panics: starts must not stall for good.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match std::panic::AssertUnwindSafe(coordinate(shared.clone())).catch_unwind().await {
            Ok(()) => return,
            Err(_) => {
                tracing::error!("the start gate panicked; restarting it");
                shared.metrics.worker_panics.inc();
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
}

async fn coordinate(shared: Arc<Shared>) {
    let gate = shared.startgate.clone();
    let mut status = shared.status_version.subscribe();
    let mut kicks = gate.kick.subscribe();
    let mut c = Coordinator { shown: HashMap::new(), paths: PathWatch::new() };
    loop {
        let wake = c.step(&shared, &gate);
        tokio::select! {
            // The engine loop ended.
            _ = shared.msg.closed() => return,
            r = status.changed() => if r.is_err() { return },
            r = kicks.changed() => if r.is_err() { return },
            _ = c.paths.changed() => {}
            _ = sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtwarden_policies::load_texts;

    use super::*;

    fn desired(spec: &str) -> DesiredState {
        let text = format!(
            "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  domains:\n{spec}"
        );
        load_texts([(std::path::Path::new("t.yaml"), text.as_str())]).expect("valid policy").desired
    }

    struct Fixed;
    impl Clock for Fixed {
        fn now(&self) -> Tick {
            Duration::from_secs(100)
        }
    }

    fn gate(spec: &str, max: usize) -> Arc<StartGate> {
        let g = Arc::new(StartGate::new(max, Arc::new(Fixed)));
        g.set_desired(&desired(spec));
        g
    }

    /// Register waiters the way workers do (the receivers are kept so replies can be seen).
    fn wait(g: &Arc<StartGate>, names: &[&str]) -> Vec<(Registration, oneshot::Receiver<Turn>)> {
        names
            .iter()
            .map(|n| {
                let (tx, rx) = oneshot::channel();
                (g.register(n, Reply::Start(tx)), rx)
            })
            .collect()
    }

    fn view(states: &[(&str, DomainState)]) -> View {
        let mut v = View::default();
        for (n, s) in states {
            v.facts.states.insert(n.to_string(), *s);
            v.facts.healthy.insert(n.to_string());
            if *s == ON {
                v.up.insert(n.to_string());
            }
        }
        v
    }

    fn held(v: &Verdicts) -> Vec<String> {
        v.held.iter().map(|(n, (_, w))| format!("{n}: {}", w.join(", "))).collect()
    }

    const OFF: DomainState = DomainState::ShutOff;
    const ON: DomainState = DomainState::Running;

    #[test]
    fn slots_go_to_the_lowest_order_first() {
        let g = gate(
            "    - name: c\n      startup: {order: 3}\n    - name: a\n      startup: {order: 1}\n    - name: b1\n      startup: {order: 2}\n    - name: b2\n      startup: {order: 2}\n",
            1,
        );
        let _w = wait(&g, &["c", "b2", "b1"]);
        let v = view(&[("a", ON), ("b1", OFF), ("b2", OFF), ("c", OFF)]);
        let d = decide(&g.lock(), &v, &|_| None, 1, Tick::ZERO);
        assert_eq!(d.starts, ["b1"], "group 2 in policy order; c waits for group 2");
        assert_eq!(
            held(&d),
            [
                "b2: a start slot (1 at a time, --max-concurrent-starts)",
                "c: order group 2 (b1, b2 are not running yet)"
            ]
        );
    }

    #[test]
    fn a_quarantined_dependency_is_named_and_still_waited_for() {
        let g = gate("    - name: db1\n    - name: web1\n      startup: {after: [db1]}\n", 4);
        let _w = wait(&g, &["web1"]);
        let mut v = view(&[("db1", OFF), ("web1", OFF)]);
        v.quarantined.insert("db1".into());
        let d = decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO);
        assert!(d.starts.is_empty());
        assert_eq!(held(&d), ["web1: db1 (quarantined)"]);
    }

    #[test]
    fn an_announced_look_holds_later_groups_and_a_round_holds_ordered_starts() {
        let g = gate("    - name: db1\n      startup: {order: 1}\n    - name: web1\n      startup: {order: 2}\n", 4);
        let _w = wait(&g, &["web1"]);
        let v = view(&[("db1", OFF), ("web1", OFF)]);
        let announced = g.announce("db1", true);
        let d = decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO);
        assert_eq!(held(&d), ["web1: order group 1 (db1 is not running yet)"]);
        drop(announced);
        let mut v = v;
        v.round = true;
        let d = decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO);
        assert_eq!(held(&d), [format!("web1: {ROUND}")]);
        v.round = false;
        assert_eq!(decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO).starts, ["web1"]);
    }

    #[test]
    fn paths_not_answering_say_so() {
        let g = gate("    - name: web1\n      startup: {requires: {paths: [/mnt/nfs/disk]}}\n", 4);
        let _w = wait(&g, &["web1"]);
        let mut v = view(&[("web1", OFF)]);
        v.facts.missing_paths.insert("/mnt/nfs/disk".into());
        let d = decide(&g.lock(), &v, &|_| Some(Found::NotAnswering), 4, Tick::ZERO);
        assert_eq!(held(&d), ["web1: /mnt/nfs/disk (not answering)"]);
    }

    #[test]
    fn stops_wait_for_later_groups_and_dependents_to_be_down() {
        let g = gate(
            "    - name: db1\n      state: stopped\n      startup: {order: 1}\n    - name: web1\n      state: stopped\n      startup: {order: 2, after: [db1]}\n    - name: other\n      startup: {order: 3}\n",
            4,
        );
        let (tx, _rx) = oneshot::channel();
        let _r = g.register("db1", Reply::Stop(tx));
        let v = view(&[("db1", ON), ("web1", ON), ("other", ON)]);
        let d = decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO);
        assert_eq!(held(&d), ["db1: web1 (stops first)"], "`other` is not to stop");
        let v = view(&[("db1", ON), ("web1", OFF), ("other", ON)]);
        assert_eq!(decide(&g.lock(), &v, &|_| None, 4, Tick::ZERO).stops, ["db1"]);
    }

    #[test]
    fn a_domain_holds_at_most_one_hung_path_check() {
        let web1: Vec<String> = ["/nfs/a", "/nfs/b", "/local/c"].map(String::from).to_vec();
        let db1: Vec<String> = vec!["/nfs/b".to_string()];
        let hung = |p: &str| (p == "/nfs/a").then_some(Found::NotAnswering);
        let list = watch_list([web1.as_slice(), db1.as_slice()].into_iter(), &hung);
        // web1 waits for /nfs/a anyway: its later paths are not checked meanwhile; db1's are.
        assert_eq!(list, BTreeSet::from(["/nfs/a".to_string(), "/nfs/b".to_string()]));
        let list = watch_list([web1.as_slice()].into_iter(), &|_| None);
        assert_eq!(list.len(), 3, "nothing hangs: every path is checked");
    }

    #[tokio::test]
    async fn a_permit_frees_its_slot_and_starts_the_delay() {
        let g = gate(
            "    - name: db1\n      startup: {order: 1, delay: 30s}\n    - name: web1\n      startup: {order: 2}\n",
            1,
        );
        g.lock().starting.insert("db1".into());
        let permit = Permit { gate: g.clone(), domain: "db1".into(), up: false };
        permit.finish(true);
        let st = g.lock();
        assert!(st.starting.is_empty());
        assert_eq!(st.started_at.get("db1"), Some(&Duration::from_secs(100)));
        drop(st);
        let _w = wait(&g, &["web1"]);
        let mut v = view(&[("db1", ON), ("web1", OFF)]);
        v.facts.started_at = g.lock().started_at.clone();
        let d = decide(&g.lock(), &v, &|_| None, 1, Duration::from_secs(110));
        assert_eq!(held(&d), ["web1: order group 1 (+30s delay after db1)"]);
        assert_eq!(d.wake_at, Some(Duration::from_secs(130)));
    }

    #[tokio::test]
    async fn an_event_ends_a_wait_and_a_cancelled_wait_leaves_no_waiter() {
        let g = gate("    - name: web1\n", 1);
        let g2 = g.clone();
        let waiting = tokio::spawn(async move { matches!(g2.wait_turn("web1").await, Turn::LookAgain) });
        while g.lock().starts.is_empty() {
            tokio::task::yield_now().await;
        }
        g.domain_event("web1");
        assert!(waiting.await.unwrap(), "an event makes the worker look again");
        let fut = g.wait_turn("web1");
        let cancelled = tokio::time::timeout(Duration::from_millis(1), fut).await;
        assert!(cancelled.is_err());
        assert!(g.lock().starts.is_empty(), "a dropped wait unregisters");
    }
}
