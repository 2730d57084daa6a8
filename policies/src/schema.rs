//! The JSON Schema of a HostPolicy document, for editors' YAML language servers.

use crate::types::HostPolicy;

/// The schema as pretty JSON, stable across runs (checked in under `examples/`).
pub fn host_policy_schema_json() -> String {
    let schema = schemars::schema_for!(HostPolicy);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
