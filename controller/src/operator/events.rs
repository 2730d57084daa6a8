//! Kubernetes Events on the policy for what happened to its domains on this node: restarts,
//! quarantines, failed repairs and refused `exec` steps, each told once per change.

use std::collections::HashMap;

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
    recorder: Recorder,
    node: String,
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
    pub fn new(client: Client, node: String) -> Self {
        let reporter = Reporter { controller: "virtwarden".into(), instance: Some(node.clone()) };
        EventPublisher { recorder: Recorder::new(client, reporter), node, told: HashMap::new() }
    }

    /// The events `d` calls for, given what was told before (pure).
    fn due(&self, d: &DomainStatus) -> Vec<Event> {
        let before = self.told.get(&d.name).cloned().unwrap_or_default();
        let node = &self.node;
        let event = |type_, reason: &str, action: &str, note: String| Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
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
        let reference = policy.object_ref(&());
        for d in domains {
            for ev in self.due(d) {
                if let Err(e) = self.recorder.publish(&ev, &reference).await {
                    tracing::debug!(%e, "cannot publish event");
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
        EventPublisher::new(Client::new(svc, "default"), "node1".into())
    }

    fn remember(p: &mut EventPublisher, d: &DomainStatus) {
        p.told.insert(d.name.clone(), Told::of(d));
    }

    #[tokio::test]
    async fn a_refused_hook_is_told_once_per_change() {
        let mut p = publisher();
        let mut d = DomainStatus { name: "web1".into(), ..Default::default() };
        assert!(p.due(&d).is_empty());
        remember(&mut p, &d);
        d.refused_hook = Some("/opt/repair is outside --allow-exec-dir".into());
        let events = p.due(&d);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "HookRefused");
        assert!(events[0].note.as_deref().unwrap().contains("outside --allow-exec-dir"));
        remember(&mut p, &d);
        assert!(p.due(&d).is_empty(), "the same refusal is not told again");
        d.refused_hook = Some("/opt/repair is group-writable".into());
        assert_eq!(p.due(&d).len(), 1, "a different refusal is");
    }

    #[tokio::test]
    async fn an_address_conflict_is_a_warning_told_once_per_change() {
        let mut p = publisher();
        let mut d = DomainStatus { name: "web1".into(), health: Some(Default::default()), ..Default::default() };
        remember(&mut p, &d);
        let conflict = "10.0.0.2 is answered by 02:00:00:00:00:66 on br0, not by the domain's 52:54:00:00:00:01";
        d.health.as_mut().unwrap().address_conflict = Some(conflict.into());
        let events = p.due(&d);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].reason.as_str(), events[0].type_), ("AddressConflict", EventType::Warning));
        assert!(events[0].note.as_deref().unwrap().contains(conflict));
        remember(&mut p, &d);
        assert!(p.due(&d).is_empty());
    }
}
