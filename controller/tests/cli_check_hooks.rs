//! `virtwarden check` warns (exit 0) about `exec` hooks whose command is missing or not
//! executable on this host (issue 18: the examples named a hook that did not exist).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn policy_with_hook(command: &str) -> String {
    format!(
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: hooks\nspec:\n  domains:\n    - name: vm1\n      remediation:\n        - action: start\n        - action: exec\n          after: 3\n          command: [\"{command}\", \"--now\"]\n"
    )
}

fn check(dir: &std::path::Path, command: &str) -> (Option<i32>, String) {
    let file = dir.join("p.yaml");
    std::fs::write(&file, policy_with_hook(command)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden")).args(["check", file.to_str().unwrap()]).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_warns_when_an_exec_hook_is_missing_or_not_executable_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = check(dir.path(), "/nonexistent/repair-vm");
    assert_eq!(code, Some(0), "a warning, not an error: {stderr}");
    let file = dir.path().join("p.yaml");
    assert!(
        stderr.contains(&format!("warning: {}:12:", file.display()))
            && stderr.contains("exec hook of domain vm1: /nonexistent/repair-vm does not exist"),
        "{stderr}"
    );

    let script = dir.path().join("repair");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = check(dir.path(), script.to_str().unwrap());
    assert_eq!(code, Some(0));
    assert!(stderr.contains("is not executable"), "{stderr}");

    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, stderr) = check(dir.path(), script.to_str().unwrap());
    assert_eq!(code, Some(0));
    assert!(!stderr.contains("exec hook"), "an installed hook is fine: {stderr}");
}
