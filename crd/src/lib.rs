//! Kubernetes resources for virtwarden: the cluster-scoped `HostPolicy` (the same spec as a
//! policy file, `nodeSelector` included) and the per-node `HostPolicyEnactment` status object.
//! `crdgen` prints both CRDs; nobody writes schema YAML by hand.

// kube's printcolumn(...) repeats keys like `type_` by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use virtwarden_policies::HostPolicySpec;

pub mod schema;
pub mod tolerant;

/// Condition types used on enactments and aggregated on policies.
pub mod condition {
    pub const AVAILABLE: &str = "Available";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons (CamelCase, as the API conventions ask).
pub mod reason {
    pub const CONVERGED: &str = "Converged";
    pub const REMEDIATING: &str = "Remediating";
    pub const CRASH_LOOP: &str = "CrashLoop";
    pub const CONFLICT: &str = "Conflict";
    pub const INVALID_POLICY: &str = "InvalidPolicy";
    /// An `exec` remediation step was refused (not run) on the node.
    pub const HOOK_REFUSED: &str = "HookRefused";
}

/// A HostPolicy as a cluster-scoped custom resource: the policy-file spec, unchanged.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "virtwarden.io",
    version = "v1alpha1",
    kind = "HostPolicy",
    plural = "hostpolicies",
    shortname = "hpol",
    category = "virtwarden",
    status = "HostPolicyStatus",
    doc = "Desired state of libvirt/KVM nodes selected by nodeSelector, reconciled by virtwarden on each node.",
    printcolumn(
        name = "Matched",
        type_ = "integer",
        json_path = ".status.matchedNodes",
        description = "nodes this policy selects"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableNodes",
        description = "nodes where it converged"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "integer",
        json_path = ".status.degradedNodes",
        description = "nodes that cannot converge"
    ),
    printcolumn(
        name = "Enforcing",
        type_ = "integer",
        json_path = ".status.enforcingNodes",
        description = "nodes enforcing the current generation, alive"
    ),
    printcolumn(
        name = "Lagging",
        type_ = "integer",
        json_path = ".status.laggingNodes",
        description = "nodes on an older generation or whose heartbeat expired"
    ),
    printcolumn(
        name = "Failing",
        type_ = "integer",
        json_path = ".status.failingNodes",
        description = "nodes alive on the current generation that cannot converge"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[schemars(transform = schema::open_empty_objects)]
pub struct HostPolicyResourceSpec {
    #[serde(flatten)]
    pub policy: HostPolicySpec,
}

/// Aggregated over the nodes the policy selects, from their enactments; written only when it
/// changes, by one node at a time (the first by name, the next ones only if it is gone).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub matched_nodes: u32,
    #[serde(default)]
    pub available_nodes: u32,
    #[serde(default)]
    pub progressing_nodes: u32,
    #[serde(default)]
    pub degraded_nodes: u32,
    /// Nodes enforcing the policy's current generation, their virtwarden alive and not failing.
    #[serde(default)]
    pub enforcing_nodes: u32,
    /// Nodes behind: their enactment is of an older generation, or their virtwarden's heartbeat
    /// Lease expired (it is down, or cannot reach the API).
    #[serde(default)]
    pub lagging_nodes: u32,
    /// Nodes alive and on the current generation that cannot converge (Degraded).
    #[serde(default)]
    pub failing_nodes: u32,
    /// Standard conditions (`Available`, `Progressing`, `Degraded`) summarising the nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One node's enactment of one policy, named `<policy>.<node>`.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "virtwarden.io",
    version = "v1alpha1",
    kind = "HostPolicyEnactment",
    plural = "hostpolicyenactments",
    shortname = "hpe",
    category = "virtwarden",
    status = "HostPolicyEnactmentStatus",
    doc = "How one node enacts one HostPolicy; written only by that node's virtwarden.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policy"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Available\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Available\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicyEnactmentSpec {
    pub policy: String,
    pub node: String,
}

/// Per-node detail: conditions plus every managed domain and bridge.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicyEnactmentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainEnactment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<BridgeEnactment>,
}

/// One managed domain on one node.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainEnactment {
    pub name: String,
    /// As virsh prints it, e.g. `shut off (crashed)`.
    pub state: String,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default)]
    pub quarantined: bool,
    /// The last `exec` remediation step the node refused to run, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_hook: Option<String>,
    /// What its start waits for (order group, `after`, `delay`, a required path, a start slot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Guest health, for domains with `health`: `healthy`, `booting`, `unhealthy: <what failed>`,
    /// `boot failed: <evidence>`, `suspended: <why>`, `down`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// One managed bridge on one node.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BridgeEnactment {
    pub name: String,
    #[serde(default)]
    pub present: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
}

/// Both CRDs as one multi-document YAML stream, as checked in at `examples/k8s/crd.yaml`.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    let header = "# Generated by `make crd` (cargo run -p virtwarden-crd --bin crdgen). Do not edit.\n";
    let docs = [serde_saphyr::to_string(&HostPolicy::crd())?, serde_saphyr::to_string(&HostPolicyEnactment::crd())?];
    Ok(format!("{header}---\n{}---\n{}", docs[0], docs[1]))
}
