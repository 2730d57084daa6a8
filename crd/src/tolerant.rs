//! Reading HostPolicy resources from the API server tolerantly. A field this build does not know
//! (written against a newer CRD) is pruned against this build's own structural schema, as the API
//! server prunes, and reported; a spec that still cannot be read becomes an error on that one
//! policy instead of breaking the whole watch. Policy files stay strict (`deny_unknown_fields`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::ClusterResourceScope;
use kube::{CustomResourceExt, Resource};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{HostPolicy, HostPolicyResourceSpec, HostPolicyStatus};

/// A HostPolicy as the operator watches it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedHostPolicy {
    pub metadata: ObjectMeta,
    /// The spec, or why it cannot be read even with unknown fields pruned (e.g. an enum value
    /// this build does not know).
    pub spec: Result<HostPolicyResourceSpec, UnreadableSpec>,
    /// The aggregate as last written; a status that cannot be read counts as none.
    pub status: Option<HostPolicyStatus>,
    /// Dotted paths of the fields that were ignored, e.g. `spec.domains[0].hibernate`.
    pub ignored_fields: Vec<String>,
}

/// A spec that cannot be read; its node selector, when readable, still decides which nodes
/// report the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableSpec {
    pub message: String,
    pub node_selector: Option<BTreeMap<String, String>>,
}

impl WatchedHostPolicy {
    /// Decode one object as the API server sent it.
    pub fn from_value(mut value: Value) -> Result<Self, serde_json::Error> {
        let metadata: ObjectMeta = serde_json::from_value(value.get("metadata").cloned().unwrap_or_default())?;
        let mut ignored_fields = Vec::new();
        let mut spec_value = value.get_mut("spec").map(Value::take).unwrap_or(Value::Null);
        prune(&mut spec_value, spec_schema(), "spec", &mut ignored_fields);
        let spec = serde_json::from_value::<HostPolicyResourceSpec>(spec_value.clone()).map_err(|e| UnreadableSpec {
            message: format!("spec cannot be read by this virtwarden: {e}"),
            node_selector: spec_value.get("nodeSelector").and_then(|s| serde_json::from_value(s.clone()).ok()),
        });
        let status = value.get("status").and_then(|s| serde_json::from_value(s.clone()).ok());
        Ok(WatchedHostPolicy { metadata, spec, status, ignored_fields })
    }

    /// The node selector, from the spec or, for an unreadable spec, as far as it was readable.
    pub fn node_selector(&self) -> Option<&BTreeMap<String, String>> {
        match &self.spec {
            Ok(s) => s.policy.node_selector.as_ref(),
            Err(e) => e.node_selector.as_ref(),
        }
    }
}

impl From<HostPolicy> for WatchedHostPolicy {
    fn from(p: HostPolicy) -> Self {
        WatchedHostPolicy { metadata: p.metadata, spec: Ok(p.spec), status: p.status, ignored_fields: Vec::new() }
    }
}

impl<'de> Deserialize<'de> for WatchedHostPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        WatchedHostPolicy::from_value(Value::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

impl Resource for WatchedHostPolicy {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        HostPolicy::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        HostPolicy::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        HostPolicy::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        HostPolicy::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The `spec` part of this build's structural CRD schema, the one the API server prunes with.
fn spec_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = HostPolicy::crd();
        crd.spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|s| s.get("properties").and_then(|p| p.get("spec")).cloned())
            .unwrap_or(Value::Null)
    })
}

/// Remove what `schema` does not declare, recording each removed field's path. Values of other
/// types are left for the strict decode to judge.
fn prune(value: &mut Value, schema: &Value, path: &str, ignored: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, v) in map.iter_mut() {
                    prune(v, values, &format!("{path}.{k}"), ignored);
                }
                return;
            }
            let empty = serde_json::Map::new();
            let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
            map.retain(|k, _| {
                let known = properties.contains_key(k);
                if !known {
                    ignored.push(format!("{path}.{k}"));
                }
                known
            });
            for (k, v) in map.iter_mut() {
                prune(v, &properties[k], &format!("{path}.{k}"), ignored);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune(v, item_schema, &format!("{path}[{i}]"), ignored);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(spec: Value) -> Value {
        json!({"apiVersion": "virtwarden.io/v1alpha1", "kind": "HostPolicy",
               "metadata": {"name": "web", "uid": "u1", "generation": 2}, "spec": spec})
    }

    #[test]
    fn unknown_fields_are_pruned_and_reported() {
        let p: WatchedHostPolicy = serde_json::from_value(object(json!({
            "futureTopLevel": true,
            "domains": [{"name": "web1", "restart": "always", "hibernate": {"after": "1h"}}],
            "bridges": [{"name": "br0", "stp": {"enabled": true, "rootGuard": true}}],
            "nodeSelector": {"role": "kvm"},
        })))
        .unwrap();
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.policy.domains[0].name, "web1");
        assert_eq!(spec.policy.domains[0].restart, virtwarden_policies::RestartPolicy::Always);
        assert!(spec.policy.bridges[0].stp.as_ref().unwrap().enabled);
        let mut ignored = p.ignored_fields.clone();
        ignored.sort();
        assert_eq!(ignored, ["spec.bridges[0].stp.rootGuard", "spec.domains[0].hibernate", "spec.futureTopLevel"]);
        // Map values (nodeSelector) are data, not fields: nothing of them is pruned.
        assert_eq!(p.node_selector().unwrap()["role"], "kvm");
    }

    #[test]
    fn the_file_path_stays_strict() {
        let text = "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: web}\nspec:\n  domains:\n    - name: web1\n      hibernate: true\n";
        let err = virtwarden_policies::load::load_texts([(std::path::Path::new("p.yaml"), text)]).unwrap_err();
        assert!(err.to_string().contains("hibernate"), "{err}");
    }

    #[test]
    fn an_unreadable_spec_is_an_error_on_that_policy_not_a_decode_failure() {
        let p: WatchedHostPolicy = serde_json::from_value(object(json!({
            "domains": [{"name": "web1", "state": "hibernated"}],
            "nodeSelector": {"role": "kvm"},
        })))
        .unwrap();
        let err = p.spec.as_ref().unwrap_err();
        assert!(err.message.contains("hibernated"), "{}", err.message);
        assert_eq!(p.node_selector().unwrap()["role"], "kvm");
        assert_eq!(p.metadata.name.as_deref(), Some("web"));
    }

    #[test]
    fn an_empty_object_field_keeps_no_unknown_content() {
        let p: WatchedHostPolicy = serde_json::from_value(object(json!({
            "domains": [{"name": "web1", "health": {"probe": {"guestAgentPing": {"retries": 3}}}}],
        })))
        .unwrap();
        assert!(p.spec.is_ok(), "{:?}", p.spec);
        assert_eq!(p.ignored_fields, ["spec.domains[0].health.probe.guestAgentPing.retries"]);
    }
}
