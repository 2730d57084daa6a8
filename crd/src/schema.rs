//! Schema adjustments that make the policy types' JSON Schema a valid Kubernetes structural
//! schema. Policy files stay strict through serde's `deny_unknown_fields`; only the CRD changes.

use schemars::transform::{transform_subschemas, Transform};
use schemars::Schema;

/// Drops `additionalProperties: false` from objects that declare no properties.
///
/// schemars renders `deny_unknown_fields` as `additionalProperties: false`. kube's structural
/// rewriter removes it where `properties` exist, but an empty struct such as
/// `health.probe.guestAgentPing: {}` keeps it, and the API server rejects a CRD with
/// `additionalProperties: false`. Without it the server prunes unknown fields of such an object,
/// which is what an empty struct means.
pub fn open_empty_objects(schema: &mut Schema) {
    OpenEmptyObjects.transform(schema);
}

struct OpenEmptyObjects;

impl Transform for OpenEmptyObjects {
    fn transform(&mut self, schema: &mut Schema) {
        if let Some(obj) = schema.as_object_mut() {
            let no_properties = obj.get("properties").and_then(|p| p.as_object()).is_none_or(|p| p.is_empty());
            if no_properties && obj.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) {
                obj.remove("additionalProperties");
            }
        }
        transform_subschemas(self, schema);
    }
}
