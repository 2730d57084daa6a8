//! Running a plan's domain actions in parallel: different domains at once (bounded), each
//! domain's own actions in order; configuration, then stops (reverse start order, wave by
//! wave), then starts as start ordering releases them. Results come back in plan order.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use virtwarden_policies::DesiredState;

use super::execute::{execute_action, ActionOutcome};
use crate::hypervisor::Hypervisor;
use crate::observe::paths::missing_paths;
use crate::observe::DomainState;
use crate::plan::startup::{is_start, is_stop, waits_text, StartupFacts, StartupOrder, Wait};
use crate::plan::Action;

/// Default bound on concurrent actions in `apply` (`--parallel`). Measured by
/// `make bench-apply`: see the README for the figures behind it.
pub const DEFAULT_PARALLEL: usize = 16;

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
                let result = execute_action(hv, action);
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
                    if !w.waits.contains(wait) {
                        w.waits.push(wait.clone());
                    }
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
