//! The operator against an API server in memory (tower-test mocks; see support/fake_kube.rs):
//! single writes checked call by call, and the watch-driven loop with the real engine on
//! libvirt's test driver, or with a scripted status source where only the API traffic matters.

#[path = "support/engines.rs"]
mod engines;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::sync::Arc;
use std::time::Duration;

use engines::{eventually, scripted, Recorded};
use fake_kube::{node, FakeKube, ENACTMENTS, NODES, POLICIES};
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use virtwarden::act::remediation::Registry;
use virtwarden::engine::{Engine, EngineConfig};
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::operator::{kube_io, Operator};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

async fn expect(handle: &mut Handle, method: &str, path_prefix: &str, reply: Value) -> (String, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {method} {path_prefix}"))
        .expect("a request");
    assert_eq!(req.method().as_str(), method, "{}", req.uri());
    let uri = req.uri().to_string();
    assert!(uri.starts_with(path_prefix), "expected {path_prefix}, got {uri}");
    let body = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
    (uri, body)
}

/// A HostPolicy resource as JSON: `domains` with `restart: always`, optional node selector.
fn policy(name: &str, domains: &[&str], selector: Option<Value>) -> Value {
    let domains: Vec<Value> = domains.iter().map(|d| json!({"name": d, "restart": "always"})).collect();
    let mut spec = json!({ "domains": domains });
    if let Some(s) = selector {
        spec["nodeSelector"] = s;
    }
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy", "metadata": {"name": name}, "spec": spec})
}

fn enactment_reply(policy: &str, node: &str) -> Value {
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactment",
           "metadata": {"name": kube_io::enactment_name(policy, node)}, "spec": {"policy": policy, "node": node}})
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_default();
    (c["status"].as_str().unwrap_or_default().to_string(), c["reason"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn a_new_enactment_is_server_side_applied_with_owner_and_labels_then_only_its_status() {
    let (client, mut handle) = mock();
    let status = virtwarden_crd::HostPolicyEnactmentStatus::default();
    let server = tokio::spawn(async move {
        let path = "/apis/virtwarden.io/v1alpha1/hostpolicyenactments/web.node1.3";
        let (uri, body) = expect(&mut handle, "PATCH", &format!("{path}?"), enactment_reply("web", "node1")).await;
        assert!(uri.contains("fieldManager=virtwarden-node1") && uri.contains("force=true"), "{uri}");
        assert_eq!(body["metadata"]["labels"], json!({"virtwarden.io/node": "node1", "virtwarden.io/policy": "web"}));
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-web");
        assert_eq!(body["metadata"]["ownerReferences"][0].get("blockOwnerDeletion"), None);
        assert_eq!(body["spec"], json!({"policy": "web", "node": "node1"}));
        let (uri, body) =
            expect(&mut handle, "PATCH", &format!("{path}/status?"), enactment_reply("web", "node1")).await;
        assert!(uri.contains("fieldManager=virtwarden-node1"), "{uri}");
        assert!(body.get("status").is_some(), "{body}");
        // An existing enactment: its status alone.
        expect(&mut handle, "PATCH", &format!("{path}/status?"), enactment_reply("web", "node1")).await;
        handle
    });
    kube_io::apply_enactment(&client, "web", "uid-web", "node1", &status, true).await.unwrap();
    kube_io::apply_enactment(&client, "web", "uid-web", "node1", &status, false).await.unwrap();
    let mut handle = server.await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await.is_err(),
        "nothing more was sent"
    );
}

#[tokio::test]
async fn the_aggregate_is_written_under_one_shared_manager() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let reply = policy("web", &[], None);
        let (uri, body) =
            expect(&mut handle, "PATCH", "/apis/virtwarden.io/v1alpha1/hostpolicies/web/status?", reply).await;
        assert!(uri.contains("fieldManager=virtwarden-aggregate") && uri.contains("force=true"), "{uri}");
        assert_eq!(body["status"]["matchedNodes"], 2);
    });
    let status = virtwarden_crd::HostPolicyStatus { matched_nodes: 2, ..Default::default() };
    kube_io::apply_policy_status(&client, "web", &status).await.unwrap();
    server.await.unwrap();
}

/// An engine with no policy yet on the example test-driver host, and that host's connection.
fn test_driver_engine() -> (Arc<LibvirtHost>, virtwarden::engine::EngineHandle, tokio::task::JoinHandle<()>) {
    start_event_loop();
    let node_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("examples/testbed/node.xml");
    let host = Arc::new(LibvirtHost::open(&format!("test://{}", node_file.display())).unwrap());
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let connector = Arc::new(SharedConnector { host: host.clone() });
    let (engine, task) = Engine::spawn(connector, Default::default(), config, Registry::with_builtins());
    (host, engine, task)
}

fn enactment_of(api: &FakeKube, name: &str) -> Value {
    api.object("HostPolicyEnactment", name).map(|e| e["status"].clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_in_domain_healed_enactment_and_aggregate_out_nothing_rewritten_until_something_changes() {
    let (host, engine, task) = test_driver_engine();
    let api = FakeKube::new();
    api.put(node("node1", json!({})));
    api.put(policy("web", &["web1"], None));
    let (recorded, record) = Recorded::new(engine.clone());
    let mut op = Operator::new(api.client(), "node1".into(), recorded);
    let operator = tokio::spawn(async move { op.run().await });

    // web1 is shut off in the test driver: selected, started, reported.
    engine
        .wait_for(Duration::from_secs(10), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.state.starts_with("running"))
        })
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    eventually(10, "a converged enactment and aggregate", || {
        let e = enactment_of(&api, "web.node1.3");
        let p = api.object("HostPolicy", "web").unwrap_or_default();
        condition(&e, "Available") == ("True".into(), "Converged".into())
            && e["domains"][0]["name"] == "web1"
            && p["status"]["matchedNodes"] == 1
            && p["status"]["availableNodes"] == 1
    })
    .await;
    let web = api.object("HostPolicy", "web").unwrap();
    assert!(web["metadata"].get("finalizers").is_none(), "no finalizer: deleting never waits for a node");
    let transition = |api: &FakeKube, type_: &str| {
        let e = enactment_of(api, "web.node1.3");
        e["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap()["lastTransitionTime"].clone()
    };
    let not_degraded_since = transition(&api, "Degraded");

    // Status changes that change nothing reported (a resync) and a policy edit that changes no
    // spec (an annotation) cost no write: two full status rounds later nothing was sent.
    // The Lease heartbeat (every 10 s) is no status write; a slow machine may cross one here.
    let writes = |api: &FakeKube| {
        api.calls().iter().filter(|c| c.is_write() && !c.uri.contains("/events") && !c.uri.contains("/leases/")).count()
    };
    let before = writes(&api);
    engine.resync();
    let mut annotated = policy("web", &["web1"], None);
    annotated["metadata"]["annotations"] = json!({"note": "reviewed"});
    api.put(annotated);
    record.settle().await;
    let sent: Vec<String> =
        api.calls().iter().filter(|c| c.is_write()).map(|c| format!("{} {} {}", c.method, c.uri, c.body)).collect();
    assert_eq!(writes(&api), before, "{sent:#?}");

    // The guest dies and is restarted: the enactment is rewritten and an Event tells it. Waited
    // on by what happened (running again after a failure that names the destroy), not by a
    // count: the first start is no restart (issue 18), and under load a second event of the same
    // reason is sent as a PATCH of a series rather than a POST.
    virtwarden::hypervisor::DomainControl::destroy(host.as_ref(), "web1").unwrap();
    let healed = |d: &virtwarden::engine::status::DomainStatus| {
        d.name == "web1"
            && d.state.starts_with("running")
            && d.last_failure.as_deref().is_some_and(|f| f.contains("destroyed"))
    };
    let s = engine
        .wait_for(Duration::from_secs(30), |s| s.domains.iter().any(healed))
        .await
        .unwrap_or_else(|| panic!("not restarted: {:#?}", engine.status()));
    let restarts = s.domains.iter().find(|d| healed(d)).unwrap().restarts;
    assert!(restarts >= 1);
    let restarted = |c: &fake_kube::Call| {
        (c.method == "POST" || c.method == "PATCH")
            && c.uri.contains("/events")
            && c.body["reason"] == "Restarted"
            && c.body["note"].as_str().is_some_and(|n| n.contains("destroyed"))
    };
    eventually(30, "a Restarted event", || api.calls().iter().any(restarted)).await;
    let event = api.calls().into_iter().find(restarted).unwrap().body;
    // In the operator's namespace, about this node's Lease, naming the policy.
    assert_eq!(event["metadata"]["namespace"], "default", "the client's namespace");
    assert_eq!(event["regarding"]["kind"], "Lease");
    assert_eq!(event["regarding"]["name"], "node1");
    assert_eq!(event["related"]["kind"], "HostPolicy");
    assert_eq!(event["related"]["name"], "web");
    // The failure as the engine saw it: the lifecycle event, or the state reason when a resync
    // noticed first (`stopped/destroyed`, `shut off (destroyed)`).
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("HostPolicy web: web1: ") && note.contains("destroyed") && note.contains("node1"),
        "{event}"
    );
    eventually(30, "restarts in the enactment", || {
        enactment_of(&api, "web.node1.3")["domains"][0]["restarts"] == json!(restarts)
    })
    .await;
    // Degraded stayed False through the restart: its transition time did not move.
    assert_eq!(condition(&enactment_of(&api, "web.node1.3"), "Degraded").0, "False");
    assert_eq!(transition(&api, "Degraded"), not_degraded_since);
    operator.abort();
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_waits_until_both_the_policy_and_the_node_lists_are_complete() {
    let api = FakeKube::new();
    api.put(node("node1", json!({"role": "kvm"})));
    api.put(policy("everywhere", &["a"], None));
    api.put(policy("kvm", &["b"], Some(json!({"role": "kvm"}))));
    api.hold_lists(NODES);
    let (engine, script) = scripted();
    let mut op = Operator::new(api.client(), "node1".into(), engine);
    let operator = tokio::spawn(async move { op.run().await });

    // The policy list is complete and watched (its watch starts only after the loop took the
    // list in), the enactments too; the node list is not there yet.
    let watching =
        |api: &FakeKube, collection: &str| api.calls().iter().any(|c| c.path() == collection && c.is_watch());
    eventually(10, "policy and enactment watches", || watching(&api, POLICIES) && watching(&api, ENACTMENTS)).await;
    assert!(script.record.reloaded_domains().is_empty(), "selected before the node's labels were known");

    api.release(NODES);
    eventually(10, "a selection", || !script.record.reloaded_domains().is_empty()).await;
    assert_eq!(script.record.reloaded_domains()[0], ["a", "b"], "the first selection saw the labels");
    operator.abort();

    // The same with the policy list late: nothing is selected from an empty policy cache.
    let api = FakeKube::new();
    api.put(node("node1", json!({"role": "kvm"})));
    api.put(policy("everywhere", &["a"], None));
    api.put(policy("kvm", &["b"], Some(json!({"role": "kvm"}))));
    api.hold_lists(POLICIES);
    let (engine, script) = scripted();
    let mut op = Operator::new(api.client(), "node1".into(), engine);
    let operator = tokio::spawn(async move { op.run().await });
    eventually(10, "node and enactment watches", || watching(&api, NODES) && watching(&api, ENACTMENTS)).await;
    assert!(script.record.reloaded_domains().is_empty());
    let status_writes =
        |api: &FakeKube| api.calls().into_iter().filter(|c| c.is_write() && !c.uri.contains("/leases/")).count();
    assert_eq!(status_writes(&api), 0, "no status written before the first selection (the heartbeat aside)");
    api.release(POLICIES);
    eventually(10, "a selection", || !script.record.reloaded_domains().is_empty()).await;
    assert_eq!(script.record.reloaded_domains(), [["a", "b"]]);
    operator.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_change_deselects_the_node_which_removes_its_own_enactment() {
    let (_host, engine, task) = test_driver_engine();
    let api = FakeKube::new();
    api.put(node("node1", json!({"role": "kvm"})));
    api.put(policy("web", &["web1"], Some(json!({"role": "kvm"}))));
    let mut op = Operator::new(api.client(), "node1".into(), engine.clone());
    let operator = tokio::spawn(async move { op.run().await });
    engine
        .wait_for(Duration::from_secs(10), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.state.starts_with("running"))
        })
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    eventually(10, "the enactment", || api.object("HostPolicyEnactment", "web.node1.3").is_some()).await;

    api.put(node("node1", json!({"role": "storage"})));
    engine
        .wait_for(Duration::from_secs(10), |s| s.domains.is_empty())
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    eventually(10, "the enactment removed", || api.object("HostPolicyEnactment", "web.node1.3").is_none()).await;
    assert!(api
        .calls()
        .iter()
        .any(|c| c.method == "DELETE" && c.path().ends_with("/hostpolicyenactments/web.node1.3")));
    operator.abort();
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_policy_stops_being_enforced_and_nothing_recreates_its_enactment() {
    let api = FakeKube::new();
    api.put(node("node1", json!({})));
    api.put(policy("web", &["web1"], None));
    api.put(policy("db", &["db1"], None));
    let (engine, script) = scripted();
    let mut op = Operator::new(api.client(), "node1".into(), engine);
    let operator = tokio::spawn(async move { op.run().await });
    eventually(10, "both enactments", || api.objects("HostPolicyEnactment").len() == 2).await;

    // kubectl delete: the policy goes at once (no finalizer, no node to wait for); the garbage
    // collector takes its enactment; the node stops managing web1 and keeps db1.
    api.remove("HostPolicy", "web");
    eventually(10, "web1 no longer managed", || script.record.reloaded_domains().last().is_some_and(|d| d == &["db1"]))
        .await;
    script.record.settle().await;
    assert!(api.object("HostPolicyEnactment", "web.node1.3").is_none(), "recreated after deletion");
    assert!(api.object("HostPolicyEnactment", "db.node1.2").is_some());
    assert!(
        api.calls().iter().all(|c| !(c.method == "PATCH" && c.path() == format!("{POLICIES}/web"))),
        "nothing patches a policy itself"
    );
    operator.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_with_a_field_from_a_newer_crd_is_still_enforced() {
    let api = FakeKube::new();
    api.put(node("node1", json!({})));
    let mut p = policy("web", &["web1"], None);
    p["spec"]["domains"][0]["hibernateAfter"] = json!("1h");
    p["spec"]["maintenanceWindow"] = json!({"start": "02:00"});
    api.put(p);
    let (engine, script) = scripted();
    let mut op = Operator::new(api.client(), "node1".into(), engine);
    let operator = tokio::spawn(async move { op.run().await });
    eventually(10, "web1 selected", || script.record.reloaded_domains() == [["web1"]]).await;
    eventually(10, "a converged enactment", || condition(&enactment_of(&api, "web.node1.3"), "Available").0 == "True")
        .await;
    operator.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_exec_step_shows_in_the_enactment_and_as_one_event() {
    let api = FakeKube::new();
    api.put(node("node1", json!({})));
    api.put(policy("web", &["web1"], None));
    let (engine, script) = scripted();
    let mut op = Operator::new(api.client(), "node1".into(), engine);
    let operator = tokio::spawn(async move { op.run().await });
    eventually(10, "the enactment", || condition(&enactment_of(&api, "web.node1.3"), "Available").0 == "True").await;

    let why = "/opt/repair/vm is outside --allow-exec-dir";
    script.set("web1", |d| {
        d.state = "shut off (crashed)".into();
        d.refused_hook = Some(why.into());
    });
    eventually(10, "the refusal in the enactment", || {
        enactment_of(&api, "web.node1.3")["domains"][0]["refusedHook"] == why
    })
    .await;
    let e = enactment_of(&api, "web.node1.3");
    assert_eq!(condition(&e, "Degraded"), ("True".into(), "HookRefused".into()));
    script.record.settle().await;
    let events: Vec<Value> = api
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.uri.contains("/events") && c.body["reason"] == "HookRefused")
        .map(|c| c.body)
        .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(events[0]["note"].as_str().unwrap().contains(why));
    assert_eq!(events[0]["type"], "Warning");
    operator.abort();
}
