//! API requests per change with 1, 10 and 100 simulated nodes: one in-memory API server, one
//! operator per node (each with its own kube client and a scripted status source), virtual
//! time. Prints the figures (`make bench-operator`) and holds the operator to them: a change on
//! one node costs that node's enactment write plus at most one aggregate write, whatever the
//! number of nodes, and nothing is sent while nothing changes.

#[path = "support/engines.rs"]
mod engines;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::sync::Arc;
use std::time::Duration;

use engines::{scripted, Script};
use fake_kube::{node, Call, FakeKube};
use serde_json::json;
use tokio::task::JoinHandle;
use virtwarden::operator::Operator;

/// Requests sent during one phase, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Requests {
    enactment_writes: usize,
    aggregate_writes: usize,
    other_writes: usize,
    reads: usize,
    /// Lease renewals: a fixed rate per node (one per lease::RENEW_EVERY), not caused by a change.
    heartbeats: usize,
}

impl Requests {
    fn of(calls: &[Call]) -> Self {
        let mut r = Requests::default();
        for c in calls.iter().filter(|c| !c.is_watch()) {
            match (c.method.as_str(), c.path()) {
                ("GET", _) => r.reads += 1,
                ("PATCH", p) if p.contains("/leases/") => r.heartbeats += 1,
                ("PATCH", p) if p.contains("/hostpolicyenactments/") => r.enactment_writes += 1,
                ("PATCH", p) if p.contains("/hostpolicies/") => r.aggregate_writes += 1,
                _ => r.other_writes += 1,
            }
        }
        r
    }
    fn total(&self) -> usize {
        self.enactment_writes + self.aggregate_writes + self.other_writes + self.reads
    }
}

fn policy(restart: &str) -> serde_json::Value {
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy", "metadata": {"name": "web"},
           "spec": {"domains": [{"name": "web1", "restart": restart}]}})
}

/// Let every node finish what it has to do: virtual time runs only while all tasks wait.
async fn quiet() {
    tokio::time::sleep(Duration::from_secs(60)).await;
}

async fn phase(api: &FakeKube, change: impl FnOnce()) -> Requests {
    let before = api.call_count();
    change();
    quiet().await;
    Requests::of(&api.calls()[before..])
}

struct Figures {
    idle: Requests,
    one_node: Requests,
    back: Requests,
    policy_edit: Requests,
}

/// The policy `web` and `nodes` nodes, each with its operator running; settled.
async fn cluster(nodes: usize) -> (Arc<FakeKube>, Vec<Script>, Vec<JoinHandle<()>>) {
    let api = FakeKube::new();
    api.put(policy("always"));
    let mut scripts: Vec<Script> = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let name = format!("node{i:03}");
        api.put(node(&name, json!({})));
        let (engine, script) = scripted();
        let mut op = Operator::new(api.client(), name, engine);
        tasks.push(tokio::spawn(async move { op.run().await }));
        scripts.push(script);
    }
    quiet().await;
    (api, scripts, tasks)
}

async fn measure(nodes: usize) -> Figures {
    let (api, scripts, tasks) = cluster(nodes).await;
    let status = |api: &FakeKube| api.object("HostPolicy", "web").unwrap()["status"].clone();
    assert_eq!(api.objects("HostPolicyEnactment").len(), nodes);
    assert_eq!(status(&api)["matchedNodes"], nodes);
    assert_eq!(status(&api)["availableNodes"], nodes);

    let idle = phase(&api, || {}).await;
    let one_node = phase(&api, || scripts[nodes / 2].set("web1", |d| d.state = "shut off (crashed)".into())).await;
    assert_eq!(status(&api)["progressingNodes"], 1);
    assert_eq!(status(&api)["availableNodes"], nodes - 1);
    let back = phase(&api, || scripts[nodes / 2].set("web1", |d| d.state = "running (booted)".into())).await;
    assert_eq!(status(&api)["availableNodes"], nodes);
    let policy_edit = phase(&api, || {
        api.put(policy("on-failure"));
    })
    .await;
    assert_eq!(status(&api)["observedGeneration"], 2);
    let current = api.objects("HostPolicyEnactment").iter().filter(|e| e["status"]["observedGeneration"] == 2).count();
    assert_eq!(current, nodes, "every node reports the new generation");
    for t in tasks {
        t.abort();
    }
    Figures { idle, one_node, back, policy_edit }
}

#[tokio::test(start_paused = true)]
async fn api_requests_per_change_do_not_grow_with_the_number_of_nodes() {
    println!("API requests per change (enactment writes + aggregate writes + other writes + reads = total):");
    for nodes in [1, 10, 100] {
        let f = measure(nodes).await;
        let show = |r: Requests| {
            format!(
                "{} + {} + {} + {} = {}",
                r.enactment_writes,
                r.aggregate_writes,
                r.other_writes,
                r.reads,
                r.total()
            )
        };
        println!(
            "{nodes:>4} nodes: one node's domain crashes: {}; back to running: {}; policy edited: {}; 60 s idle: {}",
            show(f.one_node),
            show(f.back),
            show(f.policy_edit),
            show(f.idle)
        );
        assert_eq!(f.idle.total(), 0, "nothing is sent while nothing changes");
        for change in [f.one_node, f.back] {
            assert_eq!(change.enactment_writes, 1, "{nodes} nodes: {change:?}");
            assert_eq!(change.aggregate_writes, 1, "{nodes} nodes: {change:?}");
            assert_eq!(change.reads + change.other_writes, 0, "{nodes} nodes: {change:?}");
        }
        // An edit concerns every node: one enactment write each, the aggregate once or twice.
        assert_eq!(f.policy_edit.enactment_writes, nodes, "{nodes} nodes: {:?}", f.policy_edit);
        assert!((1..=2).contains(&f.policy_edit.aggregate_writes), "{nodes} nodes: {:?}", f.policy_edit);
        assert_eq!(f.policy_edit.reads + f.policy_edit.other_writes, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn when_the_first_node_is_gone_the_next_one_writes_the_aggregate_once() {
    let (api, scripts, tasks) = cluster(3).await;
    // node000, the writer, dies; its enactment stays behind (nothing deletes a dead node's).
    tasks[0].abort();
    let started = tokio::time::Instant::now();
    let before = api.call_count();
    scripts[2].set("web1", |d| d.state = "shut off (crashed)".into());
    let mut repaired = None;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = api.object("HostPolicy", "web").unwrap()["status"].clone();
        if repaired.is_none() && status["progressingNodes"] == 1 {
            repaired = Some(started.elapsed());
        }
    }
    let r = Requests::of(&api.calls()[before..]);
    assert_eq!((r.enactment_writes, r.aggregate_writes, r.reads), (1, 1, 0), "{r:?}");
    let after = repaired.expect("the aggregate was repaired");
    // node001 is second by name: it waits one repair turn (10 s), not more than two status rounds on top.
    assert!(after >= Duration::from_secs(10) && after <= Duration::from_secs(15), "{after:?}");
    for t in tasks {
        t.abort();
    }
}
