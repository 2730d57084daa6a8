//! The node's heartbeat: a `coordination.k8s.io/v1` Lease named after the node in the operator's
//! namespace, renewed every `RENEW_EVERY` (`kubectl get leases -n virtwarden` shows which nodes'
//! virtwarden are alive). It is not a leader election: every node holds its own Lease. A Lease
//! not renewed within its duration marks the node as lagging in its policies' status.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;

use super::kube_io::NODE_LABEL;

/// How often the Lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How long a renewal counts: three renewals may be missed before the node is called lagging.
pub const LEASE_SECONDS: i32 = 40;

/// Renew (or create) this node's Lease now.
pub async fn renew(client: &Client, namespace: &str, node: &str) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let labels: BTreeMap<&str, &str> = [(NODE_LABEL, node), ("app.kubernetes.io/name", "virtwarden")].into();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": node, "namespace": namespace, "labels": labels },
        "spec": {
            "holderIdentity": format!("virtwarden-{node}"),
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    api.patch(node, &PatchParams::apply(&format!("virtwarden-{node}")).force(), &Patch::Apply(&lease)).await?;
    Ok(())
}

/// Renew every `RENEW_EVERY` until the task is dropped; a failed renewal is retried at the next
/// tick (the engine keeps enforcing meanwhile).
pub async fn heartbeat(client: Client, namespace: String, node: String) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match renew(&client, &namespace, &node).await {
            Ok(()) if failing => {
                tracing::info!(%node, "heartbeat Lease renewed again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(%node, %namespace, %e, "cannot renew the heartbeat Lease");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Whether `lease` was renewed within its duration as of `now`.
pub fn is_fresh(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return false };
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else { return false };
    renewed.0 + Duration::from_secs(seconds.max(0) as u64) > now
}

/// The nodes whose Lease is fresh as of `now` (a Lease is named after its node).
pub fn alive_nodes(leases: &[Arc<Lease>], now: Timestamp) -> HashSet<String> {
    leases.iter().filter(|l| is_fresh(l, now)).filter_map(|l| l.metadata.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    fn lease(name: &str, renewed: i64, seconds: Option<i32>) -> Arc<Lease> {
        let mut l = Lease::default();
        l.metadata.name = Some(name.into());
        l.spec = Some(LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: seconds,
            ..Default::default()
        });
        Arc::new(l)
    }

    #[test]
    fn a_lease_is_fresh_for_its_duration_after_renewal_only() {
        let now = Timestamp::from_second(1_000).unwrap();
        let leases = [lease("a", 990, Some(40)), lease("b", 950, Some(40)), lease("c", 999, None)];
        assert_eq!(alive_nodes(&leases, now), HashSet::from(["a".to_string()]));
        assert!(!is_fresh(&Lease::default(), now), "no spec: not alive");
    }
}
