//! Start ordering through `apply` on libvirt's test driver: the order in which domains start
//! and stop is read from libvirt's own lifecycle events on the connection `apply` uses (a
//! node-file test driver keeps its state per connection).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use virtwarden::act::{apply_plan_with, ApplyOptions, ApplyReport};
use virtwarden::hypervisor::events::{HypervisorEvent, LifecycleKind};
use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::events::{start_event_loop, subscribe, EventSubscription};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::paths::missing_paths;
use virtwarden::plan::startup::waits_text;
use virtwarden::plan::{plan_ordered, render_text, Plan};
use virtwarden_policies::DesiredState;

const STARTED: LifecycleKind = LifecycleKind::Started;
const STOPPED: LifecycleKind = LifecycleKind::Stopped;

fn policy(domains: &str) -> DesiredState {
    virtwarden_tests::inline_policy(&format!(
        "  domains:
{domains}"
    ))
}

/// A test-driver host with these domains, running or shut off, and its lifecycle events.
struct Host {
    // Dropped before the connection it was registered on.
    _subscription: EventSubscription,
    host: LibvirtHost,
    events: UnboundedReceiver<HypervisorEvent>,
    _dir: tempfile::TempDir,
}

impl Host {
    fn new(domains: &[(&str, bool)]) -> Host {
        start_event_loop();
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        std::fs::write(&node, virtwarden_tests::node_xml(domains)).unwrap();
        let host = LibvirtHost::open(&format!("test://{}", node.display())).unwrap();
        let (tx, events) = unbounded_channel();
        let subscription = subscribe(&host, tx).unwrap();
        Host { _subscription: subscription, host, events, _dir: dir }
    }

    fn plan(&self, desired: &DesiredState) -> Plan {
        plan_ordered(desired, &self.host.observe_host().unwrap(), &missing_paths(desired))
    }

    fn apply(&self, desired: &DesiredState) -> ApplyReport {
        let p = self.plan(desired);
        apply_plan_with(&self.host, desired, &p, &ApplyOptions { parallel: 8 }).unwrap()
    }

    /// The next `n` events of kind `event`, in arrival order, with when each arrived.
    fn events(&mut self, event: LifecycleKind, n: usize) -> Vec<(String, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            match self.events.try_recv() {
                Ok(HypervisorEvent::Lifecycle(e)) if e.kind == event => got.push((e.domain, e.received)),
                Ok(_) => {}
                Err(_) => {
                    assert!(Instant::now() < deadline, "only {} of {n} events arrived: {got:?}", got.len());
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        got
    }
}

fn position(events: &[(String, Instant)]) -> HashMap<&str, usize> {
    events.iter().enumerate().map(|(i, (d, _))| (d.as_str(), i)).collect()
}

#[test]
fn order_groups_after_and_delay_decide_the_start_order() {
    let mut h = Host::new(&[("db1", false), ("db2", false), ("app0", false), ("app1", false), ("web1", false)]);
    let desired = policy(
        "    - name: web1\n      startup: {after: [app1]}\n    - name: app1\n      startup: {order: 2, after: [app0]}\n    - name: app0\n      startup: {order: 2}\n    - name: db1\n      startup: {order: 1, delay: 1s}\n    - name: db2\n      startup: {order: 1}\n",
    );
    let report = h.apply(&desired);
    assert!(report.converged(), "{report:#?}");
    let started = h.events(STARTED, 5);
    let at = position(&started);
    let names: Vec<&str> = started.iter().map(|(d, _)| d.as_str()).collect();
    // Order group 1 (in parallel, either way round), then group 2 with app1 after app0, then
    // the unordered web1.
    assert!(at["db1"] < 2 && at["db2"] < 2, "{names:?}");
    assert_eq!(&names[2..], ["app0", "app1", "web1"]);
    // Group 2 waited for db1's delay.
    let gap = started[at["app0"]].1.duration_since(started[at["db1"]].1);
    // The delay counts from db1's start returning, the gap from its event being delivered (which
    // a loaded machine may hold back): a margin, yet far from the few ms without any delay.
    assert!(gap >= Duration::from_millis(700), "group 2 started {gap:?} after db1, whose delay is 1s");
    // apply says what each start waited for, in plan (= start) order.
    let waited: Vec<String> = report
        .outcomes
        .iter()
        .map(|o| {
            format!(
                "{}: {}",
                o.action.domain,
                if o.waited_for.is_empty() { "-".into() } else { waits_text(&o.waited_for) }
            )
        })
        .collect();
    assert_eq!(
        waited,
        [
            "db1: -",
            "db2: -",
            "app0: waits for order group 1 (+1s delay after db1)",
            "app1: waits for order group 1 (+1s delay after db1), app0 (not running)",
            "web1: waits for order group 2 (app1 is not running yet), app1 (not running)",
        ]
    );
}

#[test]
fn stops_go_in_reverse_start_order() {
    let mut h = Host::new(&[("db1", true), ("app1", true), ("web1", true), ("web2", true), ("batch", true)]);
    let desired = policy(
        "    - name: db1\n      state: stopped\n      startup: {order: 1}\n    - name: app1\n      state: stopped\n      startup: {order: 2}\n    - name: web1\n      state: stopped\n      startup: {order: 2, after: [app1]}\n    - name: web2\n      state: stopped\n      startup: {order: 2}\n    - name: batch\n      state: stopped\n",
    );
    let p = h.plan(&desired);
    let planned: Vec<&str> = p.actions.iter().map(|a| a.domain.as_str()).collect();
    assert_eq!(planned, ["batch", "web1", "web2", "app1", "db1"], "{}", render_text(&p));
    let report = h.apply(&desired);
    assert!(report.converged(), "{report:#?}");
    let stopped = h.events(STOPPED, 5);
    let at = position(&stopped);
    assert_eq!(at["batch"], 0, "{stopped:?}");
    assert!(at["web1"] < at["app1"] && at["web2"] < at["app1"], "{stopped:?}");
    assert_eq!(at["db1"], 4, "{stopped:?}");
}

#[test]
fn a_start_waits_for_its_required_path() {
    let mut h = Host::new(&[("files1", false), ("web1", false)]);
    let dir = tempfile::tempdir().unwrap();
    let image: PathBuf = dir.path().join("images/files1.qcow2");
    let desired = policy(&format!(
        "    - name: files1\n      startup:\n        order: 1\n        requires: {{paths: [{}]}}\n    - name: web1\n      startup: {{order: 2}}\n",
        image.display()
    ));
    let p = h.plan(&desired);
    assert!(p.actions.is_empty(), "{}", render_text(&p));
    let held: Vec<String> = p.held.iter().map(|h| h.line()).collect();
    assert_eq!(
        held,
        [
            format!("files1: shut off (unknown), policy wants running → start (held: waits for {})", image.display()),
            "web1: shut off (unknown), policy wants running → start (held: waits for order group 1 (files1 is not running yet))"
                .to_string(),
        ]
    );
    let report = h.apply(&desired);
    assert!(!report.converged());
    assert_eq!(report.remaining.held.len(), 2);
    assert_eq!(h.host.observe_domain("files1").unwrap().unwrap().state.as_str(), "shut off");

    // The storage appears: both start, files1 first.
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::write(&image, b"").unwrap();
    let report = h.apply(&desired);
    assert!(report.converged(), "{report:#?}");
    let names: Vec<String> = h.events(STARTED, 2).into_iter().map(|(d, _)| d).collect();
    assert_eq!(names, ["files1", "web1"]);
}

#[test]
fn a_start_whose_dependency_stays_down_is_held_not_started() {
    let mut h = Host::new(&[("db1", false), ("web1", false), ("web2", false)]);
    let desired = policy(
        "    - name: db1\n      state: stopped\n    - name: web1\n      startup: {after: [db1]}\n    - name: web2\n",
    );
    let p = h.plan(&desired);
    assert_eq!(p.actions.len(), 1, "{}", render_text(&p));
    assert_eq!(
        p.held.iter().map(|h| h.line()).collect::<Vec<_>>(),
        ["web1: shut off (unknown), policy wants running → start (held: waits for db1 (not running))"]
    );
    let report = h.apply(&desired);
    assert!(!report.converged(), "a held start is not converged");
    let names: Vec<String> = h.events(STARTED, 1).into_iter().map(|(d, _)| d).collect();
    assert_eq!(names, ["web2"]);
    assert!(h.events.try_recv().is_err(), "nothing else started");
    assert_eq!(h.host.observe_domain("web1").unwrap().unwrap().state.as_str(), "shut off");
}
