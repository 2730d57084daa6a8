//! The bad-input corpus: every malformed policy in `tests/bad-policies/` must be rejected with
//! exactly the error its first line announces (`# expect: LINE:COL: message`), with a hint.

use virtwarden_policies::{load_paths, LoadError};
use virtwarden_tests::{repo_path, sorted_entries};

#[test]
fn every_bad_policy_is_rejected_with_its_exact_located_error() {
    let files = sorted_entries(&repo_path("tests/bad-policies"));
    assert!(files.len() >= 25, "the corpus must hold at least 25 files, has {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        let first = String::from_utf8_lossy(bytes.split(|b| *b == b'\n').next().unwrap_or_default()).to_string();
        let expected = first
            .strip_prefix("# expect: ")
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` first line", file.display()))
            .replace("{file}", &file.display().to_string());
        match load_paths(std::slice::from_ref(file)) {
            Ok(_) => failures.push(format!("{}: accepted, expected `{expected}`", file.display())),
            Err(LoadError::Invalid(diags)) => {
                let d = &diags[0];
                let got = format!("{}:{}: {}", d.position.line, d.position.column, d.message);
                if got != expected {
                    failures.push(format!("{}:\n  expected {expected}\n  got      {got}", file.display()));
                }
                if d.file != *file {
                    failures.push(format!("{}: diagnostic names {}", file.display(), d.file.display()));
                }
                if d.hint.is_none() {
                    failures.push(format!("{}: `{got}` has no hint", file.display()));
                }
            }
            Err(other) => failures.push(format!("{}: wrong error kind: {other}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{} of {} corpus files failed:\n{}", failures.len(), files.len(), failures.join("\n"));
}

#[test]
fn a_bad_file_among_good_ones_loads_nothing() {
    let good = repo_path("examples/policies");
    let bad = repo_path("tests/bad-policies/14-unknown-boot-device.yaml");
    let err = load_paths(&[good, bad]).expect_err("loading must fail as a whole");
    assert_eq!(err.diagnostics().len(), 1);
}

#[test]
fn conflicts_across_files_name_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |policy: &str| {
        format!("apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: {policy}\nspec:\n  domains:\n    - name: web1\n")
    };
    std::fs::write(dir.path().join("a.yaml"), doc("a")).unwrap();
    std::fs::write(dir.path().join("b.yml"), doc("b")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let err = load_paths(&[dir.path().to_path_buf()]).expect_err("duplicate domain");
    let text = err.to_string();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yml");
    assert!(
        text.contains(&format!("{}:7:13: domain `web1` is already declared at {}:7:13", b.display(), a.display())),
        "{text}"
    );
    assert!(text.ends_with("1 error found; no policy was loaded"), "{text}");
}

#[test]
fn examples_are_valid_and_merge() {
    let loaded = load_paths(&[repo_path("examples/policies")]).expect("examples must be valid");
    let d = &loaded.desired;
    assert_eq!(d.policies, ["database", "maintenance", "web-tier"]);
    let names: Vec<&str> = d.domains.iter().map(|m| m.spec.name.as_str()).collect();
    assert_eq!(names, ["db1", "batch1", "cache1", "web1", "web2"]);
    assert_eq!(d.domain("batch1").map(|m| m.policy.as_str()), Some("maintenance"));
}
