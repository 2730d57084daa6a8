//! Golden plans: each `tests/golden/<case>/` holds `policy.yaml`, `observed.yaml` (an observed
//! host) and `plan.txt` (the exact plan text). Adding a case means adding files, not code.
//! `UPDATE_GOLDEN=1 cargo test --test golden` rewrites `plan.txt` after a deliberate change.
//! The plan is the one `virtwarden plan` prints (start ordering applied); an optional
//! `missing-paths.txt` lists required paths that do not exist, one a line.

use virtwarden::observe::ObservedHost;
use virtwarden::plan::{plan_ordered, render_text};
use virtwarden_policies::load_paths;
use virtwarden_tests::{repo_path, sorted_entries};

#[test]
fn golden_plans_match() {
    let cases = sorted_entries(&repo_path("tests/golden"));
    assert!(cases.len() >= 10, "expected at least 10 golden cases");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in cases.iter().filter(|p| p.is_dir()) {
        let desired = load_paths(&[case.join("policy.yaml")])
            .unwrap_or_else(|e| panic!("{}: policy.yaml invalid:\n{e}", case.display()))
            .desired;
        let observed_text = std::fs::read_to_string(case.join("observed.yaml")).unwrap();
        let observed: ObservedHost = serde_saphyr::from_str(&observed_text)
            .unwrap_or_else(|e| panic!("{}: observed.yaml invalid: {e}", case.display()));
        let missing = std::fs::read_to_string(case.join("missing-paths.txt"))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let got = render_text(&plan_ordered(&desired, &observed, &missing));
        let plan_file = case.join("plan.txt");
        if update {
            std::fs::write(&plan_file, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&plan_file).unwrap_or_default();
        if got != want {
            failures.push(format!("{}:\n--- want\n{want}--- got\n{got}", case.display()));
        }
    }
    assert!(failures.is_empty(), "golden plans differ (UPDATE_GOLDEN=1 to accept):\n{}", failures.join("\n"));
}
