//! The operator against a REAL kube-apiserver 1.20 (+ etcd, kube-controller-manager for garbage
//! collection; see support/apiserver.rs): examples/k8s/ applied as shipped, and `virtwarden
//! operator` processes for three "nodes", each with its own libvirt test-driver host, data and
//! state directories and lock, authenticated as the DaemonSet's ServiceAccount with a
//! TokenRequest token. The outage test runs the operator loop in this process (same code, same
//! ServiceAccount) so that it can crash a domain of the node's test driver while the API is away.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver::{client_from, free_port, repo, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use virtwarden::operator::kube_io::enactment_name;
use virtwarden_crd::{HostPolicy, HostPolicyEnactment};

/// examples/k8s/ as a cluster admin applies it, minus what 1.20 cannot take and the DaemonSet
/// (the tests run the binary themselves).
async fn install(server: &ApiServer) {
    let k8s = repo().join("examples/k8s");
    for file in ["namespace.yaml", "crd.yaml", "serviceaccount.yaml", "rbac.yaml"] {
        let text = std::fs::read_to_string(k8s.join(file)).expect("manifest");
        server.apply_yaml(&text).await;
    }
    println!(
        "examples/k8s/admission-policy.yaml NOT applied: ValidatingAdmissionPolicy needs Kubernetes 1.30 \
         (this API server is 1.20); its CEL is checked by controller/tests/manifests.rs only"
    );
}

/// Wait until `f` gives something (polling every 200 ms), at most `secs` seconds.
async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn put_node(admin: &Client, name: &str, labels: Value) {
    let api: Api<Node> = Api::all(admin.clone());
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    api.patch(name, &PatchParams::apply("virtwarden-tests").force(), &Patch::Apply(&node)).await.expect("node");
}

async fn put_policy(admin: &Client, name: &str, domains: &[&str], selector: Option<Value>) {
    let api: Api<HostPolicy> = Api::all(admin.clone());
    let domains: Vec<Value> = domains.iter().map(|d| json!({"name": d, "restart": "always"})).collect();
    let mut spec = json!({ "domains": domains });
    if let Some(s) = selector {
        spec["nodeSelector"] = s;
    }
    let p =
        json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply("virtwarden-tests").force(), &Patch::Apply(&p)).await.expect("policy");
}

async fn enactments(admin: &Client) -> Vec<HostPolicyEnactment> {
    let api: Api<HostPolicyEnactment> = Api::all(admin.clone());
    api.list(&ListParams::default()).await.expect("list enactments").items
}

fn condition(e: &HostPolicyEnactment, type_: &str) -> String {
    e.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

/// (policy, node) of every enactment that reports its domains all running, converged.
async fn converged(admin: &Client) -> BTreeSet<(String, String)> {
    enactments(admin)
        .await
        .into_iter()
        .filter(|e| condition(e, "Available") == "True")
        .filter(|e| {
            e.status
                .as_ref()
                .is_some_and(|s| !s.domains.is_empty() && s.domains.iter().all(|d| d.state.starts_with("running")))
        })
        .map(|e| (e.spec.policy, e.spec.node))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter().map(|(p, n)| (p.to_string(), n.to_string())).collect()
}

async fn policy_status(admin: &Client, name: &str) -> Value {
    let api: Api<HostPolicy> = Api::all(admin.clone());
    serde_json::to_value(api.get(name).await.expect("policy").status).unwrap_or_default()
}

/// How many times the ServiceAccount listed the policies (not watches).
fn policy_lists(server: &ApiServer) -> usize {
    server
        .audit()
        .iter()
        .filter(|a| {
            a["verb"] == "list"
                && a["stage"] == "ResponseComplete"
                && a["user"]["username"] == "system:serviceaccount:virtwarden:virtwarden"
                && a["requestURI"].as_str().is_some_and(|u| u.starts_with("/apis/virtwarden.io/v1alpha1/hostpolicies"))
        })
        .count()
}

/// One `virtwarden operator` process: its own test-driver host (a copy of
/// examples/testbed/node.xml), data, state and lock, the ServiceAccount's kubeconfig.
struct NodeAgent {
    name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    metrics: u16,
}

impl NodeAgent {
    fn spawn(name: &str, kubeconfig: &Path) -> NodeAgent {
        let dir = tempfile::Builder::new().prefix(&format!("virtwarden-{name}-")).tempdir().unwrap();
        let host = dir.path().join("node.xml");
        std::fs::copy(repo().join("examples/testbed/node.xml"), &host).unwrap();
        let metrics = free_port();
        let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
            .arg("operator")
            .arg("--connect")
            .arg(format!("test://{}", host.display()))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--lock-file")
            .arg(dir.path().join("virtwarden.lock"))
            .env("NODE_NAME", name)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("virtwarden operator runs");
        NodeAgent { name: name.into(), dir, child: Some(child), metrics }
    }

    /// GET `path` on the node's metrics and health endpoint: the status code.
    fn probe(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    /// The node dies: SIGKILL, nothing said goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            apiserver::stop(c);
        }
    }
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The ServiceAccount, with a TokenRequest token, is refused everything RBAC does not grant.
async fn check_refusals(admin: &Client, sa: &Client) {
    let policies: Api<HostPolicy> = Api::all(sa.clone());
    policies.list(&ListParams::default()).await.expect("the ServiceAccount lists policies");
    let web = json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy",
                     "metadata": {"name": "web"}, "spec": {"domains": [{"name": "web1"}]}});
    forbidden(policies.patch("web", &PatchParams::apply("x").force(), &Patch::Apply(&web)).await, "patch a HostPolicy");
    forbidden(policies.delete("web", &DeleteParams::default()).await, "delete a HostPolicy");
    forbidden(
        policies.create(&PostParams::default(), &serde_json::from_value(web).unwrap()).await,
        "create a HostPolicy",
    );
    forbidden(Api::<Secret>::namespaced(sa.clone(), "virtwarden").list(&ListParams::default()).await, "secrets here");
    forbidden(Api::<Secret>::namespaced(sa.clone(), "default").list(&ListParams::default()).await, "secrets elsewhere");
    // Events and Leases in its own namespace only.
    forbidden(Api::<Lease>::namespaced(sa.clone(), "default").list(&ListParams::default()).await, "leases elsewhere");
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"}});
    forbidden(
        Api::<Lease>::namespaced(sa.clone(), "kube-system")
            .patch("n1", &PatchParams::apply("x").force(), &Patch::Apply(&lease))
            .await,
        "a lease in kube-system",
    );
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "x"},
                       "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "virtwarden",
                       "reportingInstance": "n1", "action": "Restart", "reason": "Restarted", "type": "Normal"});
    for ns in ["default", "kube-system"] {
        forbidden(
            Api::<Event>::namespaced(sa.clone(), ns)
                .create(&PostParams::default(), &serde_json::from_value(event.clone()).unwrap())
                .await,
            &format!("an event in {ns}"),
        );
    }
    forbidden(
        Api::<Node>::all(sa.clone())
            .patch(
                "n1",
                &PatchParams::apply("x").force(),
                &Patch::Apply(&json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"x": "y"}}})),
            )
            .await,
        "label a node",
    );
    let _ = admin;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_as_the_service_account_enforce_report_and_follow_the_cluster() {
    let server = ApiServer::start().await;
    install(&server).await;
    let admin = server.admin.clone();
    let kubeconfig =
        server.service_account_kubeconfig("virtwarden", "virtwarden", &server.dir().join("sa.kubeconfig")).await;
    let sa = client_from(&kubeconfig).await;
    assert_eq!(sa.default_namespace(), "virtwarden");

    put_node(&admin, "n1", json!({"role": "kvm"})).await;
    put_node(&admin, "n2", json!({"role": "kvm"})).await;
    put_node(&admin, "n3", json!({"role": "storage"})).await;
    put_policy(&admin, "web", &["web1"], Some(json!({"role": "kvm"}))).await;
    put_policy(&admin, "db", &["db1"], None).await;
    check_refusals(&admin, &sa).await;
    let mut agents: Vec<NodeAgent> = ["n1", "n2", "n3"].iter().map(|n| NodeAgent::spawn(n, &kubeconfig)).collect();
    let logs = |agents: &[NodeAgent]| agents.iter().map(|a| format!("--- {}\n{}", a.name, a.log())).collect::<String>();

    // Each node enforces what selects it and reports it: web on the kvm nodes, db everywhere.
    let want = pairs(&[("db", "n1"), ("db", "n2"), ("db", "n3"), ("web", "n1"), ("web", "n2")]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while converged(&admin).await != want {
        assert!(Instant::now() < deadline, "not converged: {:?}\n{}", converged(&admin).await, logs(&agents));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for a in &agents {
        // Ready once its last status round went through; polled, as a kubelet would.
        wait_for(&format!("{} healthy and ready", a.name), 30, || async {
            ((a.probe("/healthz"), a.probe("/readyz")) == (Some(200), Some(200))).then_some(())
        })
        .await;
    }
    for e in enactments(&admin).await {
        let (policy, node) = (&e.spec.policy, &e.spec.node);
        assert_eq!(e.metadata.name.as_deref(), Some(enactment_name(policy, node).as_str()));
        let labels = e.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("virtwarden.io/node"), Some(node));
        assert_eq!(labels.get("virtwarden.io/policy"), Some(policy));
        // Written by its own node only (each node applies under its own field manager).
        let managers: BTreeSet<String> =
            e.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect();
        assert_eq!(managers, BTreeSet::from([format!("virtwarden-{node}")]), "{}", e.metadata.name.unwrap());
        let s = e.status.unwrap();
        let domain = if policy == "web" { "web1" } else { "db1" };
        assert_eq!(s.domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), [domain]);
        assert!(s.domains[0].health.is_none() && s.domains[0].waiting_for.is_empty(), "{:?}", s.domains[0]);
    }
    // Status goes through the status subresource: the audit log has every status write on
    // …/status, by the ServiceAccount, and no write of an enactment's main resource but its creation.
    let sa_user = "system:serviceaccount:virtwarden:virtwarden";
    let writes: Vec<(String, String, i64)> = server
        .audit()
        .iter()
        .filter(|a| a["user"]["username"] == sa_user && a["stage"] == "ResponseComplete")
        .filter(|a| ["create", "patch", "update", "delete"].contains(&a["verb"].as_str().unwrap_or_default()))
        .map(|a| {
            (
                a["verb"].as_str().unwrap().into(),
                a["requestURI"].as_str().unwrap().into(),
                a["responseStatus"]["code"].as_i64().unwrap_or(0),
            )
        })
        .filter(|(_, _, code)| *code < 400) // (this test's own refused requests above)
        .collect();
    let enactment_main =
        writes.iter().filter(|(_, u, _)| u.contains("/hostpolicyenactments/") && !u.contains("/status?")).count();
    let enactment_status =
        writes.iter().filter(|(_, u, _)| u.contains("/hostpolicyenactments/") && u.contains("/status?")).count();
    assert_eq!(enactment_main, 5, "one creating apply per enactment: {writes:#?}");
    assert!(enactment_status >= 5, "{writes:#?}");
    assert!(writes.iter().all(|(_, u, _)| !u.contains("/hostpolicies/") || u.contains("/status?")), "{writes:#?}");

    // Aggregates, heartbeats.
    let web = wait_for("web's aggregate", 30, || async {
        let s = policy_status(&admin, "web").await;
        (s["enforcingNodes"] == 2 && s["availableNodes"] == 2).then_some(s)
    })
    .await;
    assert_eq!(
        (web["matchedNodes"].as_u64(), web["laggingNodes"].as_u64(), web["failingNodes"].as_u64()),
        (Some(2), Some(0), Some(0))
    );
    let leases: Vec<String> = Api::<Lease>::namespaced(admin.clone(), "virtwarden")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .collect();
    assert_eq!(leases, ["n1", "n2", "n3"]);

    // An edit is enforced and reflected.
    put_policy(&admin, "web", &["web1", "web2"], Some(json!({"role": "kvm"}))).await;
    wait_for("web2 in web's enactments", 30, || async {
        let ok = enactments(&admin).await.iter().filter(|e| e.spec.policy == "web").all(|e| {
            e.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == Some(2) && s.domains.iter().any(|d| d.name == "web2"))
        });
        ok.then_some(())
    })
    .await;

    // A deleted policy's enactments go (garbage collection; no node recreates them).
    Api::<HostPolicy>::all(admin.clone()).delete("db", &DeleteParams::default()).await.unwrap();
    wait_for("db's enactments collected", 60, || async {
        enactments(&admin).await.iter().all(|e| e.spec.policy != "db").then_some(())
    })
    .await;

    // A label change moves web from n1 to n3.
    put_node(&admin, "n1", json!({"role": "storage"})).await;
    put_node(&admin, "n3", json!({"role": "kvm"})).await;
    let want = pairs(&[("web", "n2"), ("web", "n3")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while converged(&admin).await != want || enactments(&admin).await.len() != 2 {
        assert!(Instant::now() < deadline, "web did not move: {:?}\n{}", converged(&admin).await, logs(&agents));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(enactments(&admin).await.iter().all(|e| e.spec.policy != "db"), "db's enactments came back");

    // A node whose virtwarden dies is counted as lagging once its Lease expires.
    agents[1].kill();
    let web = wait_for("n2 lagging in web's status", 90, || async {
        let s = policy_status(&admin, "web").await;
        (s["laggingNodes"] == 1).then_some(s)
    })
    .await;
    assert_eq!((web["enforcingNodes"].as_u64(), web["matchedNodes"].as_u64()), (Some(1), Some(2)), "{web}");
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_api_outage_the_node_keeps_enforcing_and_catches_up_in_seconds() {
    use virtwarden::act::remediation::Registry;
    use virtwarden::engine::{Engine, EngineConfig};
    use virtwarden::libvirt::connect::SharedConnector;
    use virtwarden::libvirt::events::start_event_loop;
    use virtwarden::libvirt::LibvirtHost;
    use virtwarden::operator::Operator;

    let mut server = ApiServer::start().await;
    install(&server).await;
    let admin = server.admin.clone();
    let kubeconfig =
        server.service_account_kubeconfig("virtwarden", "virtwarden", &server.dir().join("sa.kubeconfig")).await;
    let sa = client_from(&kubeconfig).await;
    put_node(&admin, "n1", json!({})).await;
    put_policy(&admin, "web", &["web1"], None).await;

    start_event_loop();
    let host_file: PathBuf = repo().join("examples/testbed/node.xml");
    let host = Arc::new(LibvirtHost::open(&format!("test://{}", host_file.display())).unwrap());
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let (engine, task) = Engine::spawn(
        Arc::new(SharedConnector { host: host.clone() }),
        Default::default(),
        config,
        Registry::with_builtins(),
    );
    let mut op = Operator::new(sa.clone(), "n1".into(), engine.clone());
    let api_health = op.api_health.clone();
    let operator = tokio::spawn(async move { op.run().await });
    let restarts = |admin: Client| async move {
        let e = enactments(&admin).await;
        e.first().and_then(|e| e.status.as_ref()).and_then(|s| s.domains.first()).map(|d| d.restarts)
    };
    wait_for("web1 converged", 60, || async { (converged(&admin).await == pairs(&[("web", "n1")])).then_some(()) })
        .await;
    assert_eq!(api_health.problem(), None, "ready");
    let before = restarts(admin.clone()).await.unwrap();

    // The API server goes away; etcd moves on and is compacted, so the watches' resource
    // versions are gone when it returns (410 → relist).
    let lists_before = policy_lists(&server);
    server.stop_apiserver();
    wait_for("readiness to say the API is unreachable", 30, || async { api_health.problem() }).await;
    virtwarden::hypervisor::DomainControl::destroy(host.as_ref(), "web1").unwrap();
    engine
        .wait_for(Duration::from_secs(20), |s| {
            s.domains.iter().any(|d| d.name == "web1" && d.restarts > before && d.state.starts_with("running"))
        })
        .await
        .expect("web1 restarted while the API is down");
    assert!(engine.liveness().await.is_ok(), "liveness is the engine's: still live");
    server.bump_etcd_revision();
    server.compact_etcd();
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage lasts a while: the watches back off
    server.start_apiserver().await;

    // An edit right after the server is back reaches the enactment (in seconds, printed; the
    // bound is only for a machine under load: watches back off up to 3 s each, then relist).
    let edited = Instant::now();
    put_policy(&admin, "web", &["web1", "web2"], None).await;
    wait_for("the edit in the enactment", 60, || async {
        let e = enactments(&admin).await;
        e.iter().any(|e| e.status.as_ref().is_some_and(|s| s.domains.iter().any(|d| d.name == "web2"))).then_some(())
    })
    .await;
    println!("edit after the API returned → enactment updated: {:?}", edited.elapsed());
    wait_for("ready again", 60, || async { api_health.problem().is_none().then_some(()) }).await;
    // No duplicate, and the restart made during the outage is reported.
    let all = enactments(&admin).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    wait_for("the outage's restart in the enactment", 60, || async {
        restarts(admin.clone()).await.filter(|r| *r > before)
    })
    .await;
    // The restart is told as an Event in the operator's namespace, regarding the node's Lease,
    // naming the policy.
    let events: Api<Event> = Api::namespaced(admin.clone(), "virtwarden");
    let restarted = wait_for("a Restarted event", 60, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("Restarted") && e.note.as_deref().is_some_and(|n| n.contains("destroyed"))
        })
    })
    .await;
    let regarding = restarted.regarding.clone().unwrap_or_default();
    assert_eq!((regarding.kind.as_deref(), regarding.name.as_deref()), (Some("Lease"), Some("n1")), "{restarted:?}");
    let related = restarted.related.clone().unwrap_or_default();
    assert_eq!((related.kind.as_deref(), related.name.as_deref()), (Some("HostPolicy"), Some("web")), "{restarted:?}");
    assert!(restarted.note.as_deref().is_some_and(|n| n.starts_with("HostPolicy web: web1: ")), "{restarted:?}");
    let elsewhere: Vec<Event> = Api::<Event>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("virtwarden"))
        .filter(|e| e.metadata.namespace.as_deref() != Some("virtwarden"))
        .collect();
    assert!(elsewhere.is_empty(), "{elsewhere:#?}");

    // The watches listed again after the server returned (410 Gone).
    assert!(policy_lists(&server) > lists_before, "no relist of the policies after the outage");
    operator.abort();
    engine.shutdown();
    task.await.unwrap();
}
