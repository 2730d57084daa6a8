//! Kubernetes Events for what happened to a policy's domains on this node: restarts,
//! quarantines, failed repairs and refused `exec` steps, each told once per change.
//!
//! Only in the operator's own namespace. The API does not allow that for an Event *regarding* a
//! cluster-scoped object: such an Event must live in `kube-system` (1.20) or `default` (kube's
//! Recorder puts it there), which would need rights in a namespace that is not ours. So an Event
//! regards this node's heartbeat Lease (namespaced, named after the node) and names the
//! HostPolicy as its `related` object and in its note:
//! `kubectl -n virtwarden get events --field-selector involvedObject.name=<node>`.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use virtwarden_crd::tolerant::WatchedHostPolicy;

use crate::engine::status::DomainStatus;

/// What the last events of one domain were about.
#[derive(Debug, Clone, Default, PartialEq)]
struct Told {
    restarts: u32,
    quarantined: bool,
    last_error: Option<String>,
    refused_hook: Option<String>,
    address_conflict: Option<String>,
}

pub struct EventPublisher {
    client: Client,
    reporter: Reporter,
    node: String,
    /// This node's Lease in the operator's namespace: what the Events regard.
    lease: ObjectReference,
    told: HashMap<String, Told>,
}

impl Told {
    fn of(d: &DomainStatus) -> Self {
        Told {
            restarts: d.restarts,
            quarantined: d.quarantined.is_some(),
            last_error: d.last_error.clone(),
            refused_hook: d.refused_hook.clone(),
            address_conflict: d.health.as_ref().and_then(|h| h.address_conflict.clone()),
        }
    }
}

impl EventPublisher {
    pub fn new(client: Client, node: String, namespace: String) -> Self {
        let reporter = Reporter { controller: "virtwarden".into(), instance: Some(node.clone()) };
        let lease = ObjectReference {
            api_version: Some("coordination.k8s.io/v1".into()),
            kind: Some("Lease".into()),
            name: Some(node.clone()),
            namespace: Some(namespace),
            ..Default::default()
        };
        EventPublisher { client, reporter, node, lease, told: HashMap::new() }
    }

    /// The events `d` calls for, given what was told before (pure).
    fn due(&self, policy: &ObjectReference, d: &DomainStatus) -> Vec<Event> {
        let before = self.told.get(&d.name).cloned().unwrap_or_default();
        let node = &self.node;
        let name = policy.name.as_deref().unwrap_or_default();
        let event = |type_, reason: &str, action: &str, note: String| Event {
            type_,
            reason: reason.into(),
            note: Some(format!("HostPolicy {name}: {note}")),
            action: action.into(),
            secondary: Some(policy.clone()),
        };
        let mut events = Vec::new();
        if self.told.contains_key(&d.name) && d.restarts > before.restarts {
            let why = d.last_failure.as_deref().unwrap_or("down");
            let note = format!("{}: {why} on node {node} ({} restarts)", d.name, d.restarts);
            events.push(event(EventType::Normal, "Restarted", "Restart", note));
        }
        if let Some(q) = d.quarantined.as_deref().filter(|_| !before.quarantined) {
            events.push(event(
                EventType::Warning,
                "Quarantined",
                "Quarantine",
                format!("{} on node {node}: {q}", d.name),
            ));
        }
        if let Some(e) = d.last_error.as_deref().filter(|e| before.last_error.as_deref() != Some(*e)) {
            let note = format!("{} on node {node}: {e}", d.name);
            events.push(event(EventType::Warning, "RemediationFailed", "Remediate", note));
        }
        if let Some(r) = d.refused_hook.as_deref().filter(|r| before.refused_hook.as_deref() != Some(*r)) {
            let note = format!("{} on node {node}: exec step refused, not run: {r}", d.name);
            events.push(event(EventType::Warning, "HookRefused", "Remediate", note));
        }
        let conflict = d.health.as_ref().and_then(|h| h.address_conflict.as_deref());
        if let Some(c) = conflict.filter(|c| before.address_conflict.as_deref() != Some(*c)) {
            let note =
                format!("{} on node {node}: {c}; its probes are no evidence until it clears (not reset)", d.name);
            events.push(event(EventType::Warning, "AddressConflict", "Probe", note));
        }
        events
    }

    /// Publish what changed for `domains` (of `policy`) since the last call.
    pub async fn publish(&mut self, policy: &WatchedHostPolicy, domains: &[&DomainStatus]) {
        let related = policy.object_ref(&());
        // A fresh recorder each time: kube's Recorder folds events with the same reason about
        // the same objects into one series and keeps the FIRST note, so "web1 … (2 restarts)"
        // would be told as "(1 restarts)" again. Each change here is told once anyway.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        for d in domains {
            for ev in self.due(&related, d) {
                if let Err(e) = recorder.publish(&ev, &self.lease).await {
                    tracing::warn!(%e, reason = %ev.reason, "cannot publish event");
                }
            }
            self.told.insert(d.name.clone(), Told::of(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> EventPublisher {
        let (svc, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        EventPublisher::new(Client::new(svc, "default"), "node1".into(), "virtwarden".into())
    }

    fn remember(p: &mut EventPublisher, d: &DomainStatus) {
        p.told.insert(d.name.clone(), Told::of(d));
    }

    #[tokio::test]
    async fn a_refused_hook_is_told_once_per_change() {
        let mut p = publisher();
        let mut d = DomainStatus { name: "web1".into(), ..Default::default() };
        let web = ObjectReference { name: Some("web".into()), ..Default::default() };
        assert!(p.due(&web, &d).is_empty());
        remember(&mut p, &d);
        d.refused_hook = Some("/opt/repair is outside --allow-exec-dir".into());
        let events = p.due(&web, &d);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "HookRefused");
        assert!(events[0].note.as_deref().unwrap().contains("outside --allow-exec-dir"));
        remember(&mut p, &d);
        assert!(p.due(&web, &d).is_empty(), "the same refusal is not told again");
        d.refused_hook = Some("/opt/repair is group-writable".into());
        assert_eq!(p.due(&web, &d).len(), 1, "a different refusal is");
    }

    #[tokio::test]
    async fn an_address_conflict_is_a_warning_told_once_per_change() {
        let mut p = publisher();
        let mut d = DomainStatus { name: "web1".into(), health: Some(Default::default()), ..Default::default() };
        let web = ObjectReference { name: Some("web".into()), ..Default::default() };
        remember(&mut p, &d);
        let conflict = "10.0.0.2 is answered by 02:00:00:00:00:66 on br0, not by the domain's 52:54:00:00:00:01";
        d.health.as_mut().unwrap().address_conflict = Some(conflict.into());
        let events = p.due(&web, &d);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].reason.as_str(), events[0].type_), ("AddressConflict", EventType::Warning));
        assert!(events[0].note.as_deref().unwrap().contains(conflict));
        remember(&mut p, &d);
        assert!(p.due(&web, &d).is_empty());
    }
}
