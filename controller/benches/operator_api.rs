//! `make bench-operator` (part 2): the operator on a REAL kube-apiserver 1.20 (support/apiserver.rs),
//! three `virtwarden operator` processes authenticated as the DaemonSet's ServiceAccount. Prints:
//! - HostPolicy edit → enactment updated (observedGeneration = the edit's), p50/p99, for the
//!   first node and for all three (the edits are spaced 2.5–3.5 s apart, as separate edits are);
//! - API requests per edit, from the server's audit log (the ServiceAccount's requests, by verb and
//!   resource; Lease renewals are a fixed rate and shown apart).
//!
//! BENCH_EDITS (default 40) edits.

#[path = "../tests/support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiserver::{free_port, repo, ApiServer};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::Api;
use serde_json::{json, Value};
use virtwarden_crd::{HostPolicy, HostPolicyEnactment};

const SA: &str = "system:serviceaccount:virtwarden:virtwarden";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn policy(restart: &str) -> Value {
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy", "metadata": {"name": "web"},
           "spec": {"domains": [{"name": "web1", "restart": restart}]}})
}

/// The audit log's ServiceAccount requests (not watches) as "verb resource" → count.
fn sa_requests(server: &ApiServer) -> (BTreeMap<String, usize>, usize) {
    let mut by_kind = BTreeMap::new();
    let mut leases = 0;
    for a in server.audit() {
        if a["user"]["username"] != SA || a["stage"] != "ResponseComplete" || a["verb"] == "watch" {
            continue;
        }
        let uri = a["requestURI"].as_str().unwrap_or_default();
        if uri.contains("/leases/") && a["verb"] == "patch" {
            leases += 1;
            continue;
        }
        let resource = uri.split('?').next().unwrap_or_default();
        let kind = if resource.contains("/hostpolicyenactments/") && resource.ends_with("/status") {
            "hostpolicyenactments/status"
        } else if resource.contains("/hostpolicyenactments") {
            "hostpolicyenactments"
        } else if resource.contains("/hostpolicies/") && resource.ends_with("/status") {
            "hostpolicies/status"
        } else if resource.contains("/hostpolicies") {
            "hostpolicies"
        } else if resource.contains("/events") {
            "events"
        } else {
            resource
        };
        *by_kind.entry(format!("{} {kind}", a["verb"].as_str().unwrap_or_default())).or_insert(0) += 1;
    }
    (by_kind, leases)
}

fn diff(after: &BTreeMap<String, usize>, before: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let edits: usize = std::env::var("BENCH_EDITS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let server = ApiServer::start().await;
    for file in ["namespace.yaml", "crd.yaml", "serviceaccount.yaml", "rbac.yaml"] {
        server.apply_yaml(&std::fs::read_to_string(repo().join("examples/k8s").join(file)).unwrap()).await;
    }
    let admin = server.admin.clone();
    let kubeconfig =
        server.service_account_kubeconfig("virtwarden", "virtwarden", &server.dir().join("sa.kubeconfig")).await;
    let nodes = ["n1", "n2", "n3"];
    let apply = PatchParams::apply("bench").force();
    for n in nodes {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}});
        Api::<Node>::all(admin.clone()).patch(n, &apply, &Patch::Apply(&node)).await.unwrap();
    }
    let policies: Api<HostPolicy> = Api::all(admin.clone());
    policies.patch("web", &apply, &Patch::Apply(&policy("always"))).await.unwrap();

    // When each (node, generation) was first seen, by a watch of the enactments.
    let seen: Arc<Mutex<BTreeMap<(String, i64), Instant>>> = Arc::default();
    let s = seen.clone();
    let enactments: Api<HostPolicyEnactment> = Api::all(admin.clone());
    tokio::spawn(async move {
        let mut w = watcher(enactments, watcher::Config::default()).boxed();
        while let Some(ev) = w.next().await {
            let (watcher::Event::Apply(e) | watcher::Event::InitApply(e)) = (match ev {
                Ok(ev) => ev,
                Err(_) => continue,
            }) else {
                continue;
            };
            if let Some(g) = e.status.as_ref().and_then(|s| s.observed_generation) {
                s.lock().unwrap().entry((e.spec.node.clone(), g)).or_insert_with(Instant::now);
            }
        }
    });

    let dirs: Vec<tempfile::TempDir> = nodes.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents: Vec<Child> = Vec::new();
    for (n, dir) in nodes.iter().zip(&dirs) {
        let host = dir.path().join("node.xml");
        std::fs::copy(repo().join("examples/testbed/node.xml"), &host).unwrap();
        agents.push(
            Command::new(env!("CARGO_BIN_EXE_virtwarden"))
                .arg("operator")
                .arg(format!("--connect=test://{}", host.display()))
                .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
                .arg(format!("--state-dir={}", dir.path().join("state").display()))
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--lock-file={}", dir.path().join("lock").display()))
                .env("NODE_NAME", n)
                .env("KUBECONFIG", &kubeconfig)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("virtwarden operator"),
        );
    }
    let all_at = |g: i64| nodes.iter().all(|n| seen.lock().unwrap().contains_key(&(n.to_string(), g)));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !all_at(1) {
        assert!(Instant::now() < deadline, "the nodes never reported generation 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    let (before, leases_before) = sa_requests(&server);
    let started = Instant::now();
    let (mut first, mut all) = (Vec::new(), Vec::new());
    for i in 0..edits {
        let g = 2 + i as i64;
        let t0 = Instant::now();
        policies
            .patch("web", &apply, &Patch::Apply(&policy(if i % 2 == 0 { "on-failure" } else { "always" })))
            .await
            .unwrap();
        let deadline = t0 + Duration::from_secs(60);
        while !all_at(g) {
            assert!(Instant::now() < deadline, "generation {g} never reached every node");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let times: Vec<Instant> = nodes.iter().map(|n| seen.lock().unwrap()[&(n.to_string(), g)]).collect();
        first.push(*times.iter().min().unwrap() - t0);
        all.push(*times.iter().max().unwrap() - t0);
        tokio::time::sleep(Duration::from_millis(2500 + fastrand::u64(0..1000))).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after, leases_after) = sa_requests(&server);
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }

    first.sort();
    all.sort();
    println!("operator on a real kube-apiserver 1.20, 3 nodes, {edits} HostPolicy edits:");
    for (what, d) in [("first node", &first), ("all 3 nodes", &all)] {
        println!(
            "  edit → enactment updated ({what}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(d, 0.5).as_secs_f64() * 1e3,
            percentile(d, 0.99).as_secs_f64() * 1e3,
            d.last().unwrap().as_secs_f64() * 1e3
        );
    }
    let per_edit = diff(&after, &before);
    let total: usize = per_edit.values().sum();
    println!(
        "  API requests per edit (all 3 nodes together, ServiceAccount, from the audit log): {:.2}",
        total as f64 / edits as f64
    );
    for (k, v) in &per_edit {
        println!("    {k}: {:.2}", *v as f64 / edits as f64);
    }
    println!(
        "  Lease renewals: {:.2}/s for 3 nodes (not per change)",
        (leases_after - leases_before) as f64 / elapsed.as_secs_f64()
    );
}
