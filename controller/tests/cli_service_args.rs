//! `run` and `operator` take one set of service flags (clap `flatten`): the same help text for
//! each, and the same checks — `--resync 0s` is refused by both (the operator used to turn it
//! into 1 s silently).

use std::process::{Command, Output};

fn virtwarden(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(args)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env_remove("NODE_NAME")
        .env("VIRTWARDEN_LOCK_FILE", dir.path().join("virtwarden.lock"))
        .output()
        .expect("run virtwarden")
}

/// `--help` of a command, with no environment that shows up in it.
fn help(command: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args([command, "--help"])
        .env_remove("VIRTWARDEN_LOCK_FILE")
        .env_remove("NODE_NAME")
        .output()
        .expect("run virtwarden");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The help paragraph of each `--flag` in `help`, keyed by the flag.
fn flag_help(help: &str) -> Vec<(String, String)> {
    let mut flags = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in help.lines() {
        let t = line.trim();
        let is_flag = t.starts_with("--") || (t.starts_with('-') && t.contains(", --"));
        if is_flag {
            flags.extend(current.take());
            let name = t.split([' ', '=']).find(|w| w.starts_with("--")).unwrap_or("").to_string();
            current = Some((name, String::new()));
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(t);
            text.push('\n');
        }
    }
    flags.extend(current);
    flags
}

#[test]
fn run_and_operator_describe_their_shared_flags_identically() {
    let run = help("run");
    let operator = help("operator");
    let run_flags = flag_help(&run);
    let operator_flags = flag_help(&operator);
    let shared = [
        "--connect",
        "--resync",
        "--metrics-addr",
        "--state-dir",
        "--data-dir",
        "--lock-file",
        "--network",
        "--max-concurrent-starts",
    ];
    for flag in shared {
        let r = run_flags.iter().find(|(f, _)| f == flag).unwrap_or_else(|| panic!("run lacks {flag}:\n{run}"));
        let o = operator_flags
            .iter()
            .find(|(f, _)| f == flag)
            .unwrap_or_else(|| panic!("operator lacks {flag}:\n{operator}"));
        assert_eq!(r, o, "{flag} reads differently in run and operator");
        assert!(!r.1.trim().is_empty(), "{flag} has no help text");
    }
    assert!(operator_flags.iter().any(|(f, _)| f == "--node-name"), "{operator}");
    assert!(operator_flags.iter().any(|(f, _)| f == "--allow-exec-dir"), "{operator}");
}

#[test]
fn a_zero_resync_is_refused_by_run_and_by_operator() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let run = virtwarden(&["run", "--resync", "0s", "--state-dir", state, "/nonexistent"]);
    let operator = virtwarden(&["operator", "--node-name", "n1", "--resync", "0s", "--state-dir", state]);
    for (what, out) in [("run", run), ("operator", operator)] {
        assert_eq!(out.status.code(), Some(2), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--resync must be longer than 0s"),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
