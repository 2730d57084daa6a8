//! The Prometheus alert rules in examples/prometheus: `promtool check rules` accepts them, their
//! `promtool test rules` unit tests pass and make every alert fire and stay quiet at least once,
//! every alert says what to run, every metric they query is one virtwarden exports, and the
//! PrometheusRule in examples/k8s holds the same groups.

#[path = "support/ops_tools.rs"]
mod ops_tools;
#[path = "support/promql.rs"]
mod promql;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use virtwarden::engine::metrics::{DomainLabel, Metrics};

fn rules_path() -> PathBuf {
    ops_tools::repo().join("examples/prometheus/virtwarden-rules.yaml")
}

fn tests_path() -> PathBuf {
    ops_tools::repo().join("examples/prometheus/tests/virtwarden-rules-test.yaml")
}

fn yaml(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn rules() -> Vec<Value> {
    let doc = yaml(&rules_path());
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

fn promtool(args: &[&str]) -> String {
    let out =
        Command::new(ops_tools::promtool()).args(args).current_dir(ops_tools::repo()).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_check_rules_accepts_the_rules() {
    let out = promtool(&["check", "rules", "examples/prometheus/virtwarden-rules.yaml"]);
    assert!(out.contains(&format!("SUCCESS: {} rules found", rules().len())), "{out}");
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let out = promtool(&["test", "rules", "examples/prometheus/tests/virtwarden-rules-test.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_fires_and_stays_quiet_in_the_unit_tests() {
    let tests = yaml(&tests_path());
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests") {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = a["alertname"].as_str().expect("alertname").to_string();
            match a["exp_alerts"].as_array().map(Vec::len) {
                Some(0) | None => quiet.insert(name),
                Some(_) => fires.insert(name),
            };
        }
    }
    for rule in rules() {
        let name = rule["alert"].as_str().expect("every rule is an alert");
        assert!(fires.contains(name), "no unit test makes {name} fire");
        assert!(quiet.contains(name), "no unit test checks that {name} stays quiet");
    }
}

#[test]
fn every_alert_has_a_for_a_severity_a_summary_and_says_what_to_run() {
    let rules = rules();
    assert!(rules.len() >= 8, "{rules:#?}");
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        assert!(rule["for"].is_string(), "{name} has no `for:`");
        assert!(
            matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")),
            "{name}: severity critical or warning"
        );
        let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
        let description = rule["annotations"]["description"].as_str().unwrap_or_default();
        assert!(summary.contains("{{ $labels.instance }}"), "{name}: the summary names the host: {summary}");
        assert!(description.contains("`virtwarden status`"), "{name}: the description says to run virtwarden status");
        // An alert about one domain names it and the diagnose command for it.
        if summary.contains("{{ $labels.domain }}") {
            assert!(
                description.contains("`virtwarden diagnose {{ $labels.domain }}`"),
                "{name}: the description says to run virtwarden diagnose DOMAIN: {description}"
            );
        }
    }
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for expected in [
        "VirtwardenDomainQuarantined",
        "VirtwardenDomainRestartingRepeatedly",
        "VirtwardenGuestUnhealthy",
        "VirtwardenGuestBootFailed",
        "VirtwardenDriftKeepsComingBack",
        "VirtwardenLibvirtDisconnected",
        "VirtwardenNotReady",
        "VirtwardenHookRefused",
    ] {
        assert!(names.contains(expected), "missing alert {expected}: {names:?}");
    }
}

/// Every sample name the registry writes once each family has a series: the names as they
/// appear on /metrics (`_total`, `_bucket`, …), from the real encoder.
fn exported_names() -> BTreeSet<String> {
    let m = Metrics::default();
    let domain = DomainLabel { domain: "d".into() };
    m.restarts.get_or_create(&domain).inc();
    m.domain_quarantined.get_or_create(&domain).set(1);
    m.action("start", true);
    m.drift("stp");
    m.hook_refused("writable");
    m.writer_conflict("stp");
    m.set_backed_off("stp", 1);
    let probe = virtwarden::plan::health::ProbeResult {
        target: "tcp 127.0.0.1:1".into(),
        address: None,
        latency: std::time::Duration::from_millis(1),
        outcome: Err(virtwarden::plan::health::ProbeFailure::Refused),
    };
    m.probe("d", "tcp", &probe);
    m.health_state("d", "healthy");
    m.guest_event("d", "watchdog");
    m.set_address_conflict("d", true);
    m.reconcile_seconds.observe(0.1);
    m.event_lag_seconds.observe(0.1);
    promql::sample_names(&m.encode())
}

#[test]
fn every_metric_the_rules_query_is_exported() {
    let exported = exported_names();
    assert!(exported.contains("virtwarden_restarts_total"), "{exported:?}");
    for rule in rules() {
        let expr = rule["expr"].as_str().unwrap();
        let used = promql::metric_names(expr);
        assert!(!used.is_empty(), "{expr}");
        for name in used {
            assert!(
                exported.contains(&name),
                "{}: `{name}` is not a metric virtwarden exports: {exported:?}",
                rule["alert"]
            );
        }
    }
}

#[test]
fn the_prometheusrule_holds_the_same_groups() {
    let k8s = yaml(&ops_tools::repo().join("examples/k8s/prometheusrule.yaml"));
    assert_eq!(k8s["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(k8s["kind"], "PrometheusRule");
    assert_eq!(k8s["metadata"]["namespace"], "virtwarden");
    let rules = yaml(&rules_path());
    assert!(
        k8s["spec"]["groups"] == rules["groups"],
        "examples/k8s/prometheusrule.yaml is stale: run `make prometheusrule` and commit the result"
    );
}
