//! Checked-in generated files must match what the code generates now.

use virtwarden_tests::repo_path;

fn assert_fresh(rel: &str, generated: &str, regenerate: &str) {
    let on_disk = std::fs::read_to_string(repo_path(rel)).unwrap_or_default();
    assert!(on_disk == generated, "{rel} is stale: run `{regenerate}` and commit the result");
}

#[test]
fn json_schema_in_examples_is_current() {
    assert_fresh(
        "examples/schema/hostpolicy.schema.json",
        &virtwarden_policies::schema::host_policy_schema_json(),
        "make schema",
    );
}

#[test]
fn crd_yaml_in_examples_is_current() {
    assert_fresh("examples/k8s/crd.yaml", &virtwarden_crd::crds_yaml().unwrap(), "make crd");
}

fn crd_docs() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo_path("examples/k8s/crd.yaml")).unwrap();
    serde_saphyr::from_str_multiple(&text).expect("crd.yaml parses as YAML")
}

#[test]
fn crd_schema_has_enums_ranges_and_printer_columns() {
    let docs = crd_docs();
    assert_eq!(docs.len(), 2);
    let policy = &docs[0];
    assert_eq!(policy["spec"]["scope"], "Cluster");
    assert_eq!(policy["spec"]["group"], "virtwarden.io");
    let version = &policy["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let domain = &spec["domains"]["items"]["properties"];
    assert_eq!(domain["state"]["enum"], serde_json::json!(["running", "stopped", "ignored"]));
    assert_eq!(domain["restart"]["enum"], serde_json::json!(["always", "on-failure", "never"]));
    assert_eq!(domain["boot"]["items"]["enum"], serde_json::json!(["hd", "cdrom", "network", "fd"]));
    let stp = &spec["bridges"]["items"]["properties"]["stp"]["properties"];
    assert_eq!(stp["forwardDelay"]["minimum"].as_f64(), Some(2.0));
    assert_eq!(stp["forwardDelay"]["maximum"].as_f64(), Some(30.0));
    assert_eq!(stp["helloTime"]["maximum"].as_f64(), Some(10.0));
    assert_eq!(stp["maxAge"]["minimum"].as_f64(), Some(6.0));
    assert_eq!(spec["bridges"]["items"]["properties"]["name"]["maxLength"].as_u64(), Some(15));
    assert!(spec["nodeSelector"].is_object(), "nodeSelector must be part of the spec");
    let columns: Vec<&str> =
        version["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Matched", "Available", "Degraded", "Enforcing", "Lagging", "Failing", "Age"]);
    assert_eq!(policy["spec"]["names"]["shortNames"], serde_json::json!(["hpol"]));

    let enactment = &docs[1];
    assert_eq!(enactment["spec"]["names"]["kind"], "HostPolicyEnactment");
    assert_eq!(enactment["spec"]["scope"], "Cluster");
    let columns: Vec<&str> = enactment["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Node", "Policy", "Status", "Reason", "Age"]);
}

#[test]
fn a_policy_file_is_a_valid_custom_resource() {
    // One document works in both modes: a policy file deserializes as the CRD type.
    let text = std::fs::read_to_string(repo_path("examples/policies/web-tier.yaml")).unwrap();
    let cr: virtwarden_crd::HostPolicy = serde_saphyr::from_str(&text).expect("policy file is a HostPolicy resource");
    assert_eq!(cr.spec.policy.domains.len(), 2);
}

/// The rules of a Kubernetes structural schema (the API server rejects a CRD that breaks them):
/// every schema names its `type`, `additionalProperties` is never `false` nor next to
/// `properties`, no `$ref`/`definitions`/`uniqueItems`, and inside `allOf`/`anyOf`/`oneOf`/`not`
/// only value validations on properties the enclosing schema already declares.
fn structural_violations(
    schema: &serde_json::Value,
    path: &str,
    parent_properties: Option<&serde_json::Value>,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    let Some(obj) = schema.as_object() else {
        out.push(format!("{path}: not a schema object"));
        return;
    };
    let in_junctor = parent_properties.is_some();
    for key in ["$ref", "$defs", "definitions", "$schema", "id", "additionalItems", "patternProperties", "dependencies"]
    {
        if obj.contains_key(key) {
            out.push(format!("{path}: `{key}` is not allowed"));
        }
    }
    if obj.get("uniqueItems") == Some(&Value::Bool(true)) {
        out.push(format!("{path}: uniqueItems: true is not allowed"));
    }
    match obj.get("additionalProperties") {
        Some(Value::Bool(false)) => out.push(format!("{path}: additionalProperties: false is not allowed")),
        Some(_) if obj.contains_key("properties") => {
            out.push(format!("{path}: additionalProperties and properties are mutually exclusive"))
        }
        _ => {}
    }
    let open = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if in_junctor {
        for key in obj.keys() {
            if ["type", "description", "default", "additionalProperties", "nullable", "title"].contains(&key.as_str())
                || key.starts_with("x-kubernetes-")
            {
                out.push(format!("{path}: `{key}` is not allowed inside allOf/anyOf/oneOf/not"));
            }
        }
        if let (Some(props), Some(parent)) = (obj.get("properties").and_then(Value::as_object), parent_properties) {
            for name in props.keys() {
                if parent.get(name).is_none() {
                    out.push(format!("{path}.properties.{name}: not declared outside the junctor"));
                }
            }
        }
    } else if !open && obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
        out.push(format!("{path}: no type"));
    }
    // Inside a junctor, nested schemas stay under the junctor rules.
    let empty = Value::Object(Default::default());
    let nested = |name: Option<&str>| -> Option<&Value> {
        in_junctor.then(|| {
            name.and_then(|n| parent_properties.and_then(|p| p.get(n)))
                .and_then(|p| p.get("properties"))
                .unwrap_or(&empty)
        })
    };
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            structural_violations(sub, &format!("{path}.properties.{name}"), nested(Some(name)), out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}.items"), nested(None), out);
    }
    if let Some(add) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        structural_violations(add, &format!("{path}.additionalProperties"), nested(None), out);
    }
    let own = obj.get("properties").unwrap_or(&empty);
    for junctor in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in obj.get(junctor).and_then(Value::as_array).into_iter().flatten().enumerate() {
            structural_violations(sub, &format!("{path}.{junctor}[{i}]"), Some(own), out);
        }
    }
    if let Some(not) = obj.get("not") {
        structural_violations(not, &format!("{path}.not"), Some(own), out);
    }
}

#[test]
fn crd_schemas_are_structural() {
    for doc in crd_docs() {
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        for version in doc["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let mut violations = Vec::new();
            structural_violations(schema, &name, None, &mut violations);
            assert!(violations.is_empty(), "{name} is not a structural schema:\n{}", violations.join("\n"));
        }
    }
}

#[test]
fn the_structural_check_catches_what_the_api_server_rejects() {
    use serde_json::json;
    let check = |schema: serde_json::Value| {
        let mut v = Vec::new();
        structural_violations(&schema, "s", None, &mut v);
        v
    };
    assert!(check(json!({"type": "object", "properties": {"a": {"type": "string"}}})).is_empty());
    let v = check(json!({"type": "object", "properties": {"ping": {"type": "object", "additionalProperties": false}}}));
    assert_eq!(v, ["s.properties.ping: additionalProperties: false is not allowed"]);
    assert_eq!(check(json!({"type": "object", "properties": {"a": {}}})), ["s.properties.a: no type"]);
    let v = check(
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "oneOf": [{"required": ["a"]}, {"properties": {"b": {"type": "string"}}}]}),
    );
    assert_eq!(
        v,
        [
            "s.oneOf[1].properties.b: not declared outside the junctor",
            "s.oneOf[1].properties.b: `type` is not allowed inside allOf/anyOf/oneOf/not"
        ]
    );
}
