//! Metric names in PromQL texts and on a /metrics page, for the tests that check what the alert
//! rules and the dashboard query against what virtwarden exports.

#![allow(dead_code)]

use std::collections::BTreeSet;

/// `virtwarden_…` names in a PromQL text.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("virtwarden_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Sample names on a /metrics page (`virtwarden_restarts_total`, `…_bucket`, …).
pub fn sample_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}
