//! The operator against a mocked API server (tower-test): each scenario checks the requests
//! call by call, with a timeout so a missing call fails. The engine runs on libvirt's test driver.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use virtwarden::act::remediation::Registry;
use virtwarden::engine::connect::SharedConnector;
use virtwarden::engine::{Engine, EngineConfig};
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::operator::{kube_io, Operator};
use virtwarden_crd::{HostPolicy, HostPolicyResourceSpec};
use virtwarden_policies::{DomainPolicy, HostPolicySpec, RestartPolicy};

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

fn policy(name: &str, domains: &[&str]) -> HostPolicy {
    let mut p = HostPolicy::new(
        name,
        HostPolicyResourceSpec {
            policy: HostPolicySpec {
                domains: domains
                    .iter()
                    .map(|d| DomainPolicy { restart: RestartPolicy::Always, ..DomainPolicy::named(*d) })
                    .collect(),
                ..Default::default()
            },
        },
    );
    p.metadata.uid = Some(format!("uid-{name}"));
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("7".into());
    p
}

fn enactment_reply(policy: &str, node: &str) -> Value {
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactment",
           "metadata": {"name": format!("{policy}.{node}")}, "spec": {"policy": policy, "node": node}})
}

/// One `write_statuses` round for policy `web` on node1: enactment, its status, the list of
/// enactments for the aggregate, the policy status. Returns the enactment status body.
async fn expect_status_round(handle: &mut Handle) -> Value {
    let enactment = "/apis/virtwarden.io/v1alpha1/hostpolicyenactments/web.node1";
    expect(handle, "PATCH", &format!("{enactment}?"), enactment_reply("web", "node1")).await;
    let (_, body) = expect(handle, "PATCH", &format!("{enactment}/status?"), enactment_reply("web", "node1")).await;
    let empty =
        json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactmentList", "metadata": {}, "items": []});
    expect(handle, "GET", "/apis/virtwarden.io/v1alpha1/hostpolicyenactments?", empty).await;
    let policy = serde_json::to_value(policy("web", &[])).unwrap();
    expect(handle, "PATCH", "/apis/virtwarden.io/v1alpha1/hostpolicies/web/status?", policy).await;
    body
}

#[tokio::test]
async fn enactment_is_server_side_applied_with_owner_and_labels() {
    let (client, mut handle) = mock();
    let p = policy("web", &["web1"]);
    let status = virtwarden_crd::HostPolicyEnactmentStatus::default();
    let server = tokio::spawn(async move {
        let (uri, body) = expect(
            &mut handle,
            "PATCH",
            "/apis/virtwarden.io/v1alpha1/hostpolicyenactments/web.node1?",
            enactment_reply("web", "node1"),
        )
        .await;
        assert!(uri.contains("fieldManager=virtwarden-node1") && uri.contains("force=true"), "{uri}");
        assert_eq!(body["metadata"]["labels"], json!({"virtwarden.io/node": "node1", "virtwarden.io/policy": "web"}));
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-web");
        assert_eq!(body["spec"], json!({"policy": "web", "node": "node1"}));
        let (uri, body) = expect(
            &mut handle,
            "PATCH",
            "/apis/virtwarden.io/v1alpha1/hostpolicyenactments/web.node1/status?",
            enactment_reply("web", "node1"),
        )
        .await;
        assert!(uri.contains("fieldManager=virtwarden-node1"), "{uri}");
        assert!(body.get("status").is_some(), "{body}");
    });
    kube_io::apply_enactment(&client, &p, "node1", &status).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn policy_status_aggregates_node_counts_under_one_shared_manager() {
    let (client, mut handle) = mock();
    let p = policy("web", &["web1"]);
    let server = tokio::spawn(async move {
        let cond = |t: &str| json!({"type": t, "status": "True", "reason": "X", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        let list = json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactmentList", "metadata": {}, "items": [
            {"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactment", "metadata": {"name": "web.a"}, "spec": {"policy": "web", "node": "a"}, "status": {"conditions": [cond("Available")]}},
            {"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactment", "metadata": {"name": "web.b"}, "spec": {"policy": "web", "node": "b"}, "status": {"conditions": [cond("Degraded")]}}]});
        let (uri, _) = expect(&mut handle, "GET", "/apis/virtwarden.io/v1alpha1/hostpolicyenactments?", list).await;
        assert!(uri.contains("labelSelector=virtwarden.io%2Fpolicy%3Dweb"), "{uri}");
        let reply = serde_json::to_value(policy("web", &[])).unwrap();
        let (uri, body) =
            expect(&mut handle, "PATCH", "/apis/virtwarden.io/v1alpha1/hostpolicies/web/status?", reply).await;
        assert!(uri.contains("fieldManager=virtwarden-aggregate"), "{uri}");
        assert_eq!(body["status"]["matchedNodes"], 2);
        assert_eq!(body["status"]["availableNodes"], 1);
        assert_eq!(body["status"]["degradedNodes"], 1);
        assert_eq!(body["status"]["progressingNodes"], 0);
    });
    kube_io::aggregate_policy_status(&client, &p).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn finalizer_is_added_and_removed_by_the_last_node() {
    let (client, mut handle) = mock();
    let p = policy("web", &[]);
    let server = tokio::spawn(async move {
        let reply = serde_json::to_value(policy("web", &[])).unwrap();
        let (_, body) =
            expect(&mut handle, "PATCH", "/apis/virtwarden.io/v1alpha1/hostpolicies/web?", reply.clone()).await;
        assert_eq!(body["metadata"]["finalizers"], json!(["virtwarden.io/enactments"]));
        // Deletion: this node drops its enactment, finds none left, removes the finalizer.
        expect(
            &mut handle,
            "DELETE",
            "/apis/virtwarden.io/v1alpha1/hostpolicyenactments/web.node1?",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        )
        .await;
        let empty = json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactmentList", "metadata": {}, "items": []});
        expect(&mut handle, "GET", "/apis/virtwarden.io/v1alpha1/hostpolicyenactments?", empty).await;
        let (_, body) = expect(&mut handle, "PATCH", "/apis/virtwarden.io/v1alpha1/hostpolicies/web?", reply).await;
        assert_eq!(body["metadata"]["finalizers"], json!([]));
    });
    kube_io::ensure_finalizer(&client, &p).await.unwrap();
    let mut deleting = p.clone();
    deleting.metadata.finalizers = Some(vec!["virtwarden.io/enactments".into()]);
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    kube_io::finish_deletion(&client, &deleting, "node1").await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_in_domain_healed_enactment_out() {
    let (host, engine, task) = test_driver_engine();
    engine.wait_for(Duration::from_secs(10), |_| engine.is_ready()).await.unwrap();
    let (client, mut handle) = mock();
    let mut op = Operator::new(client, "node1".into(), engine.clone());

    // web1 is shut off in the test driver; a HostPolicy selecting this node arrives.
    let mut p = policy("web", &["web1"]);
    p.metadata.finalizers = Some(vec!["virtwarden.io/enactments".into()]);
    let policies = vec![Arc::new(p)];
    op.reselect(&policies, &BTreeMap::new()).await;
    let healed = engine
        .wait_for(Duration::from_secs(10), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.state.starts_with("running"))
        })
        .await;
    assert!(healed.is_some(), "{:#?}", engine.status());

    let server = tokio::spawn(async move {
        let body = expect_status_round(&mut handle).await;
        (body, handle)
    });
    assert!(op.write_statuses(&policies).await);
    let (body, mut handle) = server.await.unwrap();
    let status = &body["status"];
    assert_eq!(status["domains"][0]["name"], "web1");
    assert!(status["domains"][0]["state"].as_str().unwrap().starts_with("running"), "{status}");
    let available = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Available").unwrap();
    assert_eq!(available["status"], "True");
    assert_eq!(available["reason"], "Converged");

    // The guest dies and is restarted: the next status round also tells it as an Event.
    virtwarden::hypervisor::DomainControl::destroy(host.as_ref(), "web1").unwrap();
    engine
        .wait_for(Duration::from_secs(10), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.restarts == 2 && d.state.starts_with("running"))
        })
        .await
        .expect("restarted");
    let server = tokio::spawn(async move {
        expect_status_round(&mut handle).await;
        let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "default"}, "eventTime": "2026-01-01T00:00:00.000000Z"});
        let (uri, body) = expect(&mut handle, "POST", "/apis/events.k8s.io/v1/namespaces/default/events?", event).await;
        (uri, body)
    });
    assert!(op.write_statuses(&policies).await);
    let (_, event) = server.await.unwrap();
    assert_eq!(event["reason"], "Restarted");
    assert_eq!(event["regarding"]["name"], "web");
    assert!(event["note"].as_str().unwrap().starts_with("web1: stopped/destroyed"), "{event}");
    engine.shutdown();
    task.await.unwrap();
}

#[test]
fn rbac_grants_nothing_beyond_the_list() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("examples/k8s/rbac.yaml"),
    )
    .unwrap();
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    granted.push(format!("{}/{}:{}", g.as_str().unwrap(), r.as_str().unwrap(), v.as_str().unwrap()));
                }
            }
        }
    }
    granted.sort();
    let mut allowed: Vec<String> = [
        "virtwarden.io/hostpolicies:get",
        "virtwarden.io/hostpolicies:list",
        "virtwarden.io/hostpolicies:watch",
        "virtwarden.io/hostpolicies:patch", // finalizer only
        "virtwarden.io/hostpolicies/status:get",
        "virtwarden.io/hostpolicies/status:patch",
        "virtwarden.io/hostpolicyenactments:get",
        "virtwarden.io/hostpolicyenactments:list",
        "virtwarden.io/hostpolicyenactments:watch",
        "virtwarden.io/hostpolicyenactments:create",
        "virtwarden.io/hostpolicyenactments:patch",
        "virtwarden.io/hostpolicyenactments:delete",
        "virtwarden.io/hostpolicyenactments/status:get",
        "virtwarden.io/hostpolicyenactments/status:patch",
        "/nodes:get",
        "/nodes:list",
        "/nodes:watch",
        "/events:create",
        "/events:patch",
        "events.k8s.io/events:create",
        "events.k8s.io/events:patch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    allowed.sort();
    assert_eq!(granted, allowed);
    assert!(!text.contains("\"*\""), "no wildcards");
}

/// A scripted API server for the watch-driven loop: answers lists and watches of HostPolicies
/// and the Node, records every write. The node's labels can be changed mid-test, which the
/// server announces as a MODIFIED event on the node watch.
struct FakeApi {
    labels: std::sync::Mutex<Value>,
    label_change: tokio::sync::Notify,
    writes: std::sync::Mutex<Vec<(String, String, Value)>>,
}

fn node_json(labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "resourceVersion": "2", "labels": labels}})
}

async fn serve(api: Arc<FakeApi>, mut handle: Handle, policy: Value) {
    loop {
        let Some((req, send)) = handle.next_request().await else { return };
        let method = req.method().as_str().to_string();
        let uri = req.uri().to_string();
        let body = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let api = api.clone();
        let policy = policy.clone();
        // Watches hold their response open, so each request is answered from its own task.
        tokio::spawn(async move {
            let reply: Value = if method == "GET" && uri.starts_with("/apis/virtwarden.io/v1alpha1/hostpolicies?") {
                if uri.contains("watch=true") {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyList", "metadata": {"resourceVersion": "1"}, "items": [policy]})
            } else if method == "GET" && uri.starts_with("/api/v1/nodes?") {
                if uri.contains("watch=true") {
                    api.label_change.notified().await;
                    let labels = api.labels.lock().unwrap().clone();
                    let event = json!({"type": "MODIFIED", "object": node_json(&labels)});
                    let mut line = serde_json::to_vec(&event).unwrap();
                    line.push(b'\n');
                    send.send_response(Response::builder().body(Body::from(line)).unwrap());
                    return;
                }
                let labels = api.labels.lock().unwrap().clone();
                json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "2"}, "items": [node_json(&labels)]})
            } else if method == "GET" && uri.starts_with("/apis/virtwarden.io/v1alpha1/hostpolicyenactments?") {
                json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactmentList", "metadata": {}, "items": []})
            } else if method == "POST" && uri.contains("/events") {
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "default"}, "eventTime": "2026-01-01T00:00:00.000000Z"})
            } else {
                api.writes.lock().unwrap().push((method.clone(), uri.clone(), body));
                if uri.contains("hostpolicyenactments") {
                    enactment_reply("web", "node1")
                } else {
                    policy
                }
            };
            send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_policy_selects_node_then_stops_matching_after_a_label_change() {
    let (_host, engine, task) = test_driver_engine();
    let (client, handle) = mock();
    let mut p = policy("web", &["web1"]);
    p.spec.policy.node_selector = Some([("role".to_string(), "kvm".to_string())].into());
    let api = Arc::new(FakeApi {
        labels: std::sync::Mutex::new(json!({"role": "kvm"})),
        label_change: tokio::sync::Notify::new(),
        writes: Default::default(),
    });
    tokio::spawn(serve(api.clone(), handle, serde_json::to_value(&p).unwrap()));
    let mut op = Operator::new(client, "node1".into(), engine.clone());
    let operator = tokio::spawn(async move { op.run().await });

    // Listed policy + node labels → selected → web1 managed and started.
    engine
        .wait_for(Duration::from_secs(10), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.state.starts_with("running"))
        })
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    // The finalizer and the enactment are written through the API.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let w = api.writes.lock().unwrap().clone();
        let finalizer = w.iter().any(|(m, u, b)| {
            m == "PATCH"
                && u.starts_with("/apis/virtwarden.io/v1alpha1/hostpolicies/web?")
                && b["metadata"]["finalizers"] == json!(["virtwarden.io/enactments"])
        });
        let enactment = w.iter().any(|(m, u, b)| {
            m == "PATCH"
                && u.contains("hostpolicyenactments/web.node1/status")
                && b["status"]["domains"][0]["name"] == "web1"
        });
        if finalizer && enactment {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "writes: {w:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The node's label changes: the policy no longer selects it and web1 is no longer managed.
    *api.labels.lock().unwrap() = json!({"role": "storage"});
    api.label_change.notify_one();
    engine
        .wait_for(Duration::from_secs(10), |s| s.domains.is_empty())
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    operator.abort();
    engine.shutdown();
    task.await.unwrap();
}
