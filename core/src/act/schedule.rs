//! Running a plan's domain actions in parallel: different domains at once (bounded), each
//! domain's own actions in order; configuration, then stops (reverse start order, wave by
//! wave), then starts as start ordering releases them. Results come back in plan order.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use virtwarden_policies::DesiredState;

use super::execute::{execute_action, ActionOutcome};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::observe::paths::missing_paths;
use crate::observe::DomainState;
use crate::plan::startup::{is_start, is_stop, remember_wait, waits_text, StartupFacts, StartupOrder, Wait};
use crate::plan::Action;

/// Default bound on concurrent actions in `apply` (`--parallel`): libvirtd serves 20 calls at
/// once by default (`max_workers`), which the 4 pooled connections reach. `make bench-apply`
/// measured 50 starts at 82 s (4), 52 s (8), 33 s (16), 36 s (20), 32 s (32), 29 s (50): past
/// 16, noise (docs/benchmarks.md).
pub const DEFAULT_PARALLEL: usize = 20;

/// How `apply` runs a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// At most this many actions at once, each on a different domain (at least 1).
    pub parallel: usize,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { parallel: DEFAULT_PARALLEL }
    }
}

/// One domain's actions, run in order on one thread.
struct Job {
    indexes: Vec<usize>,
}

/// What a finished job reports: per action, its index, error text and duration.
type JobResult = Vec<(usize, Option<String>, u128)>;

/// A bounded set of threads running jobs inside a scope.
struct Pool<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    hv: &'env dyn Hypervisor,
    actions: &'env [Action],
    tx: mpsc::Sender<JobResult>,
    rx: mpsc::Receiver<JobResult>,
    in_flight: usize,
    limit: usize,
}

impl<'scope, 'env> Pool<'scope, 'env> {
    fn has_room(&self) -> bool {
        self.in_flight < self.limit
    }

    fn spawn(&mut self, job: Job) {
        let (hv, actions, tx) = (self.hv, self.actions, self.tx.clone());
        self.in_flight += 1;
        self.scope.spawn(move || {
            let mut results = Vec::with_capacity(job.indexes.len());
            for i in job.indexes {
                let action = &actions[i];
                let started = Instant::now();
                // A panic must come back as a result: the scheduler waits for every job.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute_action(hv, action)))
                    .unwrap_or_else(|_| {
                        Err(HypervisorError::Failed {
                            op: action.kind.name(),
                            domain: action.domain.clone(),
                            message: "panicked".into(),
                        }
                        .into())
                    });
                let millis = started.elapsed().as_millis();
                match &result {
                    Ok(()) => {
                        tracing::info!(domain = %action.domain, action = action.kind.name(), millis, "action done")
                    }
                    Err(err) => {
                        tracing::warn!(domain = %action.domain, action = action.kind.name(), %err, "action failed")
                    }
                }
                results.push((i, result.err().map(|e| e.to_string()), millis));
            }
            // The receiver lives as long as the scope; a send can only fail if it panicked.
            let _ = tx.send(results);
        });
    }

    /// The next finished job, waiting at most `timeout` (forever when `None`).
    fn next(&mut self, timeout: Option<Duration>) -> Option<JobResult> {
        if self.in_flight == 0 {
            if let Some(t) = timeout {
                std::thread::sleep(t);
            }
            return None;
        }
        let got = match timeout {
            Some(t) => self.rx.recv_timeout(t).ok(),
            None => self.rx.recv().ok(),
        };
        if got.is_some() {
            self.in_flight -= 1;
        }
        got
    }
}

/// Run every job of one stage, at most `pool.limit` at once, and wait for all of them.
fn run_stage(pool: &mut Pool, jobs: Vec<Job>, mut record: impl FnMut(JobResult)) {
    let mut queue = jobs.into_iter();
    loop {
        while pool.has_room() {
            match queue.next() {
                Some(job) => pool.spawn(job),
                None => break,
            }
        }
        if pool.in_flight == 0 {
            return;
        }
        if let Some(done) = pool.next(None) {
            record(done);
        }
    }
}

/// What a start waited for, since when, and when it was let go.
struct Waiting {
    since: Instant,
    released: Option<Instant>,
    waits: Vec<Wait>,
}

/// Execute `actions` (a plan's domain actions, in plan order) and return one outcome per
/// action, in the same order. Continues past failures; a start whose wait can no longer end
/// (a dependency failed, a path is missing) is reported as held, not run.
pub fn run_actions(
    hv: &dyn Hypervisor,
    desired: &DesiredState,
    actions: &[Action],
    opts: &ApplyOptions,
) -> Vec<ActionOutcome> {
    let order = StartupOrder::new(desired);
    let mut results: Vec<Option<(Option<String>, u128)>> = vec![None; actions.len()];
    let mut waited: HashMap<usize, Waiting> = HashMap::new();
    let mut held: HashMap<usize, Vec<Wait>> = HashMap::new();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let limit = opts.parallel.max(1);
        let mut pool = Pool { scope, hv, actions, tx, rx, in_flight: 0, limit };
        let mut record = |done: JobResult| {
            for (i, error, millis) in done {
                results[i] = Some((error, millis));
            }
        };
        // 1. Configuration: one job per domain with its actions in plan order.
        let mut by_domain: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, a) in actions.iter().enumerate() {
            if is_stop(&a.kind) || is_start(&a.kind) {
                continue;
            }
            match by_domain.iter_mut().find(|(d, _)| *d == a.domain) {
                Some((_, list)) => list.push(i),
                None => by_domain.push((a.domain.clone(), vec![i])),
            }
        }
        run_stage(&mut pool, by_domain.into_iter().map(|(_, indexes)| Job { indexes }).collect(), &mut record);
        // 2. Stops, wave by wave in reverse start order.
        let stops: Vec<usize> = (0..actions.len()).filter(|&i| is_stop(&actions[i].kind)).collect();
        let stopping: Vec<String> = stops.iter().map(|&i| actions[i].domain.clone()).collect();
        for wave in order.stop_waves(&stopping) {
            let jobs = stops
                .iter()
                .filter(|&&i| wave.contains(&actions[i].domain))
                .map(|&i| Job { indexes: vec![i] })
                .collect();
            run_stage(&mut pool, jobs, &mut record);
        }
        // 3. Starts, as ordering releases them.
        let starts: HashMap<&str, usize> = (0..actions.len())
            .filter(|&i| is_start(&actions[i].kind))
            .map(|i| (actions[i].domain.as_str(), i))
            .collect();
        if starts.is_empty() {
            return;
        }
        let mut facts = start_facts(hv, desired, &order, &starts);
        let mut pending: BTreeSet<String> = starts.keys().map(|d| d.to_string()).collect();
        let mut in_flight: BTreeSet<String> = BTreeSet::new();
        let origin = Instant::now();
        loop {
            let now = origin.elapsed();
            let decision = order.decide(&pending, &facts, now);
            for (name, waits) in &decision.held {
                let Some(&i) = starts.get(name.as_str()) else { continue };
                let w = waited.entry(i).or_insert_with(|| {
                    tracing::info!(domain = %name, waits = %waits_text(waits), "start waits");
                    Waiting { since: Instant::now(), released: None, waits: Vec::new() }
                });
                for wait in waits {
                    remember_wait(&mut w.waits, wait);
                }
            }
            for name in &decision.ready {
                if in_flight.contains(name) {
                    continue;
                }
                if !pool.has_room() {
                    break;
                }
                if let Some(&i) = starts.get(name.as_str()) {
                    if let Some(w) = waited.get_mut(&i) {
                        w.released = Some(Instant::now());
                    }
                    in_flight.insert(name.clone());
                    pool.spawn(Job { indexes: vec![i] });
                }
            }
            if pool.in_flight == 0 && decision.ready.is_empty() && decision.wake_at.is_none() {
                // Nothing runs and nothing will change by waiting: what is left stays held.
                for (name, waits) in decision.held {
                    if let Some(&i) = starts.get(name.as_str()) {
                        tracing::warn!(domain = %name, waits = %waits_text(&waits), "start held");
                        held.insert(i, waits);
                    }
                }
                return;
            }
            let timeout = decision.wake_at.map(|t| t.saturating_sub(origin.elapsed()));
            let Some(done) = pool.next(timeout) else { continue };
            let finished = Instant::now().duration_since(origin);
            for (i, error, millis) in done {
                let name = &actions[i].domain;
                in_flight.remove(name);
                pending.remove(name);
                if error.is_none() {
                    facts.states.insert(name.clone(), DomainState::Running);
                    facts.healthy.insert(name.clone());
                    facts.started_at.insert(name.clone(), finished);
                }
                results[i] = Some((error, millis));
            }
        }
    });
    actions
        .iter()
        .enumerate()
        .map(|(i, action)| {
            let (waited_for, waited_ms) = match waited.remove(&i) {
                Some(w) => {
                    let end = w.released.unwrap_or_else(Instant::now);
                    (w.waits, end.saturating_duration_since(w.since).as_millis())
                }
                None => (Vec::new(), 0),
            };
            let (error, millis) = results[i].clone().unwrap_or((None, 0));
            ActionOutcome { action: action.clone(), error, millis, waited_for, waited_ms, held: held.remove(&i) }
        })
        .collect()
}

/// The facts the starts begin from: the current state of every managed domain that a start
/// depends on or that is to start (read after the stops), and the missing required paths.
/// `apply` does not probe health: a running dependency counts as healthy.
fn start_facts(
    hv: &dyn Hypervisor,
    desired: &DesiredState,
    order: &StartupOrder,
    starts: &HashMap<&str, usize>,
) -> StartupFacts {
    let mut facts = StartupFacts::default();
    if !order.is_constrained() {
        return facts;
    }
    let mut names: BTreeSet<&str> = starts.keys().copied().collect();
    for d in starts.keys() {
        names.extend(order.dependencies(d).iter().map(String::as_str));
    }
    for name in names {
        match hv.domain_state(name) {
            Ok(Some(state)) => {
                facts.states.insert(name.to_string(), state);
                facts.healthy.insert(name.to_string());
            }
            Ok(None) => {}
            // Unknown counts as not running: a dependent waits rather than start too early.
            Err(e) => {
                tracing::warn!(domain = name, %e, "cannot read the state of a start dependency");
                facts.states.insert(name.to_string(), DomainState::NoState);
            }
        }
    }
    facts.missing_paths = missing_paths(desired);
    facts
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use virtwarden_policies::load_texts;

    use super::*;
    use crate::hypervisor::{DomainControl, DomainReader, HypervisorError};
    use crate::observe::{ObservedDomain, ObservedHost};
    use crate::plan::{plan_ordered, ActionKind};

    /// Domains in memory; every call is recorded; a start holds until `rendezvous` starts run
    /// at once (or a deadline passes), so concurrency is observable without timing guesses.
    struct Fake {
        state: Mutex<FakeState>,
        changed: Condvar,
        rendezvous: usize,
    }

    #[derive(Default)]
    struct FakeState {
        domains: HashMap<String, DomainState>,
        calls: Vec<String>,
        arrived: usize,
        active: usize,
        max_active: usize,
        fail: Vec<String>,
    }

    impl Fake {
        fn new(domains: &[(&str, DomainState)], rendezvous: usize) -> Self {
            let state =
                FakeState { domains: domains.iter().map(|(n, s)| (n.to_string(), *s)).collect(), ..Default::default() };
            Fake { state: Mutex::new(state), changed: Condvar::new(), rendezvous }
        }

        fn calls(&self) -> Vec<String> {
            self.state.lock().unwrap().calls.clone()
        }

        fn call(&self, op: &str, name: &str, to: Option<DomainState>) -> Result<(), HypervisorError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(format!("{op} {name}"));
            if s.fail.iter().any(|f| f == name) {
                return Err(HypervisorError::Failed { op: "start", domain: name.into(), message: "no".into() });
            }
            if op == "start" {
                // Starts meet in batches of `rendezvous`: the n-th waits for the rest of its batch.
                let batch_end = (s.arrived / self.rendezvous + 1) * self.rendezvous;
                s.arrived += 1;
                s.active += 1;
                s.max_active = s.max_active.max(s.active);
                self.changed.notify_all();
                let deadline = Instant::now() + Duration::from_secs(5);
                while s.arrived < batch_end && Instant::now() < deadline {
                    s = self.changed.wait_timeout(s, Duration::from_millis(20)).unwrap().0;
                }
                s.active -= 1;
            }
            if let Some(to) = to {
                s.domains.insert(name.to_string(), to);
            }
            Ok(())
        }

        fn observed(&self, name: &str, state: DomainState) -> ObservedDomain {
            ObservedDomain {
                name: name.into(),
                uuid: String::new(),
                state,
                reason: crate::observe::StateReason::Unknown,
                persistent: true,
                autostart: false,
                boot: Default::default(),
                interfaces: vec![],
                disks: vec![],
                id: None,
            }
        }
    }

    impl DomainReader for Fake {
        fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
            let s = self.state.lock().unwrap();
            let mut domains: Vec<ObservedDomain> = s.domains.iter().map(|(n, st)| self.observed(n, *st)).collect();
            domains.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(ObservedHost { domains, ..Default::default() })
        }
        fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
            Ok(self.state.lock().unwrap().domains.get(name).map(|st| self.observed(name, *st)))
        }
    }

    impl DomainControl for Fake {
        fn start(&self, name: &str) -> Result<(), HypervisorError> {
            self.call("start", name, Some(DomainState::Running))
        }
        fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
            self.call("shutdown", name, Some(DomainState::ShutOff))
        }
        fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
            self.call("destroy", name, Some(DomainState::ShutOff))
        }
        fn resume(&self, name: &str) -> Result<(), HypervisorError> {
            self.call("resume", name, Some(DomainState::Running))
        }
        fn reset(&self, name: &str) -> Result<(), HypervisorError> {
            self.call("reset", name, None)
        }
        fn set_autostart(&self, name: &str, _on: bool) -> Result<(), HypervisorError> {
            self.call("autostart", name, None)
        }
        fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
            self.call("dumpxml", name, None)?;
            Ok("<domain><os><boot dev='network'/></os></domain>".into())
        }
        fn define_xml(&self, name: &str, _xml: &str) -> Result<(), HypervisorError> {
            self.call("define", name, None)
        }
    }

    fn desired(domains: &str) -> DesiredState {
        let text = format!(
            "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  domains:\n{domains}"
        );
        load_texts([(std::path::Path::new("t.yaml"), text.as_str())]).expect("valid").desired
    }

    fn run(fake: &Fake, desired: &DesiredState, parallel: usize) -> Vec<ActionOutcome> {
        let observed = fake.observe_host().unwrap();
        let plan = plan_ordered(desired, &observed, &Default::default());
        run_actions(fake, desired, &plan.actions, &ApplyOptions { parallel })
    }

    #[test]
    fn starts_run_in_parallel_up_to_the_bound() {
        let names: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
        let domains: Vec<(&str, DomainState)> = names.iter().map(|n| (n.as_str(), DomainState::ShutOff)).collect();
        let policy: String = names.iter().map(|n| format!("    - name: {n}\n")).collect();
        let fake = Fake::new(&domains, 3);
        let outcomes = run(&fake, &desired(&policy), 3);
        assert_eq!(fake.state.lock().unwrap().max_active, 3, "three starts at once, never more");
        let order: Vec<&str> = outcomes.iter().map(|o| o.action.domain.as_str()).collect();
        assert_eq!(order, ["vm0", "vm1", "vm2", "vm3", "vm4", "vm5"], "outcomes stay in plan order");
        assert!(outcomes.iter().all(|o| o.error.is_none() && o.held.is_none()));
    }

    #[test]
    fn a_domains_own_actions_stay_in_order_and_configuration_comes_first() {
        let fake = Fake::new(&[("a", DomainState::ShutOff), ("b", DomainState::Running)], 1);
        let d = desired("    - name: a\n      autostart: true\n      boot: [hd]\n    - name: b\n      state: stopped\n      autostart: true\n");
        let outcomes = run(&fake, &d, 8);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:#?}");
        let calls = fake.calls();
        let pos = |c: &str| calls.iter().position(|x| x == c).unwrap_or_else(|| panic!("{c} not in {calls:?}"));
        assert!(pos("dumpxml a") < pos("define a") && pos("define a") < pos("autostart a"), "{calls:?}");
        let last_config = pos("autostart a").max(pos("autostart b")).max(pos("define a"));
        assert!(last_config < pos("shutdown b") && pos("shutdown b") < pos("start a"), "{calls:?}");
    }

    #[test]
    fn a_failed_dependency_holds_its_dependents() {
        let fake = Fake::new(&[("db", DomainState::ShutOff), ("web", DomainState::ShutOff)], 1);
        fake.state.lock().unwrap().fail.push("db".into());
        let d = desired("    - name: db\n    - name: web\n      startup: {after: [db]}\n");
        let outcomes = run(&fake, &d, 8);
        assert!(outcomes[0].error.is_some());
        assert_eq!(
            outcomes[1].held.as_deref().map(waits_text).as_deref(),
            Some("waits for db (not running)"),
            "{outcomes:#?}"
        );
        assert!(!fake.calls().contains(&"start web".to_string()), "web was never started");
    }

    #[test]
    fn starts_follow_order_groups_and_a_stop_goes_first_in_reverse() {
        let fake = Fake::new(
            &[
                ("db", DomainState::ShutOff),
                ("web", DomainState::ShutOff),
                ("old1", DomainState::Running),
                ("old2", DomainState::Running),
            ],
            1,
        );
        let d = desired(
            "    - name: web\n      startup: {order: 2}\n    - name: db\n      startup: {order: 1}\n    - name: old1\n      state: stopped\n      startup: {order: 1}\n    - name: old2\n      state: stopped\n      startup: {order: 2}\n",
        );
        let outcomes = run(&fake, &d, 8);
        assert!(outcomes.iter().all(|o| o.error.is_none() && o.held.is_none()), "{outcomes:#?}");
        assert_eq!(fake.calls(), ["shutdown old2", "shutdown old1", "start db", "start web"]);
        let web = outcomes.iter().find(|o| o.action.domain == "web").unwrap();
        assert_eq!(waits_text(&web.waited_for), "waits for order group 1 (db is not running yet)");
        assert!(matches!(outcomes[0].action.kind, ActionKind::Shutdown { .. }), "plan order: stops first");
    }
}
