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
    assert_eq!(columns, ["Matched", "Available", "Degraded", "Age"]);
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
