//! The Grafana dashboard in examples/grafana: every metric its PromQL queries is one a running
//! `virtwarden run` (libvirt's test driver, a quarantined and a healthy probed domain) really
//! exports on /metrics, every query parses (promtool), and it shows what operators look for.

#[path = "support/ops_rig.rs"]
mod ops_rig;
#[path = "support/ops_tools.rs"]
mod ops_tools;
#[path = "support/promql.rs"]
mod promql;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

fn dashboard() -> Value {
    let path = ops_tools::repo().join("examples/grafana/virtwarden-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL text of the dashboard: panel targets' `expr` and the variables' queries.
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) if s.contains("virtwarden_") => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

fn dashboard_queries() -> Vec<String> {
    let mut out = Vec::new();
    queries(&dashboard(), &mut out);
    assert!(out.len() >= 10, "{out:#?}");
    out
}

fn used_metrics() -> BTreeSet<String> {
    dashboard_queries().iter().flat_map(|q| promql::metric_names(q)).collect()
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_running_service() {
    let used = used_metrics();
    let dir = tempfile::tempdir().unwrap();
    let rig = ops_rig::OpsRig::start(dir.path());
    rig.wait_web1_quarantined();
    rig.wait_status("web2 healthy", |s| ops_rig::domain(s, "web2").is_some_and(|d| d["health"]["phase"] == "healthy"));
    // Counters and labelled families appear once something happened; all of it has by now, but
    // the page is read again until it shows them all or the deadline passes.
    let deadline = Instant::now() + ops_rig::WAIT;
    loop {
        let page = rig.scrape();
        let exported = promql::sample_names(&page);
        let missing: Vec<&String> = used.difference(&exported).collect();
        if missing.is_empty() {
            assert!(page.contains("virtwarden_domain_quarantined{domain=\"web1\"} 1"), "{page}");
            assert!(page.contains("virtwarden_guest_health{domain=\"web2\",state=\"healthy\"} 1"), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics a running virtwarden does not export: {missing:?}\n/metrics:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    // Grafana's variables replaced by what they stand for, each query a recording rule that
    // `promtool check rules` parses.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        let expr = if let Some(inner) = q.strip_prefix("label_values(") {
            // label_values(SELECTOR, LABEL): the selector must parse.
            inner.rsplit_once(',').map(|(sel, _)| sel.to_string()).expect("label_values(selector, label)")
        } else {
            q.clone()
        };
        let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$domain", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, &rules).unwrap();
    let out = std::process::Command::new(ops_tools::promtool()).args(["check", "rules"]).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dashboard_shows_restarts_quarantines_health_latency_drift_and_probes() {
    let used = used_metrics();
    for m in [
        "virtwarden_restarts_total",
        "virtwarden_domain_quarantined",
        "virtwarden_guest_health",
        "virtwarden_reconcile_duration_seconds_bucket",
        "virtwarden_drift_detected_total",
        "virtwarden_probe_duration_seconds_bucket",
    ] {
        assert!(used.contains(m), "the dashboard does not query {m}: {used:?}");
    }
    let d = dashboard();
    assert_eq!(d["uid"], "virtwarden");
    // Every panel queries through the datasource variable, so the dashboard imports anywhere.
    let panels = d["panels"].as_array().unwrap();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
}
