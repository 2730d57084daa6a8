//! The `virtwarden` binary's exit codes and output, run as a user would run it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs the binary with its own host lock file, so parallel tests never contend (and never
/// touch the host's /run).
fn virtwarden(args: &[&str]) -> Output {
    let lock = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(args)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("VIRTWARDEN_LOCK_FILE", lock.path().join("virtwarden.lock"))
        .output()
        .expect("run virtwarden")
}

fn testbed() -> String {
    format!("test://{}", repo().join("examples/testbed/node.xml").display())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_exits_2_on_every_corpus_file_and_never_panics() {
    let dir = repo().join("tests/bad-policies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 25);
    for f in &files {
        let out = virtwarden(&["check", f.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", f.display());
        assert!(!stderr.contains("panicked"), "{}: {stderr}", f.display());
        assert!(
            stderr.starts_with(&format!("{}:", f.display())),
            "{}: error must start with file:line:col: {stderr}",
            f.display()
        );
        assert!(stderr.contains("hint: "), "{}: {stderr}", f.display());
    }
}

#[test]
fn check_accepts_the_examples() {
    let out = virtwarden(&["check", repo().join("examples/policies").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 2 file(s), 3 policies: 5 domain(s)"), "{}", text(&out.stdout));
}

#[test]
fn missing_policy_path_is_invalid_input() {
    let out = virtwarden(&["check", "/nonexistent/policy.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/policy.yaml does not exist"));
}

#[test]
fn plan_reports_drift_with_exit_3_and_json_for_machines() {
    let policies = repo().join("examples/policies");
    let out = virtwarden(&["plan", "--connect", &testbed(), policies.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("web1: shut off (unknown), policy wants running → start\n"), "{stdout}");
    assert!(stdout.ends_with("7 actions planned\n"), "{stdout}");
    assert!(!stdout.contains("legacy"), "unmanaged domain in plan: {stdout}");

    let out = virtwarden(&["plan", "-c", &testbed(), "--output", "json", policies.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["actions"].as_array().unwrap().len(), 7);
    assert!(json["actions"].as_array().unwrap().iter().any(|a| a["domain"] == "web1" && a["kind"] == "start"));
}

#[test]
fn apply_converges_and_exits_0() {
    let policies = repo().join("examples/policies");
    let out = virtwarden(&["apply", "--connect", &testbed(), policies.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("verify (observed again):\n  note: cache1"), "{stdout}");
    assert!(stdout.contains("  in sync: nothing to do\nconverged\n"), "{stdout}");
}

#[test]
fn apply_with_a_failing_action_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web2\n      boot: [fd]\n",
    )
    .unwrap();
    let out = virtwarden(&["apply", "-c", &testbed(), file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("FAILED  web2:"), "{}", text(&out.stdout));
}

#[test]
fn invalid_policy_exits_2_before_connecting() {
    let bad = repo().join("tests/bad-policies/14-unknown-boot-device.yaml");
    for cmd in ["plan", "apply"] {
        let out = virtwarden(&[cmd, "-c", "test:///default", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
    }
}

#[test]
fn unreachable_hypervisor_is_a_runtime_error() {
    let policies = repo().join("examples/policies");
    let out = virtwarden(&["plan", "-c", "test:///nonexistent/node.xml", policies.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot connect to test:///nonexistent/node.xml"), "{}", text(&out.stderr));
}

#[test]
fn schema_is_json_and_help_documents_exit_codes() {
    let out = virtwarden(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "HostPolicy");
    let help = text(&virtwarden(&["--help"]).stdout);
    assert!(help.contains("plan    0 in sync, 3 drift found, 2 invalid policy, 1 runtime error"), "{help}");
}

#[test]
fn a_held_start_is_drift_for_plan_and_not_converged_for_apply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: legacy\n      state: stopped\n    - name: web1\n      startup: {after: [legacy]}\n",
    )
    .unwrap();
    let line = "web1: shut off (unknown), policy wants running → start";
    let out = virtwarden(&["plan", "-c", &testbed(), file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("{line} (held: waits for legacy (not running))\n")), "{stdout}");
    assert!(stdout.ends_with("0 actions planned, 1 held\n"), "{stdout}");
    let out = virtwarden(&["apply", "-c", &testbed(), "--parallel", "4", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.ends_with("NOT converged: 0 action(s) failed, 1 still planned\n"), "{stdout}");
}

#[test]
fn apply_rejects_a_parallel_bound_of_zero() {
    let policies = repo().join("examples/policies");
    let out = virtwarden(&["apply", "-c", &testbed(), "--parallel", "0", policies.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`0` is not a number from 1 to 1024"), "{}", text(&out.stderr));
}

#[test]
fn release_of_a_bridge_lifts_its_held_uplink_change_in_the_memory_when_no_service_runs() {
    let data = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let memory = serde_json::json!({
        "format": 1,
        "domains": {},
        "uplinks": {"held": [{"bridge": "br0", "port": "up0", "reason": "ping 198.51.100.99 did not answer within 2s",
                               "at": "2026-12-06T04:00:00Z", "fingerprint": "{}"}]}
    });
    std::fs::write(data.path().join("memory.json"), memory.to_string()).unwrap();
    let args =
        ["release", "br0", "--state-dir", state.path().to_str().unwrap(), "--data-dir", data.path().to_str().unwrap()];
    let out = virtwarden(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "released up0 → br0 (held: ping 198.51.100.99 did not answer within 2s); it is tried again when virtwarden runs next\n"
    );
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("memory.json")).unwrap()).unwrap();
    assert!(after["uplinks"].get("held").is_none(), "{after}");
    // Nothing held any more: a second release lifts nothing of up0's.
    assert!(!text(&virtwarden(&args).stdout).contains("up0"));
}
