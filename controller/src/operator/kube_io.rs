//! Writes to the Kubernetes API: this node's enactments through server-side apply (each node
//! owns its own objects, so nodes never contend), their removal when a policy stops selecting
//! the node, and the policy's aggregated status under one shared field manager. No finalizers:
//! owner references let the garbage collector remove enactments with their policy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use virtwarden_crd::tolerant::WatchedHostPolicy;
use virtwarden_crd::{HostPolicyEnactment, HostPolicyEnactmentStatus, HostPolicyStatus};

pub const NODE_LABEL: &str = "virtwarden.io/node";
pub const POLICY_LABEL: &str = "virtwarden.io/policy";
const API_VERSION: &str = "virtwarden.io/v1alpha1";
const AGGREGATE_MANAGER: &str = "virtwarden-aggregate";

/// This node's enactment of `policy`: `<policy>.<node>.<length of policy>`. Policy and node
/// names may both contain dots, so `<policy>.<node>` alone is ambiguous (policy `p.x` on node `n2`
/// and policy `p` on node `x.n2`); the policy's length makes the split unique. A hash suffix
/// would be unique too, but the admission policy's CEL has no hash function to check it, and a
/// name it cannot check is a name another node can take first.
pub fn enactment_name(policy: &str, node: &str) -> String {
    format!("{policy}.{node}.{}", policy.len())
}

fn node_manager(node: &str) -> String {
    format!("virtwarden-{node}")
}

/// Write this node's enactment of `policy` (uid `uid`): with `create`, the object itself
/// (labels, owner reference, spec) first, else only its status.
pub async fn apply_enactment(
    client: &Client,
    policy: &str,
    uid: &str,
    node: &str,
    status: &HostPolicyEnactmentStatus,
    create: bool,
) -> Result<(), kube::Error> {
    let api: Api<HostPolicyEnactment> = Api::all(client.clone());
    let name = enactment_name(policy, node);
    let pp = PatchParams::apply(&node_manager(node)).force();
    if create {
        let owner = OwnerReference {
            api_version: API_VERSION.into(),
            kind: "HostPolicy".into(),
            name: policy.into(),
            uid: uid.into(),
            controller: Some(false),
            block_owner_deletion: None,
        };
        let labels: BTreeMap<&str, &str> = [(NODE_LABEL, node), (POLICY_LABEL, policy)].into();
        let object = json!({
            "apiVersion": API_VERSION,
            "kind": "HostPolicyEnactment",
            "metadata": { "name": name, "labels": labels, "ownerReferences": [owner] },
            "spec": { "policy": policy, "node": node },
        });
        api.patch(&name, &pp, &Patch::Apply(&object)).await?;
    }
    let status = json!({
        "apiVersion": API_VERSION,
        "kind": "HostPolicyEnactment",
        "metadata": { "name": name },
        "status": status,
    });
    api.patch_status(&name, &pp, &Patch::Apply(&status)).await?;
    Ok(())
}

/// Remove this node's enactment of a policy that no longer selects the node (already gone is fine).
pub async fn delete_enactment(client: &Client, policy: &str, node: &str) -> Result<(), kube::Error> {
    let api: Api<HostPolicyEnactment> = Api::all(client.clone());
    match api.delete(&enactment_name(policy, node), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Write the policy's aggregated status; returns the policy as the server has it now.
pub async fn apply_policy_status(
    client: &Client,
    policy: &str,
    status: &HostPolicyStatus,
) -> Result<WatchedHostPolicy, kube::Error> {
    let body = json!({
        "apiVersion": API_VERSION,
        "kind": "HostPolicy",
        "metadata": { "name": policy },
        "status": status,
    });
    // The answer is decoded tolerantly too: the policy may carry fields of a newer CRD.
    let api: Api<WatchedHostPolicy> = Api::all(client.clone());
    api.patch_status(policy, &PatchParams::apply(AGGREGATE_MANAGER).force(), &Patch::Apply(&body)).await
}
