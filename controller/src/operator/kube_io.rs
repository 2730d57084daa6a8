//! Talking to the Kubernetes API: per-node enactments through server-side apply (each node owns
//! its own object, so nodes never contend), the policy's aggregated status (computed from all
//! enactments, written under one shared field manager so any node may refresh it), finalizers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virtwarden_crd::{condition, HostPolicy as HostPolicyResource, HostPolicyEnactment, HostPolicyEnactmentStatus};

pub const FINALIZER: &str = "virtwarden.io/enactments";
pub const NODE_LABEL: &str = "virtwarden.io/node";
pub const POLICY_LABEL: &str = "virtwarden.io/policy";
const API_VERSION: &str = "virtwarden.io/v1alpha1";
const AGGREGATE_MANAGER: &str = "virtwarden-aggregate";

pub fn enactment_name(policy: &str, node: &str) -> String {
    format!("{policy}.{node}")
}

fn node_manager(node: &str) -> String {
    format!("virtwarden-{node}")
}

/// Create or update this node's enactment of `policy`, then its status.
pub async fn apply_enactment(
    client: &Client,
    policy: &HostPolicyResource,
    node: &str,
    status: &HostPolicyEnactmentStatus,
) -> Result<(), kube::Error> {
    let api: Api<HostPolicyEnactment> = Api::all(client.clone());
    let pname = policy.name_any();
    let name = enactment_name(&pname, node);
    let owner = OwnerReference {
        api_version: API_VERSION.into(),
        kind: "HostPolicy".into(),
        name: pname.clone(),
        uid: policy.uid().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: None,
    };
    let labels: BTreeMap<&str, &str> = [(NODE_LABEL, node), (POLICY_LABEL, pname.as_str())].into();
    let object = json!({
        "apiVersion": API_VERSION,
        "kind": "HostPolicyEnactment",
        "metadata": { "name": name, "labels": labels, "ownerReferences": [owner] },
        "spec": { "policy": pname, "node": node },
    });
    let pp = PatchParams::apply(&node_manager(node)).force();
    api.patch(&name, &pp, &Patch::Apply(&object)).await?;
    let status = json!({ "apiVersion": API_VERSION, "kind": "HostPolicyEnactment", "status": status });
    api.patch_status(&name, &pp, &Patch::Apply(&status)).await?;
    Ok(())
}

/// Count the policy's enactments per condition and write the totals to the policy's status.
pub async fn aggregate_policy_status(client: &Client, policy: &HostPolicyResource) -> Result<(), kube::Error> {
    let pname = policy.name_any();
    let enactments: Api<HostPolicyEnactment> = Api::all(client.clone());
    let list = enactments.list(&ListParams::default().labels(&format!("{POLICY_LABEL}={pname}"))).await?;
    let count = |type_: &str| {
        list.items
            .iter()
            .filter(|e| {
                e.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == type_ && c.status == "True"))
            })
            .count()
    };
    let status = json!({
        "apiVersion": API_VERSION,
        "kind": "HostPolicy",
        "status": {
            "observedGeneration": policy.metadata.generation,
            "matchedNodes": list.items.len(),
            "availableNodes": count(condition::AVAILABLE),
            "progressingNodes": count(condition::PROGRESSING),
            "degradedNodes": count(condition::DEGRADED),
        }
    });
    let policies: Api<HostPolicyResource> = Api::all(client.clone());
    policies.patch_status(&pname, &PatchParams::apply(AGGREGATE_MANAGER).force(), &Patch::Apply(&status)).await?;
    Ok(())
}

/// Make sure the policy carries our finalizer, so deleting it lets every node clean up first.
pub async fn ensure_finalizer(client: &Client, policy: &HostPolicyResource) -> Result<(), kube::Error> {
    if policy.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = policy.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": policy.resource_version() } });
    let api: Api<HostPolicyResource> = Api::all(client.clone());
    api.patch(&policy.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The policy is being deleted: drop this node's enactment; the last node removes the finalizer.
/// Nothing on the host is torn down: domains keep running, bridges stay.
pub async fn finish_deletion(client: &Client, policy: &HostPolicyResource, node: &str) -> Result<(), kube::Error> {
    let pname = policy.name_any();
    let enactments: Api<HostPolicyEnactment> = Api::all(client.clone());
    match enactments.delete(&enactment_name(&pname, node), &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e),
    }
    let left = enactments.list(&ListParams::default().labels(&format!("{POLICY_LABEL}={pname}"))).await?;
    if left.items.iter().all(|e| e.spec.node == node) && policy.finalizers().iter().any(|f| f == FINALIZER) {
        let finalizers: Vec<&String> = policy.finalizers().iter().filter(|f| *f != FINALIZER).collect();
        let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": policy.resource_version() } });
        let api: Api<HostPolicyResource> = Api::all(client.clone());
        api.patch(&pname, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    Ok(())
}
