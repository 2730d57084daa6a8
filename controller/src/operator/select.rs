//! Which HostPolicy resources apply to this node, merged exactly like policy files: a conflict
//! between two policies is reported on both and nothing of the conflicting part is applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use virtwarden_crd::tolerant::WatchedHostPolicy;
use virtwarden_crd::HostPolicyResourceSpec;
use virtwarden_policies::dependencies::check_dependencies;
use virtwarden_policies::merge::merge;
use virtwarden_policies::validate::validate_document;
use virtwarden_policies::{DesiredState, HostPolicy, Metadata, API_VERSION, KIND};

/// The result of selecting and merging the policies for one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Names of the policies that select this node (valid or not), sorted.
    pub selected: Vec<String>,
    pub desired: DesiredState,
    /// Per policy: conflicts with other policies.
    pub conflicts: HashMap<String, Vec<String>>,
    /// Per policy: why it is invalid (it is then not applied at all).
    pub invalid: HashMap<String, Vec<String>>,
}

/// A label selector as `nodeSelector` holds it: every key must have the given value.
pub fn matches(selector: Option<&BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn as_document(name: &str, spec: &HostPolicyResourceSpec) -> HostPolicy {
    HostPolicy {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata { name: name.to_string(), ..Default::default() },
        spec: spec.policy.clone(),
    }
}

/// Select the live (not being deleted) policies whose nodeSelector matches `labels`, validate
/// them and merge them. A policy whose spec this build cannot read is selected as invalid.
pub fn select(policies: &[Arc<WatchedHostPolicy>], labels: &BTreeMap<String, String>) -> Selection {
    let mut sel = Selection::default();
    let mut docs = Vec::new();
    let mut chosen: Vec<&WatchedHostPolicy> = policies
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| matches(p.node_selector(), labels))
        .collect();
    chosen.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for p in chosen {
        let name = p.metadata.name.clone().unwrap_or_default();
        sel.selected.push(name.clone());
        let spec = match &p.spec {
            Ok(spec) => spec,
            Err(e) => {
                sel.invalid.insert(name, vec![e.message.clone()]);
                continue;
            }
        };
        let doc = as_document(&name, spec);
        let issues = validate_document(&doc);
        if issues.is_empty() {
            docs.push(doc);
        } else {
            sel.invalid.insert(name, issues.into_iter().map(|i| format!("{}: {}", i.path, i.message)).collect());
        }
    }
    drop_unmet_dependencies(&mut docs, &mut sel);
    let (desired, conflicts) = merge(&docs);
    for c in conflicts {
        let a = docs[c.first.document].metadata.name.clone();
        let b = docs[c.second.document].metadata.name.clone();
        sel.conflicts.entry(a.clone()).or_default().push(format!("{} is also declared by policy {b}", c.subject));
        sel.conflicts.entry(b).or_default().push(format!("{} is also declared by policy {a}", c.subject));
    }
    sel.desired = desired;
    sel
}

/// `startup.after` across policies, checked like policy files are: a policy whose waits can
/// never be met (a domain no policy manages, a later order group, a cycle) is invalid and not
/// applied. Dropping one can leave another waiting for a domain only it managed, so repeat
/// until none is left (each round drops at least one policy).
fn drop_unmet_dependencies(docs: &mut Vec<HostPolicy>, sel: &mut Selection) {
    loop {
        let issues = check_dependencies(docs);
        if issues.is_empty() {
            return;
        }
        let mut bad = std::collections::BTreeSet::new();
        for issue in issues {
            let holder = docs[issue.site.document].metadata.name.clone();
            for &d in &issue.documents {
                bad.insert(d);
                let name = docs[d].metadata.name.clone();
                let text = if name == holder {
                    format!("{}: {}", issue.site.path, issue.message)
                } else {
                    format!("{} (at {} of policy {holder})", issue.message, issue.site.path)
                };
                sel.invalid.entry(name).or_default().push(text);
            }
        }
        let mut index = 0;
        docs.retain(|_| {
            index += 1;
            !bad.contains(&(index - 1))
        });
    }
}

#[cfg(test)]
mod tests {
    use virtwarden_crd::HostPolicy as HostPolicyResource;
    use virtwarden_policies::{DomainPolicy, HostPolicySpec};

    use super::*;

    fn resource(name: &str, selector: Option<&[(&str, &str)]>, domains: &[&str]) -> HostPolicyResource {
        let spec = HostPolicySpec {
            node_selector: selector.map(|s| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            domains: domains.iter().map(|d| DomainPolicy::named(*d)).collect(),
            ..Default::default()
        };
        HostPolicyResource::new(name, HostPolicyResourceSpec { policy: spec })
    }

    fn policy(name: &str, selector: Option<&[(&str, &str)]>, domains: &[&str]) -> Arc<WatchedHostPolicy> {
        Arc::new(resource(name, selector, domains).into())
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selects_by_node_labels() {
        let ps = vec![
            policy("all", None, &["a"]),
            policy("kvm", Some(&[("role", "kvm")]), &["b"]),
            policy("gpu", Some(&[("role", "kvm"), ("gpu", "yes")]), &["c"]),
        ];
        let s = select(&ps, &labels(&[("role", "kvm")]));
        assert_eq!(s.selected, ["all", "kvm"]);
        let names: Vec<&str> = s.desired.domains.iter().map(|d| d.spec.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // After a label change the gpu policy matches too.
        let s = select(&ps, &labels(&[("role", "kvm"), ("gpu", "yes")]));
        assert_eq!(s.selected, ["all", "gpu", "kvm"]);
    }

    #[test]
    fn conflicts_are_reported_on_both_and_not_applied() {
        let ps = vec![policy("p1", None, &["web", "x"]), policy("p2", None, &["web", "y"])];
        let s = select(&ps, &labels(&[]));
        let names: Vec<&str> = s.desired.domains.iter().map(|d| d.spec.name.as_str()).collect();
        assert_eq!(names, ["x", "y"], "the conflicting domain comes from neither");
        assert_eq!(s.conflicts["p1"], ["domain `web` is also declared by policy p2"]);
        assert_eq!(s.conflicts["p2"], ["domain `web` is also declared by policy p1"]);
    }

    #[test]
    fn unmet_dependencies_across_policies_invalidate_the_waiting_policy() {
        use virtwarden_policies::Startup;
        let after = |p: &mut HostPolicyResource, dep: &str| {
            p.spec.policy.domains[0].startup = Some(Startup { after: vec![dep.into()], ..Default::default() });
        };
        let mut web = resource("web", None, &["web1"]);
        after(&mut web, "db1");
        let web: Arc<WatchedHostPolicy> = Arc::new(web.into());
        let mut batch = resource("batch", None, &["batch1"]);
        after(&mut batch, "web1");
        let batch: Arc<WatchedHostPolicy> = Arc::new(batch.into());
        // db1's policy selects another node: web waits for a domain nobody manages here, and
        // once web is dropped, batch waits for web1, which then nobody manages either.
        let db = policy("db", Some(&[("role", "db")]), &["db1"]);
        let s = select(&[web.clone(), batch.clone(), db.clone(), policy("other", None, &["x"])], &labels(&[]));
        assert_eq!(
            s.invalid["web"],
            ["spec.domains[0].startup.after[0]: `after` names `db1`, which no policy manages"]
        );
        assert_eq!(
            s.invalid["batch"],
            ["spec.domains[0].startup.after[0]: `after` names `web1`, which no policy manages"]
        );
        let names: Vec<&str> = s.desired.domains.iter().map(|d| d.spec.name.as_str()).collect();
        assert_eq!(names, ["x"]);
        // With db selected too, everything is applied.
        let s = select(&[web, batch, db], &labels(&[("role", "db")]));
        assert!(s.invalid.is_empty(), "{:?}", s.invalid);
        assert_eq!(s.desired.domains.len(), 3);
    }

    #[test]
    fn a_cycle_across_policies_is_reported_on_each() {
        use virtwarden_policies::Startup;
        let mut a = resource("a", None, &["a1"]);
        a.spec.policy.domains[0].startup = Some(Startup { after: vec!["b1".into()], ..Default::default() });
        let mut b = resource("b", None, &["b1"]);
        b.spec.policy.domains[0].startup = Some(Startup { after: vec!["a1".into()], ..Default::default() });
        let s = select(&[Arc::new(a.into()), Arc::new(b.into()), policy("c", None, &["c1"])], &labels(&[]));
        let cycle = "dependency cycle: a1 → b1 → a1 (each waits for the next)";
        assert_eq!(s.invalid["a"], [format!("spec.domains[0].startup.after[0]: {cycle}")]);
        assert_eq!(s.invalid["b"], [format!("{cycle} (at spec.domains[0].startup.after[0] of policy a)")]);
        assert_eq!(s.desired.domains.len(), 1);
    }

    #[test]
    fn invalid_policies_are_not_applied() {
        let mut bad = resource("bad", None, &["web"]);
        bad.spec.policy.domains[0].state = virtwarden_policies::DesiredDomainState::Stopped;
        bad.spec.policy.domains[0].restart = virtwarden_policies::RestartPolicy::Always;
        let s = select(&[Arc::new(bad.into()), policy("good", None, &["db"])], &labels(&[]));
        assert_eq!(s.desired.domains.len(), 1);
        assert!(s.invalid["bad"][0].contains("contradicts"), "{:?}", s.invalid);
    }
}

#[cfg(test)]
mod unreadable {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_unreadable_policy_is_selected_as_invalid_and_applies_nothing() {
        let p = WatchedHostPolicy::from_value(json!({
            "apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy", "metadata": {"name": "future"},
            "spec": {"nodeSelector": {"role": "kvm"}, "domains": [{"name": "web1", "state": "hibernated"}]}}))
        .unwrap();
        let all = [Arc::new(p)];
        let kvm: BTreeMap<String, String> = [("role".to_string(), "kvm".to_string())].into();
        let s = select(&all, &kvm);
        assert_eq!(s.selected, ["future"]);
        assert!(s.desired.domains.is_empty());
        assert!(s.invalid["future"][0].contains("hibernated"), "{:?}", s.invalid);
        // Its readable node selector still decides where it is reported.
        assert!(select(&all, &BTreeMap::new()).selected.is_empty());
    }
}
