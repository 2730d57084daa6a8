//! The Kubernetes manifests in examples/k8s: the ClusterRole grants exactly what the operator
//! uses, the admission policy is valid Kubernetes and its CEL expressions (evaluated with a CEL
//! interpreter against admission requests) let a node write only its own enactments, and the
//! DaemonSet runs pinned, confined and only on nodes an administrator marked.

use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::{json, Value};

const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
const VIRTWARDEN: &str = "system:serviceaccount:virtwarden:virtwarden";

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("examples/k8s")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
    serde_saphyr::from_str_multiple(&text).unwrap()
}

#[test]
fn rbac_grants_nothing_beyond_the_list() {
    let text = std::fs::read_to_string(k8s_dir().join("rbac.yaml")).unwrap();
    let docs = documents("rbac.yaml");
    let grants = |kind: &str| {
        let role = docs.iter().find(|d| d["kind"] == kind).unwrap();
        let mut granted = Vec::new();
        for rule in role["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        granted.push(format!(
                            "{}/{}:{}",
                            g.as_str().unwrap(),
                            r.as_str().unwrap(),
                            v.as_str().unwrap()
                        ));
                    }
                }
            }
        }
        granted.sort();
        granted
    };
    let granted = grants("ClusterRole");
    let mut allowed = vec![
        // Policies are only read: no patch (there is no finalizer), no update, no delete.
        "virtwarden.io/hostpolicies:list",
        "virtwarden.io/hostpolicies:watch",
        "virtwarden.io/hostpolicies/status:patch",
        "virtwarden.io/hostpolicyenactments:list",
        "virtwarden.io/hostpolicyenactments:watch",
        "virtwarden.io/hostpolicyenactments:create",
        "virtwarden.io/hostpolicyenactments:patch",
        "virtwarden.io/hostpolicyenactments:delete",
        "virtwarden.io/hostpolicyenactments/status:patch",
        "/nodes:list",
        "/nodes:watch",
    ];
    allowed.sort();
    assert_eq!(granted, allowed);
    // In the operator's namespace only: heartbeat Leases and Events.
    let role = docs.iter().find(|d| d["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], "virtwarden");
    let binding = docs.iter().find(|d| d["kind"] == "RoleBinding").unwrap();
    assert_eq!(binding["metadata"]["namespace"], "virtwarden");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        grants("Role"),
        [
            "coordination.k8s.io/leases:create",
            "coordination.k8s.io/leases:list",
            "coordination.k8s.io/leases:patch",
            "coordination.k8s.io/leases:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch",
        ]
    );
    assert!(!text.contains("\"*\""), "no wildcards");
    assert!(!text.contains("finalizers"), "no finalizer rights");
}

/// Evaluates a ValidatingAdmissionPolicy the way the API server does, for one request.
struct Admission {
    policy: ValidatingAdmissionPolicy,
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The policy does not apply (matchConditions false).
    NotMatched,
    Allowed,
    Denied(String),
}

fn eval(expression: &str, context: &cel::Context) -> cel::Value {
    let program = cel::Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e:?}"));
    program.execute(context).unwrap_or_else(|e| panic!("{expression}: {e:?}"))
}

impl Admission {
    fn load() -> Self {
        let docs = documents("admission-policy.yaml");
        let policy = docs.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicy").unwrap();
        Admission { policy: serde_json::from_value(policy.clone()).expect("a ValidatingAdmissionPolicy") }
    }

    fn review(&self, operation: &str, user: &str, node: Option<&str>, object: Value, old: Value) -> Verdict {
        let spec = self.policy.spec.as_ref().unwrap();
        let mut context = cel::Context::default();
        context.add_variable("request", request(operation, user, node)).unwrap();
        context.add_variable("object", object).unwrap();
        context.add_variable("oldObject", old).unwrap();
        for c in spec.match_conditions.iter().flatten() {
            if eval(&c.expression, &context) != cel::Value::Bool(true) {
                return Verdict::NotMatched;
            }
        }
        let mut variables = serde_json::Map::new();
        for v in spec.variables.iter().flatten() {
            let mut ctx = cel::Context::default();
            ctx.add_variable("request", request(operation, user, node)).unwrap();
            let value = eval(&v.expression, &ctx);
            let cel::Value::String(s) = value else { panic!("variable {} is not a string: {value:?}", v.name) };
            variables.insert(v.name.clone(), json!(s.as_str()));
        }
        context.add_variable("variables", Value::Object(variables)).unwrap();
        for v in spec.validations.iter().flatten() {
            if eval(&v.expression, &context) != cel::Value::Bool(true) {
                let message = match &v.message_expression {
                    Some(m) => match eval(m, &context) {
                        cel::Value::String(s) => s.to_string(),
                        other => panic!("message is not a string: {other:?}"),
                    },
                    None => v.message.clone().unwrap_or_default(),
                };
                return Verdict::Denied(message);
            }
        }
        Verdict::Allowed
    }
}

/// An admission request's `request` as CEL sees it; a real token always carries a credential id.
fn request(operation: &str, user: &str, node: Option<&str>) -> Value {
    let mut extra = json!({"authentication.kubernetes.io/credential-id": ["JTI=test"]});
    if let Some(n) = node {
        extra[NODE_NAME_KEY] = json!([n]);
    }
    json!({"operation": operation, "userInfo": {"username": user, "extra": extra}})
}

/// An enactment as server-side apply produces it.
fn enactment(policy: &str, node: &str) -> Value {
    json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicyEnactment",
           "metadata": {"name": virtwarden::operator::kube_io::enactment_name(policy, node),
                        "labels": {"virtwarden.io/node": node, "virtwarden.io/policy": policy}},
           "spec": {"policy": policy, "node": node}})
}

#[test]
fn the_admission_policy_is_valid_kubernetes_and_bound() {
    let a = Admission::load();
    let spec = a.policy.spec.as_ref().unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec.match_constraints.as_ref().unwrap().resource_rules.as_ref().unwrap();
    let resources: Vec<&String> = rules.iter().flat_map(|r| r.resources.iter().flatten()).collect();
    assert_eq!(resources, ["hostpolicyenactments", "hostpolicyenactments/status"]);
    let operations: Vec<&String> = rules.iter().flat_map(|r| r.operations.iter().flatten()).collect();
    assert_eq!(operations, ["CREATE", "UPDATE", "DELETE"]);
    // Every expression compiles.
    let expressions = spec
        .match_conditions
        .iter()
        .flatten()
        .map(|c| &c.expression)
        .chain(spec.variables.iter().flatten().map(|v| &v.expression))
        .chain(
            spec.validations
                .iter()
                .flatten()
                .flat_map(|v| std::iter::once(&v.expression).chain(v.message_expression.as_ref())),
        );
    for e in expressions {
        cel::Program::compile(e).unwrap_or_else(|err| panic!("{e}: {err:?}"));
    }
    let docs = documents("admission-policy.yaml");
    let binding: ValidatingAdmissionPolicyBinding =
        serde_json::from_value(docs.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding").unwrap().clone())
            .unwrap();
    let bspec = binding.spec.unwrap();
    assert_eq!(bspec.policy_name.as_deref(), a.policy.metadata.name.as_deref());
    assert_eq!(bspec.validation_actions, Some(vec!["Deny".to_string()]));
    let kustomization = std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap();
    assert!(kustomization.contains("admission-policy.yaml"));
}

#[test]
fn a_node_writes_only_its_own_enactments() {
    let a = Admission::load();
    let own = || enactment("web", "node1");
    let other = || enactment("web", "node2");
    let null = Value::Null;
    // Its own: create, update (object and status), delete.
    assert_eq!(a.review("CREATE", VIRTWARDEN, Some("node1"), own(), null.clone()), Verdict::Allowed);
    assert_eq!(a.review("UPDATE", VIRTWARDEN, Some("node1"), own(), own()), Verdict::Allowed);
    assert_eq!(a.review("DELETE", VIRTWARDEN, Some("node1"), null.clone(), own()), Verdict::Allowed);
    // Another node's: denied whatever the operation.
    let denied = |v: Verdict| matches!(v, Verdict::Denied(ref m) if m.contains("node1"));
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), other(), null.clone())));
    assert!(denied(a.review("UPDATE", VIRTWARDEN, Some("node1"), other(), other())));
    assert!(denied(a.review("DELETE", VIRTWARDEN, Some("node1"), null.clone(), other())));
    // Taking another node's enactment over by rewriting its spec.node.
    assert!(denied(a.review("UPDATE", VIRTWARDEN, Some("node1"), own(), other())));
    // Its own node in spec, but named or labelled as another node's or another policy's.
    let mut misnamed = own();
    misnamed["metadata"]["name"] = json!("web.node2.3");
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), misnamed, null.clone())));
    // The old `<policy>.<node>` names: one name for two different enactments.
    let mut unsuffixed = own();
    unsuffixed["metadata"]["name"] = json!("web.node1");
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), unsuffixed, null.clone())));
    let mut mislabelled = own();
    mislabelled["metadata"]["labels"]["virtwarden.io/node"] = json!("node2");
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), mislabelled, null.clone())));
    let mut other_policy = own();
    other_policy["metadata"]["labels"]["virtwarden.io/policy"] = json!("db");
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), other_policy, null.clone())));
    let mut unlabelled = own();
    unlabelled["metadata"].as_object_mut().unwrap().remove("labels");
    assert!(denied(a.review("CREATE", VIRTWARDEN, Some("node1"), unlabelled, null.clone())));
}

#[test]
fn no_node_can_take_the_name_another_node_needs() {
    // Node `x.n2` with policy `p` and node `n2` with policy `p.x`: `<policy>.<node>` was
    // `p.x.n2` for both; the names differ now, and each node may write only its own.
    let a = Admission::load();
    let (mine, theirs) = (enactment("p", "x.n2"), enactment("p.x", "n2"));
    assert_ne!(mine["metadata"]["name"], theirs["metadata"]["name"]);
    assert_eq!(a.review("CREATE", VIRTWARDEN, Some("x.n2"), mine.clone(), Value::Null), Verdict::Allowed);
    assert_eq!(a.review("CREATE", VIRTWARDEN, Some("n2"), theirs.clone(), Value::Null), Verdict::Allowed);
    let mut squat = mine;
    squat["metadata"]["name"] = theirs["metadata"]["name"].clone();
    let v = a.review("CREATE", VIRTWARDEN, Some("x.n2"), squat, Value::Null);
    assert!(matches!(v, Verdict::Denied(ref m) if m.contains("x.n2")), "{v:?}");
}

#[test]
fn a_token_without_a_node_is_refused_and_other_users_are_not_affected() {
    let a = Admission::load();
    let v = a.review("CREATE", VIRTWARDEN, None, enactment("web", "node1"), Value::Null);
    assert!(matches!(v, Verdict::Denied(ref m) if m.contains("not bound to a node")), "{v:?}");
    // An administrator, or another service account, is not this policy's business (RBAC is).
    for user in
        ["kubernetes-admin", "system:serviceaccount:other:virtwarden", "system:serviceaccount:virtwarden:default"]
    {
        assert_eq!(
            a.review("DELETE", user, None, Value::Null, enactment("web", "node2")),
            Verdict::NotMatched,
            "{user}"
        );
    }
}

#[test]
fn the_daemonset_is_pinned_confined_and_on_marked_nodes_only() {
    let docs = documents("daemonset.yaml");
    let ds: DaemonSet = serde_json::from_value(docs[0].clone()).expect("a DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let selector = pod.node_selector.unwrap();
    assert_eq!(selector.get("node-restriction.kubernetes.io/virtwarden-kvm").map(String::as_str), Some("true"));
    assert!(selector.keys().all(|k| k.starts_with("node-restriction.kubernetes.io/")), "kubelets can set {selector:?}");
    let pod_seccomp = pod.security_context.and_then(|s| s.seccomp_profile).map(|p| p.type_);
    assert_eq!(pod_seccomp.as_deref(), Some("RuntimeDefault"));
    let c = &pod.containers[0];
    let image = c.image.as_deref().unwrap();
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    assert_eq!(tag, env!("CARGO_PKG_VERSION"), "the image is pinned to this release");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    assert_eq!(sc.capabilities.as_ref().unwrap().add, Some(vec!["NET_ADMIN".to_string()]));
    // --data-dir is a host directory, so the engine's memory survives the pod.
    let args = c.args.clone().unwrap();
    let data_dir = args.iter().position(|a| a == "--data-dir").map(|i| args[i + 1].clone()).expect("--data-dir");
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == data_dir).expect("a mount at --data-dir");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), Some("/var/lib/virtwarden"));
    assert_ne!(mount.read_only, Some(true));
    let dockerfile = std::fs::read_to_string(k8s_dir().join("Dockerfile")).unwrap();
    assert!(dockerfile.lines().any(|l| l.starts_with("RUN cargo build") && l.contains("--locked")), "builds --locked");
}
